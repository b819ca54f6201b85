"""Embedding diagnostics against float64 numpy references, and on the sharded 8-device mesh."""
import functools

import jax
import numpy as np
import pytest

from configs import fmnist
from lejepa_jax import diagnostics
from lejepa_jax import models
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import steps


def _np_rankme(x, eps=1e-7):
  s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
  p = s / s.sum() + eps
  return float(np.exp(-np.sum(p * np.log(p))))


def _anisotropic(n, d, seed=0):
  rng = np.random.default_rng(seed)
  scales = np.geomspace(3.0, 0.01, d)            # a spread spectrum: entropy well below d
  return (rng.normal(size=(n, d)) * scales + rng.normal(size=d)).astype(np.float32)


def _stats(x, seed=0, **kw):
  scalars, arrays = diagnostics.embedding_stats(jax.numpy.asarray(x), jax.random.key(seed), **kw)
  return {k: float(v) for k, v in scalars.items()}, {k: np.asarray(v) for k, v in arrays.items()}


@pytest.mark.parametrize('n,d', [(200, 24), (16, 40)])
def test_scalars_and_spectrum_match_numpy(n, d):
  x = _anisotropic(n, d)
  scalars, arrays = _stats(x, num_slices=32)
  x64 = x.astype(np.float64)
  assert scalars['rankme'] == pytest.approx(_np_rankme(x64), rel=1e-4)
  assert scalars['rankme_centred'] == pytest.approx(_np_rankme(x64 - x64.mean(0)), rel=1e-4)
  assert 1.0 < scalars['rankme'] < 0.8 * min(n, d)
  eig = np.sort(np.linalg.eigvalsh(np.cov(x64, rowvar=False)))[::-1]
  k = min(n, d)
  assert arrays['spectrum'].shape == (k,)
  # the top eigenvalues to float32 precision; past rank n - 1 (centred) they are ~0
  np.testing.assert_allclose(arrays['spectrum'][:k - 1], eig[:k - 1], rtol=2e-3,
                             atol=1e-5 * eig[0])
  assert np.all(np.diff(arrays['spectrum']) <= 1e-6 * eig[0])           # descending
  var = x64.var(axis=0)
  assert scalars['var_mean'] == pytest.approx(var.mean(), rel=1e-4)
  assert scalars['var_min'] == pytest.approx(var.min(), rel=1e-3)
  assert scalars['var_max'] == pytest.approx(var.max(), rel=1e-4)
  assert scalars['mean_norm'] == pytest.approx(np.linalg.norm(x64, axis=1).mean(), rel=1e-5)


