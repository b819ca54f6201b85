"""The train step, sharding invariance, and the runlocal config end to end with resume."""
import functools
import json
import os
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import fmnist
from lejepa_jax import steps, train
from lejepa_jax import sharding as sharding_lib


def _tiny_config():
  c = fmnist.get_config('runlocal')
  c.batch_size = 16
  c.data.global_size, c.data.local_size = 28, 14
  return c


def _batch(c, seed=0):
  rng = np.random.default_rng(seed)
  d = c.data
  return {'global': rng.normal(size=(c.batch_size, d.num_global_views, d.global_size,
                                     d.global_size, 1)).astype(np.float32),
          'local': rng.normal(size=(c.batch_size, d.num_local_views, d.local_size,
                                    d.local_size, 1)).astype(np.float32),
          'label': rng.integers(0, 10, c.batch_size).astype(np.int32)}


def _run_steps(c, mesh, batch, n, tx=None):
  programs = steps.build(c, mesh, 100)
  with sharding_lib.activate(mesh):
    state = programs.init(np.int32(c.seed))
    step = programs.train_step
    if tx is not None:   # same model and shardings, another optimizer
      state = state.replace(opt_state=tx.init(state.params))
      step = jax.jit(functools.partial(steps.train_step, model=programs.model, tx=tx, config=c))
    global_batch = sharding_lib.to_global_batch(batch, mesh)
    history = []
    for _ in range(n):
      state, metrics = step(state, global_batch)
      history.append(jax.device_get(metrics))
  return state, history


def test_train_steps_reduce_the_loss_on_a_fixed_batch():
  c = _tiny_config()
  c.optim.warmup_steps = 1
  mesh = sharding_lib.make_mesh({'data': -1})
  _, history = _run_steps(c, mesh, _batch(c), 8)
  losses = [h['train/loss'] for h in history]
  assert losses[-1] < losses[0], losses
  assert all(np.isfinite(losses))


def test_sharded_step_equals_single_device_step():
  c = _tiny_config()
  batch = _batch(c, seed=1)
  one = sharding_lib.make_mesh({'data': 1}, devices=jax.devices()[:1])
  eight = sharding_lib.make_mesh({'data': 4, 'fsdp': 2})
  # Plain SGD, so that parameters compare gradients (Adam's first step is sign(g),
  # which turns float rounding of near-zero gradients into lr-sized differences).
  state1, h1 = _run_steps(c, one, batch, 2, tx=optax.sgd(0.5))
  state8, h8 = _run_steps(c, eight, batch, 2, tx=optax.sgd(0.5))
  for k in ('train/loss', 'train/inv', 'train/sigreg', 'train/probe_loss'):
    np.testing.assert_allclose(h8[-1][k], h1[-1][k], rtol=2e-4, err_msg=k)
  flat1 = jax.tree.leaves(jax.device_get(state1.params))
  flat8 = jax.tree.leaves(jax.device_get(state8.params))
  for a, b in zip(flat1, flat8):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mesh_shape_resolution_and_errors():
  assert sharding_lib.mesh_shape({'data': -1, 'fsdp': 2}, 8) == (4, 2, 1)
  assert sharding_lib.mesh_shape(None, 8) == (8, 1, 1)
  with pytest.raises(ValueError, match='unknown axes'):
    sharding_lib.mesh_shape({'model': 2}, 8)
  with pytest.raises(ValueError, match='needs'):
    sharding_lib.mesh_shape({'data': 3}, 8)


def _read_params(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  return ocp.StandardCheckpointer().restore(path)['params']


def test_runlocal_trains_checkpoints_and_resumes_to_the_bit(tmp_path):
  if not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'):
    pytest.skip('needs the dataset-fashion-mnist Debian package')
  c = fmnist.get_config('runlocal')
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(c, workdir)
  assert 0.0 <= results['eval/linear_probe_top1'] <= 1.0 and 0.0 <= results['eval/knn_top1'] <= 1.0
  assert results['eval/linear_probe_top1'] > 0.3          # far above 0.1 chance on 10 classes
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  keys = set().union(*lines)
  for k in ('step', 'train/loss', 'train/inv', 'train/sigreg', 'train/images_per_sec',
            'eval/linear_probe_top1', 'eval/knn_top1'):
    assert k in keys, k
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  steps_done = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert steps_done == [c.checkpoint_every, c.total_steps]
  final = _read_params(workdir, c.total_steps)

  # Pre-empted after the middle checkpoint: the rerun resumes there and lands on the same bits.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', str(c.total_steps)))
  os.remove(os.path.join(resumed, 'metrics.jsonl'))
  train.train_and_evaluate(c, resumed)
  lines = [json.loads(l) for l in open(os.path.join(resumed, 'metrics.jsonl'))]
  train_steps = [l['step'] for l in lines if 'train/loss' in l]
  assert min(train_steps) > c.checkpoint_every       # nothing before the checkpoint re-ran
  again = _read_params(resumed, c.total_steps)
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_bad_config_fails_early_naming_the_key(tmp_path):
  c = fmnist.get_config('runlocal')
  c.lamb = 1.5
  with pytest.raises(ValueError, match='lamb'):
    train.train_and_evaluate(c, str(tmp_path))
  c = fmnist.get_config('runlocal')
  c.batch_size = 30           # not divisible by the 8 devices
  with pytest.raises(ValueError, match='batch_size'):
    train.train_and_evaluate(c, str(tmp_path))
  c = fmnist.get_config('runlocal')
  c.eval.batch_size = 1001    # features are sharded over the 8 devices too
  with pytest.raises(ValueError, match='eval.batch_size'):
    train.train_and_evaluate(c, str(tmp_path))
  c = fmnist.get_config('runlocal')
  c.data.dir = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
    train.train_and_evaluate(c, str(tmp_path))
