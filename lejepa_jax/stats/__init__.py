"""Normality tests, and the choice of which one regularises training.

`lejepa_jax.sigreg.epps_pulley` (the default SIGReg statistic) and the tests in
`univariate` map columns x, shape (..., N, M) -> (..., M), against N(0, 1); they
regularise embeddings through random slices (`lejepa_jax.sigreg.sliced`). The tests in
`multivariate` map samples x, shape (..., N, D) -> (...), against N(0, I) directly.
Every test takes `axis_name` (inside `jax.shard_map`: N is the global count).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lejepa_jax import sigreg
from lejepa_jax.stats import multivariate, univariate

UNIVARIATE = {
    'epps_pulley': sigreg.epps_pulley,
    'anderson_darling': univariate.anderson_darling,
    'cramer_von_mises': univariate.cramer_von_mises,
    'watson': univariate.watson,
    'shapiro_francia': univariate.shapiro_francia,
    'vasicek_entropy': univariate.vasicek_entropy,
    'moments': univariate.moments,
    'order_statistics_nll': univariate.order_statistics_nll,
    'extended_jarque_bera': univariate.extended_jarque_bera,
    'vcreg': univariate.vcreg,
}
MULTIVARIATE = {
    'bhep': multivariate.bhep,
    'henze_zirkler': multivariate.henze_zirkler,
    'henze_visagie': multivariate.henze_visagie,
    'comb': multivariate.comb,
    'bhep_m': multivariate.bhep_m,
}
STATISTICS = tuple(UNIVARIATE) + tuple(MULTIVARIATE)


def regulariser(statistic: str, z: jax.Array, key: jax.Array, *, num_slices: int = 1024,
                axis_name=None, **options) -> jax.Array:
  """The normality penalty of embeddings z, shape (..., N, D) -> scalar.

  A univariate statistic is applied to num_slices random projections drawn from `key`
  (sliced; `statistic='epps_pulley'` is SIGReg); a multivariate one to z itself.
  Either way the result is the mean over the leading indices (e.g. views). `options`
  go to the statistic (e.g. t_max, num_points, quadrature_rule for Epps-Pulley).
  """
  if statistic in UNIVARIATE:
    return sigreg.sliced(UNIVARIATE[statistic], z, key, num_slices=num_slices,
                         axis_name=axis_name, **options)
  if statistic in MULTIVARIATE:
    return jnp.mean(MULTIVARIATE[statistic](z, axis_name=axis_name, **options))
  raise ValueError(f'sigreg.statistic must be one of {STATISTICS}, got {statistic!r}')


def regulariser_on_mesh(statistic: str, z: jax.Array, key: jax.Array, *, batch_axes,
                        mesh=None, num_slices: int = 1024, **options) -> jax.Array:
  """`regulariser` of a global z whose sample axis (-2) is split over the mesh axes
  `batch_axes` of `mesh` (default: the active one, `jax.set_mesh`), under `jax.jit`.

  Each device reduces its own rows and the statistic's own collective over `batch_axes`
  (Epps-Pulley: one pmean of its per-knot sums) combines them; value and gradient are
  those of `regulariser` on the gathered z. Left to XLA's partitioner instead, a variadic
  reduction over a sharded axis becomes an all-gather of every device's partial sums and
  a second 34-output reduction, which XLA's GPU compiler cannot fit in one H100 block on
  32 GPUs (found by `plan --topology=h100-4x8`). Other mesh axes stay automatic.
  """
  axes = tuple(batch_axes)
  spec = P(*(None,) * (z.ndim - 2), axes, None)

  def per_device(z, key):
    return regulariser(statistic, z, key, num_slices=num_slices, axis_name=axes, **options)
  return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, P()), out_specs=P(),
                       axis_names=set(axes))(z, key)
