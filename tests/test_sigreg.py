"""Epps-Pulley and SIGReg against float64 references, closed forms, and under sharding."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lejepa_jax import sigreg


def numpy_epps_pulley(x, t_max=3.0, num_points=17):
  """float64 transcription of the reference algorithm: value (M,) and d value / dx (N, M)."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  t = np.linspace(0.0, t_max, num_points)
  dt = t_max / (num_points - 1)
  w = np.full(num_points, 2 * dt)
  w[0] = w[-1] = dt
  phi = np.exp(-t**2 / 2)
  w = w * phi
  xt = x[:, :, None] * t                             # (N, M, T)
  c = np.cos(xt).mean(0) - phi                        # (M, T)
  s = np.sin(xt).mean(0)
  value = n * ((c**2 + s**2) * w).sum(-1)
  # d/dx_n: sum_k 2 w_k t_k [S_k cos(t_k x_n) - (C_k - phi_k) sin(t_k x_n)]
  grad = (2 * w * t * (s[None] * np.cos(xt) - c[None] * np.sin(xt))).sum(-1)
  return value, grad


def closed_form_epps_pulley(x):
  """N * integral over R of |ECF(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt, quadrature-free (float64)."""
  x = np.asarray(x, np.float64)
  n = len(x)
  diff = x[:, None] - x[None, :]
  integral = (np.sqrt(2 * np.pi) * np.exp(-diff**2 / 2).sum() / n**2
              - 2 * np.sqrt(np.pi) * np.exp(-x**2 / 4).sum() / n
              + np.sqrt(2 * np.pi / 3))
  return n * integral


