"""Univariate tests of the simple hypothesis "this column is N(0, 1)", as pure functions.

Tests (each maps x of shape (..., N, M) to one statistic per column, shape (..., M)):
  anderson_darling      EDF test, tail-weighted (Anderson-Darling A^2)
  cramer_von_mises      EDF test (Cramer-von Mises W^2)
  watson                EDF test, W^2 without its location component (Watson U^2)
  shapiro_francia       sorted sample against expected normal order statistics
  vasicek_entropy       m-spacing entropy estimate turned into a KL divergence to N(0, 1)
  moments               raw moments E[x^k], k <= k_max, against 0, 1, 0, 3, ...
  order_statistics_nll  negative log density of each order statistic, centred
  extended_jarque_bera  mean, variance, skewness and kurtosis (~ chi^2(4))
  vcreg                 mean and variance only (~ chi^2(2))

Conventions. The test runs down each column (axis -2). Larger = less normal. Each
statistic is computed in float32 whatever the input dtype, is differentiable (these
are training losses; sorting is differentiable), and is scaled so that its null
distribution hardly moves with N (e.g. W^2 = 1/(12N) + sum_i (...)^2, not a mean of
squares that shrinks like 1/N). The data are never standardised: the hypothesis is
mean 0 AND variance 1, and standardising would hide exactly the mean and scale
errors a regulariser of embeddings must see.

Distribution: inside `jax.shard_map` give `axis_name`; x is then this device's shard
of the rows and N the global row count. Tests built on means (moments,
extended_jarque_bera, vcreg) average their per-column means across the axis with
`jax.lax.pmean`. Tests built on the sorted sample (all others) all-gather the rows of
every column first, so every device holds the global (N, M) columns (memory
N_global x M per device) and computes the identical statistic. Either way value and
gradient equal the single-device result on the full batch.
"""
from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

from lejepa_jax.sigreg import global_count

_TINY = 1e-30        # floor for spacings before a log
_VAR_FLOOR = 1e-12   # floor for variances before a division (its square stays a normal float32)


# ---------------------------------------------------------------- helpers

def _as_columns(x: jax.Array, name: str) -> jax.Array:
  if x.ndim < 2:
    raise ValueError(f'{name} expects (..., N, M), got shape {x.shape}')
  return x.astype(jnp.float32)


def _on_sorted_columns(statistic, x: jax.Array, axis_name):
  """statistic(sorted full columns, shape (..., N_global, M)) -> (..., M), on every device.

  The rows of every column are gathered from all devices first. all_gather's result
  still counts as device-varying, so the (identical) per-device values are averaged
  with pmean: a no-op on the value that marks it replicated and, in the backward
  pass, hands each device 1/n_devices of the cotangent, which all_gather's transpose
  (a reduce-scatter) sums back to exactly the full-batch gradient of each shard.
  """
  if axis_name is not None:
    x = jax.lax.all_gather(x, axis_name, axis=x.ndim - 2, tiled=True)
  value = statistic(jnp.sort(x, axis=-2))
  if axis_name is not None:
    value = jax.lax.pmean(value, axis_name)
  return value


def _global_mean(values: jax.Array, axis_name) -> jax.Array:
  """Mean over samples (axis -2) across all devices: (..., N_local, M) -> (..., M)."""
  mean = jnp.mean(values, axis=-2)
  return mean if axis_name is None else jax.lax.pmean(mean, axis_name)


def _ranks(n: int) -> np.ndarray:
  """1, ..., n as a float32 column, broadcasting against (..., n, M)."""
  return np.arange(1, n + 1, dtype=np.float32)[:, None]


def _harmonic(n: int) -> np.ndarray:
  """H_0, ..., H_n in float64 (psi(k) = H_{k-1} - euler_gamma)."""
  return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


def _log_factorial(n: int) -> np.ndarray:
  """log 0!, ..., log n! in float64."""
  return np.array([math.lgamma(k + 1) for k in range(n + 1)])


