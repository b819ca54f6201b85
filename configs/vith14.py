"""ViT-H/14 on ImageNet-1k: the paper's headline, 79% frozen linear probe (abstract).

The same recipe as configs/vitg.py; configs/RECIPES.md gives every value's source.
  python -m lejepa_jax.plan --config=configs/vith14.py --topology=v5p-64
  launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/workdir configs/vith14.py
Arguments: runlocal (toy size on a CPU), epochs=N (default 100).
"""
from configs import vitg


def get_config(arg=None):
  args = vitg.parse_args(arg, 'vith14')
  c = vitg.imagenet_vit('H', 14, epochs=float(args.get('epochs', 100)))
  return vitg.runlocal_of(c) if args.get('runlocal') else c
