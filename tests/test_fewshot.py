"""Few-shot ridge regression on sharded features against a float64 numpy implementation."""
import jax
import numpy as np
import pytest

from lejepa_jax import sharding as sharding_lib
from lejepa_jax.evaluators import features as features_lib
from lejepa_jax.evaluators import fewshot


def _mesh(name):
  if name == '1dev':
    return sharding_lib.make_mesh({'data': 1}, devices=jax.devices()[:1])
  return sharding_lib.make_mesh({'data': 4, 'fsdp': 2}, devices=jax.devices())


def _ridge_numpy(x, y, test_x, num_classes, reg):
  """float64: L2-normalise, centre on the support set, ridge onto +-1 one-hot (primal form)."""
  n = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  x, test_x = n(x.astype(np.float64)), n(test_x.astype(np.float64))
  centre = x.mean(0)
  xc = x - centre
  targets = 2 * np.eye(num_classes)[y] - 1
  w = np.linalg.solve(xc.T @ xc + reg * np.eye(x.shape[1]), xc.T @ targets)
  return np.argmax((test_x - centre) @ w, axis=1)


def _ridge_weights_numpy(x, y, num_classes, reg):
  """float64 (W, centre) of the ridge fit, primal form."""
  x = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  centre = x.mean(0)
  xc = x - centre
  targets = 2 * np.eye(num_classes)[y] - 1
  return np.linalg.solve(xc.T @ xc + reg * np.eye(x.shape[1]), xc.T @ targets), centre


@pytest.mark.parametrize('dim', [6, 40])     # 40 padded rows: primal form (6), kernel form (40)
def test_one_fit_program_serves_every_shot_count_padding_rows_drop_out_exactly(dim):
  """Every shot count runs the program compiled for the largest: the 3-shot fit padded to
  10 shots (row 0 labelled -1) gives the float64 weights of the 3-shot support set alone."""
  mesh = _mesh('8dev')
  rng = np.random.default_rng(3)
  num_classes, regs = 4, (0.01, 1.0)
  x = rng.normal(size=(256, dim)).astype(np.float32) + 2.0      # off-centre: padding would show
  y = np.arange(256) % num_classes
  train = features_lib.from_numpy(x, y, mesh, 64)
  labels = fewshot.host_labels(train, mesh)
  flat_x = np.asarray(train.x).reshape(-1, dim)
  rows = fewshot.support_rows(labels, num_classes, 3, np.random.default_rng(0))
  fit = fewshot._fit_fn(mesh, num_classes, regs)
  w, centre = fit(train.x, *fewshot._padded(rows, labels[rows], 10 * num_classes))
  for i, reg in enumerate(regs):
    want_w, want_centre = _ridge_weights_numpy(flat_x[rows], labels[rows], num_classes, reg)
    np.testing.assert_allclose(np.asarray(centre), want_centre, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w[i]), want_w, rtol=2e-3, atol=2e-4 * np.abs(want_w).max())


def _clustered(rng, centres, n, noise):
  y = rng.integers(0, len(centres), n)
  return (centres[y] + noise * rng.normal(size=(n, centres.shape[1]))).astype(np.float32), y


@pytest.mark.parametrize('mesh_name', ['8dev', '1dev'])
def test_fewshot_equals_float64_ridge_on_the_same_support_sets(mesh_name):
  mesh = _mesh(mesh_name)
  rng = np.random.default_rng(0)
  num_classes, dim = 4, 12
  centres = rng.normal(size=(num_classes, dim))
  train_x, train_y = _clustered(rng, centres, 400, noise=1.2)
  test_x, test_y = _clustered(rng, centres, 150, noise=1.2)
  # padding rows (label -1) inside both splits: never picked, never scored
  pad = lambda x, y: (np.concatenate([x, 9 * x[:10]]), np.concatenate([y, -np.ones(10, int)]))
  train = features_lib.from_numpy(*pad(train_x, train_y), mesh, 64)
  test = features_lib.from_numpy(*pad(test_x, test_y), mesh, 32)
  reg = 0.1
  got = fewshot.evaluate(train, test, num_classes, mesh=mesh, shots=(1, 5), seeds=3,
                         l2_regs=(reg,), seed=7)
  labels = fewshot.host_labels(train, mesh)
  flat_x = np.asarray(train.x).reshape(-1, dim)
  for shots in (1, 5):
    accs = []
    for trial in range(3):
      rows = fewshot.support_rows(labels, num_classes, shots, np.random.default_rng([7, shots, trial]))
      assert sorted(np.bincount(labels[rows], minlength=num_classes)) == [shots] * num_classes
      pred = _ridge_numpy(flat_x[rows], labels[rows], test_x, num_classes, reg)
      accs.append(np.mean(pred == test_y))
    # float32 vs float64 may flip a near-tie: at most one test image per draw
    assert abs(got[f'fewshot_{shots}shot_top1'] - np.mean(accs)) <= 1 / len(test_y) + 1e-9
    assert abs(got[f'fewshot_{shots}shot_top1_std'] - np.std(accs)) <= 2 / len(test_y)
  assert 0.4 < got['fewshot_1shot_top1'] < got['fewshot_5shot_top1'] < 1.0


def test_fewshot_picks_the_regulariser_on_training_images_and_reports_its_test_accuracy():
  mesh = _mesh('8dev')
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(3, 20))
  train = features_lib.from_numpy(*_clustered(rng, centres, 300, noise=2.0), mesh, 64)
  test_x, test_y = _clustered(rng, centres, 200, noise=2.0)
  test = features_lib.from_numpy(test_x, test_y, mesh, 64)
  regs = (1e-4, 1.0, 1e4)
  per_reg = [fewshot.evaluate(train, test, 3, mesh=mesh, shots=(10,), seeds=1, l2_regs=(r,))
             ['fewshot_10shot_top1'] for r in regs]
  chosen = fewshot.evaluate(train, test, 3, mesh=mesh, shots=(10,), seeds=1, l2_regs=regs,
                            val_examples=250)['fewshot_10shot_top1']
  assert chosen in per_reg                       # the test accuracy of one of the fits
  assert len(set(per_reg)) > 1                   # the choice mattered on this data


def test_support_rows_too_few_images_of_a_class_names_the_class():
  labels = np.array([0, 0, 0, 1, -1])
  with pytest.raises(ValueError, match='class 1 has 1 training images'):
    fewshot.support_rows(labels, 2, 2, np.random.default_rng(0))
