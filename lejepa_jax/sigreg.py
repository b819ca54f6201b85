"""SIGReg: the Sketched Isotropic Gaussian Regulariser, as pure functions.

`epps_pulley` compares each column's empirical characteristic function (ECF)
with the standard normal's, exp(-t^2/2), in a Gaussian-weighted L2 norm.
`sigreg` projects embeddings on fresh random unit directions (slices) and
averages the per-slice statistic.

Distribution: inside `jax.shard_map` give `axis_name`; the ECF (a mean over
samples) is averaged across that mesh axis with `jax.lax.pmean`, and N is the
global sample count, so value and gradient equal the single-device result on
the full batch. Under plain `jax.jit` with sharded global arrays no axis name
is needed: XLA reduces over the global batch itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def quadrature(t_max: float = 3.0, num_points: int = 17):
  """Knots t_k on [0, t_max] and weights for the integral over the real line.

  |ECF(t) - CF(t)|^2 is even in t, so integrating on [0, t_max] with doubled
  trapezoid weights covers [-t_max, t_max]. The weights include the window
  phi(t) = exp(-t^2/2), which is also the target characteristic function.
  Returns (knots, weights, phi), each of shape (num_points,), float32.
  """
  if num_points < 2:
    raise ValueError(f'sigreg.num_points must be >= 2, got {num_points}')
  if t_max <= 0:
    raise ValueError(f'sigreg.t_max must be > 0, got {t_max}')
  knots = jnp.linspace(0.0, t_max, num_points, dtype=jnp.float32)
  dt = t_max / (num_points - 1)
  trapezoid = jnp.full((num_points,), 2.0 * dt, jnp.float32)
  trapezoid = trapezoid.at[0].set(dt).at[-1].set(dt)
  phi = jnp.exp(-0.5 * knots**2)
  return knots, trapezoid * phi, phi


def _global_count(n_local: int, axis_name) -> jax.Array | int:
  if axis_name is None:
    return n_local
  return n_local * jax.lax.psum(1, axis_name)


def epps_pulley(x: jax.Array, *, t_max: float = 3.0, num_points: int = 17,
                axis_name=None) -> jax.Array:
  """Epps-Pulley statistic of each column of x, shape (..., N, M) -> (..., M).

  statistic_m = N * sum_k w_k |ECF_m(t_k) - exp(-t_k^2/2)|^2, with N the
  global sample count. Computed in float32 whatever the input dtype.
  """
  if x.ndim < 2:
    raise ValueError(f'epps_pulley expects (..., N, M), got shape {x.shape}')
  x = x.astype(jnp.float32)
  knots, weights, phi = quadrature(t_max, num_points)
  # ECF(t) = mean_n exp(i t x_n); complex64 carries cos and sin together.
  ecf = jnp.mean(jnp.exp(1j * (x[..., None] * knots)), axis=-3)  # (..., M, T)
  if axis_name is not None:
    ecf = jax.lax.pmean(ecf, axis_name)
  err = jnp.abs(ecf - phi) ** 2
  return _global_count(x.shape[-2], axis_name) * (err @ weights)


def random_slices(key: jax.Array, dim: int, num_slices: int) -> jax.Array:
  """num_slices unit vectors in R^dim, as the columns of a (dim, num_slices) matrix."""
  directions = jax.random.normal(key, (dim, num_slices), jnp.float32)
  return directions / jnp.linalg.norm(directions, axis=0, keepdims=True)


def sliced(test, z: jax.Array, key: jax.Array, *, num_slices: int = 1024,
           axis_name=None, **test_kwargs) -> jax.Array:
  """Any univariate test made multivariate: mean of `test` over random 1-D projections.

  `test(x, *, axis_name=None, **test_kwargs)` maps (..., N, M) -> (..., M), e.g.
  `epps_pulley` or a test from `lejepa_jax.stats.univariate`. z has shape (..., N, D);
  the same slices, drawn from `key`, serve every leading index (e.g. every view); the
  result is the mean over leading indices and slices. Pass the same key on every device
  (e.g. `jax.random.fold_in(base_key, step)`).
  """
  if z.ndim < 2:
    raise ValueError(f'expected embeddings of shape (..., N, D), got shape {z.shape}')
  slices = random_slices(key, z.shape[-1], num_slices)
  projected = z.astype(jnp.float32) @ slices
  return jnp.mean(test(projected, axis_name=axis_name, **test_kwargs))


def sigreg(z: jax.Array, key: jax.Array, *, num_slices: int = 1024,
           t_max: float = 3.0, num_points: int = 17, axis_name=None) -> jax.Array:
  """Sliced Epps-Pulley of embeddings z, shape (..., N, D) -> scalar (see `sliced`)."""
  if z.ndim < 2:
    raise ValueError(f'sigreg expects (..., N, D), got shape {z.shape}')
  return sliced(epps_pulley, z, key, num_slices=num_slices, axis_name=axis_name,
                t_max=t_max, num_points=num_points)