def _normal_moment(k: int) -> int:
  """E[Z^k] for Z ~ N(0, 1): (k-1)!! for even k, 0 for odd k."""
  return 0 if k % 2 else math.prod(range(k - 1, 0, -2))


# ---------------------------------------------------------------- EDF tests

def anderson_darling(x: jax.Array, *, axis_name=None) -> jax.Array:
  """Anderson-Darling A^2 = -N - (1/N) sum_i (2i-1) [log Phi(x_(i)) + log Phi(-x_(N+1-i))].

  log_ndtr keeps both tails finite (Phi(x) underflows float32 below x = -13) and
  gives a gradient there. E[A^2] = 1 under the null for every N.
  """
  x = _as_columns(x, 'anderson_darling')

  def statistic(s):
    n = s.shape[-2]
    logs = log_ndtr(s) + log_ndtr(-jnp.flip(s, axis=-2))
    return -n - jnp.sum((2 * _ranks(n) - 1) * logs, axis=-2) / n

  return _on_sorted_columns(statistic, x, axis_name)


def _cvm_terms(s):
  n = s.shape[-2]
  u = ndtr(s)
  w2 = 1.0 / (12 * n) + jnp.sum((u - (2 * _ranks(n) - 1) / (2 * n)) ** 2, axis=-2)
  return w2, u


def cramer_von_mises(x: jax.Array, *, axis_name=None) -> jax.Array:
  """Cramer-von Mises W^2 = 1/(12N) + sum_i (Phi(x_(i)) - (2i-1)/(2N))^2 (scipy's).

  N times the mean squared gap between Phi(x_(i)) and the plotting positions, so
  E[W^2] = 1/6 under the null for every N (the reference code's plain mean of
  squares shrinks like 1/N).
  """
  x = _as_columns(x, 'cramer_von_mises')
  return _on_sorted_columns(lambda s: _cvm_terms(s)[0], x, axis_name)


def watson(x: jax.Array, *, axis_name=None) -> jax.Array:
  """Watson U^2 = W^2 - N (mean_i Phi(x_i) - 1/2)^2.

  The subtracted term is W^2's component along a constant offset of the CDF values,
  on W^2's scale (the factor N; the reference code subtracts the unscaled square
  from a mean of squares). E[U^2] = 1/12 under the null. U^2 is blind to a rotation
  of Phi(x) on the circle, not to a shift of x: N(mu, 1) still bends Phi(x) away
  from uniform and is rejected.
  """
  x = _as_columns(x, 'watson')

  def statistic(s):
    w2, u = _cvm_terms(s)
    return w2 - s.shape[-2] * (jnp.mean(u, axis=-2) - 0.5) ** 2

  return _on_sorted_columns(statistic, x, axis_name)


# ---------------------------------------------------------------- order statistics

def _blom_scores(n: int) -> np.ndarray:
  """m_i = Phi^-1((i - 3/8) / (N + 1/4)), Blom's approximation of E[Z_(i)], float32 column."""
  # float64 constants at trace time: jnp.ndtri inside jit would be a traced array.
  inv_cdf = statistics.NormalDist().inv_cdf
  return np.array([inv_cdf((i - 0.375) / (n + 0.25)) for i in range(1, n + 1)],
                  np.float32)[:, None]


