"""Few-shot linear classification on frozen features: closed-form ridge regression.

For each number of shots S and each of several seeds: S training images per class
are drawn (class-balanced, without replacement), their features are L2-normalised
and centred, and a ridge regression onto +-1 one-hot targets is solved in closed form
(kernel form: the support set is small). The regulariser is picked on `val_examples`
other training images (labels of those are used for that choice only), and the test
split is classified by argmax of the regression output. Reported: the mean test top-1
over seeds and its standard deviation.

Features stay sharded: the support and validation rows are gathered with
`features.take_rows`, the test predictions run on the sharded test features.
Only the labels of the training split (int32, one per image) come to the host.
"""
from __future__ import annotations

import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lejepa_jax.evaluators import features as features_lib


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=None)
def _replicate_fn(mesh):
  return jax.jit(lambda y: y, out_shardings=NamedSharding(mesh, P()))


def host_labels(features: features_lib.Features, mesh) -> np.ndarray:
  """The flat labels (-1 = padding) of a Features, on every host (small: one int per row)."""
  return np.asarray(_replicate_fn(mesh)(features.y)).reshape(-1)


def support_rows(labels: np.ndarray, num_classes: int, shots: int,
                 rng: np.random.Generator) -> np.ndarray:
  """`shots` random flat rows of each class (without replacement), class by class."""
  rows = []
  for c in range(num_classes):
    of_class = np.flatnonzero(labels == c)
    if len(of_class) < shots:
      raise ValueError(f'few-shot: class {c} has {len(of_class)} training images, fewer than '
                       f'{shots} shots: lower the shots of the fewshot evaluator')
    rows.append(rng.choice(of_class, shots, replace=False))
  return np.concatenate(rows).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _fit_fn(mesh, num_classes: int, l2_regs: tuple):
  """(train x, support rows, their labels) -> (W (R, F, C) for each l2 reg, centre (F,)).

  Rows labelled -1 are padding and drop out exactly (zero rows of the centred features and
  targets): every shot count runs the one program compiled for the largest."""
  rep = NamedSharding(mesh, P())

  @functools.partial(jax.jit, in_shardings=(features_lib.x_sharding(mesh), rep, rep),
                     out_shardings=(rep, rep))
  def fit(x, rows, labels):
    valid = (labels >= 0).astype(jnp.float32)[:, None]
    support = _normalize(features_lib.take_rows(x, rows, mesh, replicated=True)) * valid
    centre = support.sum(axis=0) / valid.sum()
    xc = (support - centre) * valid
    targets = (2.0 * jax.nn.one_hot(labels, num_classes) - 1.0) * valid
    n, dim = xc.shape
    # The same W either way; solve the smaller system (n = shots x classes images, dim features).
    # A padding row is zero in Xc and Y, so its dual coefficient is 0 and the primal sums skip it.
    if n <= dim:
      gram, eye = xc @ xc.T, jnp.eye(n, dtype=xc.dtype)
      one = lambda reg: xc.T @ jnp.linalg.solve(gram + reg * eye, targets)  # Xc^T (Xc Xc^T + rI)^-1 Y
    else:
      cov, eye, xty = xc.T @ xc, jnp.eye(dim, dtype=xc.dtype), xc.T @ targets
      one = lambda reg: jnp.linalg.solve(cov + reg * eye, xty)            # (Xc^T Xc + rI)^-1 Xc^T Y
    return jax.vmap(one)(jnp.asarray(l2_regs, jnp.float32)), centre
  return fit


def _padded(rows: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """rows and their labels padded to `size` with row 0 labelled -1 (ignored by the fit)."""
  pad = size - len(rows)
  return (np.concatenate([rows, np.zeros(pad, np.int32)]),
          np.concatenate([labels, np.full(pad, -1, np.int32)]).astype(np.int32))


@functools.lru_cache(maxsize=None)
def _correct_fn(mesh):
  """(W (R, F, C), centre, x, y) -> rows each regression classifies right; y = -1 never counts."""
  rep = NamedSharding(mesh, P())

  @functools.partial(jax.jit, in_shardings=(rep, rep, features_lib.x_sharding(mesh),
                                            features_lib.y_sharding(mesh)), out_shardings=rep)
  def correct(w, centre, x, y):
    def batch(total, xy):
      scores = jnp.einsum('gf,rfc->rgc', _normalize(xy[0]) - centre, w)
      return total + jnp.sum(jnp.argmax(scores, -1) == xy[1], axis=-1), None
    return jax.lax.scan(batch, jnp.zeros((w.shape[0],), jnp.int32), (x, y))[0]
  return correct


def programs(train, test, num_classes: int, *, mesh, shots=(1, 5, 10, 25),
             l2_regs=(1e-3, 1e-2, 1e-1, 1.0, 10.0), **unused) -> list:
  """[(name, jitted fn, abstract args)]: `fn.lower(*args).compile()` compiles what `evaluate` runs."""
  del unused  # seeds, val_examples, seed: the programs do not depend on them
  rep = NamedSharding(mesh, P())
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  regs, dim = tuple(float(r) for r in l2_regs), train.x.shape[-1]
  n = max(shots) * num_classes    # one fit program serves every shot count (padded rows)
  out = [('fewshot/fit', _fit_fn(mesh, num_classes, regs),
          (train.x, sds((n,), jnp.int32), sds((n,), jnp.int32)))]
  w = lambda r: sds((r, dim, num_classes), jnp.float32)
  out.append(('fewshot/correct', _correct_fn(mesh), (w(len(regs)), sds((dim,), jnp.float32),
                                                      test.x, test.y)))
  return out


def evaluate(train, test, num_classes: int, *, mesh, shots=(1, 5, 10, 25), seeds: int = 3,
             l2_regs=(1e-3, 1e-2, 1e-1, 1.0, 10.0), val_examples: int = 1000,
             seed: int = 0) -> dict:
  """{'fewshot_Sshot_top1': mean test top-1 over seeds, 'fewshot_Sshot_top1_std': ...}."""
  labels = host_labels(train, mesh)
  y_shape = train.y.shape
  correct = _correct_fn(mesh)
  support_size = max(shots) * num_classes
  out = {}
  for s in shots:
    accuracies = []
    for trial in range(seeds):
      rng = np.random.default_rng([seed, s, trial])
      rows = support_rows(labels, num_classes, s, rng)
      w, centre = _fit_fn(mesh, num_classes, tuple(float(r) for r in l2_regs))(
          train.x, *_padded(rows, labels[rows], support_size))
      best = 0
      if len(l2_regs) > 1:                 # pick the regulariser on other training images
        rest = np.setdiff1d(np.flatnonzero(labels >= 0), rows)
        val = rng.choice(rest, min(val_examples, len(rest)), replace=False)
        val_y = np.full(labels.shape, -1, np.int32)
        val_y[val] = labels[val]
        val_y = val_y.reshape(y_shape)
        val_y = jax.make_array_from_callback(y_shape, features_lib.y_sharding(mesh),
                                             lambda index, a=val_y: a[index])
        best = int(np.argmax(np.asarray(correct(w, centre, train.x, val_y))))
      right = int(np.asarray(correct(w[best:best + 1], centre, test.x, test.y))[0])
      accuracies.append(right / test.count)
    out[f'fewshot_{s}shot_top1'] = float(np.mean(accuracies))
    out[f'fewshot_{s}shot_top1_std'] = float(np.std(accuracies))
    logging.info('  few-shot %d per class: top-1 %.4f +- %.4f over %d draws', s,
                 out[f'fewshot_{s}shot_top1'], out[f'fewshot_{s}shot_top1_std'], seeds)
  return out
