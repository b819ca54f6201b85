"""Multivariate normality statistics against their defining integrals, float64 closed
forms and exact null means; power; sharded value and gradient; bf16; parameter checks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
from jax.sharding import PartitionSpec as P

from lejepa_jax.stats import multivariate as mv


# ---------------------------------------------------------------------------------------
# float64 references: the defining integrals by Gauss-Hermite quadrature, and the closed
# forms written out with numpy.

def _gauss_hermite(d, nodes, precision):
  """Nodes (K, d) and weights (K,) of E f(t) for t ~ N(0, I / precision), tensor rule."""
  u, w = np.polynomial.hermite_e.hermegauss(nodes)          # weight exp(-u^2 / 2)
  u, w = u / np.sqrt(precision), w / np.sqrt(2 * np.pi)
  t = np.stack([g.ravel() for g in np.meshgrid(*[u] * d, indexing='ij')], -1)
  weights = np.prod([g.ravel() for g in np.meshgrid(*[w] * d, indexing='ij')], axis=0)
  return t, weights


def _defining_integral(x, integrand, precision, nodes):
  """N * int integrand(t) w(t) dt, w the N(0, I / precision) density."""
  t, weights = _gauss_hermite(x.shape[1], nodes, precision)
  return len(x) * np.sum(weights * integrand(x, t))


def _ecf(x, t):
  phase = t @ x.T                                              # (K, N)
  return np.cos(phase).mean(1), np.sin(phase).mean(1)


def _mgf(x, t):
  return np.exp(t @ x.T).mean(1)


def _bhep_integrand(x, t):
  re, im = _ecf(x, t)
  return (re - np.exp(-0.5 * (t * t).sum(1)))**2 + im**2


def _hv_integrand(x, t):
  e = np.exp(t @ x.T)                                          # (K, N)
  residual = (e[:, :, None] * (x[None] - t[:, None])).mean(1)  # grad M_N - t M_N
  return (residual**2).sum(1)


def _bhep_m_integrand(x, t):
  return (_mgf(x, t) - np.exp(0.5 * (t * t).sum(1)))**2


def _comb_integrand(x, t):
  return (_ecf(x, t)[0] * _mgf(x, t) - 1)**2


def _np_bhep(x, beta):
  n, d = x.shape
  b2 = beta**2
  sq_dist = ((x[:, None] - x[None])**2).sum(-1)
  return (np.exp(-b2 * sq_dist / 2).sum() / n
          - 2 * (1 + b2)**(-d / 2) * np.exp(-b2 * (x * x).sum(1) / (2 * (1 + b2))).sum()
          + n * (1 + 2 * b2)**(-d / 2))


def _np_hv(x, gamma):
  n, d = x.shape
  s2 = ((x[:, None] + x[None])**2).sum(-1)
  poly = x @ x.T - s2 / (2 * gamma) + s2 / (4 * gamma**2) + d / (2 * gamma)
  return (np.exp(s2 / (4 * gamma)) * poly).sum() / n


def _np_bhep_m(x, beta):
  n, d = x.shape
  s2 = ((x[:, None] + x[None])**2).sum(-1)
  return (np.exp(s2 / (4 * beta)).sum() / n
          - 2 * (beta / (beta - 0.5))**(d / 2) * np.exp((x * x).sum(1) / (4 * beta - 2)).sum()
          + n * (beta / (beta - 1))**(d / 2))


def _np_g(a, b, gamma):
  """G(a_p, b_q) = exp((|a|^2 - |b|^2) / (4 gamma)) cos(<a, b> / (2 gamma)), (P, Q)."""
  return (np.exp(((a * a).sum(1)[:, None] - (b * b).sum(1)[None]) / (4 * gamma))
          * np.cos(a @ b.T / (2 * gamma)))


def _np_comb(x, gamma):
  n, d = x.shape
  plus = (x[:, None] + x[None]).reshape(-1, d)                 # all ordered (k, m)
  minus = (x[:, None] - x[None]).reshape(-1, d)
  return (_np_g(plus, np.concatenate([minus, plus]), gamma).sum() / (2 * n**3)
          - 2 / n * _np_g(x, x, gamma).sum() + n)


# name -> (jax function, float64 closed form, integrand, weight precision); params are
# passed as keyword arguments.
_STATS = {
    'bhep': (mv.bhep, lambda x, beta=0.1: _np_bhep(x, beta), _bhep_integrand,
             lambda x, beta=0.1: 1 / beta**2),
    'henze_zirkler': (mv.henze_zirkler,
                      lambda x: _np_bhep(x, mv.henze_zirkler_beta(*x.shape)), _bhep_integrand,
                      lambda x: 1 / mv.henze_zirkler_beta(*x.shape)**2),
    'henze_visagie': (mv.henze_visagie, lambda x, gamma=5.0: _np_hv(x, gamma), _hv_integrand,
                      lambda x, gamma=5.0: 2 * gamma),
    'bhep_m': (mv.bhep_m, lambda x, beta=10.0: _np_bhep_m(x, beta), _bhep_m_integrand,
               lambda x, beta=10.0: 2 * beta),
    'comb': (mv.comb, lambda x, gamma=5.0: _np_comb(x, gamma), _comb_integrand,
             lambda x, gamma=5.0: 2 * gamma),
}
_CASES = [('bhep', {}), ('bhep', {'beta': 1.0}), ('henze_zirkler', {}),
          ('henze_visagie', {}), ('henze_visagie', {'gamma': 2.5}),
          ('bhep_m', {}), ('bhep_m', {'beta': 3.0}), ('comb', {}), ('comb', {'gamma': 3.0})]
_IDS = [name + ''.join(f'_{k}{v}' for k, v in params.items()) for name, params in _CASES]


def _jit(fn, **params):
  """Jitted: op-by-op dispatch would compile every primitive of every shape anew."""
  return jax.jit(functools.partial(fn, **params))


# ---------------------------------------------------------------------------------------
# 1. Closed forms.

@pytest.mark.parametrize('d', [1, 2])
@pytest.mark.parametrize('name,params', _CASES, ids=_IDS)
def test_closed_form_equals_defining_integral(name, params, d):
  fn, _, integrand, precision = _STATS[name]
  x = np.random.default_rng(d).normal(size=(30, d)) * 1.1 + 0.2
  reference = _defining_integral(x, integrand, precision(x, **params), 60)
  # The quadrature has converged: more nodes change nothing at this tolerance.
  finer = _defining_integral(x, integrand, precision(x, **params), 90)
  np.testing.assert_allclose(reference, finer, rtol=1e-9)
  np.testing.assert_allclose(_jit(fn, **params)(jnp.asarray(x, jnp.float32)), reference, rtol=1e-4)


@pytest.mark.parametrize('name,params', _CASES, ids=_IDS)
def test_closed_form_matches_float64_transcription(name, params):
  fn, closed_form, _, _ = _STATS[name]
  fn = _jit(fn, **params)
  rng = np.random.default_rng(3)
  shapes = [(33, 5)] if name == 'comb' else [(300, 16), (301, 3)]
  for n, d in shapes:
    shifted = rng.normal(size=(n, d)) + 0.3
    np.testing.assert_allclose(fn(jnp.asarray(shifted, jnp.float32)),
                               closed_form(shifted, **params), rtol=1e-5)
    # Under the null the statistic is O(1) but its sums are O(N): float32 rounding of the
    # constants leaves an absolute error of order N * 1e-8 (see the module docstring).
    null = rng.normal(size=(n, d)).astype(np.float32)
    np.testing.assert_allclose(fn(jnp.asarray(null)),
                               closed_form(null.astype(np.float64), **params),
                               rtol=1e-5, atol=1e-7 * n)


@pytest.mark.parametrize('name', list(_STATS))
def test_gradient_matches_float64_finite_differences(name):
  fn, closed_form, _, _ = _STATS[name]
  n, d = (10, 2) if name == 'comb' else (24, 3)
  x = (np.random.default_rng(4).normal(size=(n, d)) * 1.2 + 0.2).astype(np.float32)
  grad = np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(x)))
  x64, h = x.astype(np.float64), 1e-6
  numeric = np.zeros_like(x64)
  for index in np.ndindex(*x.shape):
    step = np.zeros_like(x64)
    step[index] = h
    numeric[index] = (closed_form(x64 + step) - closed_form(x64 - step)) / (2 * h)
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5 * np.abs(numeric).max())


def test_leading_batch_dims_and_comb_row_batches():
  x = np.random.default_rng(5).normal(size=(3, 2, 20, 3)).astype(np.float32)
  for name in _STATS:
    fn, closed_form, _, _ = _STATS[name]
    value = jax.jit(fn)(jnp.asarray(x))
    assert value.shape == (3, 2) and value.dtype == jnp.float32
    for index in np.ndindex(3, 2):
      np.testing.assert_allclose(value[index], closed_form(x[index].astype(np.float64)),
                                 rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(_jit(mv.comb, batch_size=6)(jnp.asarray(x)),
                             jax.jit(mv.comb)(jnp.asarray(x)), rtol=1e-6)


# ---------------------------------------------------------------------------------------
# 2. Null distribution and power.

def _comb_null_mean(n, d, gamma):
  """E[comb] for N samples of N(0, I_D), exactly, as one radial integral.

  E (R_N(t) M_N(t) - 1)^2 depends on t through r^2 = |t|^2 only: expand the square over
  sample indices, group coinciding indices (set partitions of the four factors), and use
  E cos(Z)^a exp(b Z) for Z = <t, x> ~ N(0, r^2).
  """
  def moment(a, b, r2):
    if a == 0:
      return np.exp(b * b * r2 / 2)
    if a == 1:
      return np.exp((b * b - 1) * r2 / 2) * np.cos(b * r2)
    return 0.5 * (np.exp(b * b * r2 / 2) + np.exp((b * b - 4) * r2 / 2) * np.cos(2 * b * r2))

  def partitions(items):
    if not items:
      yield []
      return
    for rest in partitions(items[1:]):
      yield [[items[0]]] + rest
      for i in range(len(rest)):
        yield rest[:i] + [[items[0]] + rest[i]] + rest[i + 1:]

  blocks = list(partitions(['cos', 'cos', 'mgf', 'mgf']))      # 15 set partitions

  def mean_square(r2):
    second = sum(np.prod([n - i for i in range(len(p))])
                 * np.prod([moment(b.count('cos'), b.count('mgf'), r2) for b in p]) for p in blocks)
    first = (n * moment(1, 1, r2) + n * (n - 1) * moment(1, 0, r2) * moment(0, 1, r2)) / n**2
    return second / n**4 - 2 * first + 1

  # Under the weight, 2 gamma |t|^2 is chi-square with d degrees of freedom.
  density = lambda q: scipy.stats.chi2.pdf(2 * gamma * q, d) * 2 * gamma
  return n * scipy.integrate.quad(lambda q: mean_square(q) * density(q), 0, 60 / (gamma - 2),
                                  limit=200)[0]


def _null_mean(name, n, d):
  """Exact E[statistic] under N(0, I), default parameters."""
  if name in ('bhep', 'henze_zirkler'):
    beta = 0.1 if name == 'bhep' else mv.henze_zirkler_beta(n, d)
    return 1 - (1 + 2 * beta**2)**(-d / 2)
  if name == 'henze_visagie':     # only the j = k terms have nonzero mean
    g = 5.0
    return (1 - 2 / g)**(-d / 2) * (d * (1 - 1 / g)**2 / (1 - 2 / g) + d / (2 * g))
  if name == 'bhep_m':
    b = 10.0
    return (1 - 2 / b)**(-d / 2) - (1 - 1 / b)**(-d / 2)
  return _comb_null_mean(n, d, 5.0)


def _normal(rng, shape):
  return rng.standard_normal(shape, dtype=np.float32)


def _replicates(fn, seed, reps, n, d, sample=_normal, chunk=50):
  """reps statistics of independent (n, d) samples. numpy draws them: eager jax.random
  would compile its primitives anew for every shape."""
  f, rng = jax.jit(fn), np.random.default_rng(seed)
  return np.concatenate([np.asarray(f(sample(rng, (chunk, n, d))))
                         for _ in range(-(-reps // chunk))])[:reps]


@pytest.mark.parametrize('name', list(_STATS))
def test_null_mean_is_exact_and_stable_in_n(name):
  # Every statistic's null mean is the exact, (nearly) N-free value: within 4 standard
  # errors at a small and a 4x larger N. For all but comb the exact value does not depend
  # on N at all (henze_zirkler only through its bandwidth); comb's changes by O(1/N).
  fn, d = _STATS[name][0], 4
  sizes, reps = ((8, 32), 200) if name == 'comb' else ((200, 800), 150)
  means, stderrs = [], []
  for n in sizes:
    stats = _replicates(fn, n, reps, n, d)
    expected = _null_mean(name, n, d)
    stderr = stats.std() / np.sqrt(reps)
    assert abs(stats.mean() - expected) < 4 * stderr, (name, n, stats.mean(), expected, stderr)
    means.append(stats.mean())
    stderrs.append(stderr)
  # And directly: the two Monte Carlo means agree within 4 combined standard errors
  # (a fifth to a third of the mean with these replicate counts).
  assert abs(means[0] - means[1]) < 4 * np.hypot(*stderrs), (name, means, stderrs)


def test_comb_null_mean_formula_at_other_parameters():
  # The formula itself, beyond the default gamma and D.
  n, d, gamma = 12, 2, 3.0
  stats = _replicates(lambda y: mv.comb(y, gamma=gamma), d, 600, n, d, chunk=300)
  expected = _comb_null_mean(n, d, gamma)
  assert abs(stats.mean() - expected) < 4 * stats.std() / np.sqrt(len(stats))


_ALTERNATIVES = {
    'shift': lambda rng, s: _normal(rng, s) + 0.5,
    'scale': lambda rng, s: 2 * _normal(rng, s),
    'uniform': lambda rng, s: rng.random(s, dtype=np.float32),      # U(0, 1) per coordinate
}


@pytest.mark.parametrize('name', ['bhep', 'henze_zirkler', 'henze_visagie', 'bhep_m'])
def test_alternatives_exceed_null_95th_percentile(name):
  fn, n, d = _STATS[name][0], 512, 4
  null = _replicates(fn, 10, 100, n, d)
  q95 = np.quantile(null, 0.95)
  alternatives = dict(_ALTERNATIVES)
  if name == 'henze_zirkler':
    # Shape alone (mean 0, covariance I): the bandwidth is wide enough to see it. The
    # narrow-weight tests (bhep beta=0.1, the MGF ones) have little power here.
    alternatives['uniform_standardised'] = lambda rng, s: rng.uniform(
        -np.sqrt(3), np.sqrt(3), s).astype(np.float32)
  for alt, sample in alternatives.items():
    stats = _replicates(fn, 11, 20, n, d, sample, chunk=20)
    assert (stats > q95).mean() >= 0.95, (name, alt, np.median(stats), q95)
    if alt == 'shift' and name != 'henze_zirkler':   # (whose bandwidth changes with N)
      # The factor N: a fixed departure gives a statistic growing like N.
      half = _replicates(fn, 12, 20, n // 2, d, sample, chunk=20)
      ratio = np.median(stats) / np.median(half)
      assert 1.5 < ratio < 2.7, (name, ratio)


def test_comb_power_and_covariance_blind_spot():
  fn, d = mv.comb, 4
  null = _replicates(fn, 20, 120, 40, d, chunk=40)
  shifted = [_replicates(fn, 21, 40, n, d, _ALTERNATIVES['shift'], chunk=40)
             for n in (20, 40)]
  assert (shifted[1] > np.quantile(null, 0.95)).mean() >= 0.95
  assert 1.5 < np.median(shifted[1]) / np.median(shifted[0]) < 2.7
  # R M = 1 for N(0, 4 I) too: the statistic is inflated (its spread is larger) but does
  # not grow with N, unlike under a mean shift.
  scaled = [_replicates(fn, 22, 40, n, d, _ALTERNATIVES['scale'], chunk=40)
            for n in (20, 40)]
  assert np.median(scaled[1]) / np.median(scaled[0]) < 1.4, [np.median(s) for s in scaled]


# ---------------------------------------------------------------------------------------
# 3. Sharding: value and gradient equal the full batch.

def _mesh():
  return jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))


def _put(x, mesh, spec):
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))


@pytest.mark.parametrize('name', list(_STATS))
def test_sharded_equals_full_batch_value_and_gradient(name):
  fn = _STATS[name][0]
  mesh = _mesh()
  n = 32 if name == 'comb' else 64
  x = jnp.asarray(np.random.default_rng(30).normal(size=(2, n, 4)) * 1.2 + 0.2, jnp.float32)
  weights = jnp.array([1.0, 0.7])
  sharded = jax.shard_map(functools.partial(fn, axis_name='data'), mesh=mesh,
                          in_specs=P(None, 'data'), out_specs=P())
  xs = _put(x, mesh, P(None, 'data'))
  full = jax.jit(fn)(x)
  np.testing.assert_allclose(jax.jit(sharded)(xs), full, rtol=1e-5)
  g_sharded = jax.jit(jax.grad(lambda y: (sharded(y) * weights).sum()))(xs)
  g_full = jax.jit(jax.grad(lambda y: (fn(y) * weights).sum()))(x)
  np.testing.assert_allclose(g_sharded, g_full, rtol=1e-5, atol=1e-5 * np.abs(g_full).max())
  if name != 'bhep':
    return
  # The pitfall this guards against: statistics of each device's rows alone.
  local = n // 8
  local_only = np.mean([jax.jit(fn)(x[:, i * local:(i + 1) * local]) for i in range(8)], axis=0)
  assert np.all(np.abs(local_only - full) > 1e-3 * np.abs(full))


def test_sharded_rows_without_batch_dim():
  mesh = _mesh()
  x = jnp.asarray(np.random.default_rng(31).normal(size=(128, 3)) + 0.1, jnp.float32)
  for fn in (mv.bhep, mv.henze_zirkler):
    sharded = jax.shard_map(functools.partial(fn, axis_name='data'), mesh=mesh,
                            in_specs=P('data'), out_specs=P())
    xs = _put(x, mesh, P('data'))
    np.testing.assert_allclose(jax.jit(sharded)(xs), jax.jit(fn)(x), rtol=1e-5)
    g_full = jax.jit(jax.grad(fn))(x)
    np.testing.assert_allclose(jax.jit(jax.grad(sharded))(xs), g_full,
                               rtol=1e-5, atol=1e-5 * np.abs(g_full).max())


# ---------------------------------------------------------------------------------------
# 4. bf16 input, 5. parameter checks.

@pytest.mark.parametrize('name', list(_STATS))
def test_bfloat16_input_close_to_float32(name):
  fn = jax.jit(_STATS[name][0])
  n = 32 if name == 'comb' else 256
  for shift in (0.0, 0.5):
    x = jnp.asarray(np.random.default_rng(40).normal(size=(n, 4)) + shift, jnp.float32)
    low = fn(x.astype(jnp.bfloat16))
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, fn(x), rtol=1e-2)


@pytest.mark.parametrize('fn,params', [
    (mv.bhep, {'beta': 0.0}), (mv.bhep, {'beta': -1.0}),
    (mv.henze_visagie, {'gamma': 2.0}), (mv.henze_visagie, {'gamma': 1.0}),
    (mv.bhep_m, {'beta': 2.0}), (mv.bhep_m, {'beta': 1.5}),
    (mv.comb, {'gamma': 2.0}), (mv.comb, {'gamma': 0.1}),
])
def test_parameter_checks(fn, params):
  with pytest.raises(ValueError, match='beta|gamma'):
    fn(jnp.zeros((8, 2)), **params)


def test_shape_check():
  for fn in (mv.bhep, mv.henze_zirkler, mv.henze_visagie, mv.bhep_m, mv.comb):
    with pytest.raises(ValueError, match='expects'):
      fn(jnp.zeros(8))
