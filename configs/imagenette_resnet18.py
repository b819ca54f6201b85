"""In-domain pretraining with a ResNet-18 on Imagenette, the paper's in-domain setting
(LeJEPA, Balestriero & LeCun 2025, the in-domain table: frozen-probe top-1 92.36 for
ResNet-18 and 92.80 for ResNet-34 on Imagenette, pretrained on Imagenette alone).

The recipe is the paper's default one at its resolution (the ImageNet recipe of
configs/vitg.py: 2 global views of 224 px, scale 0.3-1, and 6 local views of 98 px, scale
0.05-0.3, lambda 0.05, AdamW lr 5e-4, bf16, the BatchNorm projector to 64 dimensions) with
what the paper sets for ResNets: weight decay 5e-4 (ViTs: 5e-2). The encoder is torchvision's
ResNet-18 (models/resnet.py; 'imagenet' stem); the projector and the frozen probes read its
global-average-pooled 512-d features. Not given by the sources and chosen here: 400 epochs
(the paper's ImageNet-100 ResNet-50 run), batch 256, 10 warm-up epochs.
`--config.model.variant=resnet34` (or resnet50) is the table's other rows.

Data: TFDS `imagenette/320px-v2` (shorter side 320 px) prepared under data.dir.
  python -m lejepa_jax.plan --config=configs/imagenette_resnet18.py --topology=v5p-8
  python -m lejepa_jax.main --config=configs/imagenette_resnet18.py --workdir=DIR \\
      --config.data.dir=/path/to/tensorflow_datasets
Arguments: runlocal (the same code path at toy size on Fashion-MNIST, a minute on a CPU),
epochs=N (default 400).
"""
import ml_collections

from configs import vitg

IMAGENETTE_TRAIN_SIZE = 9469
BATCH_SIZE = 256
STEPS_PER_EPOCH = IMAGENETTE_TRAIN_SIZE // BATCH_SIZE


def resnet_model(m, variant: str) -> None:
  """Turns a ViT recipe's model block into a ResNet's: the ViT-only keys at their defaults."""
  m.variant = variant
  for key in ('patch_size', 'depth', 'mlp_dim', 'num_heads', 'num_registers', 'width'):
    m[key] = 0
  m.remat = 'none'
  m.drop_path_rate = 0.0
  m.attention = ''
  m.stem = 'imagenet'
  m.conv = 'xla'
  m.embedding_dim = 0                # the projector reads the pooled features


def get_config(arg=None):
  args = vitg.parse_args(arg, 'imagenette_resnet18')
  epochs = float(args.get('epochs', 400))
  c = vitg.imagenet_vit('S', 8, epochs=epochs, batch_size=BATCH_SIZE)
  resnet_model(c.model, 'resnet18')
  c.total_steps = int(epochs) * STEPS_PER_EPOCH
  c.log_every = 20
  c.checkpoint_every = 1000
  c.mesh = {'data': -1, 'fsdp': 1, 'tensor': 1}   # an 11M model: plain data parallel
  d = c.data
  d.name = 'tfds:imagenette/320px-v2'
  d.dir = ''                          # '': TFDS's default data directory
  d.num_classes = 10
  o = c.optim
  o.weight_decay = 5e-4               # the paper's value for ResNets
  o.warmup_steps = 10 * STEPS_PER_EPOCH
  c.eval.batch_size = 512
  c.diagnostics.every = STEPS_PER_EPOCH * 10
  c.evals.online_probe.every = STEPS_PER_EPOCH * 10
  c.evals.knn_curve.every = 50 * STEPS_PER_EPOCH
  c.evals.knn_curve.max_examples = 0
  c.evals.linear_probe.batch_size = 1024
  c.evals.linear_probe.lrs = (1e-3, 3e-3, 1e-2)
  c.evals.linear_probe.epochs = 50
  if args.get('runlocal'):
    local = vitg.runlocal_of(c)      # Fashion-MNIST, toy sizes, this config's evaluators
    resnet_model(local.model, c.model.variant)
    local.model.width = 8            # a narrow ResNet-18
    local.model.stem = 'cifar'       # 28 px images
    local.model.conv = 'matmul'
    local.optim.weight_decay = c.optim.weight_decay
    return local
  return ml_collections.ConfigDict(c)
