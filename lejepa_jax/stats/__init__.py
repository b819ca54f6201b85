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
