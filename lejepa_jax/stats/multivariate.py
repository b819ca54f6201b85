"""Multivariate tests of the simple null N(0, I_D), as pure functions.

Every statistic is N times a weighted L2 distance between a transform of the sample
(empirical characteristic function psi_N(t) = mean_j exp(i <t, x_j>), its real part
R_N, or empirical moment generating function M_N(t) = mean_j exp(<t, x_j>)) and the
same transform of N(0, I), integrated against a Gaussian weight. Each integral has a
closed form: sums of kernels over pairs of samples, single sums and a constant.

  bhep / henze_zirkler  ECF vs exp(-|t|^2/2)                  pair sums
  henze_visagie         MGF PDE grad M = t M                  pair sums
  bhep_m                MGF vs exp(|t|^2/2)                   pair sums
  comb                  R_N M_N vs 1 (ECF times MGF)          sums over pairs of pairs, O(N^4)

The data are never centred or whitened: that would hide mean and scale errors.
x has shape (..., N, D), samples in rows; the result has shape (...). Computed in
float32 whatever the input dtype; Gram matrices use the highest matmul precision
(squared distances come from them).

Distribution: inside `jax.shard_map` pass `axis_name`. Each device gathers all rows,
evaluates the kernels between its own rows and all rows, and the partial sums are
added with `jax.lax.psum`; N is the global count. Value and gradient equal the
single-device result on the full batch (gradients reach the gathered copies through
the transpose of `all_gather`).

Weights are probability densities (Gaussian), so each statistic is N times a mean
squared deviation over frequencies t; the papers' unnormalised weights exp(-gamma |t|^2)
differ by a constant factor, stated per function.

Null distributions (x ~ N(0, I)): BHEP's statistic is bounded. The MGF-based ones
(henze_visagie, bhep_m, comb) contain exp(|x_j|^2 / gamma)-sized terms whose mean is
finite only for gamma (beta) > 2; below that the statistic drifts upward with N,
dominated by the largest |x_j| (the reference's defaults HV gamma=1, COMB gamma=0.1),
hence the parameter checks. Their null means grow like (1 - 2/gamma)^(-D/2) and their
terms like exp(D / gamma): float32 overflows past D of roughly 70 gamma, and heavy-tailed
data (or bf16 rounding of it) moves them a lot. They suit small D (e.g. projections).

Precision: each statistic is O(1) under the null but a difference of sums of size N.
Kernels are centred per pair (see `_centred`), yet the float32 rounding of constants
leaves an absolute error of order N * 1e-8, far below the null spread.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lejepa_jax.sigreg import global_count


_HIGHEST = jax.lax.Precision.HIGHEST


def _prepare(x, name):
  if x.ndim < 2:
    raise ValueError(f'{name} expects (..., N, D), got shape {x.shape}')
  return x.astype(jnp.float32)


def _gather(x, axis_name):
  """All rows of the global batch, (..., N, D), on every device."""
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=x.ndim - 2, tiled=True)


def _total(local_sum, axis_name):
  return local_sum if axis_name is None else jax.lax.psum(local_sum, axis_name)


def _gram(a, b):
  """<a_j, b_k>, shape (..., J, K)."""
  return jnp.einsum('...jd,...kd->...jk', a, b, precision=_HIGHEST)


def _weighted_sum(values, weights):
  """values @ weights (numpy weights) in full float32: no reduced-precision matmul passes."""
  return jnp.einsum('...p,p->...', values, weights, precision=_HIGHEST)


def _sq_norm(x):
  return jnp.sum(x * x, axis=-1)


def _v_statistic(x, pair_kernel, axis_name):
  """(1/N) sum_{j,k} pair_kernel(x_j, x_k), j over local rows and k over all rows.

  pair_kernel(x_local, x_all) -> (..., n_local, N). Rows are summed first, then the
  row sums: the float32 rounding error then grows like sqrt(N), not N.
  """
  x_all = _gather(x, axis_name)
  rows = pair_kernel(x, x_all).sum(-1)
  return _total(rows.sum(-1), axis_name) / x_all.shape[-2]


def _centred(log_pair, log_single_local, log_single_all, log_const):
  """K_jk - m_j - m_k + c from logarithms, as c (expm1(.) - expm1(.) - expm1(.)).

  The three sums of the closed forms are each about N while the statistic is O(1);
  subtracting per pair, in units of c with expm1, keeps each term's rounding error
  relative to its own (small) size rather than to c.
  """
  return jnp.exp(log_const) * (
      jnp.expm1(log_pair - log_const)
      - jnp.expm1(log_single_local - log_const)[..., :, None]
      - jnp.expm1(log_single_all - log_const)[..., None, :])


def _bhep(x, beta, axis_name):
  d = x.shape[-1]
  b2 = beta * beta
  log_c = -0.5 * d * np.log1p(2 * b2)
  log_m0 = -0.5 * d * np.log1p(b2)

  def kernel(xl, xa):
    nl, na = _sq_norm(xl), _sq_norm(xa)
    sq_dist = jnp.maximum(nl[..., :, None] + na[..., None, :] - 2 * _gram(xl, xa), 0.0)
    single = lambda n: log_m0 - b2 / (2 * (1 + b2)) * n
    return _centred(-0.5 * b2 * sq_dist, single(nl), single(na), log_c)

  return _v_statistic(x, kernel, axis_name)


def bhep(x: jax.Array, *, beta: float = 0.1, axis_name=None) -> jax.Array:
  """Baringhaus-Henze-Epps-Pulley statistic, (..., N, D) -> (...).

  N * int_{R^D} |psi_N(t) - exp(-|t|^2/2)|^2 phi_beta(t) dt, phi_beta the N(0, beta^2 I)
  density. Closed form (with |.| the Euclidean norm):
    (1/N) sum_{j,k} exp(-beta^2 |x_j - x_k|^2 / 2)
    - 2 (1 + beta^2)^(-D/2) sum_j exp(-beta^2 |x_j|^2 / (2 (1 + beta^2)))
    + N (1 + 2 beta^2)^(-D/2).
  Under N(0, I) its mean is 1 - (1 + 2 beta^2)^(-D/2) for every N. (The reference
  returns the integral without the factor N, whose null distribution shrinks like 1/N.)
  """
  if not beta > 0:
    raise ValueError(f'bhep needs beta > 0, got {beta}')
  return _bhep(_prepare(x, 'bhep'), float(beta), axis_name)


def henze_zirkler_beta(n: int, d: int) -> float:
  """Henze-Zirkler bandwidth (1/sqrt 2) ((2D + 1) N / 4)^(1/(D + 4))."""
  return float(((2 * d + 1) * n / 4.0) ** (1.0 / (d + 4)) / np.sqrt(2.0))


def henze_zirkler(x: jax.Array, *, axis_name=None) -> jax.Array:
  """Henze-Zirkler statistic: `bhep` with beta = henze_zirkler_beta(N, D), N global.

  N * int_{R^D} |psi_N(t) - exp(-|t|^2/2)|^2 phi_beta(t) dt with that beta; closed form
  as in `bhep`. The bandwidth grows with N, so the null mean 1 - (1 + 2 beta^2)^(-D/2)
  tends to 1 and the statistic grows slower than N under alternatives.
  """
  x = _prepare(x, 'henze_zirkler')
  n = global_count(x.shape[-2], axis_name)
  return _bhep(x, henze_zirkler_beta(n, x.shape[-1]), axis_name)


def henze_visagie(x: jax.Array, *, gamma: float = 5.0, axis_name=None) -> jax.Array:
  """Henze-Visagie statistic from the PDE grad M(t) = t M(t) of N(0, I)'s MGF.

  N * int_{R^D} |grad M_N(t) - t M_N(t)|^2 w_gamma(t) dt, with w_gamma the N(0, I/(2 gamma))
  density (gamma/pi)^(D/2) exp(-gamma |t|^2). With grad M_N(t) - t M_N(t) =
  mean_j (x_j - t) exp(<t, x_j>) and s = x_j + x_k, the closed form is
    (1/N) sum_{j,k} exp(|s|^2 / (4 gamma))
        * (<x_j, x_k> - |s|^2 / (2 gamma) + |s|^2 / (4 gamma^2) + D / (2 gamma)),
  with no single sum or constant: the PDE residual of N(0, I) is zero.
  Henze & Visagie (2020) weight by exp(-gamma |t|^2) itself, a factor (pi/gamma)^(D/2)
  more. Needs gamma > 2: the diagonal terms grow like exp(|x_j|^2 / gamma), whose mean
  under N(0, I) is infinite for gamma <= 2.
  """
  if not gamma > 2:
    raise ValueError(f'henze_visagie needs gamma > 2 (finite null mean), got {gamma}')
  x = _prepare(x, 'henze_visagie')
  d = x.shape[-1]
  g = float(gamma)

  def kernel(xl, xa):
    inner = _gram(xl, xa)
    s2 = jnp.maximum(_sq_norm(xl)[..., :, None] + _sq_norm(xa)[..., None, :] + 2 * inner, 0.0)
    poly = inner + s2 * (1 / (4 * g * g) - 1 / (2 * g)) + d / (2 * g)
    return jnp.exp(s2 / (4 * g)) * poly

  return _v_statistic(x, kernel, axis_name)


def bhep_m(x: jax.Array, *, beta: float = 10.0, axis_name=None) -> jax.Array:
  """MGF analogue of BHEP (Henze & Jimenez-Gamero 2019), (..., N, D) -> (...).

  N * int_{R^D} (M_N(t) - exp(|t|^2/2))^2 w_beta(t) dt, with w_beta the N(0, I/(2 beta))
  density (beta/pi)^(D/2) exp(-beta |t|^2). Closed form:
    (1/N) sum_{j,k} exp(|x_j + x_k|^2 / (4 beta))
    - 2 (beta / (beta - 1/2))^(D/2) sum_j exp(|x_j|^2 / (4 beta - 2))
    + N (beta / (beta - 1))^(D/2).
  The paper (and the reference code, which also drops the constant) weights by
  exp(-beta |t|^2), i.e. (pi/beta)^(D/2) times this. The integral exists for beta > 1;
  beta > 2 is needed for a finite null mean (the j = k terms are exp(|x_j|^2 / beta)).
  """
  if not beta > 2:
    raise ValueError(f'bhep_m needs beta > 2 (finite null mean), got {beta}')
  x = _prepare(x, 'bhep_m')
  d = x.shape[-1]
  b = float(beta)
  log_c = -0.5 * d * np.log1p(-1 / b)
  log_m0 = -0.5 * d * np.log1p(-1 / (2 * b))

  def kernel(xl, xa):
    nl, na = _sq_norm(xl), _sq_norm(xa)
    s2 = jnp.maximum(nl[..., :, None] + na[..., None, :] + 2 * _gram(xl, xa), 0.0)
    single = lambda n: log_m0 + n / (4 * b - 2)
    return _centred(s2 / (4 * b), single(nl), single(na), log_c)

  return _v_statistic(x, kernel, axis_name)


def _trig_mgf_kernel(a_sq, b_sq, ab, gamma):
  """G(a, b) = int cos(<t, b>) exp(<t, a>) w_gamma(t) dt, from |a|^2, |b|^2 and <a, b>.

  = Re E exp(<t, a + i b>) for t ~ N(0, I/(2 gamma))
  = exp((|a|^2 - |b|^2) / (4 gamma)) cos(<a, b> / (2 gamma)).
  """
  return jnp.exp((a_sq - b_sq) / (4 * gamma)) * jnp.cos(ab / (2 * gamma))


def comb(x: jax.Array, *, gamma: float = 5.0, axis_name=None,
         batch_size: int | None = None) -> jax.Array:
  """ECF-times-MGF statistic of Henze, Jimenez-Gamero & Meintanis (2019), (..., N, D) -> (...).

  For X ~ N(0, Sigma), R(t) M(t) = exp(-t'St/2) exp(t'St/2) = 1 (R the real part of the
  characteristic function). The statistic is
    N * int_{R^D} (R_N(t) M_N(t) - 1)^2 w_gamma(t) dt,
  w_gamma the N(0, I/(2 gamma)) density (gamma/pi)^(D/2) exp(-gamma |t|^2). With
    G(a, b) = int cos(<t, b>) exp(<t, a>) w_gamma(t) dt
            = exp((|a|^2 - |b|^2) / (4 gamma)) cos(<a, b> / (2 gamma)),
  the closed form is
    1/(2 N^3) sum_{j,k,l,m} [G(x_k + x_m, x_j - x_l) + G(x_k + x_m, x_j + x_l)]
    - (2/N) sum_{j,k} G(x_k, x_j) + N.
  (The paper weights by exp(-gamma |t|^2), (pi/gamma)^(D/2) times this.) The reference's
  COMB keeps only the middle sum, as sqrt(N) (mean G - 1): a signed first-order term,
  not this L2 distance. Squaring R_N M_N makes a sum over pairs of pairs: O(N^4 D) time,
  evaluated `batch_size` local rows at a time (default one) with `jax.lax.map`,
  memory O(N^3) per row.

  Blind spot: R M = 1 for every centred normal, so a pure covariance error (e.g. scale)
  is invisible at the population level; it shows only through the statistic's spread
  and does not grow with N. gamma > 2 keeps the null mean finite (the terms with
  j = k = l = m carry exp(|x_j|^2 / gamma), as in `bhep_m`).
  """
  if not gamma > 2:
    raise ValueError(f'comb needs gamma > 2 (finite null mean), got {gamma}')
  x = _prepare(x, 'comb')
  g = float(gamma)
  n_local = x.shape[-2]
  x_all = _gather(x, axis_name)
  n = x_all.shape[-2]
  first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_local
  sq_all = _sq_norm(x_all)

  # sum_j G(x_k, x_j) for every row k, from the gathered rows (O(N^2), cheap).
  cross = _trig_mgf_kernel(sq_all[..., :, None], sq_all[..., None, :], _gram(x_all, x_all), g)
  cross_rows = cross.sum(-1)                                   # (..., N)
  cross_local = jax.lax.dynamic_slice_in_dim(cross_rows, first, n_local, axis=-1)

  # The b = x_j -+ x_l over ordered (j, l), up to sign (G is even in b): j < l twice
  # each, j = l gives 2 x_j once and 0 N times. Weights halved (the 1/2 in the formula).
  upper_j, upper_l = np.triu_indices(n, 1)
  xj, xl = x_all[..., upper_j, :], x_all[..., upper_l, :]
  b = jnp.concatenate([xj + xl, xj - xl, 2 * x_all], axis=-2)
  b_weights = np.concatenate([np.ones(2 * len(upper_j)), np.full(n, 0.5)]).astype(np.float32)
  b_sq = _sq_norm(b)

  # The a = x_k + x_m, symmetric in (k, m): row k takes m = k + s (mod N), s <= N/2.
  # Over all rows every unordered pair comes once (weight 2; s = 0 weight 1; for even N
  # the pairs at s = N/2 twice, weight 1 each), and every row does the same work.
  shifts = np.arange(n // 2 + 1)
  a_weights = np.where((shifts == 0) | (2 * shifts == n), 1.0, 2.0).astype(np.float32)

  m = (first + np.arange(n_local)[:, None] + shifts) % n       # (n_local, S)
  a = x[..., :, None, :] + jnp.take(x_all, m, axis=-2)          # (..., n_local, S, D)
  cross_pairs = cross_local[..., :, None] + jnp.take(cross_rows, m, axis=-1)

  def row(args):
    a, cross_pair = args                                      # (..., S, D), (..., S)
    a_sq = _sq_norm(a)
    quad = _weighted_sum(_trig_mgf_kernel(a_sq[..., :, None], b_sq[..., None, :], _gram(a, b), g),
                         b_weights)
    quad = quad + 0.5 * n * jnp.exp(a_sq / (4 * g))            # the b = 0 terms
    return _weighted_sum(quad - n * cross_pair + n * n, a_weights)

  rows = (jnp.moveaxis(a, -3, 0), jnp.moveaxis(cross_pairs, -2, 0))
  per_row = jax.lax.map(jax.checkpoint(row), rows, batch_size=batch_size)
  return _total(per_row.sum(0), axis_name) / n**3