def shapiro_francia(x: jax.Array, *, composite: bool = False, axis_name=None) -> jax.Array:
  """Sorted sample x_(i) against Blom's expected normal order statistics m_i.

  composite=False (default; the N(0, 1) test): N * mean_i (x_(i) - m_i)^2, the L2
  distance between sample and N(0, 1) quantiles (de Wet and Venter). It sees shape,
  mean and scale errors. Its null mean, mostly the summed variance of the order
  statistics, creeps up like log log N (2.8 at N = 256, 3.4 at N = 2048).
  composite=True: the classical Shapiro-Francia test of "x is normal with SOME mean
  and variance", N * (1 - W') with W' the squared Pearson correlation of x_(i) and
  m_i. W' is unchanged by x -> a x + b, so it cannot see a wrong mean or scale
  (N(3, 4) passes), and neither can the reference code's 1 - |cos(m, x_sorted)|,
  which is scale-invariant and so cannot reject N(0, 4). Shapiro-Francia is the
  location-scale-invariant version of the default statistic: minimising
  sum (x_(i) - a - b m_i)^2 over a, b leaves sum (x - mean x)^2 (1 - W').
  """
  x = _as_columns(x, 'shapiro_francia')

  def statistic(s):
    n = s.shape[-2]
    m = _blom_scores(n)
    if not composite:
      return jnp.sum((s - m) ** 2, axis=-2)
    # 1 - W' = (residual sum of squares of the regression of x_(i) on m_i) / ss, computed
    # from the residuals: 1 - cov^2 / (ss |m|^2) would cancel catastrophically in float32.
    m = m - m.mean()
    centred = s - jnp.mean(s, axis=-2, keepdims=True)
    slope = jnp.sum(centred * m, axis=-2, keepdims=True) / np.sum(m**2)
    rss = jnp.sum((centred - slope * m) ** 2, axis=-2)
    return n * rss / jnp.maximum(jnp.sum(centred**2, axis=-2), _VAR_FLOOR)

  return _on_sorted_columns(statistic, x, axis_name)


def _default_spacing(n: int) -> int:
  return max(1, round(math.sqrt(n) / 2))


def _log_ndtr_difference(a, b):
  """log(Phi(b) - Phi(a)) for a <= b, accurate in both tails and for tiny b - a.

  Works in the tail the interval leans into (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)),
  so neither Phi rounds to 1; b - a = 0 gives log(1e-30) rather than -inf.
  """
  upper = (a + b) > 0
  high = jnp.where(upper, log_ndtr(-a), log_ndtr(b))
  low = jnp.where(upper, log_ndtr(-b), log_ndtr(a))
  return high + jnp.log(-jnp.expm1(jnp.minimum(low - high, -_TINY)))


VASICEK_DOMAINS = ('cdf', 'x')


def vasicek_entropy(x: jax.Array, *, m: int | None = None, domain: str = 'cdf',
                    axis_name=None) -> jax.Array:
  """N * KL(sample || N(0, 1)) estimated from m-spacings (Vasicek 1976), centred.

  Vasicek's entropy estimate of a sorted sample y is
    H(y) = (1/N) sum_i log(N / (2m) (y_(i+m) - y_(i-m))),
  with y_(j) clamped to y_(1) / y_(N) beyond the ends; m defaults to round(sqrt(N)/2),
  at least 1. KL(p || N(0, 1)) = -H(X) + E[X^2]/2 + log(2 pi)/2 is zero only for
  N(0, 1) itself (the reference code compares exp(H) with the sample standard
  deviation instead, which is blind to mean and scale). Two estimates of it:
    domain='cdf' (default): -H(u) with u = Phi(x). KL is unchanged by the map
      x -> Phi(x), and N(0, 1) maps to U(0, 1), whose entropy is 0. The spacings
      Phi(x_(i+m)) - Phi(x_(i-m)) integrate the normal density exactly over each
      spacing, so under the null the statistic is a function of uniform spacings
      only: its null distribution is exact and free of the density's curvature.
    domain='x': -H(x) + mean(x^2)/2 + log(2 pi)/2, the literal formula, which takes
      the density constant across each spacing. In the tails (the clamped ends
      above all) that is far off: after the centring below its null mean still
      drifts with N (about -1 at N = 256, -7 at 1024, -14 at 2048, m by the default).
  Both are centred by b_N, the exact null bias of the spacing part: for uniform
  order statistics E[log(U_(j) - U_(i))] = psi(j - i) - psi(N + 1) (digammas of
  integers), which makes the 'cdf' null mean exactly 0 for every N (uncentred it
  would be about N/(4m)). The null spread grows like (N/m)^(1/2), about N^(1/4):
  the spacings' noise falls more slowly than 1/N. Under alternatives the statistic
  grows like N times the divergence, as the other tests.
  """
  if domain not in VASICEK_DOMAINS:
    raise ValueError(f'vasicek_entropy domain must be one of {VASICEK_DOMAINS}, got {domain!r}')
  x = _as_columns(x, 'vasicek_entropy')

  def statistic(s):
    n = s.shape[-2]
    k = _default_spacing(n) if m is None else m
    if not 1 <= k < n:
      raise ValueError(f'vasicek_entropy needs 1 <= m < N, got m={k}, N={n}')
    upper = np.minimum(np.arange(n) + k, n - 1)
    lower = np.maximum(np.arange(n) - k, 0)
    harmonic = _harmonic(n)
    bias = np.mean(harmonic[upper - lower - 1]) - harmonic[n]   # E[log uniform spacing]
    if domain == 'cdf':
      log_spacing = _log_ndtr_difference(s[..., lower, :], s[..., upper, :])
      kl = -jnp.mean(log_spacing, axis=-2)
    else:
      log_spacing = jnp.log(jnp.maximum(s[..., upper, :] - s[..., lower, :], _TINY))
      kl = -jnp.mean(log_spacing, axis=-2) + 0.5 * jnp.mean(s**2, axis=-2)
      bias = bias + 0.5 * math.log(2 * math.pi)
    # -H = -mean(log spacing) - log(N / 2m); removing the null mean of its uniform
    # part, -bias - log(N / 2m), leaves -mean(log spacing) + bias.
    return n * (kl + np.float32(bias))

  return _on_sorted_columns(statistic, x, axis_name)


