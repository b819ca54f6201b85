"""The online probe's test top-1: the LayerNorm + linear head trained during pretraining.

The training step fits this head (`models.LinearProbe`, params['probe']) on the stop-gradient
features of the augmented global views (model.online_probe_input), as the authors' MINIMAL.md
does with its LayerNorm + Linear probe on the 512-d backbone output; its accuracy on the
test split, read at every evaluation, is the figure MINIMAL.md reports (90.7% for ViT-S/8 on
Imagenette). Nothing is fitted here: the head is applied to the test split's features of the
kind it was trained on (`suite.feature_kind`), under the evaluation view (centre crop).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from lejepa_jax.models import heads


@functools.lru_cache(maxsize=None)
def _correct_fn(mesh, num_classes: int):
  """(probe params, test x, test y) -> number of test rows the head classifies right."""
  head = heads.LinearProbe(num_classes)

  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
  def correct(params, x, y):
    logits = head.apply({'params': params}, x)
    return jnp.sum(jnp.argmax(logits, axis=-1) == y)    # padding rows (label -1) never count
  return correct


def evaluate(train, test, num_classes: int, *, mesh, probe=None, seed: int = 0) -> dict:
  """{'online_probe_top1'} of the head `probe` (the run's params['probe']) on `test`.

  `train` is not read (None when the runner extracts the test split only); `seed` is
  accepted for the common evaluator interface.
  """
  del train, seed
  if probe is None:
    raise ValueError('online_probe: the runner passes the online probe parameters')
  correct = _correct_fn(mesh, num_classes)(probe, test.x, test.y)
  return {'online_probe_top1': int(correct) / test.count}


def programs(train, test, num_classes: int, *, mesh, probe=None) -> list:
  """[(name, jitted fn, abstract args)] for `plan` (probe: its abstract parameters)."""
  del train
  return [('online_probe/correct', _correct_fn(mesh, num_classes), (probe, test.x, test.y))]
