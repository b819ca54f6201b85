"""Frozen linear probe: LayerNorm + linear layer on fixed features, AdamW.

The learning rate is chosen on a held-out part of the training split, then
the probe is retrained on the whole training split and scored on test.

Everything runs on the sharded `Features` arrays: minibatches are gathered
with `features.take_rows` (rows split over the batch axes, so the probe's
forward and backward are data parallel), accuracies are masked sums over the
sharded arrays. All randomness comes from `seed`, so the same global arrays give
the same result however many processes hold them. The lrs are trained side by
side (vmap): one program, one minibatch gather per step for all of them.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lejepa_jax import optim
from lejepa_jax import sharding as sharding_lib
from lejepa_jax.evaluators import features as features_lib
from lejepa_jax.models.heads import LinearProbe


@functools.lru_cache(maxsize=None)
def _split_fn(mesh, count: int, n_hold: int):
  """y, seed -> (fit rows, all rows, held-out labels): a seeded split of the real rows.

  Rows are flat indices into Features; the held-out labels are y with every
  row outside the held-out set replaced by -1 (= ignored).
  """
  rep, ys = NamedSharding(mesh, P()), features_lib.y_sharding(mesh)

  @functools.partial(jax.jit, in_shardings=(ys, rep), out_shardings=(rep, rep, ys))
  def split(y, seed):
    flat = y.reshape(-1)
    rows = jnp.nonzero(flat >= 0, size=count)[0].astype(jnp.int32)
    order = rows[jax.random.permutation(jax.random.key(seed), count)]
    hold = jnp.zeros(flat.shape, bool).at[order[:n_hold]].set(True)
    return order[n_hold:], rows, jnp.where(hold, flat, -1).reshape(y.shape)
  return split


@functools.lru_cache(maxsize=None)
def _train_fn(mesh, num_classes: int, epochs: int, batch_size: int, weight_decay: float):
  """(x, y, rows, lrs, seed) -> probe params stacked over lrs, trained on x[rows].

  warmup 1 epoch + cosine AdamW (optim.adamw) for `epochs` epochs of
  minibatches drawn without replacement from `rows`.
  """
  dp = sharding_lib.data_parallel_size(mesh)
  rep = NamedSharding(mesh, P())
  model = LinearProbe(num_classes)

  @functools.partial(jax.jit, in_shardings=(features_lib.x_sharding(mesh),
                                            features_lib.y_sharding(mesh), rep, rep, rep),
                     out_shardings=rep)
  def train(x, y, rows, lrs, seed):
    n = rows.shape[0]
    b = min(batch_size, n)
    steps_per_epoch = n // b
    padded = dp * math.ceil(b / dp)       # take_rows splits the minibatch over the batch axes
    weight = (jnp.arange(padded) < b) / b  # padding rows (repeats) have weight 0
    # Peak lr 1 then scaled per lr: AdamW's update (decay included) is linear in the lr.
    tx = optim.adamw(1.0, epochs * steps_per_epoch, steps_per_epoch, weight_decay)
    params = model.init(jax.random.key(0), jnp.zeros((1, x.shape[-1])))['params']  # deterministic
    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (len(lrs), *p.shape)), params)

    def loss_fn(p, xb, yb):
      logits = model.apply({'params': p}, xb)
      return jnp.sum(weight * optax.softmax_cross_entropy_with_integer_labels(logits, yb))

    def update(p, opt_state, lr, xb, yb):
      updates, opt_state = tx.update(jax.grad(loss_fn)(p, xb, yb), opt_state, p)
      return optax.apply_updates(p, jax.tree.map(lambda u: lr * u, updates)), opt_state

    def step(carry, idx):
      idx = jnp.pad(idx, (0, padded - b), mode='edge')
      xb = features_lib.take_rows(x, idx, mesh)
      yb = features_lib.take_rows(y, idx, mesh)
      return jax.vmap(update, in_axes=(0, 0, 0, None, None))(*carry, lrs, xb, yb), None

    def epoch(carry, key):
      order = rows[jax.random.permutation(key, n)[:steps_per_epoch * b]]
      return jax.lax.scan(step, carry, order.reshape(steps_per_epoch, b))[0], None

    keys = jax.random.split(jax.random.key(seed + 1), epochs)
    (params, _), _ = jax.lax.scan(epoch, (params, jax.vmap(tx.init)(params)), keys)
    return params
  return train


@functools.lru_cache(maxsize=None)
def _correct_fn(mesh, num_classes: int):
  """(params stacked over lrs, x, y) -> number of rows each probe gets right; y = -1 never counts."""
  model = LinearProbe(num_classes)
  rep = NamedSharding(mesh, P())

  @functools.partial(jax.jit, in_shardings=(rep, features_lib.x_sharding(mesh),
                                            features_lib.y_sharding(mesh)), out_shardings=rep)
  def correct(params, x, y):
    def batch(total, xy):                 # one eval batch at a time: logits stay (G, classes)
      logits = jax.vmap(lambda p: model.apply({'params': p}, xy[0]))(params)
      return total + jnp.sum(jnp.argmax(logits, -1) == xy[1], axis=-1), None
    return jax.lax.scan(batch, jnp.zeros(jax.tree.leaves(params)[0].shape[:1], jnp.int32), (x, y))[0]
  return correct


class _Plan(NamedTuple):
  n_hold: int
  programs: list                          # (name, jitted fn, abstract args)


def _plan(train, test, num_classes, *, mesh, lrs, epochs, batch_size, weight_decay,
          holdout_fraction) -> _Plan:
  """The jitted functions `evaluate` runs, with abstract arguments (one builder for both)."""
  n_hold = int(train.count * holdout_fraction) if len(lrs) > 1 else 0
  rep = NamedSharding(mesh, P())
  sds = lambda shape, dtype, sharding=rep: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  seed = sds((), jnp.int32)
  split = _split_fn(mesh, train.count, n_hold)
  fit = _train_fn(mesh, num_classes, epochs, batch_size, float(weight_decay))
  correct = _correct_fn(mesh, num_classes)
  one = jax.eval_shape(lambda: LinearProbe(num_classes).init(
      jax.random.key(0), jnp.zeros((1, train.x.shape[-1])))['params'])
  params = lambda k: jax.tree.map(lambda s: sds((k, *s.shape), s.dtype), one)  # k probes
  programs = [('linear_probe/split', split, (train.y, seed))]
  if n_hold:
    programs += [
        ('linear_probe/train_sweep', fit, (train.x, train.y, sds((train.count - n_hold,), jnp.int32),
                                           sds((len(lrs),), jnp.float32), seed)),
        ('linear_probe/holdout_correct', correct, (params(len(lrs)), train.x, train.y))]
  programs += [
      ('linear_probe/train_final', fit, (train.x, train.y, sds((train.count,), jnp.int32),
                                         sds((1,), jnp.float32), seed)),
      ('linear_probe/test_correct', correct, (params(1), test.x, test.y))]
  return _Plan(n_hold, programs)


def programs(train, test, num_classes: int, *, mesh, lrs=(1e-3, 3e-3, 1e-2), epochs: int = 50,
             batch_size: int = 1024, weight_decay: float = 1e-6, holdout_fraction: float = 0.1,
             seed: int = 0) -> list:
  """[(name, jitted fn, abstract args)]: `fn.lower(*args).compile()` compiles what `evaluate` runs."""
  del seed  # a traced argument: the programs do not depend on it
  return _plan(train, test, num_classes, mesh=mesh, lrs=lrs, epochs=epochs, batch_size=batch_size,
               weight_decay=weight_decay, holdout_fraction=holdout_fraction).programs


def evaluate(train, test, num_classes: int, *, mesh, lrs=(1e-3, 3e-3, 1e-2), epochs: int = 50,
             batch_size: int = 1024, weight_decay: float = 1e-6, holdout_fraction: float = 0.1,
             seed: int = 0) -> dict:
  """Test top-1 of the probe with the lr that is best on a held-out part of train."""
  plan = _plan(train, test, num_classes, mesh=mesh, lrs=lrs, epochs=epochs, batch_size=batch_size,
               weight_decay=weight_decay, holdout_fraction=holdout_fraction)
  fns = {name: fn for name, fn, _ in plan.programs}
  seed = np.int32(seed)
  fit_rows, all_rows, hold_y = fns['linear_probe/split'](train.y, seed)
  best_lr = lrs[0]
  if plan.n_hold:
    params = fns['linear_probe/train_sweep'](train.x, train.y, fit_rows,
                                             np.asarray(lrs, np.float32), seed)
    hold_acc = np.asarray(fns['linear_probe/holdout_correct'](params, train.x, hold_y)) / plan.n_hold
    for lr, acc in zip(lrs, hold_acc):
      logging.info('  linear probe lr=%g: held-out top-1 %.4f', lr, acc)
    best_lr = lrs[int(np.argmax(hold_acc))]   # the first of equals, as a strict > would
  params = fns['linear_probe/train_final'](train.x, train.y, all_rows,
                                           np.asarray([best_lr], np.float32), seed)
  correct = int(np.asarray(fns['linear_probe/test_correct'](params, test.x, test.y))[0])
  return {'linear_probe_top1': correct / test.count, 'linear_probe_lr': best_lr}
