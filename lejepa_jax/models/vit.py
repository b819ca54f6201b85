"""Vision Transformer encoder (Flax linen) with logical axis names for sharding.

Parameters and activations carry logical axis names ('embed', 'mlp', 'heads',
'kv', 'layers', 'batch', 'seq'); `lejepa_jax.sharding` maps them to mesh axes.
Blocks run under `nn.scan` (one compiled block, stacked parameters) with an
optional remat policy, so depth costs neither compile time nor activations.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# name: (width, depth, mlp_dim, num_heads)
VARIANTS = {
    'mu': (128, 4, 512, 4),        # CPU-sized, not in the paper
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1664, 48, 8192, 16),     # the paper's 1.8B-parameter ViT-g
}

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int            # size of the global crops; sets the position grid
  num_registers: int = 0
  dtype: Any = jnp.float32   # activation dtype; parameters stay float32
  remat: str = 'none'
  scan: bool = True
  attention: str | None = None  # jax.nn.dot_product_attention implementation: None, 'xla', 'cudnn'


def vit_config(variant: str, *, patch_size: int, image_size: int, **overrides) -> ViTConfig:
  """A ViTConfig from the variant table; overrides (e.g. depth=6) win."""
  if variant not in VARIANTS:
    raise ValueError(f'model.variant must be one of {sorted(VARIANTS)}, got {variant!r}')
  width, depth, mlp_dim, num_heads = VARIANTS[variant]
  base = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  base.update({k: v for k, v in overrides.items() if v is not None})
  if image_size % patch_size:
    raise ValueError(f'image size {image_size} is not a multiple of patch size {patch_size}')
  if base['width'] % base['num_heads']:
    raise ValueError(f'width {base["width"]} is not divisible by num_heads {base["num_heads"]}')
  if overrides.get('remat', 'none') not in REMAT_POLICIES:
    raise ValueError(f'model.remat must be one of {sorted(REMAT_POLICIES)}')
  if overrides.get('attention') not in (None, 'xla', 'cudnn'):
    raise ValueError(f"model.attention must be '', 'xla' or 'cudnn', got {overrides['attention']!r}")
  return ViTConfig(patch_size=patch_size, image_size=image_size, **base)


def _dense(features, axes, dtype, name=None):
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def _layer_norm(dtype, name=None):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


class Attention(nn.Module):
  """Multi-head self-attention with (embed, heads, head_dim) kernels for sharding."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    head_dim = cfg.width // cfg.num_heads
    init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2, 3))
    qkv_kernel = self.param('qkv_kernel', nn.with_logical_partitioning(
        init, ('embed', None, 'heads', 'kv')), (cfg.width, 3, cfg.num_heads, head_dim))
    qkv_bias = self.param('qkv_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, (None, 'heads', 'kv')), (3, cfg.num_heads, head_dim))
    qkv = jnp.einsum('bsd,dthk->tbshk', x, qkv_kernel.astype(cfg.dtype)) + \
        qkv_bias.astype(cfg.dtype)[:, None, None]
    # One place to pick the kernel: XLA everywhere, cuDNN flash attention on GPUs
    # (model.attention='cudnn'); logits and softmax are computed in float32.
    y = jax.nn.dot_product_attention(qkv[0], qkv[1], qkv[2], implementation=cfg.attention)
    out_kernel = self.param('out_kernel', nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2), ('heads', 'kv', 'embed')),
        (cfg.num_heads, head_dim, cfg.width))
    out_bias = self.param('out_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('embed',)), (cfg.width,))
    return jnp.einsum('bqhk,hkd->bqd', y, out_kernel.astype(cfg.dtype)) + out_bias.astype(cfg.dtype)


class Block(nn.Module):
  """Pre-norm transformer block; returns (tokens, CLS token) for nn.scan."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x, _=None):
    cfg = self.config
    y = _layer_norm(cfg.dtype, 'norm1')(x)
    y = Attention(cfg, name='attn')(y)
    x = x + y
    y = _layer_norm(cfg.dtype, 'norm2')(x)
    y = _dense(cfg.mlp_dim, ('embed', 'mlp'), cfg.dtype, 'mlp_in')(y)
    y = nn.gelu(y)
    y = nn.with_logical_constraint(y, ('batch', 'seq', 'mlp'))
    y = _dense(cfg.width, ('mlp', 'embed'), cfg.dtype, 'mlp_out')(y)
    x = nn.with_logical_constraint(x + y, ('batch', 'seq', 'embed'))
    return x, x[:, 0]


def _resize_grid(pos: jax.Array, grid: int, new_grid: int) -> jax.Array:
  """Bilinear resize of (1, grid*grid, D) position embeddings to new_grid."""
  if grid == new_grid:
    return pos
  d = pos.shape[-1]
  pos = pos.reshape(1, grid, grid, d)
  pos = jax.image.resize(pos, (1, new_grid, new_grid, d), 'bilinear', antialias=False)
  return pos.reshape(1, new_grid * new_grid, d)


class ViT(nn.Module):
  """ViT encoder. images (B, H, W, C) with H == W a multiple of the patch size.

  Returns a dict:
    'cls': final-LayerNorm CLS token (B, D), the input of the projector;
    'probe_features': CLS tokens of the last two blocks concatenated (B, 2D),
      the frozen-evaluation features (paper's probe protocol).
  Position embeddings are learned on the global-crop grid and resized
  bilinearly for other crop sizes (local crops).
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    cfg = self.config
    b, h, w, _ = images.shape
    if h != w or h % cfg.patch_size:
      raise ValueError(f'crops must be square multiples of the patch size {cfg.patch_size}, got {h}x{w}')
    x = nn.Conv(cfg.width, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                padding='VALID', dtype=cfg.dtype, name='patch_embed',
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))(images.astype(cfg.dtype))
    grid = h // cfg.patch_size
    x = x.reshape(b, grid * grid, cfg.width)
    base_grid = cfg.image_size // cfg.patch_size
    pos = self.param('pos_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, 'seq', 'embed')), (1, base_grid * base_grid, cfg.width))
    x = x + _resize_grid(pos, base_grid, grid).astype(cfg.dtype)
    cls = self.param('cls', nn.with_logical_partitioning(nn.initializers.zeros, (None, None, 'embed')),
                     (1, 1, cfg.width))
    prefix = [jnp.broadcast_to(cls, (b, 1, cfg.width)).astype(cfg.dtype)]
    if cfg.num_registers:
      registers = self.param('registers', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, None, 'embed')), (1, cfg.num_registers, cfg.width))
      prefix.append(jnp.broadcast_to(registers, (b, cfg.num_registers, cfg.width)).astype(cfg.dtype))
    x = jnp.concatenate(prefix + [x], axis=1)
    x = nn.with_logical_constraint(x, ('batch', 'seq', 'embed'))

    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan)
    if cfg.scan:
      blocks = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                       length=cfg.depth, metadata_params={nn.PARTITION_NAME: 'layers'})
      x, cls_per_layer = blocks(cfg, name='blocks')(x, None)
    else:
      cls_list = []
      for i in range(cfg.depth):
        x, c = block(cfg, name=f'block_{i}')(x, None)
        cls_list.append(c)
      cls_per_layer = jnp.stack(cls_list)
    x = _layer_norm(cfg.dtype, 'final_norm')(x)
    last_two = cls_per_layer[-2:] if cfg.depth > 1 else jnp.concatenate([cls_per_layer] * 2)
    probe_features = jnp.concatenate([last_two[0], last_two[1]], axis=-1)
    return {'cls': x[:, 0].astype(jnp.float32), 'probe_features': probe_features.astype(jnp.float32)}