def test_value_and_gradient_match_float64_reference():
  x = np.random.default_rng(0).normal(size=(300, 7)) * np.array([1, 2, 0.5, 1, 1, 3, 1]) + 0.3
  ref_value, ref_grad = numpy_epps_pulley(x)
  value = sigreg.epps_pulley(jnp.asarray(x, jnp.float32))
  grad = jax.grad(lambda y: sigreg.epps_pulley(y).sum())(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(value, ref_value, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=2e-4, atol=1e-6)


def test_leading_batch_dims_and_other_grids():
  x = np.random.default_rng(1).standard_t(df=4, size=(3, 128, 5))
  value = sigreg.epps_pulley(jnp.asarray(x, jnp.float32), t_max=5.0, num_points=33)
  chex.assert_shape(value, (3, 5))
  for i in range(3):
    np.testing.assert_allclose(value[i], numpy_epps_pulley(x[i], 5.0, 33)[0], rtol=2e-5)


@pytest.mark.parametrize('shift,scale', [(0.0, 1.0), (0.4, 1.0), (0.0, 1.6)])
def test_large_t_max_matches_closed_form_integral(shift, scale):
  x = np.random.default_rng(2).normal(size=256) * scale + shift
  value = sigreg.epps_pulley(jnp.asarray(x[:, None], jnp.float32), t_max=12.0, num_points=2001)
  np.testing.assert_allclose(value[0], closed_form_epps_pulley(x), rtol=1e-4)


def test_null_mean_equals_exact_expectation():
  # For x ~ N(0,1): E|ECF(t) - phi(t)|^2 = (1 - phi(t)^2) / N, so E[statistic] = sum_k w_k (1 - phi_k^2)
  # exactly for every N; on the [0, 3] grid with 17 knots that is about 1.05.
  knots, weights, phi = (np.asarray(a, np.float64) for a in sigreg.quadrature(3.0, 17))
  expected = float((weights * (1 - phi**2)).sum())
  assert abs(expected - 1.05) < 0.01
  x = jax.random.normal(jax.random.key(0), (512, 4000))
  stats = np.asarray(sigreg.epps_pulley(x))
  stderr = stats.std() / np.sqrt(stats.size)
  assert abs(stats.mean() - expected) < 4 * stderr, (stats.mean(), expected, stderr)
  # The infinite-range limit is sqrt(2 pi) - sqrt(2 pi / 3) = 1.0594.
  _, w_wide, phi_wide = (np.asarray(a, np.float64) for a in sigreg.quadrature(12.0, 2001))
  np.testing.assert_allclose((w_wide * (1 - phi_wide**2)).sum(),
                             np.sqrt(2 * np.pi) - np.sqrt(2 * np.pi / 3), rtol=1e-6)


@pytest.mark.parametrize('name,sample', [
    ('uniform', lambda k, s: jax.random.uniform(k, s, minval=-np.sqrt(3), maxval=np.sqrt(3))),
    ('shifted', lambda k, s: jax.random.normal(k, s) + 0.5),
    ('scaled', lambda k, s: 2.0 * jax.random.normal(k, s)),
])
def test_alternatives_give_large_statistics(name, sample):
  n, columns = 1024, 200
  null = np.asarray(sigreg.epps_pulley(jax.random.normal(jax.random.key(1), (n, columns))))
  alt = np.asarray(sigreg.epps_pulley(sample(jax.random.key(2), (n, columns))))
  # Not standardised per slice: mean and scale errors must show.
  assert np.median(alt) > np.quantile(null, 0.99), (name, np.median(alt), np.quantile(null, 0.99))
  # The statistic carries the factor N: under an alternative it grows linearly with N.
  half = np.asarray(sigreg.epps_pulley(sample(jax.random.key(3), (n // 2, columns))))
  assert 1.5 < alt.mean() / half.mean() < 2.5, (name, alt.mean() / half.mean())


def _mesh(n=4):
  return jax.make_mesh((n,), ('data',), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Explicit,))


def _put(x, mesh, spec):
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))


def test_epps_pulley_sharded_equals_full_batch_value_and_gradient():
  x = jax.random.normal(jax.random.key(3), (256, 16)) * 1.3 + 0.2
  mesh = _mesh(8)
  sharded = jax.shard_map(functools.partial(sigreg.epps_pulley, axis_name='data'), mesh=mesh,
                          in_specs=P('data'), out_specs=P())
  weights = jnp.linspace(0.5, 1.5, 16)
  xs = _put(x, mesh, P('data'))
  np.testing.assert_allclose(jax.jit(sharded)(xs), sigreg.epps_pulley(x), rtol=1e-5)
  g_sharded = jax.jit(jax.grad(lambda y: (sharded(y) * weights).sum()))(xs)
  g_full = jax.grad(lambda y: (sigreg.epps_pulley(y) * weights).sum())(x)
  np.testing.assert_allclose(g_sharded, g_full, rtol=1e-5, atol=1e-7)


def test_sigreg_sharded_equals_full_batch_value_and_gradient():
  z = jax.random.normal(jax.random.key(4), (3, 128, 32)) @ jnp.diag(jnp.linspace(0.3, 2, 32))
  key = jax.random.fold_in(jax.random.key(5), 17)
  mesh = _mesh(8)
  loss = lambda zz, axis=None: sigreg.sigreg(zz, key, num_slices=64, axis_name=axis)
  sharded = jax.shard_map(functools.partial(loss, axis='data'), mesh=mesh,
                          in_specs=P(None, 'data'), out_specs=P())
  zs = _put(z, mesh, P(None, 'data'))
  np.testing.assert_allclose(jax.jit(sharded)(zs), loss(z), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(jax.grad(sharded))(zs), jax.grad(loss)(z), rtol=1e-5, atol=1e-7)
  # The pitfall this guards against: a statistic on each local batch only.
  local_only = np.mean([loss(z[:, i * 16:(i + 1) * 16]) for i in range(8)])
  assert abs(local_only - float(loss(z))) > 1e-3


@pytest.mark.parametrize('statistic', ['epps_pulley', 'bhep'])
def test_regulariser_on_mesh_as_the_train_step_runs_it(statistic):
  """Under jit on a data x fsdp x tensor mesh (the train step's path): value and gradient of
  the gathered batch on one device, and the cross-device combine is an all-reduce, not an
  all-gather of every device's partial sums (which XLA's GPU compiler could not fit)."""
  from lejepa_jax import sharding as sharding_lib
  from lejepa_jax import stats
  z = jax.random.normal(jax.random.key(9), (3, 64, 32)) @ jnp.diag(jnp.linspace(0.3, 2, 32))
  key = jax.random.key(10)
  mesh = sharding_lib.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  on_mesh = jax.jit(jax.value_and_grad(lambda zz: stats.regulariser_on_mesh(
      statistic, zz, key, batch_axes=sharding_lib.BATCH_AXES, mesh=mesh, num_slices=64)))
  zs = _put(z, mesh, P(None, sharding_lib.BATCH_AXES))
  value, grad = on_mesh(zs)
  ref_value, ref_grad = jax.value_and_grad(
      lambda zz: stats.regulariser(statistic, zz, key, num_slices=64))(z)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
  if statistic == 'epps_pulley':
    hlo = on_mesh.lower(zs).compile().as_text()
    assert 'all-reduce' in hlo and 'all-gather' not in hlo


def test_slices_identical_on_devices_and_fresh_each_step():
  base = jax.random.key(6)
  mesh = _mesh(4)

  def per_device(_, step):
    slices = sigreg.random_slices(jax.random.fold_in(base, step), 16, 8)
    return jax.lax.all_gather(slices, 'data')

  gathered = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'), None),
                                   out_specs=P(), check_vma=False))(_put(jnp.zeros(4), mesh, P('data')), 3)
  for i in range(1, 4):
    np.testing.assert_array_equal(gathered[i], gathered[0])
  np.testing.assert_allclose(np.linalg.norm(gathered[0], axis=0), 1.0, rtol=1e-6)
  other = sigreg.random_slices(jax.random.fold_in(base, 4), 16, 8)
  assert np.abs(np.asarray(other) - np.asarray(gathered[0])).max() > 0.1


