"""Vision Transformer encoder (Flax linen) with logical axis names for sharding.

Parameters and activations carry logical axis names ('embed', 'mlp', 'heads',
'kv', 'layers', 'batch', 'seq'); `lejepa_jax.sharding` maps them to mesh axes.
Blocks run under `nn.scan` (one compiled block, stacked parameters) with an
optional remat policy, so depth costs neither compile time nor activations.

Speed (measured with benchmarks/train_step.py; each is exact up to float rounding):
- all views of an image (global and local crops) run as one packed token sequence, so
  token-wise layers are one matmul per layer, not one per crop size;
- with unrolled blocks (model.scan=False) the last block computes its CLS tokens only
  (nothing else reads it), with keys and values folded into the query
  (`models/attention.py`): 40% fewer FLOPs for the 2-block CPU default
  (ViTConfig.cls_only_last, model.cls_only_last; the scanned blocks compute every token);
- GELU is recomputed in the backward pass and, without remat, the MLP's dense layers choose
  which operand their weight gradient transposes (`_dense_bwd`): fewer passes over the widest
  activations.

Stochastic depth (ViTConfig.drop_path_rate, as timm's `drop_path_rate`): in training, each
residual branch (attention and MLP) of block i is dropped for a whole sample with
probability rate * i / (depth - 1) and scaled by 1 / keep otherwise. A sample is one view
(crop), as in the reference code, which runs every crop as its own batch entry. The masks
come from one key per block split off the 'drop_path' rng stream at the top, so scanned
and unrolled encoders draw the same masks.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lejepa_jax.models.attention import Attention, cls_tokens, join_views

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
  # With scan=False, the last block computes its CLS tokens only (the same outputs, fewer
  # FLOPs); False computes every token, as the scanned blocks always do.
  cls_only_last: bool = True
  drop_path_rate: float = 0.0   # stochastic depth of the last block (linear from 0 at the first)
  # 'exact' (erf): torch's nn.GELU(), which timm's ViTs (and the authors') use; 'tanh': the
  # tanh approximation, flax's default, which runs before this option existed were trained with.
  gelu: str = 'tanh'
  # > 0: a linear head (width -> head_dim) on the final CLS token, timm's `num_classes` head,
  # which the authors' runs use as the embedding (MINIMAL.md: num_classes=512).
  head_dim: int = 0


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
  config = ViTConfig(patch_size=patch_size, image_size=image_size, **base)
  if config.remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat must be one of {sorted(REMAT_POLICIES)}')
  if not 0.0 <= config.drop_path_rate < 1.0:
    raise ValueError(f'model.drop_path_rate must lie in [0, 1), got {config.drop_path_rate}')
  if config.gelu not in GELUS:
    raise ValueError(f'model.gelu must be one of {sorted(GELUS)}, got {config.gelu!r}')
  if config.attention not in (None, 'xla', 'cudnn'):
    raise ValueError(f"model.attention must be '', 'xla' or 'cudnn', got {config.attention!r}")
  return config


def _dense_autodiff(x, kernel, bias):
  return jnp.dot(x, kernel) + bias


# The same function with the backward pass below.
_dense_apply = jax.custom_vjp(_dense_autodiff)


def _dense_fwd(x, kernel, bias):
  return _dense_autodiff(x, kernel, bias), (x, kernel)


def _dense_bwd(residuals, dy):
  # What autodiff computes, with the kernel gradient taken as (dy^T x)^T when the input is
  # the wider side (mlp_out): XLA then transposes dy, not the 4x larger input.
  x, kernel = residuals
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  if x.shape[-1] > dy.shape[-1]:
    dkernel = jnp.dot(dy2.T, x2).T
  else:
    dkernel = jnp.dot(x2.T, dy2)
  return jnp.dot(dy, kernel.T), dkernel, jnp.sum(dy2, axis=0)


_dense_apply.defvjp(_dense_fwd, _dense_bwd)


class Dense(nn.Module):
  """nn.Dense (same parameters), optionally with the backward pass above.

  custom_grad: only without remat. A remat policy cannot save the output of a custom_vjp
  function (it is not a dot to the policy), so under `dots_no_batch` the whole MLP forward
  was recomputed in the backward pass: 12% more FLOPs for ViT-g (plan).
  """
  features: int
  axes: tuple
  dtype: Any = jnp.float32
  custom_grad: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), self.axes), (x.shape[-1], self.features))
    bias = self.param('bias', nn.with_logical_partitioning(
        nn.initializers.zeros, self.axes[-1:]), (self.features,))
    apply = _dense_apply if self.custom_grad else _dense_autodiff
    return apply(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))


def _dense(features, axes, cfg, name=None):
  return Dense(features, axes, cfg.dtype, custom_grad=cfg.remat == 'none', name=name)


# GELU keeps only its input for the backward pass and recomputes the rest there, instead of
# writing its tanh (or erf) and reading it back: two fewer passes over the widest activations.
GELUS = {
    'exact': jax.checkpoint(lambda x: nn.gelu(x, approximate=False)),
    'tanh': jax.checkpoint(lambda x: nn.gelu(x, approximate=True)),
}


def _layer_norm(dtype, name=None):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


def _keep_scale(key, rate, batch: int, views, tokens_per_view: bool, dtype):
  """Per-view stochastic-depth multipliers: 0 (dropped, probability `rate`) or 1 / (1 - rate),
  shaped (B, sum V_i S_i, 1) to multiply packed tokens, or (B, sum V_i, 1) for CLS tokens."""
  keep = 1.0 - rate
  kept = jax.random.uniform(key, (batch, sum(v for v, _ in views))) < keep
  scale = jnp.where(kept, 1.0 / keep, 0.0).astype(dtype)
  if tokens_per_view:    # every token of a view takes its view's multiplier (a static gather)
    scale = scale[:, np.repeat(np.arange(scale.shape[1]), [s for v, s in views for _ in range(v)])]
  return scale[..., None]


class Block(nn.Module):
  """Pre-norm transformer block; returns (tokens, CLS tokens) for nn.scan.

  x: (B, S, D) or packed views (see Attention). The second output is the CLS token,
  (B, D), or the CLS token of every view, (B, sum V_i, D), when `views` is set.
  cls_only: compute only the CLS tokens' outputs (the first output is then the CLS tokens).
  drop: None (no stochastic depth) or (rate, key) of this block: each residual branch is
  dropped per view with probability `rate` (see the module docstring).
  """
  config: ViTConfig
  views: tuple | None = None
  cls_only: bool = False

  @nn.compact
  def __call__(self, x, drop=None):
    cfg = self.config
    views = self.views or ((1, x.shape[1]),)
    scale = lambda k, tokens: 1.0   # noqa: E731  (no stochastic depth)
    if drop is not None:
      rate, key = drop
      keys = jax.random.split(key)
      scale = lambda k, tokens: _keep_scale(keys[k], rate, x.shape[0], views, tokens, cfg.dtype)
    y = _layer_norm(cfg.dtype, 'norm1')(x)
    y = Attention(cfg, self.views, self.cls_only, name='attn')(y)
    if self.cls_only:
      x = cls_tokens(x, views)
    x = x + y * scale(0, not self.cls_only)
    y = _layer_norm(cfg.dtype, 'norm2')(x)
    y = _dense(cfg.mlp_dim, ('embed', 'mlp'), cfg, 'mlp_in')(y)
    y = GELUS[cfg.gelu](y)
    y = nn.with_logical_constraint(y, ('batch', 'seq', 'mlp'))
    y = _dense(cfg.width, ('mlp', 'embed'), cfg, 'mlp_out')(y)
    x = nn.with_logical_constraint(x + y * scale(1, not self.cls_only), ('batch', 'seq', 'embed'))
    cls = x if self.cls_only else cls_tokens(x, views)
    return x, (cls if self.views else cls[:, 0])


def drop_path_rates(rate: float, depth: int) -> jax.Array:
  """timm's schedule: linearly from 0 at the first block to `rate` at the last."""
  return jnp.linspace(0.0, rate, depth)


