"""AdamW with linear warmup + cosine decay to lr/1000; weight decay on kernels only."""
from __future__ import annotations

import jax
import optax


def schedule(peak_lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """0 -> peak_lr linearly over warmup_steps, then cosine to peak_lr / 1000 at total_steps."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=peak_lr / 1000)


def decay_mask(params):
  """True for kernels (dense, attention, patch embedding); False for everything else.

  Decided by name, not by ndim: under nn.scan the LayerNorm scales and biases
  are stacked into 2-D arrays, and the position embedding, CLS token and
  registers are 3-D, yet none of them should be decayed.
  """
  def is_kernel(path, _):
    return str(getattr(path[-1], 'key', path[-1])).endswith('kernel')
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def adamw(peak_lr: float, total_steps: int, warmup_steps: int, weight_decay: float,
          b1: float = 0.9, b2: float = 0.999, clip_norm: float | None = None):
  tx = optax.adamw(schedule(peak_lr, total_steps, warmup_steps), b1=b1, b2=b2,
                   weight_decay=weight_decay, mask=decay_mask)
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """One AdamW for encoder + projector, another (weight decay 1e-6) for the online probe.

  The probe sees stop-gradient features, so the two never interact; they only
  share the schedule's shape.
  """
  o = config.optim
  model_tx = adamw(o.lr, total_steps, o.warmup_steps, o.weight_decay, o.b1, o.b2, o.get('clip_norm'))
  probe_tx = adamw(o.probe_lr, total_steps, o.warmup_steps, o.probe_weight_decay)

  def labels(params):
    return {k: jax.tree.map(lambda _: 'probe' if k == 'probe' else 'model', v)
            for k, v in params.items()}
  return optax.multi_transform({'model': model_tx, 'probe': probe_tx}, labels)
