"""Weighted k-NN classifier on L2-normalised features (the DINO protocol).

The training features stay sharded over the mesh's batch axes. For a
replicated chunk of queries each device scores its own rows and keeps its local
top-k; the candidates are all-gathered over the batch axes and the global top-k
is taken from them. The global top-k is among the union of local top-ks, so this
equals the top-k over all rows, while no device ever sees more than its rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lejepa_jax.evaluators import features as features_lib
from lejepa_jax.sharding import BATCH_AXES


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=None)
def _chunk_fn(mesh, num_classes: int, ks: tuple, temperature: float, chunk: int):
  """(train x, y, test x, y, start) -> for each k in ks, the number of test rows
  [start, start + chunk) voted right by their k nearest neighbours.

  One top-k search with the largest k serves every k: the neighbours come sorted by
  similarity, so the k nearest are the first k of them."""
  k = max(ks)
  rep = NamedSharding(mesh, P())
  xs, ys = features_lib.x_sharding(mesh), features_lib.y_sharding(mesh)

  def local_top_k(queries, x, y):        # per device: its (nb, G/dp, F) rows
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1)
    inv_norm = 1 / jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-12)
    sims = (queries @ x.T) * inv_norm     # cosine, without a normalised copy of x
    sims = jnp.where(y >= 0, sims, -jnp.inf)  # padding rows are never neighbours
    top, idx = jax.lax.top_k(sims, min(k, x.shape[0]))
    # all candidates of all devices, then the global top-k among them
    top = jax.lax.all_gather(top, BATCH_AXES, axis=1, tiled=True)
    labels = jax.lax.all_gather(y[idx], BATCH_AXES, axis=1, tiled=True)
    top, pick = jax.lax.top_k(top, k)
    return top, jnp.take_along_axis(labels, pick, axis=1)

  @functools.partial(jax.jit, in_shardings=(xs, ys, xs, ys, rep), out_shardings=rep)
  def correct(train_x, train_y, test_x, test_y, start):
    rows = start + jnp.arange(chunk)
    queries = _normalize(features_lib.take_rows(test_x, rows, mesh, replicated=True))
    labels = features_lib.take_rows(test_y, rows, mesh, replicated=True)
    labels = jnp.where(rows < test_y.size, labels, -1)  # past the end: no row
    # check_vma=False: after the all_gather every device holds the same candidates,
    # which the replication checker cannot infer.
    sims, neighbours = jax.shard_map(
        local_top_k, mesh=mesh, in_specs=(P(), P(None, BATCH_AXES), P(None, BATCH_AXES)),
        out_specs=P(), check_vma=False)(queries, train_x, train_y)
    votes = jax.nn.one_hot(neighbours, num_classes) * jnp.exp(sims / temperature)[..., None]
    right = [jnp.sum(jnp.argmax(votes[:, :kk].sum(axis=1), axis=-1) == labels)  # -1 never counts
             for kk in ks]
    return jnp.stack(right)
  return correct


def _ks(k, ks, count: int) -> tuple:
  """k first (it gives 'knn_top1'), then the other ks; none above the training rows."""
  wanted = (k,) + tuple(kk for kk in (ks or ()) if kk != k)
  if min(wanted) < 1:
    raise ValueError(f'k-NN: every k must be >= 1, got {wanted}')
  return tuple(min(kk, count) for kk in wanted)


def _plan(train, test, num_classes, *, mesh, k, temperature, chunk, ks=None):
  """The jitted function `evaluate` runs, its abstract arguments and the chunk starts."""
  chunk = min(chunk, test.y.size)
  fn = _chunk_fn(mesh, num_classes, _ks(k, ks, train.count), float(temperature), chunk)
  start = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
  return fn, (train.x, train.y, test.x, test.y, start), range(0, test.y.size, chunk)


def programs(train, test, num_classes: int, *, mesh, k: int = 20, temperature: float = 0.07,
             chunk: int = 1024, ks=None) -> list:
  """[(name, jitted fn, abstract args)]: `fn.lower(*args).compile()` compiles what `evaluate` runs."""
  fn, args, _ = _plan(train, test, num_classes, mesh=mesh, k=k, temperature=temperature,
                      chunk=chunk, ks=ks)
  return [('knn/chunk_correct', fn, args)]


def evaluate(train, test, num_classes: int, *, mesh, k: int = 20, temperature: float = 0.07,
             chunk: int = 1024, ks=None, seed: int = 0) -> dict:
  """Test top-1 of a k-NN vote weighted by exp(cosine / temperature).

  'knn_top1' is the vote of k neighbours; each K of `ks` (one search serves all) adds
  'knn_kK_top1'. Deterministic: `seed` is accepted for the common evaluator interface.
  """
  del seed
  fn, _, starts = _plan(train, test, num_classes, mesh=mesh, k=k, temperature=temperature,
                        chunk=chunk, ks=ks)
  correct = 0
  for start in starts:                    # one compile for all chunks; counts stay on device
    correct = correct + fn(train.x, train.y, test.x, test.y, np.int32(start))
  correct = np.asarray(correct)
  searched = _ks(k, ks, train.count)      # the order of `correct`
  out = {'knn_top1': int(correct[0]) / test.count}
  for kk in (ks or ()):
    out[f'knn_k{kk}_top1'] = int(correct[searched.index(min(kk, train.count))]) / test.count
  return out
