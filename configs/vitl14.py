"""ViT-L/14 on ImageNet-1k, 100 epochs: the paper's ablation range is 71.8-75.8% frozen
linear probe (online probe of ViT-L: 77.1%).

The same recipe as configs/vitg.py; configs/RECIPES.md gives every value's source.
  python -m lejepa_jax.plan --config=configs/vitl14.py --topology=v5p-32
  launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/workdir configs/vitl14.py
Arguments: runlocal (toy size on a CPU), epochs=N (default 100).
"""
from configs import vitg


def get_config(arg=None):
  args = vitg.parse_args(arg, 'vitl14')
  c = vitg.imagenet_vit('L', 14, epochs=float(args.get('epochs', 100)))
  return vitg.runlocal_of(c) if args.get('runlocal') else c
