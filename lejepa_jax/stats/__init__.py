"""Normality tests beyond Epps-Pulley (which lives in `lejepa_jax.sigreg`).

`univariate`: tests of columns of x, shape (..., N, M) -> (..., M), against N(0, 1).
`multivariate`: tests of samples x, shape (..., N, D) -> (...), against N(0, I).
"""
