"""Sharded frozen evaluation: features, row gather, k-NN and linear probe against numpy."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest

from lejepa_jax import sharding as sharding_lib
from lejepa_jax.evaluators import features as features_lib
from lejepa_jax.evaluators import knn, linear_probe

MESHES = {'8dev': {'data': 4, 'fsdp': 2}, '8dev_tensor': {'data': 2, 'fsdp': 2, 'tensor': 2},
          '1dev': {'data': 1}}


def _mesh(name):
  devices = jax.devices()[:1] if name == '1dev' else jax.devices()
  return sharding_lib.make_mesh(MESHES[name], devices=devices)


def _flat(features):
  x, y = np.asarray(features.x), np.asarray(features.y)
  return x.reshape(-1, x.shape[-1]), y.reshape(-1)


@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_take_rows_equals_numpy_indexing(mesh_name):
  mesh = _mesh(mesh_name)
  dp = sharding_lib.data_parallel_size(mesh)
  rng = np.random.default_rng(0)
  feats = features_lib.from_numpy(rng.normal(size=(90, 5)), rng.integers(0, 7, 90), mesh, 32)
  x, y = _flat(feats)
  idx = rng.integers(0, len(x), 24).astype(np.int32)
  idx[:3] = [len(x) - 1, 0, len(x) + 5]             # edges and one past the end (-> zeros)
  gather = jax.jit(lambda a, i, rep: features_lib.take_rows(a, i, mesh, replicated=rep),
                   static_argnums=2)
  ref_x = np.concatenate([x, np.zeros((6, 5), np.float32)])[idx]
  ref_y = np.concatenate([y, np.zeros(6, np.int32)])[idx]
  for rep in (False, True):
    got_x, got_y = gather(feats.x, idx, rep), gather(feats.y, idx, rep)
    np.testing.assert_array_equal(np.asarray(got_x), ref_x)   # bitwise
    np.testing.assert_array_equal(np.asarray(got_y), ref_y)
    rows_per_device = 24 if rep else 24 // dp
    assert {s.data.shape for s in got_x.addressable_shards} == {(rows_per_device, 5)}


def test_extract_matches_numpy_keeps_each_device_share_and_counts_real_rows():
  mesh = _mesh('8dev')
  g, dim = 16, 3
  rng = np.random.default_rng(1)
  images = rng.normal(size=(3 * g, 2, 2, 1)).astype(np.float32)
  labels = rng.integers(0, 5, 3 * g).astype(np.int32)
  mask = np.ones(3 * g, np.int32)
  mask[[7, 40, 41, 47]] = 0          # padding anywhere: validity comes from the mask
  batches = [{'image': images[b * g:(b + 1) * g], 'label': labels[b * g:(b + 1) * g],
              'mask': mask[b * g:(b + 1) * g]} for b in range(3)]
  w = rng.normal(size=(4, dim)).astype(np.float32)
  variables = {'w': jnp.asarray(w)}
  feature_fn = jax.jit(lambda v, im: im.reshape(im.shape[0], -1) @ v['w'] * 2.0,
                       in_shardings=(sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)))
  feats = features_lib.extract(feature_fn, variables, iter(batches), mesh, num_batches=3)
  x, y = _flat(feats)
  np.testing.assert_allclose(x, images.reshape(3 * g, -1).astype(np.float64) @ w * 2.0,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(y, np.where(mask > 0, labels, -1))
  assert feats.count == mask.sum() == 44
  # Each of the 8 devices holds its 2 rows of each of the 3 batches, nothing more.
  assert feats.x.sharding.is_equivalent_to(features_lib.x_sharding(mesh), 3)
  assert [s.data.shape for s in feats.x.addressable_shards] == [(3, 2, dim)] * 8
  assert [s.data.shape for s in feats.y.addressable_shards] == [(3, 2)] * 8
  abstract = features_lib.abstract_features(44, g, dim, mesh)
  assert (abstract.x.shape, abstract.y.shape) == (feats.x.shape, feats.y.shape)
  assert abstract.x.sharding.is_equivalent_to(feats.x.sharding, 3)

  # Features computed replicated (or split over another axis) are re-split by rows;
  # batches never yielded stay padding.
  replicated_fn = jax.jit(feature_fn, out_shardings=sharding_lib.replicated(mesh))
  again = features_lib.extract(replicated_fn, variables, iter(batches), mesh, num_batches=4)
  np.testing.assert_array_equal(np.asarray(again.x)[:3], np.asarray(feats.x))
  np.testing.assert_array_equal(np.asarray(again.y)[3], -1)
  assert again.count == 44
  assert [s.data.shape for s in again.x.addressable_shards] == [(4, 2, dim)] * 8
  with pytest.raises(ValueError, match='num_batches=2'):
    features_lib.extract(feature_fn, variables, iter(batches), mesh, num_batches=2)


def _clustered(rng, centres, n, noise):
  y = rng.integers(0, len(centres), n)
  return centres[y] + noise * rng.normal(size=(n, centres.shape[1])), y


def _knn_numpy(train_x, train_y, test_x, test_y, num_classes, k, temperature):
  """Brute-force float64 DINO vote over the real rows only."""
  tn = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  qn = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
  sims = qn @ tn.T
  top = np.argsort(-sims, axis=1)[:, :k]
  votes = np.zeros((len(qn), num_classes))
  for q in range(len(qn)):
    np.add.at(votes[q], train_y[top[q]], np.exp(sims[q, top[q]] / temperature))
  return np.sum(votes.argmax(1) == test_y) / len(test_y)


@pytest.mark.parametrize('mesh_name', ['8dev', '1dev'])
def test_knn_equals_brute_force_numpy_with_padding_rows(mesh_name):
  mesh = _mesh(mesh_name)
  rng = np.random.default_rng(2)
  num_classes, temperature = 5, 0.1
  centres = rng.normal(size=(num_classes, 8))
  train_x, train_y = _clustered(rng, centres, 300, noise=0.9)
  test_x, test_y = _clustered(rng, centres, 70, noise=0.9)
  # Padding rows that would be every query's nearest neighbour if they were not masked.
  pad_x = np.concatenate([train_x[:100], test_x[:20], train_x[100:]])
  pad_y = np.concatenate([train_y[:100], -np.ones(20, int), train_y[100:]])
  train = features_lib.from_numpy(pad_x, pad_y, mesh, 64)
  test = features_lib.from_numpy(np.concatenate([test_x, 50 * test_x[:5]]),
                                 np.concatenate([test_y, -np.ones(5, int)]), mesh, 32)
  assert (train.count, test.count) == (300, 70)
  for k in (1, 5, 20):
    ref = _knn_numpy(train_x, train_y, test_x, test_y, num_classes, k, temperature)
    assert 0.4 < ref < 0.97                          # not a trivial task
    got = knn.evaluate(train, test, num_classes, mesh=mesh, k=k, temperature=temperature, chunk=24)
    assert got['knn_top1'] == ref, k
  # Several k from one search: each equals its own brute-force vote.
  got = knn.evaluate(train, test, num_classes, mesh=mesh, k=5, ks=(1, 5, 20, 1000),
                     temperature=temperature, chunk=24)
  for k in (1, 5, 20):
    assert got[f'knn_k{k}_top1'] == _knn_numpy(train_x, train_y, test_x, test_y, num_classes, k,
                                                temperature), k
  assert got['knn_top1'] == got['knn_k5_top1']
  assert got['knn_k1000_top1'] == _knn_numpy(train_x, train_y, test_x, test_y, num_classes, 300,
                                             temperature)   # k capped at the 300 training rows


def _probe_data(mesh, rng):
  w = rng.normal(size=(12, 3))
  w -= w.mean(0)          # argmax(x @ w) then survives the probe's LayerNorm (mean and scale)
  x = rng.normal(size=(1000, 12))
  y = np.argmax(x @ w, -1)
  test_x = np.concatenate([x[800:], 100 * rng.normal(size=(7, 12))])  # + 7 padding rows
  test_y = np.concatenate([y[800:], -np.ones(7, int)])
  return (features_lib.from_numpy(x[:800], y[:800], mesh, 128),
          features_lib.from_numpy(test_x, test_y, mesh, 64))


def _layernorm_dense_numpy(params, x):
  x = x.astype(np.float64)
  norm = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  norm = norm * np.asarray(params['norm']['scale'], np.float64) + np.asarray(params['norm']['bias'])
  return norm @ np.asarray(params['head']['kernel'], np.float64) + np.asarray(params['head']['bias'])


def test_linear_probe_same_on_8_and_1_devices_learns_rule_and_picks_lr_on_holdout():
  options = dict(lrs=(1e-6, 3e-2), epochs=8, batch_size=100, seed=3)  # 1e-6: hopeless
  results, params = {}, {}
  for name in ('8dev', '1dev'):
    mesh = _mesh(name)
    train, test = _probe_data(mesh, np.random.default_rng(4))
    results[name] = linear_probe.evaluate(train, test, 3, mesh=mesh, **options)
    fns = {n: fn for n, fn, _ in linear_probe.programs(train, test, 3, mesh=mesh, **options)}
    fit_rows, all_rows, hold_y = fns['linear_probe/split'](train.y, np.int32(3))
    # The split: fit and held-out rows are disjoint and cover exactly the real rows.
    hold_rows = np.flatnonzero(np.asarray(hold_y).reshape(-1) >= 0)
    assert len(hold_rows) == 80 and len(np.intersect1d(hold_rows, np.asarray(fit_rows))) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([hold_rows, np.asarray(fit_rows)])),
                                  np.flatnonzero(np.asarray(train.y).reshape(-1) >= 0))
    params[name] = fns['linear_probe/train_final'](train.x, train.y, all_rows,
                                                   np.asarray([3e-2], np.float32), np.int32(3))
    # The masked, sharded test accuracy equals a float64 numpy forward pass of the same probe.
    correct = fns['linear_probe/test_correct'](params[name], test.x, test.y)
    p = jax.tree.map(lambda a: np.asarray(a)[0], params[name])
    tx, ty = _flat(test)
    keep = ty >= 0
    ref = np.sum(_layernorm_dense_numpy(p, tx[keep]).argmax(-1) == ty[keep])
    assert int(correct[0]) == ref
    assert results[name]['linear_probe_top1'] == pytest.approx(ref / 200)
  assert results['8dev']['linear_probe_lr'] == results['1dev']['linear_probe_lr'] == 3e-2
  assert results['8dev']['linear_probe_top1'] > 0.9
  assert abs(results['8dev']['linear_probe_top1'] - results['1dev']['linear_probe_top1']) <= 1 / 200
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-4, atol=1e-5),
               params['8dev'], params['1dev'])


def test_programs_compile_ahead_of_time_from_abstract_features():
  mesh = _mesh('8dev_tensor')
  train = features_lib.abstract_features(1000, 64, 32, mesh)
  test = features_lib.abstract_features(300, 64, 32, mesh)
  progs = (linear_probe.programs(train, test, 10, mesh=mesh, lrs=(1e-3, 1e-2), epochs=2,
                                 batch_size=100)
           + knn.programs(train, test, 10, mesh=mesh, k=20, chunk=128))
  assert [name for name, _, _ in progs] == [
      'linear_probe/split', 'linear_probe/train_sweep', 'linear_probe/holdout_correct',
      'linear_probe/train_final', 'linear_probe/test_correct', 'knn/chunk_correct']
  for name, fn, args in progs:
    compiled = fn.lower(*args).compile()
    assert compiled.cost_analysis() is not None, name


def _two_process_workload():
  """extract -> k-NN and probe on a {'data': 4, 'fsdp': 2} mesh, with this process's rows only.

  Batches follow the eval pipeline: global batch b = records [b*G, (b+1)*G),
  process p gets rows [p*L, (p+1)*L) of it, zero padding with mask 0 at the end.
  """
  mesh = sharding_lib.make_mesh({'data': 4, 'fsdp': 2})
  rng = np.random.default_rng(6)
  centres = rng.normal(size=(4, 12))
  w = rng.normal(size=(12, 6)).astype(np.float32)
  feature_fn = jax.jit(lambda v, im: im.reshape(im.shape[0], -1) @ v['w'],
                       in_shardings=(sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)))
  g, local = 32, 32 // jax.process_count()
  out = {}
  for split, n in (('train', 230), ('test', 90)):
    x, y = _clustered(rng, centres, n, noise=0.8)
    nb = -(-n // g)
    x = np.concatenate([x, np.zeros((nb * g - n, 12))]).reshape(nb * g, 2, 2, 3).astype(np.float32)
    y = np.concatenate([y, np.zeros(nb * g - n, int)])
    mask = (np.arange(nb * g) < n).astype(np.int32)
    rows = lambda b: slice(b * g + jax.process_index() * local, b * g + (jax.process_index() + 1) * local)
    batches = ({'image': x[rows(b)], 'label': y[rows(b)], 'mask': mask[rows(b)]} for b in range(nb))
    out[split] = features_lib.extract(feature_fn, {'w': w}, batches, mesh, nb)
  return {'counts': [out['train'].count, out['test'].count],
          'shards': sorted({s.data.shape for s in out['train'].x.addressable_shards}),
          'num_shards': len(out['train'].x.addressable_shards),
          **knn.evaluate(out['train'], out['test'], 4, mesh=mesh, k=5, chunk=32),
          **linear_probe.evaluate(out['train'], out['test'], 4, mesh=mesh, lrs=(1e-6, 3e-2),
                                  epochs=10, batch_size=64)}


_WORKER = """
import json, sys
import jax
jax.config.update('jax_num_cpu_devices', 4)
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
sys.path.insert(0, 'tests')
import test_evaluators
print('RESULT', json.dumps(test_evaluators._two_process_workload(), default=list))
"""


def test_two_processes_each_holding_half_give_the_single_process_result():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env.update(PYTHONPATH=root, JAX_PLATFORMS='cpu')
  address = f'localhost:{portpicker.pick_unused_port()}'
  procs = [subprocess.Popen([sys.executable, '-c', _WORKER, address, str(i)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  results = []
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    results.append(json.loads(out.split('RESULT ')[-1]))
  single = json.loads(json.dumps(_two_process_workload(), default=list))
  assert single['num_shards'] == 8 and results[0]['num_shards'] == results[1]['num_shards'] == 4
  assert single['shards'] == results[0]['shards'] == [[8, 4, 6]]   # 8 batches, 32 / 8 rows each
  assert single['counts'] == results[0]['counts'] == [230, 90]
  assert 0.6 < single['knn_top1'] < 0.9 and single['linear_probe_top1'] > 0.6
  for r in results:
    assert r['knn_top1'] == single['knn_top1']
    assert r['linear_probe_top1'] == pytest.approx(single['linear_probe_top1'], abs=1 / 90)
    assert r['linear_probe_lr'] == single['linear_probe_lr'] == 3e-2


@pytest.mark.parametrize('mesh_name', ['8dev', '1dev'])
def test_online_probe_is_the_trained_head_on_the_test_split_against_numpy(mesh_name):
  """The head's argmax accuracy over the real test rows (padding rows never count)."""
  from lejepa_jax.evaluators import online_probe
  mesh = _mesh(mesh_name)
  rng = np.random.default_rng(4)
  _, test = _probe_data(mesh, rng)
  params = {'norm': {'scale': rng.normal(size=12).astype(np.float32),
                     'bias': rng.normal(size=12).astype(np.float32)},
            'head': {'kernel': rng.normal(size=(12, 3)).astype(np.float32),
                     'bias': rng.normal(size=3).astype(np.float32)}}
  x, y = _flat(test)
  want = np.mean((np.argmax(_layernorm_dense_numpy(params, x), -1) == y)[y >= 0])
  got = online_probe.evaluate(None, test, 3, mesh=mesh, probe=params)
  assert got == {'online_probe_top1': pytest.approx(want, abs=1e-9)}
  assert 0.2 < want < 0.9          # a head that is neither all right nor all wrong


