"""ViT-L/14 on ImageNet-1k, 100 epochs: the paper's ablation range is 71.8-75.8% frozen
linear probe (online probe of ViT-L: 77.1%).

Table 1 settings (REFERENCE.md): lambda 0.05, 2 x 224 px + 6 x 98 px views, 1024 slices,
17 knots, AdamW lr 5e-4, weight decay 0.05, bf16; the same recipe as configs/vitg.py.
  python -m lejepa_jax.plan --config=configs/vitl14.py --topology=v5p-32
  launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/workdir configs/vitl14.py
Arguments: runlocal (toy size on a CPU), epochs=N (default 100).
"""
from configs import vitg


def get_config(arg=None):
  args = vitg.parse_args(arg, 'vitl14')
  c = vitg.imagenet_vit('L', 14, epochs=float(args.get('epochs', 100)))
  return vitg.runlocal_of(c) if args.get('runlocal') else c
