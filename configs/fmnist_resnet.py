"""Fashion-MNIST on a CPU with a ResNet-18: the CPU default's data, views and evaluators,
the paper's CNN backbone (torchvision layout, 'cifar' stem for 28 px images).

python -m lejepa_jax.main --config=configs/fmnist_resnet.py --workdir=/tmp/fmnist_resnet
python -m lejepa_jax.main --config=configs/fmnist_resnet.py:runlocal --workdir=/tmp/fmnist_r_local

What differs from configs/fmnist.py: the encoder, weight decay 5e-4 (the paper's value for
ResNets; 5e-2 is its ViT value), and the step count (see the README's CPU comparison).
"""
import ml_collections

from configs import fmnist


def get_config(arg=None):
  runlocal = arg == 'runlocal'
  if arg not in (None, '', 'runlocal'):
    raise ValueError(f"configs/fmnist_resnet.py takes no argument or 'runlocal', got {arg!r}")
  c = fmnist.get_config(arg)

  m = c.model
  for key in ('patch_size', 'depth', 'mlp_dim', 'num_heads', 'num_registers'):
    m[key] = 0                    # ViT-only keys (config.validate refuses them for ResNets)
  m.variant = 'resnet18'
  m.stem = 'cifar'                # 3x3 stride-1 stem, no max pool: 28 px -> a 4x4 last stage
  m.width = 64                    # torchvision's ResNet-18 (channels 64-128-256-512)
  m.scan = False                  # unused by ResNets
  m.conv = 'matmul'               # the same function, 2-10x faster on XLA:CPU (models/conv.py)
  c.optim.weight_decay = 5e-4     # the paper's weight decay for ResNets
  c.total_steps = 1500
  c.optim.warmup_steps = 150      # 10% of the run

  if runlocal:
    c.total_steps = 20
    c.optim.warmup_steps = 5
    m.width = 8                   # a narrow ResNet-18 keeps the end-to-end tests fast
  return ml_collections.ConfigDict(c)