def test_slices_are_projections_on_unit_directions():
  x = _anisotropic(300, 12)
  _, arrays = _stats(x, num_slices=16, num_qq_slices=3)
  slices = arrays['slices']
  assert slices.shape == (3, 300)
  # Recover each direction from x @ u = slice (x has full column rank): a unit vector.
  u, *_ = np.linalg.lstsq(x.astype(np.float64), slices.T.astype(np.float64), rcond=None)
  np.testing.assert_allclose(np.linalg.norm(u, axis=0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(x @ u, slices.T, rtol=1e-3, atol=1e-3)


def test_isotropic_gaussian_is_full_rank_gaussian_and_not_flagged():
  n, d = 512, 64
  x = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
  scalars, arrays = _stats(x, num_slices=256)
  assert scalars['rankme'] > 0.9 * d
  assert scalars['rankme_centred'] > 0.9 * d
  assert scalars['sigreg'] < 1.0 and scalars['sigreg_std'] < 1.0
  # Marchenko-Pastur: all eigenvalues within (1 +- sqrt(d / n))^2 (a little slack)
  assert 0.25 < arrays['spectrum'].min() and arrays['spectrum'].max() < 2.2
  scaled, _ = _stats(3.0 * x, num_slices=256)
  assert scaled['sigreg'] > 50.0                            # wrong scale: far from N(0, I)
  assert scaled['sigreg_std'] == pytest.approx(scalars['sigreg_std'], rel=1e-3)  # same shape
  assert scaled['rankme'] == pytest.approx(scalars['rankme'], rel=1e-4)          # scale-free
  dims = {'emb': min(n, d), 'proj': min(n, d)}
  both = {**{f'emb_{k}': v for k, v in scalars.items()},
          **{f'proj_{k}': v for k, v in scaled.items()}}
  assert diagnostics.collapse_warning(both, dims) is None


def test_rank_one_and_constant_collapse_fire_the_warning():
  n, d = 256, 48
  rng = np.random.default_rng(2)
  healthy, _ = _stats(rng.normal(size=(n, d)).astype(np.float32))
  rank1 = np.outer(rng.normal(size=n), rng.normal(size=d)).astype(np.float32)
  r1, _ = _stats(rank1)
  assert r1['rankme'] == pytest.approx(1.0, abs=0.01)
  dims = {'emb': min(n, d), 'proj': min(n, d)}
  warning = diagnostics.collapse_warning(
      {**{f'emb_{k}': v for k, v in healthy.items()},
       **{f'diag/proj_{k}': v for k, v in r1.items()}}, dims)
  assert warning is not None
  assert 'projector RankMe 1.00' in warning and 'backbone' not in warning and 'lamb' in warning

  constant = np.broadcast_to(rng.normal(size=d), (n, d)).astype(np.float32)
  c, arrays = _stats(constant)
  assert c['rankme'] == pytest.approx(1.0, abs=0.01)
  assert c['var_max'] < 1e-10
  assert np.all(arrays['spectrum'] < 1e-10)
  warning = diagnostics.collapse_warning({f'emb_{k}': v for k, v in c.items()}, {'emb': d})
  assert 'backbone RankMe' in warning and 'variance' in warning
  # a constant offset alone is not a collapse of the variance check
  assert diagnostics.collapse_warning({'emb_rankme': 40.0, 'emb_var_max': 1e-3,
                                       'emb_mean_norm': 1.0}, {'emb': 48}) is None


_unsharded_stats = jax.jit(functools.partial(diagnostics.embedding_stats, num_slices=32))


def _tiny_programs(mesh):
  config = fmnist.get_config('runlocal')
  return config, steps.build(config, mesh, total_steps=10)


def test_make_fn_on_sharded_mesh_matches_unsharded_numpy():
  mesh = sharding_lib.make_mesh({'data': -1}, None)
  assert mesh.devices.size == 8
  config, programs = _tiny_programs(mesh)
  n = 64
  images = np.random.default_rng(3).normal(size=(n, 28, 28, 1)).astype(np.float32)
  key = jax.random.key(7)
  with sharding_lib.activate(mesh):
    state = programs.init(np.int32(0))
    variables = steps.variables(state)
    fn = diagnostics.make_fn(programs.model, mesh, num_slices=32)
    sharded = jax.device_put(images, sharding_lib.batch_sharding(mesh))
    scalars, arrays = jax.device_get(fn(variables, sharded, key))
  host_vars = jax.device_get(variables)
  # Unsharded reference: the same module, on host arrays, outside the mesh.
  method = models.LeJEPAModel.embed_and_project
  out, _ = jax.jit(lambda v, x: programs.model.apply(v, x, method=method,
                                                    mutable=['batch_stats']))(host_vars, images)
  emb, proj = (np.asarray(a, np.float64) for a in out)
  assert emb.shape == (n, config.model.width) and proj.shape == (n, config.model.projector_out)
  # train-mode BatchNorm: differs from the running-average (eval) projector
  proj_eval = programs.model.apply(host_vars, emb.astype(np.float32), train=False,
                                   method=lambda m, e, train: m.projector(e, train=train))
  assert np.abs(np.asarray(proj_eval) - proj).max() > 1e-2
  emb_key, proj_key = jax.random.split(key)
  for prefix, x, k in (('emb', emb, emb_key), ('proj', proj, proj_key)):
    assert scalars[f'{prefix}_rankme'] == pytest.approx(_np_rankme(x), rel=1e-3)
    eig = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1][:min(x.shape)]
    top = eig > 1e-4 * eig[0]
    np.testing.assert_allclose(arrays[f'{prefix}_spectrum'][top], eig[top], rtol=5e-3)
    assert scalars[f'{prefix}_mean_norm'] == pytest.approx(np.linalg.norm(x, axis=1).mean(),
                                                           rel=1e-4)
    assert scalars[f'{prefix}_var_max'] == pytest.approx(x.var(0).max(), rel=1e-3)
    ref, ref_arrays = _unsharded_stats(jax.numpy.asarray(x, np.float32), k)
    assert scalars[f'{prefix}_sigreg'] == pytest.approx(float(ref['sigreg']), rel=1e-3)
    np.testing.assert_allclose(arrays[f'{prefix}_slices'], ref_arrays['slices'], rtol=1e-3,
                               atol=1e-4)
  dims = diagnostics.max_ranks(programs.model, n)
  assert dims == {'emb': config.model.width, 'proj': config.model.projector_out}
  assert diagnostics.collapse_warning(scalars, dims) is None    # random init: not collapsed