def test_evaluators_read_their_protocols_features_unless_told_otherwise():
  from configs import fmnist
  from lejepa_jax.evaluators import suite
  c = fmnist.get_config('runlocal')
  c.evals = {'probe': {'type': 'linear_probe'}, 'knn': {'type': 'knn'},
             'knn_probe': {'type': 'knn', 'features': 'probe'}, 'shots': {'type': 'fewshot'},
             'online': {'type': 'online_probe'}}
  kinds = {s.name: (suite.feature_kind(c, s), suite.metric_prefix(c, s)) for s in suite.specs(c)}
  assert kinds == {'probe': ('probe', 'eval/'), 'knn': ('embedding', 'eval/'),
                   'knn_probe': ('probe', 'eval/'), 'shots': ('embedding', 'eval/'),
                   'online': ('probe', 'eval/')}
  c.eval.features = 'projection'   # a re-evaluation on other features: marked, never mixed up
  kinds = {s.name: (suite.feature_kind(c, s), suite.metric_prefix(c, s)) for s in suite.specs(c)}
  assert kinds['probe'] == ('projection', 'eval/projection/')
  assert kinds['knn'] == kinds['knn_probe'] == ('projection', 'eval/projection/')
  assert kinds['online'] == ('probe', 'eval/')
  c.eval.features = 'probe'
  kinds = {s.name: (suite.feature_kind(c, s), suite.metric_prefix(c, s)) for s in suite.specs(c)}
  assert kinds['probe'] == kinds['knn_probe'] == ('probe', 'eval/')
  assert kinds['knn'] == ('probe', 'eval/probe/')
  c.model.embedding_dim, c.model.online_probe_input = 16, 'embedding'
  assert suite.feature_kind(c, suite.specs(c, ['online'])[0]) == 'head'