def order_statistics_nll(x: jax.Array, *, axis_name=None) -> jax.Array:
  """mean_i -log f_(i)(x_(i)) minus its null expectation.

  f_(i) is the density of the i-th smallest of N draws from N(0, 1):
  -log f_(i)(x) = -[log N!/((i-1)!(N-i)!) + (i-1) log Phi(x) + (N-i) log Phi(-x) + log phi(x)].
  Its null expectation is cheap and exact: with U_(i) ~ Beta(i, N+1-i),
  E[-log f_(i)(X_(i))] = h(Beta(i, N+1-i)) + E[X_(i)^2]/2 + log(2 pi)/2, and the
  E[X_(i)^2] sum to N. It is subtracted, so the statistic has null mean 0 (it is
  negative about half the time) and grows like N under alternatives. Its null
  spread hardly moves with N: near the null it behaves like A^2 / 2.
  """
  x = _as_columns(x, 'order_statistics_nll')

  def statistic(s):
    n = s.shape[-2]
    i = np.arange(1, n + 1)
    log_fact = _log_factorial(n)
    log_comb = log_fact[n] - log_fact[i - 1] - log_fact[n - i]
    # Entropy of Beta(a, b) with a + b = N + 1: log B(a, b) - (a-1) psi(a) - (b-1) psi(b)
    # + (N-1) psi(N+1); the Euler-gamma parts of the digammas cancel.
    harmonic = _harmonic(n)
    a, b = i, n + 1 - i
    beta_entropy = -log_comb - (a - 1) * harmonic[a - 1] - (b - 1) * harmonic[b - 1] \
        + (n - 1) * harmonic[n]
    expected = np.mean(beta_entropy) + 0.5 + 0.5 * math.log(2 * math.pi)
    nll = -(log_comb.astype(np.float32)[:, None]
            + (_ranks(n) - 1) * log_ndtr(s) + (n - _ranks(n)) * log_ndtr(-s)
            - 0.5 * s**2 - np.float32(0.5 * math.log(2 * math.pi)))
    return jnp.mean(nll, axis=-2) - np.float32(expected)

  return _on_sorted_columns(statistic, x, axis_name)


# ---------------------------------------------------------------- moment tests

