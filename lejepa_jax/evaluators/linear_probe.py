"""Frozen linear probe: LayerNorm + linear layer on fixed features, AdamW.

The learning rate is chosen on a held-out part of the training split, then
the probe is retrained on the whole training split and scored on test.
"""
from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lejepa_jax import optim
from lejepa_jax.models.heads import LinearProbe


def train(features: np.ndarray, labels: np.ndarray, num_classes: int, *, lr: float,
          epochs: int, batch_size: int, weight_decay: float = 1e-6, seed: int = 0):
  """Parameters of a LinearProbe trained with warmup + cosine AdamW."""
  n, dim = features.shape
  batch_size = min(batch_size, n)
  steps_per_epoch = n // batch_size
  total = epochs * steps_per_epoch
  model = LinearProbe(num_classes)
  params = model.init(jax.random.key(seed), jnp.zeros((1, dim)))['params']
  tx = optim.adamw(lr, total, steps_per_epoch, weight_decay)
  x, y = jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.int32)

  def loss_fn(p, xb, yb):
    logits = model.apply({'params': p}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def step(carry, idx):
    p, opt_state = carry
    grads = jax.grad(loss_fn)(p, x[idx], y[idx])
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  def epoch(carry, key):
    order = jax.random.permutation(key, n)[: steps_per_epoch * batch_size]
    return jax.lax.scan(step, carry, order.reshape(steps_per_epoch, batch_size))[0], None

  @jax.jit
  def run(p, key):
    (p, _), _ = jax.lax.scan(epoch, (p, tx.init(p)), jax.random.split(key, epochs))
    return p

  return run(params, jax.random.key(seed + 1))


def accuracy(params, features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
  logits = jax.jit(LinearProbe(num_classes).apply)({'params': params}, jnp.asarray(features))
  return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == labels))


def evaluate(train_x, train_y, test_x, test_y, num_classes: int, *, lrs=(1e-3, 3e-3, 1e-2),
             epochs: int = 50, batch_size: int = 1024, weight_decay: float = 1e-6,
             holdout_fraction: float = 0.1, seed: int = 0) -> dict:
  """Test top-1 of the probe with the lr that is best on a held-out train subset."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(train_x))
  n_hold = int(len(train_x) * holdout_fraction) if len(lrs) > 1 else 0
  hold, fit = order[:n_hold], order[n_hold:]
  best_lr, best_acc = lrs[0], -1.0
  if n_hold:
    for lr in lrs:
      p = train(train_x[fit], train_y[fit], num_classes, lr=lr, epochs=epochs,
                batch_size=batch_size, weight_decay=weight_decay, seed=seed)
      acc = accuracy(p, train_x[hold], train_y[hold], num_classes)
      logging.info('  linear probe lr=%g: held-out top-1 %.4f', lr, acc)
      if acc > best_acc:
        best_lr, best_acc = lr, acc
  params = train(train_x, train_y, num_classes, lr=best_lr, epochs=epochs,
                 batch_size=batch_size, weight_decay=weight_decay, seed=seed)
  return {'linear_probe_top1': accuracy(params, test_x, test_y, num_classes),
          'linear_probe_lr': best_lr}