def test_one_encoder_pass_gives_every_kind_of_features_concatenated():
  from configs import fmnist
  from lejepa_jax import models, steps
  c = fmnist.get_config('runlocal')
  c.model.embedding_dim = 24
  mesh = sharding_lib.make_mesh({'data': -1})
  programs = steps.build(c, mesh, 1)
  state = programs.init(np.int32(0))
  images = jax.device_put(np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype(np.float32),
                          sharding_lib.batch_sharding(mesh))
  v = steps.variables(state)
  kinds = ('embedding', 'probe', 'head', 'projection')
  together = np.asarray(programs.features_of(kinds)(v, images))
  alone = [np.asarray(programs.features_of((k,))(v, images)) for k in kinds]
  dims = models.feature_dims(programs.model)
  assert [a.shape[1] for a in alone] == [dims[k] for k in kinds] == [64, 128, 24, 16]
  np.testing.assert_allclose(together, np.concatenate(alone, axis=1), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(alone[1], np.asarray(programs.features(v, images)))
  # The head is the linear map of the final CLS, the projector reads the head.
  head = state.params['encoder']['head']
  np.testing.assert_allclose(alone[2], alone[0] @ np.asarray(head['kernel']) +
                             np.asarray(head['bias']), rtol=1e-5, atol=1e-5)