def test_bfloat16_input_is_close_to_float32():
  z = jax.random.normal(jax.random.key(7), (256, 64))
  key = jax.random.key(8)
  f32 = sigreg.sigreg(z, key, num_slices=128)
  bf16 = sigreg.sigreg(z.astype(jnp.bfloat16), key, num_slices=128)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, rtol=1e-2)


@pytest.mark.parametrize('rule,t_max,num_points', [
    ('trapezoid', 3.0, 17), ('trapezoid', 4.0, 40), ('simpson', 3.0, 33),
    ('trapezoid_symmetric', 5.0, 17), ('trapezoid_symmetric', 5.0, 16), ('gauss_hermite', 0.0, 20)])
def test_fast_path_equals_autodiff_and_float64_for_every_rule(rule, t_max, num_points):
  # Several runs of knots (40, 33 knots), a half-offset grid (16 symmetric knots) and
  # unequal Gauss-Hermite knots all go through the recurrence / Horner code paths.
  x = np.random.default_rng(9).normal(size=(2, 200, 6)) * 1.2 + 0.1
  xj = jnp.asarray(x, jnp.float32)
  kwargs = dict(t_max=t_max, num_points=num_points, quadrature_rule=rule)
  fast = lambda y: sigreg.epps_pulley(y, **kwargs)
  slow = lambda y: sigreg.epps_pulley(y, implementation='autodiff', **kwargs)
  cot = jnp.linspace(0.5, 1.5, 6)
  np.testing.assert_allclose(fast(xj), slow(xj), rtol=1e-5)
  g_fast = jax.grad(lambda y: (fast(y) * cot).sum())(xj)
  g_slow = jax.grad(lambda y: (slow(y) * cot).sum())(xj)
  np.testing.assert_allclose(g_fast, g_slow, rtol=1e-4, atol=1e-5 * np.abs(g_slow).max())
  # float64 reference: the folded rule on t >= 0 equals the rule on the whole grid.
  knots, weights, _ = sigreg.quadrature(t_max, num_points, rule)
  ecf = np.exp(1j * x[..., None] * knots).mean(-3)
  ref = 200 * (np.abs(ecf - np.exp(-knots**2 / 2))**2 * weights).sum(-1)
  np.testing.assert_allclose(fast(xj), ref, rtol=1e-5)


