"""Weighted k-NN classifier on L2-normalised features (the DINO protocol)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _predict(train_x, train_y, query, *, k: int, temperature: float, num_classes: int):
  sims = query @ train_x.T                                  # cosine similarities
  top_sims, top_idx = jax.lax.top_k(sims, k)
  votes = jax.nn.one_hot(train_y[top_idx], num_classes) * jnp.exp(top_sims / temperature)[..., None]
  return jnp.argmax(votes.sum(axis=1), axis=-1)


def evaluate(train_x, train_y, test_x, test_y, num_classes: int, *, k: int = 20,
             temperature: float = 0.07, chunk: int = 1024) -> dict:
  """Top-1 of a k-NN vote weighted by exp(cosine / temperature)."""
  tx = _normalize(jnp.asarray(train_x, jnp.float32))
  ty = jnp.asarray(train_y, jnp.int32)
  k = min(k, len(train_x))
  preds = []
  for start in range(0, len(test_x), chunk):
    q = _normalize(jnp.asarray(test_x[start:start + chunk], jnp.float32))
    preds.append(np.asarray(_predict(tx, ty, q, k=k, temperature=temperature,
                                     num_classes=num_classes)))
  return {'knn_top1': float(np.mean(np.concatenate(preds) == np.asarray(test_y)))}
