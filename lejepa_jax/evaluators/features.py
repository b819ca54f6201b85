"""Frozen features of a whole split, computed sharded and gathered on every host."""
from __future__ import annotations

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from lejepa_jax import sharding as sharding_lib


def extract(feature_fn, batches, mesh, num_batches: int | None = None):
  """Runs feature_fn(images) -> (B, F) over padded batches; drops padding.

  feature_fn must be jitted; batches yield process-local {'image', 'label',
  'mask'}. Returns float32 features (N, F) and int32 labels (N,), in order.
  """
  feats, labels = [], []
  for i, local in enumerate(batches):
    batch = sharding_lib.to_global_batch(local, mesh)
    out = feature_fn(batch['image'])
    gathered = multihost_utils.process_allgather(
        {'f': out, 'y': batch['label'], 'm': batch['mask']}, tiled=True)
    keep = gathered['m'] > 0
    feats.append(np.asarray(gathered['f'], np.float32)[keep])
    labels.append(np.asarray(gathered['y'], np.int32)[keep])
    if num_batches and (i + 1) % max(num_batches // 4, 1) == 0:
      logging.info('  features: %d/%d batches', i + 1, num_batches)
  return np.concatenate(feats), np.concatenate(labels)
