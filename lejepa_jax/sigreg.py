"""SIGReg: the Sketched Isotropic Gaussian Regulariser, as pure functions.

`epps_pulley` compares each column's empirical characteristic function (ECF)
with the standard normal's, exp(-t^2/2), in a Gaussian-weighted L2 norm.
`sigreg` projects embeddings on fresh random unit directions (slices) and
averages the per-slice statistic; `sliced` does the same for any univariate test.

Speed and memory: the knots are equally spaced, so exp(i t_k x) are powers of
exp(i dt x). The forward pass is one fused reduction over that chain of complex
multiplications and the backward pass a hand-written VJP (Horner's rule), so no
(N, M, T) array is kept and only one cos/sin pair is evaluated per element
(`benchmarks/sigreg.py` measures it against the reference algorithm).

Distribution: inside `jax.shard_map` give `axis_name`; the ECF (a mean over
samples) is averaged across that mesh axis with `jax.lax.pmean`, and N is the
global sample count, so value and gradient equal the single-device result on
the full batch. Under plain `jax.jit` with sharded global arrays no axis name
is needed: XLA reduces over the global batch itself. The train step uses the
first way on every platform (`stats.regulariser_on_mesh`: a shard_map over the
batch axes), so the devices' sums meet in one all-reduce.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


QUADRATURES = ('trapezoid', 'simpson', 'trapezoid_symmetric', 'gauss_hermite')
_RUN = 17   # knots reached by complex multiplication from one exactly computed anchor


def quadrature(t_max: float = 3.0, num_points: int = 17, rule: str = 'trapezoid'):
  """Knots t_k >= 0 and weights for the integral over the real line, as float64 numpy.

  |ECF(t) - CF(t)|^2 is even in t, so every rule evaluates t >= 0 only and folds
  the weights of -t onto t. The weights include the window phi(t) = exp(-t^2/2),
  which is also the target characteristic function. Rules:
    'trapezoid': num_points knots on [0, t_max], doubled (the reference code's default);
    'simpson': the same knots, Simpson's rule (num_points odd);
    'trapezoid_symmetric': trapezoid on num_points knots on [-t_max, t_max] (the
      paper's Algorithm 1, e.g. t_max=5, num_points=17), folded onto t >= 0;
    'gauss_hermite': num_points-node Gauss-Hermite rule for the weight exp(-t^2/2)
      on the whole line (t_max unused).
  Returns (knots, weights, phi), each of shape (K,).
  """
  if rule not in QUADRATURES:
    raise ValueError(f'sigreg quadrature must be one of {QUADRATURES}, got {rule!r}')
  if num_points < 2:
    raise ValueError(f'sigreg.num_points must be >= 2, got {num_points}')
  if t_max <= 0 and rule != 'gauss_hermite':
    raise ValueError(f'sigreg.t_max must be > 0, got {t_max}')
  if rule == 'gauss_hermite':
    # int f(t) exp(-t^2/2) dt = sqrt(2) int f(sqrt(2) u) exp(-u^2) du.
    u, h = np.polynomial.hermite.hermgauss(num_points)
    knots, weights = np.sqrt(2.0) * u, np.sqrt(2.0) * h
    keep = knots >= -1e-12
    knots = np.abs(knots[keep])
    weights = np.where(knots > 1e-12, 2.0, 1.0) * weights[keep]
    return knots, weights, np.exp(-0.5 * knots**2)
  if rule == 'trapezoid_symmetric':
    full = np.linspace(-t_max, t_max, num_points)
    dt = full[1] - full[0]
    knots = full[full >= -1e-12 * t_max]
    weights = np.where(knots > 1e-12 * t_max, 2.0 * dt, dt)   # +-t pairs; t = 0 once
    weights[-1] = dt                                         # the two end points, halved
  else:
    knots = np.linspace(0.0, t_max, num_points)
    dt = t_max / (num_points - 1)
    if rule == 'trapezoid':
      weights = np.full(num_points, 2.0 * dt)
      weights[[0, -1]] = dt
    else:
      if num_points % 2 == 0:
        raise ValueError(f'simpson quadrature needs an odd num_points, got {num_points}')
      weights = np.where(np.arange(num_points) % 2 == 1, 4.0, 2.0) * dt / 3.0 * 2.0
      weights[[0, -1]] = dt / 3.0 * 2.0
  phi = np.exp(-0.5 * knots**2)
  return knots, weights * phi, phi


def global_count(n_local: int, axis_name) -> int:
  """The sample count N over all devices of `axis_name` (n_local without one)."""
  return n_local if axis_name is None else n_local * jax.lax.axis_size(axis_name)


def _runs(knots: np.ndarray):
  """Equally spaced knots as runs that one exact anchor reaches by multiplication.

  Returns (anchors, step): run r covers knots anchors[r] + j * step, j < _RUN (the
  last run padded past the final knot; callers drop the padding). None when the
  knots are not equally spaced (Gauss-Hermite): they are then computed directly.
  """
  spacing = np.diff(knots)
  if len(knots) < 3 or not np.allclose(spacing, spacing[0], rtol=1e-9, atol=0):
    return None
  return knots[0] + spacing[0] * np.arange(0, len(knots), _RUN), float(spacing[0])


def _cis(t, x):
  """(cos(t x), sin(t x)); exact constants for a Python t = 0, so XLA folds them."""
  if isinstance(t, float) and t == 0.0:
    return jnp.ones_like(x), jnp.zeros_like(x)
  return jnp.cos(t * x), jnp.sin(t * x)


def _sum_rows(terms, axis):
  """Sums of many same-shaped arrays over `axis`, as ONE variadic reduction: XLA
  fuses the producers of all terms into it, so none of them is materialised."""
  return jax.lax.reduce(tuple(terms), (np.float32(0),) * len(terms),
                        lambda a, b: tuple(u + v for u, v in zip(a, b)), (axis,))


def _ecf_deviation_sums(x, knots, target):
  """Sums over the sample axis of cos(t_k x) - target_k and sin(t_k x): (..., M, K) each.

  Neither an (..., N, M, K) array nor a transcendental per knot: within a run,
  exp(i t_{j+1} x) = exp(i t_j x) exp(i step x). Summing deviations from the
  target CF keeps the float32 partial sums small (~sqrt(N) near the target, not N),
  so rounding error stays at the level of a pairwise sum.

  On GPUs the samples are moved last first: summed over the second-to-last axis (a column
  reduction), XLA's GPU emitter gives each of the 2 x 17 outputs a shared-memory tile, more
  than an H100 block may hold (ptxas refuses the kernel; found by `plan --topology=h100-8`);
  as a row reduction it needs little. CPUs and TPUs keep the layout they were tuned on.
  """
  def samples_last(x):
    return _deviation_sums(jnp.swapaxes(x, -1, -2), knots, target, x.ndim - 1)
  return jax.lax.platform_dependent(
      x, cuda=samples_last, rocm=samples_last,
      default=lambda x: _deviation_sums(x, knots, target, x.ndim - 2))


def _deviation_sums(x, knots, target, axis):
  """_ecf_deviation_sums with the samples on `axis` of x (the other axes: (..., M))."""
  def sums(pairs, targets):
    out = _sum_rows([a for (c, s), t in zip(pairs, targets) for a in (c - t, s)], axis)
    return jnp.stack(out[0::2], -1), jnp.stack(out[1::2], -1)

  runs = _runs(knots)
  if runs is None:
    return sums([_cis(float(t), x) for t in knots], np.float32(target))
  anchors, step = runs
  c1, s1 = _cis(step, x)

  def run(anchor, targets):
    c, s = _cis(anchor, x)
    pairs = [(c, s)]
    for _ in range(_RUN - 1):
      c, s = c * c1 - s * s1, c * s1 + s * c1
      pairs.append((c, s))
    return sums(pairs, [targets[j] for j in range(_RUN)])

  k = len(knots)
  targets = np.zeros(len(anchors) * _RUN, np.float32)
  targets[:k] = target
  targets = targets.reshape(len(anchors), _RUN)
  if len(anchors) == 1:
    cos_sum, sin_sum = run(float(anchors[0]), targets[0])
  else:   # many knots: one compiled run, mapped over the anchors
    cos_sum, sin_sum = jax.lax.map(lambda r: run(*r), (jnp.asarray(anchors, jnp.float32),
                                                        jnp.asarray(targets)))
    cos_sum, sin_sum = (jnp.moveaxis(a, 0, -2).reshape(a.shape[1:-1] + (-1,))
                        for a in (cos_sum, sin_sum))
  return cos_sum[..., :k], sin_sum[..., :k]


def _ecf_vjp(x, knots, coef_cos, coef_sin):
  """sum_k coef_cos[k] cos(t_k x) + coef_sin[k] sin(t_k x), elementwise, shape of x.

  coef_*: (..., M, K). Within a run this is the real part of a polynomial in
  z = exp(i step x) with coefficients a_j = coef_cos - i coef_sin, evaluated by
  Horner's rule: one fused elementwise pass, no transcendental per knot.
  """
  runs = _runs(knots)
  if runs is None:
    total = jnp.zeros_like(x)
    for k, t in enumerate(knots):
      c, s = _cis(float(t), x)
      total = total + coef_cos[..., None, :, k] * c + coef_sin[..., None, :, k] * s
    return total
  anchors, step = runs
  c1, s1 = _cis(step, x)
  pad = len(anchors) * _RUN - len(knots)
  widths = [(0, 0)] * (coef_cos.ndim - 1) + [(0, pad)]
  a_re, a_im = jnp.pad(coef_cos, widths), -jnp.pad(coef_sin, widths)

  def run(anchor, a_re, a_im):          # a_*: (..., M, _RUN)
    p_re, p_im = a_re[..., None, :, -1], a_im[..., None, :, -1]
    for j in range(_RUN - 2, -1, -1):
      p_re, p_im = (p_re * c1 - p_im * s1 + a_re[..., None, :, j],
                    p_re * s1 + p_im * c1 + a_im[..., None, :, j])
    c0, s0 = _cis(anchor, x)
    return p_re * c0 - p_im * s0

  if len(anchors) == 1:
    return run(float(anchors[0]), a_re, a_im)
  split = lambda a: jnp.moveaxis(a.reshape(a.shape[:-1] + (len(anchors), _RUN)), -2, 0)
  total, _ = jax.lax.scan(lambda acc, r: (acc + run(*r), None), jnp.zeros_like(x),
                          (jnp.asarray(anchors, jnp.float32), split(a_re), split(a_im)))
  return total


def epps_pulley(x: jax.Array, *, t_max: float = 3.0, num_points: int = 17,
                quadrature_rule: str = 'trapezoid', axis_name=None,
                implementation: str = 'fast') -> jax.Array:
  """Epps-Pulley statistic of each column of x, shape (..., N, M) -> (..., M).

  statistic_m = N * sum_k w_k |ECF_m(t_k) - exp(-t_k^2/2)|^2, with N the global
  sample count (see `quadrature` for the knots t_k and weights w_k). Computed in
  float32 whatever the input dtype.

  implementation='fast' (default): exp(i t_k x) as powers of one complex exponential
  and a hand-written VJP (the gradient is a polynomial in exp(i dt x), evaluated by
  Horner's rule), so neither pass keeps an (N, M, K) array. 'autodiff': a complex
  exponential at every knot, differentiated by JAX (the reference algorithm; kept as
  a second implementation for tests and benchmarks).
  """
  if x.ndim < 2:
    raise ValueError(f'epps_pulley expects (..., N, M), got shape {x.shape}')
  if implementation not in ('fast', 'autodiff'):
    raise ValueError(f"implementation must be 'fast' or 'autodiff', got {implementation!r}")
  knots, weights, phi = quadrature(t_max, num_points, quadrature_rule)
  x = x.astype(jnp.float32)
  if implementation == 'autodiff':
    t = jnp.asarray(knots, jnp.float32)
    ecf = jnp.mean(jnp.exp(1j * (x[..., None] * t)), axis=-3)     # (..., M, K)
    if axis_name is not None:
      ecf = jax.lax.pmean(ecf, axis_name)
    err = jnp.abs(ecf - jnp.asarray(phi, jnp.float32)) ** 2
    return global_count(x.shape[-2], axis_name) * (err @ jnp.asarray(weights, jnp.float32))
  return _fast_epps_pulley(x, knots, weights, phi, axis_name)


def _fast_epps_pulley(x, knots, weights, phi, axis_name):
  # Constants stay numpy here: custom_vjp rules must not close over traced values.
  w = np.float32(weights)
  scale_per_knot = np.float32(2.0 * weights * knots)

  def forward(x):
    cos_sum, sin_sum = _ecf_deviation_sums(x, knots, phi)
    dev_re, ecf_im = cos_sum / x.shape[-2], sin_sum / x.shape[-2]
    if axis_name is not None:      # the ECF is a mean over samples: average it over devices
      dev_re, ecf_im = jax.lax.pmean((dev_re, ecf_im), axis_name)
    value = global_count(x.shape[-2], axis_name) * ((dev_re**2 + ecf_im**2) @ w)
    return value, (x, dev_re, ecf_im)

  @jax.custom_vjp
  def statistic(x):
    return forward(x)[0]

  def backward(residuals, g):
    x, dev_re, ecf_im = residuals
    # d statistic / d x_n = sum_k 2 w_k t_k [Im ECF_k cos(t_k x_n) - (Re ECF_k - phi_k) sin(t_k x_n)];
    # the global N cancels against the 1/N of the ECF mean.
    scale = scale_per_knot * g[..., None]
    return (_ecf_vjp(x, knots, scale * ecf_im, -scale * dev_re),)

  statistic.defvjp(forward, backward)
  return statistic(x)


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
           t_max: float = 3.0, num_points: int = 17, axis_name=None,
           quadrature_rule: str = 'trapezoid', implementation: str = 'fast') -> jax.Array:
  """Sliced Epps-Pulley of embeddings z, shape (..., N, D) -> scalar (see `sliced`)."""
  if z.ndim < 2:
    raise ValueError(f'sigreg expects (..., N, D), got shape {z.shape}')
  return sliced(epps_pulley, z, key, num_slices=num_slices, axis_name=axis_name,
                t_max=t_max, num_points=num_points, quadrature_rule=quadrature_rule,
                implementation=implementation)
