"""ResNet encoders (Flax linen), the torchvision / timm layout, with logical axis names.

ResNet-18 / 34 (basic blocks) and ResNet-50 (bottlenecks, stride on the 3x3 conv: the
"v1.5" layout of torchvision and timm's `resnet50`). Parameter names follow the PyTorch
state dict (`conv1`, `bn1`, `layer2_0/conv1`, `layer2_0/downsample_0` for
`layer2.0.downsample.0`, ...), so a timm file maps onto them key by key.

Initialisation as timm's ResNet (He et al. 2015, "Deep Residual Learning"; timm
`resnet.py`): convolutions He-normal on fan-out, BatchNorm scale 1 and bias 0, and the
last BatchNorm of every residual branch starts at scale 0 (timm's `zero_init_last=True`)
so each block starts as the identity.

BatchNorm (momentum 0.1 in PyTorch's convention, eps 1e-5) normalises a training batch
with its own statistics. Under jit the batch axis is the global batch however the mesh
splits it (XLA adds the cross-device reductions), so the statistics, the running averages
and the gradients are the same on one device and on many; evaluation uses the running
averages. Several views of an image run as one batch per crop size (all global crops
together, all local crops together), as the reference code feeds its crops.

Stems: 'imagenet' is the 7x7 stride-2 convolution and 3x3 stride-2 max pool of the paper
layout (224 px inputs: a 7x7 grid at the last stage); 'cifar' is a 3x3 stride-1 convolution
without the pool, the usual adaptation for 32 px images (a 4x4 grid at the last stage).

The features are the global average pool of the last stage (512 for ResNet-18/34, 2048 for
ResNet-50): the projector's input and, for CNNs, the frozen probe's features as in the paper.
Logical axes: every convolution kernel and BatchNorm parameter is sharded on its output
channels ('conv_out', the fsdp mesh axis), activations on 'batch'.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lejepa_jax.models.conv import conv_general_dilated_matmul

# name: (block kind, blocks per stage)
VARIANTS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
}
STEMS = ('imagenet', 'cifar')
CONVS = ('xla', 'matmul')   # model.conv: XLA's convolution, or models/conv.py's
EXPANSION = {'basic': 1, 'bottleneck': 4}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  variant: str
  block: str                    # 'basic' | 'bottleneck'
  stage_sizes: tuple[int, ...]
  width: int = 64               # channels of the stem and of the first stage (doubled per stage)
  stem: str = 'imagenet'
  dtype: Any = jnp.float32      # activation dtype; parameters and BatchNorm statistics float32
  head_dim: int = 0             # > 0: a linear head on the pooled features (timm's num_classes)
  conv: str = 'xla'             # 'matmul': one matmul per kernel tap (fast on XLA:CPU)

  @property
  def features(self) -> int:
    """Width of the pooled features."""
    return self.width * 2 ** (len(self.stage_sizes) - 1) * EXPANSION[self.block]


def is_resnet(variant: str) -> bool:
  return variant in VARIANTS


def resnet_config(variant: str, *, width: int = 0, stem: str = 'imagenet', dtype=jnp.float32,
                  head_dim: int = 0, conv: str = 'xla') -> ResNetConfig:
  if variant not in VARIANTS:
    raise ValueError(f'model.variant must be one of {sorted(VARIANTS)}, got {variant!r}')
  if stem not in STEMS:
    raise ValueError(f'model.stem must be one of {STEMS}, got {stem!r}')
  if conv not in CONVS:
    raise ValueError(f'model.conv must be one of {CONVS}, got {conv!r}')
  block, stages = VARIANTS[variant]
  return ResNetConfig(variant=variant, block=block, stage_sizes=stages, width=width or 64,
                      stem=stem, dtype=dtype, head_dim=head_dim,
                      conv=conv)


def forward_flops(cfg: ResNetConfig, size: int, channels: int) -> int:
  """Flops (2 per multiply-add) of the convolutions and the head of one image's forward pass
  at size x size: the analytic count `plan` sets beside the compiled one."""
  total, side, cin = 0, size, channels

  def conv(cout, kernel, stride):
    nonlocal total, side, cin
    side = (side + 2 * (kernel // 2) - kernel) // stride + 1
    total += 2 * side * side * kernel * kernel * cin * cout
    cin = cout
  imagenet = cfg.stem == 'imagenet'
  conv(cfg.width, 7 if imagenet else 3, 2 if imagenet else 1)
  if imagenet:
    side = (side + 2 - 3) // 2 + 1            # the max pool
  for stage, blocks in enumerate(cfg.stage_sizes):
    planes = cfg.width * 2 ** stage
    for i in range(blocks):
      stride = 2 if stage > 0 and i == 0 else 1
      block_in = cin
      if cfg.block == 'basic':
        conv(planes, 3, stride)
        conv(planes, 3, 1)
      else:
        conv(planes, 1, 1)
        conv(planes, 3, stride)
        conv(planes * 4, 1, 1)
      if stride != 1 or block_in != cin:      # the projection shortcut
        total += 2 * side * side * block_in * cin
  return total + 2 * cin * cfg.head_dim


def _conv(features, kernel, stride, cfg, name):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False, dtype=cfg.dtype,
                 name=name, conv_general_dilated=(conv_general_dilated_matmul
                                                  if cfg.conv == 'matmul' else None),
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                     (None, None, None, 'conv_out')))


def _batch_norm(train, cfg, name, zero=False):
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=cfg.dtype, name=name,
      scale_init=nn.with_logical_partitioning(
          nn.initializers.zeros if zero else nn.initializers.ones, ('conv_out',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)))


class Block(nn.Module):
  """One residual block: basic (3x3, 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 x4)."""
  config: ResNetConfig
  channels: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    cfg = self.config
    if cfg.block == 'basic':
      layers = [(self.channels, 3, self.stride), (self.channels, 3, 1)]
    else:
      layers = [(self.channels, 1, 1), (self.channels, 3, self.stride),
                (self.channels * 4, 1, 1)]
    y = x
    for i, (features, kernel, stride) in enumerate(layers, 1):
      y = _conv(features, kernel, stride, cfg, f'conv{i}')(y)
      y = _batch_norm(train, cfg, f'bn{i}', zero=i == len(layers))(y)
      if i < len(layers):
        y = nn.relu(y)
    out_channels = layers[-1][0]
    if self.stride != 1 or x.shape[-1] != out_channels:
      x = _conv(out_channels, 1, self.stride, cfg, 'downsample_0')(x)
      x = _batch_norm(train, cfg, 'downsample_1')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet encoder with ViT's interface (see models/vit.py):

  images (B, H, W, C) -> {'cls': pooled features (B, F), 'probe_features': the same,
  'head': with head_dim > 0, the linear head on them}; or a sequence of view groups
  (B, V_i, H_i, W_i, C) -> (B, sum V_i, F), each group one BatchNorm batch.
  """
  config: ResNetConfig

  @nn.compact
  def __call__(self, images, train: bool = False) -> dict[str, jax.Array]:
    cfg = self.config
    single = not isinstance(images, (tuple, list))
    groups = [images[:, None]] if single else list(images)
    # Built once, applied to each view group (shared weights; BatchNorm per group).
    stem_conv = _conv(cfg.width, 7 if cfg.stem == 'imagenet' else 3,
                      2 if cfg.stem == 'imagenet' else 1, cfg, 'conv1')
    stem_bn = _batch_norm(train, cfg, 'bn1')
    stages = [[Block(cfg, cfg.width * 2 ** stage, 2 if stage > 0 and i == 0 else 1,
                     name=f'layer{stage + 1}_{i}') for i in range(blocks)]
              for stage, blocks in enumerate(cfg.stage_sizes)]

    def pooled(x):
      x = nn.with_logical_constraint(x.astype(cfg.dtype), ('batch', None, None, None))
      x = nn.relu(stem_bn(stem_conv(x)))
      if cfg.stem == 'imagenet':
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
      for stage in stages:
        for block in stage:
          x = block(x, train)
        x = nn.with_logical_constraint(x, ('batch', None, None, None))
      return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    x = jnp.concatenate([pooled(crops.reshape((-1,) + crops.shape[2:]))
                         .reshape(crops.shape[0], crops.shape[1], -1) for crops in groups], axis=1)
    out = {'cls': x, 'probe_features': x}
    if cfg.head_dim:
      out['head'] = nn.Dense(
          cfg.head_dim, name='fc',
          kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                   ('conv_out', None)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x)
    return jax.tree.map(lambda a: a[:, 0], out) if single else out
