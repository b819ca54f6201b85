"""The LeJEPA loss, the optimizer's schedule and masks, and the frozen evaluators."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lejepa_jax import losses, optim, sigreg, steps


def test_invariance_matches_numpy():
  rng = np.random.default_rng(0)
  proj = rng.normal(size=(6, 10, 4))           # 2 global + 4 local views
  centre = proj[:2].mean(0)
  ref = np.mean([np.mean(np.sum((centre - proj[v]) ** 2, -1) / 4) for v in range(6)])
  np.testing.assert_allclose(losses.invariance(jnp.asarray(proj[:2]), jnp.asarray(proj)), ref,
                             rtol=1e-5)


@pytest.mark.parametrize('convention', ['convex', 'additive'])
def test_loss_conventions(convention):
  proj = jax.random.normal(jax.random.key(0), (4, 64, 8))
  key = jax.random.key(1)
  loss, terms = losses.lejepa_loss(proj[:2], proj, key, lamb=0.1, convention=convention,
                                   num_slices=32)
  sig = sigreg.sigreg(proj, key, num_slices=32)
  np.testing.assert_allclose(terms['sigreg'], sig, rtol=1e-6)
  inv = terms['inv']
  expected = 0.9 * inv + 0.1 * sig if convention == 'convex' else inv + 0.1 * sig
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  with pytest.raises(ValueError, match='loss_convention'):
    losses.combine(inv, sig, 0.1, 'other')


def test_configured_statistic_reaches_the_loss():
  from lejepa_jax import stats
  import ml_collections
  proj = jax.random.normal(jax.random.key(2), (3, 64, 8)) * 1.5
  key = jax.random.key(3)
  config = ml_collections.ConfigDict(dict(num_slices=16, t_max=3.0, num_points=17,
                                          quadrature='trapezoid', statistic='anderson_darling',
                                          options={}))
  _, terms = losses.lejepa_loss(proj[:2], proj, key, lamb=0.1, **steps.regulariser_options(config))
  slices = sigreg.random_slices(key, 8, 16)
  expected = np.mean(stats.univariate.anderson_darling(proj @ slices))
  np.testing.assert_allclose(terms['sigreg'], expected, rtol=1e-5)
  config.statistic, config.options = 'bhep', {'beta': 0.5}
  _, terms = losses.lejepa_loss(proj[:2], proj, key, lamb=0.1, **steps.regulariser_options(config))
  np.testing.assert_allclose(terms['sigreg'], np.mean(stats.multivariate.bhep(proj, beta=0.5)),
                             rtol=1e-5)
  config.statistic, config.options = 'epps_pulley', {}
  config.quadrature = 'gauss_hermite'
  _, terms = losses.lejepa_loss(proj[:2], proj, key, lamb=0.1, **steps.regulariser_options(config))
  np.testing.assert_allclose(
      terms['sigreg'], sigreg.sigreg(proj, key, num_slices=16, quadrature_rule='gauss_hermite'),
      rtol=1e-6)
  with pytest.raises(ValueError, match='statistic'):
    stats.regulariser('kolmogorov', proj, key)


def test_schedule_warmup_then_cosine_to_lr_over_1000():
  s = optim.schedule(1e-3, total_steps=100, warmup_steps=10)
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(s(55), 1e-6 + (1e-3 - 1e-6) * 0.5, rtol=1e-5)
  np.testing.assert_allclose(s(100), 1e-6, rtol=1e-5)


def test_no_weight_decay_on_norms_and_biases():
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}, 'norm': {'scale': jnp.ones(2)}}
  tx = optim.adamw(1.0, 10, 0, weight_decay=0.5)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # warmup 0 -> lr(0) = 1: with zero gradients only decoupled weight decay moves parameters
  np.testing.assert_allclose(updates['dense']['kernel'], -0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates['dense']['bias'], 0)
  np.testing.assert_array_equal(updates['norm']['scale'], 0)
