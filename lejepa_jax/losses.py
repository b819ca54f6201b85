"""The LeJEPA objective: view invariance + lambda * SIGReg (paper, section 5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lejepa_jax import stats

CONVENTIONS = ('convex', 'additive')


def invariance(global_proj: jax.Array, all_proj: jax.Array) -> jax.Array:
  """Mean squared distance of every view to the centre of the global views.

  global_proj: (Vg, N, K) projections of the global views; all_proj: (V, N, K)
  projections of all views (global first). Mean over views, samples and dims.
  """
  centers = jnp.mean(global_proj, axis=0)
  return jnp.mean(jnp.square(centers[None] - all_proj))


def combine(inv: jax.Array, sig: jax.Array, lamb: float, convention: str) -> jax.Array:
  """'convex': (1 - lamb) * inv + lamb * sig (the paper); 'additive': inv + lamb * sig."""
  if convention == 'convex':
    return (1.0 - lamb) * inv + lamb * sig
  if convention == 'additive':
    return inv + lamb * sig
  raise ValueError(f'loss_convention must be one of {CONVENTIONS}, got {convention!r}')


def lejepa_loss(global_proj: jax.Array, all_proj: jax.Array, key: jax.Array, *,
                lamb: float, convention: str = 'convex', statistic: str = 'epps_pulley',
                num_slices: int = 1024, axis_name=None, batch_axes=None, **statistic_options):
  """Returns (loss, {'inv': ..., 'sigreg': ...}).

  SIGReg is averaged over views: each view's batch of projections is tested
  against N(0, I) with the same slices (drawn from `key`). `statistic` picks the
  normality test (default Epps-Pulley; see `lejepa_jax.stats`), `statistic_options`
  go to it (e.g. t_max, num_points for Epps-Pulley).

  Distribution: inside `jax.shard_map` give `axis_name`; under `jax.jit` on a mesh give
  `batch_axes` (the mesh axes the sample axis is split over) and SIGReg runs per device
  with one collective (`stats.regulariser_on_mesh`); with neither, XLA partitions it all.
  """
  inv = invariance(global_proj.astype(jnp.float32), all_proj.astype(jnp.float32))
  if axis_name is not None:
    inv = jax.lax.pmean(inv, axis_name)
  if batch_axes is not None and axis_name is None:
    sig = stats.regulariser_on_mesh(statistic, all_proj, key, batch_axes=batch_axes,
                                    num_slices=num_slices, **statistic_options)
  else:
    sig = stats.regulariser(statistic, all_proj, key, num_slices=num_slices,
                            axis_name=axis_name, **statistic_options)
  return combine(inv, sig, lamb, convention), {'inv': inv, 'sigreg': sig}