def unboxed(tree):
  """The arrays of a tree of nn.Partitioned parameters (their logical axis names dropped);
  no sharding constraint is applied (that needs real devices)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned)
                      else x, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _resize_grid(pos: jax.Array, grid: int, new_grid: int) -> jax.Array:
  """Bilinear resize of (1, grid*grid, D) position embeddings to new_grid."""
  if grid == new_grid:
    return pos
  d = pos.shape[-1]
  pos = pos.reshape(1, grid, grid, d)
  pos = jax.image.resize(pos, (1, new_grid, new_grid, d), 'bilinear', antialias=False)
  return pos.reshape(1, new_grid * new_grid, d)


class ViT(nn.Module):
  """ViT encoder.

  images: (B, H, W, C) with H == W a multiple of the patch size; returns a dict
    'cls': final-LayerNorm CLS token (B, D), the input of the projector (of the head, if any);
    'head': with head_dim > 0 only, the linear head on 'cls' (B, head_dim), timm's
      classifier head, the projector's input then;
    'probe_features': CLS tokens of the last two blocks concatenated (B, 2D),
      the frozen-evaluation features (paper's probe protocol).
  Or several views of each image, a sequence of arrays (B, V_i, H_i, W_i, C) (e.g. global
  and local crops): all views run as one packed token sequence per image (token-wise layers
  see every view at once; attention stays within a view), and the outputs are (B, sum V_i, D)
  and (B, sum V_i, 2D), views in the order given.
  Position embeddings are learned on the global-crop grid and resized
  bilinearly for other crop sizes (local crops).
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, images, train: bool = False) -> dict[str, jax.Array]:
    """train=True with config.drop_path_rate > 0 draws stochastic depth from the
    'drop_path' rng stream; otherwise the encoder is deterministic."""
    cfg = self.config
    single = not isinstance(images, (tuple, list))
    groups = [images[:, None]] if single else list(images)
    patch_embed = nn.Conv(
        cfg.width, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2, padding='VALID',
        dtype=cfg.dtype, name='patch_embed',
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (None, None, None, 'embed')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))
    base_grid = cfg.image_size // cfg.patch_size
    pos = self.param('pos_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, 'seq', 'embed')),
        (1, base_grid * base_grid, cfg.width))
    cls = self.param('cls', nn.with_logical_partitioning(
        nn.initializers.zeros, (None, None, 'embed')), (1, 1, cfg.width))
    prefix = [cls]
    if cfg.num_registers:
      prefix.append(self.param('registers', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, None, 'embed')), (1, cfg.num_registers, cfg.width)))
    prefix = jnp.concatenate(prefix, axis=1).astype(cfg.dtype)

    b = groups[0].shape[0]
    tokens, views = [], []
    for crops in groups:
      _, v, h, w, _ = crops.shape
      if h != w or h % cfg.patch_size:
        raise ValueError(f'crops must be square multiples of the patch size {cfg.patch_size}, '
                         f'got {h}x{w}')
      x = patch_embed(crops.reshape((b * v,) + crops.shape[2:]).astype(cfg.dtype))
      grid = h // cfg.patch_size
      x = x.reshape(b * v, grid * grid, cfg.width)
      x = x + _resize_grid(pos, base_grid, grid).astype(cfg.dtype)
      x = jnp.concatenate([jnp.broadcast_to(prefix, (b * v,) + prefix.shape[1:]), x], axis=1)
      tokens.append(x)
      views.append((v, x.shape[1]))
    views = tuple(views)
    x = join_views(tokens, b)
    x = nn.with_logical_constraint(x, ('batch', 'seq', 'embed'))

    # Stochastic depth: (rate, key) per block, as arrays with a leading depth axis (scanned).
    drop = None
    if train and cfg.drop_path_rate > 0:
      drop = (drop_path_rates(cfg.drop_path_rate, cfg.depth),
              jax.random.split(self.make_rng('drop_path'), cfg.depth))
    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan)
    if cfg.scan:
      blocks = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                       length=cfg.depth, metadata_params={nn.PARTITION_NAME: 'layers'})
      x, cls_per_layer = blocks(cfg, views, name='blocks')(x, drop)
      x = cls_tokens(x, views)
    else:
      cls_list = []
      for i in range(cfg.depth):
        # Nothing reads the last block's other tokens: it computes the CLS tokens only.
        last = cfg.cls_only_last and i == cfg.depth - 1
        x, c = block(cfg, views, last, name=f'block_{i}')(
            x, None if drop is None else jax.tree.map(lambda a: a[i], drop))
        cls_list.append(c)
      cls_per_layer = jnp.stack(cls_list)
      if not last:
        x = cls_tokens(x, views)
    x = _layer_norm(cfg.dtype, 'final_norm')(x)                        # (B, sum V_i, D)
    last_two = cls_per_layer[-2:] if cfg.depth > 1 else jnp.concatenate([cls_per_layer] * 2)
    probe_features = jnp.concatenate([last_two[0], last_two[1]], axis=-1)
    out = {'cls': x.astype(jnp.float32), 'probe_features': probe_features.astype(jnp.float32)}
    if cfg.head_dim:
      out['head'] = nn.Dense(
          cfg.head_dim, dtype=cfg.dtype, name='head',
          kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                   ('embed', None)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(
              x).astype(jnp.float32)
    return jax.tree.map(lambda a: a[:, 0], out) if single else out
