"""AdamW with linear warmup + cosine decay; weight decay on kernels (or on every parameter).

Defaults follow the authors' README: warmup from 0, cosine to lr / 1000. Their MINIMAL.md
script differs, and the differences are options: torch's LinearLR(start_factor=0.01) warmup
(optim.warmup_start_factor), CosineAnnealingLR(eta_min=1e-3), an absolute floor shared by
the network and the probe (optim.end_lr), and torch.optim.AdamW on net.parameters(), which
decays every parameter (optim.weight_decay_on='all').
"""
from __future__ import annotations

import jax
import optax

from lejepa_jax import config_schema

# optim.weight_decay_on -> which parameters AdamW decays.
WEIGHT_DECAY_ON = ('kernels', 'all')


def schedule(peak_lr: float, total_steps: int, warmup_steps: int, *,
             end_lr: float | None = None, warmup_start_factor: float = 0.0) -> optax.Schedule:
  """peak_lr * warmup_start_factor -> peak_lr linearly over warmup_steps, then cosine to
  end_lr (default peak_lr / 1000) at total_steps."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=peak_lr * warmup_start_factor, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=peak_lr / 1000 if end_lr is None else end_lr)


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
          b1: float = 0.9, b2: float = 0.999, clip_norm: float | None = None, *,
          end_lr: float | None = None, warmup_start_factor: float = 0.0,
          weight_decay_on: str = 'kernels'):
  if weight_decay_on not in WEIGHT_DECAY_ON:
    raise ValueError(f'optim.weight_decay_on must be one of {WEIGHT_DECAY_ON}, '
                     f'got {weight_decay_on!r}')
  lr = schedule(peak_lr, total_steps, warmup_steps, end_lr=end_lr,
                warmup_start_factor=warmup_start_factor)
  tx = optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay,
                   mask=decay_mask if weight_decay_on == 'kernels' else None)
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """One AdamW for encoder + projector, another (probe_lr, probe_weight_decay) for the online
  probe, as torch's one AdamW with two parameter groups.

  The probe sees stop-gradient features, so the two never interact; they share the
  schedule's shape (warmup, end_lr, weight_decay_on).
  """
  o = config_schema.resolve(config).optim
  shape = dict(end_lr=None if o.end_lr < 0 else o.end_lr,
               warmup_start_factor=o.warmup_start_factor, weight_decay_on=o.weight_decay_on)
  model_tx = adamw(o.lr, total_steps, o.warmup_steps, o.weight_decay, o.b1, o.b2,
                   o.clip_norm, **shape)
  probe_tx = adamw(o.probe_lr, total_steps, o.warmup_steps, o.probe_weight_decay, **shape)

  def labels(params):
    return {k: jax.tree.map(lambda _: 'probe' if k == 'probe' else 'model', v)
            for k, v in params.items()}
  return optax.multi_transform({'model': model_tx, 'probe': probe_tx}, labels)
