"""Multi-head self-attention over packed views (Flax linen), with logical axis names.

A packed token sequence holds, for every image, the tokens of all its views one view after
another (see below); the ViT's token-wise layers see them as one array, and only attention
splits them back into views (`models/vit.py`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


# A packed token sequence holds, for every image, the tokens of all its views one view after
# another: `views` = ((V_0, S_0), (V_1, S_1), ...) says V_i views of S_i tokens each, CLS first.
# Token-wise layers (LayerNorm, projections, MLP) see one (B, sum V_i S_i, D) array; only
# attention splits it back into views.

def split_views(x, views):
  """(B, sum V_i S_i, ...) -> [(B * V_i, S_i, ...)] (tokens of each view)."""
  out, start = [], 0
  for v, s in views:
    part = x[:, start:start + v * s]
    out.append(part.reshape((x.shape[0] * v, s) + x.shape[2:]))
    start += v * s
  return out


def join_views(parts, batch):
  """Inverse of split_views: [(B * V_i, S_i, ...)] -> (B, sum V_i S_i, ...)."""
  parts = [p.reshape((batch, -1) + p.shape[2:]) for p in parts]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def cls_tokens(x, views):
  """The first token of every view: (B, sum V_i S_i, D) -> (B, sum V_i, D)."""
  parts, start = [], 0
  for v, s in views:
    parts.append(x[:, start:start + v * s:s])
    start += v * s
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _attention_cls_queries(x, x_q, kernel, bias):
  """Attention of one query token per view, x_q (N, 1, D), over that view's tokens x (N, S, D).

  Keys and values are never projected: q.k_s = (q Wk^T).x_s and sum_s p_s v_s =
  (sum_s p_s x_s) Wv + bv, since the probabilities sum to one. The key bias adds the same
  constant to all of a query's logits, which the softmax cancels, so it drops out (its
  gradient is exactly zero, as it is mathematically in the usual form). Per token this costs
  heads x width multiply-adds instead of the 2 x width^2 of projecting keys and values.
  """
  scale = kernel.shape[-1] ** -0.5
  q = jnp.einsum('ntd,dhk->nthk', x_q, kernel[:, 0]) + bias[0]
  q_keys = jnp.einsum('nthk,dhk->nthd', q, kernel[:, 1])
  logits = jnp.einsum('nthd,nsd->nhts', q_keys, x, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
  context = jnp.einsum('nhts,nsd->nthd', probs, x)
  return jnp.einsum('nthd,dhk->nthk', context, kernel[:, 2]) + bias[2]


class Attention(nn.Module):
  """Multi-head self-attention with (embed, heads, head_dim) kernels for sharding.

  x: (B, S, D), or packed views (B, sum V_i S_i, D) with `views` set (see split_views);
  each view attends within itself. cls_only: only the first token of each view is a query
  and the output is (B, sum V_i, D) (the last block, whose other tokens nothing reads).
  """
  config: Any            # models.vit.ViTConfig
  views: tuple | None = None
  cls_only: bool = False

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    head_dim = cfg.width // cfg.num_heads
    views = self.views or ((1, x.shape[1]),)
    init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2, 3))
    qkv_kernel = self.param('qkv_kernel', nn.with_logical_partitioning(
        init, ('embed', None, 'heads', 'kv')), (cfg.width, 3, cfg.num_heads, head_dim))
    qkv_bias = self.param('qkv_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, (None, 'heads', 'kv')), (3, cfg.num_heads, head_dim))
    kernel, bias = qkv_kernel.astype(cfg.dtype), qkv_bias.astype(cfg.dtype)
    if self.cls_only:
      y = [_attention_cls_queries(xv, xv[:, :1], kernel, bias) for xv in split_views(x, views)]
    else:
      # (B, S, 3, heads, head_dim): the projection's own layout, no transposes.
      qkv = jnp.einsum('bsd,dthk->bsthk', x, kernel) + bias
      # One place to pick the kernel: XLA everywhere, cuDNN flash attention on GPUs
      # (model.attention='cudnn'); logits and softmax are computed in float32.
      y = [jax.nn.dot_product_attention(a[:, :, 0], a[:, :, 1], a[:, :, 2],
                                        implementation=cfg.attention)
           for a in split_views(qkv, views)]
    y = join_views(y, x.shape[0])
    out_kernel = self.param('out_kernel', nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2), ('heads', 'kv', 'embed')),
        (cfg.num_heads, head_dim, cfg.width))
    out_bias = self.param('out_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('embed',)), (cfg.width,))
    return jnp.einsum('bqhk,hkd->bqd', y, out_kernel.astype(cfg.dtype)) + out_bias.astype(cfg.dtype)
