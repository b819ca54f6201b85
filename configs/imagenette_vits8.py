"""The paper's minimal recipe: ViT-S/8 at 128 px on Imagenette, 90.7% frozen linear probe
after 800 epochs (about 200 minutes on one GPU).

Settings (REFERENCE.md): lambda 0.02, V = 4 views of one size (128 px; here 4 global
views, no local ones, so the invariance centre is the mean of all four), projector to
16 dims, AdamW lr 2e-3, weight decay 0.05, batch 256, 256 slices, 17 knots, bf16.
Data: TFDS `imagenette` prepared as array_record under data.dir.
  python -m lejepa_jax.plan --config=configs/imagenette_vits8.py --topology=h100 --devices=1
  python -m lejepa_jax.main --config=configs/imagenette_vits8.py --workdir=DIR \\
      --config.data.dir=/path/to/tensorflow_datasets
Arguments: runlocal (toy size on a CPU), epochs=N (default 800).
"""
from configs import vitg

IMAGENETTE_TRAIN_SIZE = 9469


def get_config(arg=None):
  args = vitg.parse_args(arg, 'imagenette_vits8')
  c = vitg.imagenet_vit('S', 8, epochs=float(args.get('epochs', 800)), batch_size=256)
  c.lamb = 0.02
  c.log_every = 20
  c.checkpoint_every = 1000
  c.mesh = {'data': -1, 'fsdp': 1, 'tensor': 1}   # a 22M model: plain data parallel
  c.sigreg.num_slices = 256
  d = c.data
  d.name = 'tfds:imagenette'
  d.dir = ''                          # '': TFDS's default data directory
  d.num_classes = 10
  d.num_global_views = 4
  d.num_local_views = 0
  d.global_size = 128
  d.local_size = 128                  # unused (no local views)
  d.global_scale = (0.08, 1.0)        # one view size, the usual full RandomResizedCrop range
  c.model.remat = 'none'
  c.model.projector_hidden = (2048, 2048)
  c.model.projector_out = 16
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 10 * IMAGENETTE_TRAIN_SIZE // c.batch_size
  c.eval.batch_size = 512
  c.evals.linear_probe.batch_size = 1024
  c.evals.linear_probe.lrs = (1e-3, 3e-3, 1e-2)
  c.evals.linear_probe.epochs = 50
  c.evals.knn_curve.every = 50 * IMAGENETTE_TRAIN_SIZE // c.batch_size
  c.evals.knn_curve.max_examples = 0
  return vitg.runlocal_of(c) if args.get('runlocal') else c
