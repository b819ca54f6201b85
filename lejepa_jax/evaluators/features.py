"""Frozen features of a whole split, kept as sharded global arrays.

No host ever holds the whole split (ImageNet with ViT-g is 1.28M x 3328 float32,
~17 GB): each device keeps the rows of every eval batch it computed, stacked
along a leading batch-number axis.

Layout. Global eval batch b (G rows, split over the mesh's batch axes) becomes
x[b], so the flat row index b * G + i names row i of batch b; with
`data.pipeline.eval_batches` that is record b * G + i of the split, and the
padding (mask 0) is the rows from `count` on. Padding rows carry the label -1
and the evaluators skip every row labelled -1, so they read validity from the
labels, never from the row index, and stay right for any batch layout.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lejepa_jax import preemption
from lejepa_jax import sharding as sharding_lib
from lejepa_jax.sharding import BATCH_AXES


class Features(NamedTuple):
  """x: float32 (num_batches, G, F) sharded P(None, BATCH_AXES, None);
  y: int32 (num_batches, G) sharded P(None, BATCH_AXES), -1 = padding;
  count: the number of real rows (a Python int)."""
  x: jax.Array
  y: jax.Array
  count: int


def x_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(None, BATCH_AXES, None))


def y_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(None, BATCH_AXES))


@functools.lru_cache(maxsize=None)
def _buffers(mesh, num_batches: int, global_batch: int, dim: int):
  """A jitted () -> (x zeros, y all -1) in the Features layout: rows never written are padding."""
  return jax.jit(lambda: (jnp.zeros((num_batches, global_batch, dim), jnp.float32),
                          jnp.full((num_batches, global_batch), -1, jnp.int32)),
                 out_shardings=(x_sharding(mesh), y_sharding(mesh)))


@functools.lru_cache(maxsize=None)
def _writer(mesh):
  """Jitted (x, y, b, features, label, mask) -> (x, y, real rows): batch b written in place.

  Batch b's rows already sit on the devices that own row b of the buffers, so the
  write is local (no collective) and the donated buffers are updated in place:
  a device never holds more than its share plus one batch.
  """
  rows = NamedSharding(mesh, P(BATCH_AXES, None))

  @functools.partial(jax.jit, donate_argnums=(0, 1),
                     out_shardings=(x_sharding(mesh), y_sharding(mesh), NamedSharding(mesh, P())))
  def write(x, y, b, f, label, mask):
    # Re-split by rows only if feature_fn returned another layout (e.g. split over 'tensor').
    f = jax.lax.with_sharding_constraint(f.astype(jnp.float32), rows)
    keep = mask > 0
    return (x.at[b].set(f), y.at[b].set(jnp.where(keep, label, -1).astype(jnp.int32)),
            jnp.sum(keep, dtype=jnp.int32))
  return write


def extract(feature_fn, variables, batches, mesh, num_batches: int,
            should_stop=None) -> Features:
  """Features of every record that `batches` yields, sharded over the mesh's batch axes.

  feature_fn(variables, images) -> (G, F) must be jitted by the caller and take
  the model variables as an argument (closing over them would bake the
  parameters into the program as constants). batches yield num_batches
  process-local {'image', 'label', 'mask'} (as `data.pipeline.eval_batches` does).
  should_stop (optional) is called before every batch on every process; when it returns
  True, `preemption.NoticeDuringEvaluation` is raised.
  """
  write = _writer(mesh)
  x = y = None
  count = 0
  for b, local in enumerate(batches):
    if b >= num_batches:
      raise ValueError(f'extract: `batches` yielded more than num_batches={num_batches} batches')
    if should_stop is not None and should_stop():
      raise preemption.NoticeDuringEvaluation(f'during feature extraction, batch {b}')
    batch = sharding_lib.to_global_batch(local, mesh)
    f = feature_fn(variables, batch['image'])
    if x is None:
      x, y = _buffers(mesh, num_batches, *f.shape)()
    x, y, n = write(x, y, np.int32(b), f, batch['label'], batch['mask'])
    if b:   # at most two batches in flight: a stop request is seen within a batch or two
      jax.block_until_ready(count)
    count = count + n                     # stays on device: no sync per batch
    if (b + 1) % max(num_batches // 4, 1) == 0:
      logging.info('  features: %d/%d batches', b + 1, num_batches)
  if x is None:
    raise ValueError('extract: `batches` yielded no batch')
  return Features(x, y, int(count))


def columns(features: Features, start: int, stop: int) -> Features:
  """The feature columns [start, stop) of every row (one kind out of several concatenated)."""
  x = jax.jit(lambda x: x[..., start:stop], out_shardings=x_sharding(features.x.sharding.mesh))(
      features.x)
  return Features(x, features.y, features.count)


def abstract_features(num_examples: int, global_batch: int, dim: int, mesh) -> Features:
  """Shapes and shardings of `extract`'s result, allocating nothing (for AOT compiles)."""
  nb = math.ceil(num_examples / global_batch)
  return Features(jax.ShapeDtypeStruct((nb, global_batch, dim), jnp.float32, sharding=x_sharding(mesh)),
                  jax.ShapeDtypeStruct((nb, global_batch), jnp.int32, sharding=y_sharding(mesh)),
                  num_examples)


def from_numpy(x: np.ndarray, y: np.ndarray, mesh, global_batch: int | None = None) -> Features:
  """Features from host arrays (N, F), (N,) that every process holds in full.

  For baselines on raw inputs and for tests; rows are padded to whole batches
  and labels < 0 count as padding. Each process puts only its own rows on its devices.
  """
  dp = sharding_lib.data_parallel_size(mesh)
  n, dim = x.shape
  g = global_batch or dp * math.ceil(min(n, 1024) / dp)
  nb = math.ceil(n / g)
  xp = np.zeros((nb * g, dim), np.float32)
  yp = np.full((nb * g,), -1, np.int32)
  xp[:n], yp[:n] = x, y
  xp, yp = xp.reshape(nb, g, dim), yp.reshape(nb, g)
  make = lambda a, s: jax.make_array_from_callback(a.shape, s, lambda i: a[i])
  return Features(make(xp, x_sharding(mesh)), make(yp, y_sharding(mesh)), int((yp >= 0).sum()))


def take_rows(a: jax.Array, idx: jax.Array, mesh, *, replicated: bool = False) -> jax.Array:
  """a.reshape(-1, ...)[idx] for a (num_batches, G, ...) array sharded like Features.x.

  For use inside jit. idx is a replicated int vector of flat row indices; rows
  out of range come back as zeros. Each device picks the rows it owns and puts
  zeros elsewhere; a sum over the batch axes then assembles the rows (exactly:
  every row has one nonzero contribution), so no device ever holds all of `a`.
  The result is split over the batch axes (len(idx) must divide by their size)
  or, with replicated=True, on every device.
  """
  nb, g = a.shape[:2]

  def local(a_local, idx):
    me = jax.lax.axis_index(BATCH_AXES)   # position along the split G axis
    gl = a_local.shape[1]
    j, i = idx // g, idx % g
    mine = (i // gl == me) & (idx >= 0) & (idx < nb * g)
    rows = a_local[jnp.clip(j, 0, nb - 1), i % gl]
    rows = jnp.where(mine.reshape(-1, *[1] * (rows.ndim - 1)), rows, jnp.zeros_like(rows))
    if replicated:
      return jax.lax.psum(rows, BATCH_AXES)
    return jax.lax.psum_scatter(rows, BATCH_AXES, scatter_dimension=0, tiled=True)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(None, BATCH_AXES), P()),
                       out_specs=P() if replicated else P(BATCH_AXES))(a, idx)
