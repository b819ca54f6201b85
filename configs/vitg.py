"""The paper's 1.8B-parameter ViT-g/14 on ImageNet-1k, for a TPU pod (or a GPU cluster).

Data: a TFDS `imagenet2012` prepared as array_record under data.dir (no
download at run time). Launch: launch/tpu_pod.sh. Arguments (comma separated):
  runlocal  - a tiny ViT on Fashion-MNIST for about a minute on a CPU (tests);
  epochs=N  - pretraining epochs (default 100).
"""
import ml_collections

from configs import fmnist


def _parse(arg):
  out = {}
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    out[key] = value or True
  unknown = set(out) - {'runlocal', 'epochs'}
  if unknown:
    raise ValueError(f'configs/vitg.py: unknown arguments {sorted(unknown)}')
  return out


def get_config(arg=None):
  args = _parse(arg)
  c = fmnist.get_config()            # every key exists in both; override what differs
  c.seed = 0
  c.batch_size = 2048
  c.total_steps = 0
  c.epochs = float(args.get('epochs', 100))
  c.lamb = 0.05
  c.log_every = 50
  c.checkpoint_every = 2000
  c.mesh = {'data': 1, 'fsdp': -1, 'tensor': 1}   # FSDP over the pod

  c.sigreg.num_slices = 1024
  c.sigreg.t_max = 3.0
  c.sigreg.num_points = 17
  c.sigreg.quadrature = 'trapezoid'   # or simpson, trapezoid_symmetric (paper Alg. 1), gauss_hermite
  c.sigreg.statistic = 'epps_pulley'  # any name in lejepa_jax.stats.STATISTICS
  c.sigreg.options = {}               # extra keyword arguments for the statistic

  d = c.data
  d.name = 'tfds:imagenet2012'
  d.dir = 'gs://YOUR_BUCKET/tensorflow_datasets'
  d.train_split = 'train'
  d.test_split = 'validation'
  d.num_classes = 1000
  d.channels = 3
  d.mean = (0.485, 0.456, 0.406)
  d.std = (0.229, 0.224, 0.225)
  d.num_global_views = 2
  d.num_local_views = 6
  d.global_size = 224
  d.local_size = 98
  d.global_scale = (0.3, 1.0)
  d.local_scale = (0.05, 0.3)
  d.eval_crop_fraction = 0.875
  d.num_threads = 16
  d.prefetch = 4
  d.num_workers = 32
  d.augment.blur_sigma = (0.1, 2.0)

  m = c.model
  m.variant = 'g'
  m.patch_size = 14
  m.width = 0                        # 0: from the variant table
  m.depth = 0
  m.mlp_dim = 0
  m.num_heads = 0
  m.num_registers = 0
  m.dtype = 'bfloat16'
  m.remat = 'dots_no_batch'
  m.scan = True
  m.projector_hidden = (2048, 2048)
  m.projector_out = 64

  o = c.optim
  o.lr = 5e-4 * c.batch_size / 256
  o.warmup_steps = 10 * 1281167 // c.batch_size
  o.weight_decay = 0.05
  o.probe_lr = 1e-3

  e = c.eval
  e.batch_size = 2048
  e.probe_lrs = (1e-4, 3e-4, 1e-3, 3e-3)
  e.probe_epochs = 20
  e.probe_batch_size = 4096

  if args.get('runlocal'):
    local = fmnist.get_config('runlocal')
    local.model.scan = True
    local.model.remat = 'full'
    local.mesh = {'data': 1, 'fsdp': -1, 'tensor': 1}
    return local
  return c