def test_quadrature_rules_against_their_definitions():
  f = lambda t: np.cos(0.7 * t)**2 * np.exp(-t**2 / 2)      # an even test integrand
  exact = np.sqrt(np.pi) / 2 * (1 + np.exp(-0.49))           # int over R of f(t) exp(-t^2/2)
  # Symmetric trapezoid (paper's Algorithm 1) == numpy's trapezoid on [-t_max, t_max].
  for n in (17, 16):
    full = np.linspace(-5, 5, n)
    knots, weights, _ = sigreg.quadrature(5.0, n, 'trapezoid_symmetric')
    np.testing.assert_allclose((f(knots) * weights).sum(),
                               np.trapezoid(f(full) * np.exp(-full**2 / 2), full), rtol=1e-12)
  knots, weights, _ = sigreg.quadrature(3.0, 17, 'trapezoid')
  grid = np.linspace(-3, 3, 33)
  np.testing.assert_allclose((f(knots) * weights).sum(),
                             np.trapezoid(f(grid) * np.exp(-grid**2 / 2), grid), rtol=1e-12)
  knots, weights, _ = sigreg.quadrature(8.0, 33, 'simpson')
  np.testing.assert_allclose((f(knots) * weights).sum(), exact, rtol=1e-6)
  knots, weights, _ = sigreg.quadrature(0.0, 30, 'gauss_hermite')
  np.testing.assert_allclose((f(knots) * weights).sum(), exact, rtol=1e-10)


def test_gauss_hermite_matches_closed_form_integral():
  x = np.random.default_rng(10).normal(size=128) * 1.3 + 0.3
  value = sigreg.epps_pulley(jnp.asarray(x[:, None], jnp.float32), num_points=60,
                             quadrature_rule='gauss_hermite')
  np.testing.assert_allclose(value[0], closed_form_epps_pulley(x), rtol=1e-4)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='num_points'):
    sigreg.epps_pulley(jnp.zeros((4, 2)), num_points=1)
  with pytest.raises(ValueError, match='shape'):
    sigreg.epps_pulley(jnp.zeros((4,)))
  with pytest.raises(ValueError, match='odd'):
    sigreg.quadrature(3.0, 16, 'simpson')
  with pytest.raises(ValueError, match='quadrature'):
    sigreg.quadrature(3.0, 17, 'midpoint')


def test_value_and_gradient_keep_no_samples_by_slices_by_knots_array():
  n, dim, slices, knots = 4096, 64, 256, 17
  fn = jax.jit(jax.value_and_grad(
      lambda z, key: sigreg.sigreg(z, key, num_slices=slices, num_points=knots)))
  compiled = fn.lower(jax.ShapeDtypeStruct((n, dim), jnp.float32), jax.random.key(0)).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= 4 * n * slices * 4, temp                 # an (N, M, T) array alone is 17x that


ALTERNATIVES = {                                            # the six, numpy draws
    'N(0.5,1)': lambda rng, s: rng.normal(size=s) + 0.5,
    'N(0,4)': lambda rng, s: 2 * rng.normal(size=s),
    'U(-2,2)': lambda rng, s: rng.uniform(-2, 2, size=s),
    'Exp(1)': lambda rng, s: rng.exponential(size=s),
    'N(-2,.25)+N(2,.25)': lambda rng, s: rng.choice([-2.0, 2.0], size=s) + 0.5 * rng.normal(size=s),
    't3': lambda rng, s: rng.standard_t(3, size=s),
}


@pytest.mark.parametrize('rule,t_max,num_points', [
    ('trapezoid', 3.0, 17), ('trapezoid_symmetric', 5.0, 17), ('gauss_hermite', 0.0, 16)])
def test_power_at_n1024_and_null_stable_across_n(rule, t_max, num_points):
  test = jax.jit(functools.partial(sigreg.epps_pulley, t_max=t_max, num_points=num_points,
                                   quadrature_rule=rule))
  null = lambda n, seed, columns=400: np.asarray(test(jnp.asarray(
      np.random.default_rng(seed).normal(size=(n, columns)), jnp.float32)))
  critical = np.quantile(null(1024, 0), 0.95)               # 5% level, simulated under N(0, 1)
  for i, (name, draw) in enumerate(ALTERNATIVES.items()):
    stats = np.asarray(test(jnp.asarray(draw(np.random.default_rng(i + 1), (1024, 400)),
                                        jnp.float32)))
    assert np.mean(stats > critical) > 0.9, (rule, name, np.mean(stats > critical))
  # E[statistic] under the null is sum_k w_k (1 - phi_k^2) for every N.
  _, weights, phi = sigreg.quadrature(t_max, num_points, rule)
  expected = (weights * (1 - phi**2)).sum()
  for n in (128, 1024, 4096):
    stats = null(n, n, 1000)
    assert abs(stats.mean() - expected) < 4 * stats.std() / np.sqrt(stats.size), (n, stats.mean())