def moments(x: jax.Array, *, k_max: int = 4, axis_name=None) -> jax.Array:
  """N * sum_{k <= k_max} (mean(x^k) - E[Z^k])^2 / Var(Z^k), Z ~ N(0, 1).

  E[Z^k] = 0, 1, 0, 3, 0, 15, ... and Var(Z^k) = E[Z^2k] - E[Z^k]^2, so each term is
  asymptotically chi^2(1) under the null (the terms are correlated; the null mean is
  exactly k_max for every N). Sharded, the local means are averaged with pmean (the
  reference code's distributed mean discards its all-reduce).
  """
  if k_max < 1:
    raise ValueError(f'moments needs k_max >= 1, got {k_max}')
  x = _as_columns(x, 'moments')
  n = global_count(x.shape[-2], axis_name)
  powers, power = [], x
  for _ in range(k_max):
    powers.append(power)
    power = power * x
  sample = _global_mean(jnp.stack(powers), axis_name)        # (k_max, ..., M)
  ks = range(1, k_max + 1)
  target = np.array([_normal_moment(k) for k in ks], np.float32)
  null_var = np.array([_normal_moment(2 * k) - _normal_moment(k) ** 2 for k in ks], np.float32)
  shape = (k_max,) + (1,) * (sample.ndim - 1)
  return n * jnp.sum((sample - target.reshape(shape)) ** 2 / null_var.reshape(shape), axis=0)


def _central_moments(x, axis_name, higher=True):
  """Global N, mean, unbiased variance, and biased m2 (with higher: m3, m4) of each column.

  Two passes (the global mean first, then centred power means) rather than raw power
  sums: raw sums lose the variance to cancellation in float32 when |mean| >> std.
  """
  n = global_count(x.shape[-2], axis_name)
  if n < 2:
    raise ValueError(f'the variance needs N >= 2 samples, got N={n}')
  mean = _global_mean(x, axis_name)
  c = x - jnp.expand_dims(mean, -2)
  c2 = c * c
  if not higher:
    m2 = _global_mean(c2, axis_name)
    return n, mean, m2 * (n / (n - 1)), m2
  m2, m3, m4 = _global_mean(jnp.stack([c2, c2 * c, c2 * c2]), axis_name)
  return n, mean, m2 * (n / (n - 1)), m2, m3, m4


def _mean_variance_terms(n, mean, var):
  # N mean^2 / var ~ chi^2(1) and (var - 1)^2 / Var(var) = (N-1)(var-1)^2 / 2 ~ chi^2(1).
  return n * mean**2 / jnp.maximum(var, _VAR_FLOOR) + (n - 1) * (var - 1) ** 2 / 2


def extended_jarque_bera(x: jax.Array, *, axis_name=None) -> jax.Array:
  """N mean^2/var + (N-1)(var-1)^2/2 + N/6 (S^2 + (K-3)^2/4), ~ chi^2(4) under the null.

  var is the unbiased variance; S = m3 / m2^1.5 and K = m4 / m2^2 use biased central
  moments, so the last term is exactly the classical Jarque-Bera statistic
  (scipy.stats.jarque_bera).
  """
  x = _as_columns(x, 'extended_jarque_bera')
  n, mean, var, m2, m3, m4 = _central_moments(x, axis_name)
  # Powers of 1/std rather than divisions by m2^2: the latter's gradient squares m2^2,
  # which underflows for a collapsed column and turns 0 * inf into nan.
  inv_std = jax.lax.rsqrt(jnp.maximum(m2, _VAR_FLOOR))
  skew, kurt = m3 * inv_std**3, m4 * inv_std**4
  return _mean_variance_terms(n, mean, var) + n / 6 * (skew**2 + (kurt - 3) ** 2 / 4)


def vcreg(x: jax.Array, *, axis_name=None) -> jax.Array:
  """N mean^2/var + (N-1)(var-1)^2/2 (unbiased var): the first two terms of extended_jarque_bera."""
  x = _as_columns(x, 'vcreg')
  n, mean, var, _ = _central_moments(x, axis_name, higher=False)
  return _mean_variance_terms(n, mean, var)
