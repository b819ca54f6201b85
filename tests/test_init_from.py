"""config.init_from: a run starts its encoder from an export, a training workdir or a timm
state dict; mismatches stop it before it writes."""

import os

import jax
import numpy as np
import pytest

import test_folder   # tests/test_folder.py: the CLI in a fresh process
from configs import fmnist
from lejepa_jax import config as config_lib
from lejepa_jax import init_from
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import steps


@pytest.fixture(scope='module')
def export(tmp_path_factory):
  """An encoder exported from 2 steps of the runlocal config, seed 7."""
  tmp = tmp_path_factory.mktemp('init_from')
  workdir, out = tmp / 'run', tmp / 'export'
  result = test_folder._python(str(tmp), '-m', 'lejepa_jax.main',
                               '--config=configs/fmnist.py:runlocal', f'--workdir={workdir}',
                               '--config.total_steps=2', '--config.seed=7', '--config.evals={}')
  assert result.returncode == 0, result.stderr[-3000:]
  result = test_folder._python(str(tmp), '-m', 'lejepa_jax.export', f'--workdir={workdir}',
                               f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  return str(out)


def _config(**model):
  c = fmnist.get_config('runlocal')
  c.model.update(model)
  return c


def test_step_0_features_are_the_exported_encoders(export):
  import lejepa_jax
  c = _config()
  c.init_from = export
  mesh = sharding_lib.make_mesh(c.mesh)
  programs = steps.build(c, mesh, 10)
  init_from.check(c, programs.abstract_state.params['encoder'])
  images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), np.uint8)
  want = np.asarray(lejepa_jax.load_encoder(export)(images))
  exported = lejepa_jax.load_encoder(export)
  normalized = np.stack([exported.preprocess(x) for x in images])
  with sharding_lib.activate(mesh):
    fresh = programs.init(np.int32(0))
    state = init_from.apply(fresh, export, c.model.depth, c.model.scan)
    x = jax.device_put(normalized, sharding_lib.batch_sharding(mesh))
    got = np.asarray(programs.features(steps.variables(state), x))
    random = np.asarray(programs.features(steps.variables(fresh), x))
  assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
  assert np.abs(random - want).max() > 1e-2 * np.abs(want).max()    # seed 0 is another model
  # The projector and the online probe start as a fresh run's.
  for part in ('projector', 'probe'):
    for a, b in zip(jax.tree.leaves(state.params[part]), jax.tree.leaves(fresh.params[part])):
      np.testing.assert_array_equal(a, b)


def test_a_training_workdir_gives_its_newest_checkpoints_encoder(export):
  """init_from=WORKDIR (the run the export came from, scanned blocks) into an unrolled config:
  step-0 features equal the export's (1e-6); the config's other architecture is refused."""
  import lejepa_jax
  workdir = os.path.join(os.path.dirname(export), 'run')
  c = _config(scan=False)
  c.init_from = workdir
  mesh = sharding_lib.make_mesh(c.mesh)
  programs = steps.build(c, mesh, 10)
  init_from.check(c, programs.abstract_state.params['encoder'])
  exported = lejepa_jax.load_encoder(export)
  images = np.random.default_rng(2).integers(0, 256, (8, 28, 28, 1), np.uint8)
  want = np.asarray(exported(images))
  x = np.stack([exported.preprocess(i) for i in images])
  with sharding_lib.activate(mesh):
    state = init_from.apply(programs.init(np.int32(0)), workdir, c.model.depth, c.model.scan)
    got = np.asarray(programs.features(steps.variables(state),
                                       jax.device_put(x, sharding_lib.batch_sharding(mesh))))
  assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
  c.model.width, c.model.num_heads = 48, 2
  with pytest.raises(config_lib.ConfigError, match="does not fit this config's encoder"):
    init_from.check(c, steps.build(c, mesh, 10).abstract_state.params['encoder'])


def test_a_run_starts_from_the_export_and_a_wrong_one_exits_2(export, tmp_path):
  workdir = tmp_path / 'run'
  result = test_folder._python(str(tmp_path), '-m', 'lejepa_jax.main',
                               '--config=configs/fmnist.py:runlocal', f'--workdir={workdir}',
                               '--config.total_steps=2', '--config.evals={}',
                               f'--config.init_from={export}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'encoder initialised from {export}' in result.stderr
  for bad, words in ((['--config.model.width=48', '--config.model.num_heads=2'],
                      "does not fit this config's encoder"),
                     ([], 'not a lejepa_jax export')):
    other = tmp_path / f'bad{len(bad)}'
    source = export if bad else str(tmp_path)
    result = test_folder._python(str(tmp_path), '-m', 'lejepa_jax.main',
                                 '--config=configs/fmnist.py:runlocal', f'--workdir={other}',
                                 f'--config.init_from={source}', *bad)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [l for l in result.stderr.splitlines() if l.startswith('[lejepa_jax] error:')]
    assert len(errors) == 1 and words in errors[0], result.stderr[-3000:]
    assert not other.exists()


def test_mismatches_are_listed():
  found = {'encoder/a': (2, 3), 'encoder/b': (4,), 'encoder/extra': (1,)}
  expected = {'encoder/a': (2, 3), 'encoder/b': (5,), 'encoder/c': (7,)}
  assert init_from.mismatches(found, expected) == [
      'missing encoder/c (7,)', 'unexpected encoder/extra (1,)',
      'encoder/b: (4,) in the file, (5,) in the run']
  c = _config(width=48, num_heads=2)
  c.init_from = '/nonexistent'
  mesh = sharding_lib.make_mesh(c.mesh)
  programs = steps.build(c, mesh, 10)
  with pytest.raises(config_lib.ConfigError, match='does not exist'):
    init_from.check(c, programs.abstract_state.params['encoder'])


@pytest.mark.parametrize('file', ['model.safetensors', 'model.pth'])
def test_a_timm_vit_s_state_dict_gives_timms_features(tmp_path, file):
  """A timm ViT-S/16 (random weights, every one perturbed, CLS position slot included) saved as
  a state dict: the run's encoder built from it gives timm's final-norm CLS (rel 1e-4)."""
  from test_timm import import_timm, timm_features
  torch, timm = import_timm()
  torch.manual_seed(0)
  model = timm.create_model('vit_small_patch16_224', pretrained=False, num_classes=0,
                            img_size=32, in_chans=1).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  path = str(tmp_path / file)
  if file.endswith('.safetensors'):
    import safetensors.torch
    safetensors.torch.save_file(model.state_dict(), path)
  else:
    torch.save(model.state_dict(), path)
  c = _config(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16, gelu='exact',
              scan=True)
  c.data.global_size, c.data.local_size = 32, 16
  c.init_from = path
  mesh = sharding_lib.make_mesh(c.mesh)
  programs = steps.build(c, mesh, 10)
  init_from.check(c, programs.abstract_state.params['encoder'])
  x = np.random.default_rng(1).standard_normal((8, 32, 32, 1)).astype(np.float32)
  want = timm_features(model, x)['cls']
  with sharding_lib.activate(mesh):
    state = init_from.apply(programs.init(np.int32(0)), path, 12, True)
    got = np.asarray(programs.features_of(('embedding',))(
        steps.variables(state), jax.device_put(x, sharding_lib.batch_sharding(mesh))))
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
  # Another architecture: every mismatch named in one message.
  c.model.num_registers = 2
  with pytest.raises(config_lib.ConfigError, match='missing encoder/registers'):
    init_from.check(c, steps.build(c, mesh, 10).abstract_state.params['encoder'])


def test_evaluate_an_export_without_training_equals_its_run(export, tmp_path):
  """evaluate --config.init_from=EXPORT on an empty workdir (a frozen baseline) gives the
  figures of the run the export came from, evaluated on its checkpoint."""
  import json
  knn = '--config.evals=' + json.dumps({'knn': {'type': 'knn', 'k': 5, 'max_examples': 256}})
  run = os.path.join(os.path.dirname(export), 'run')
  figures = []
  for args in ([f'--workdir={run}'],
               [f'--workdir={tmp_path / "baseline"}', '--config=configs/fmnist.py:runlocal',
                f'--config.init_from={export}', '--config.seed=7']):   # the run's: same subset
    result = test_folder._python(str(tmp_path), '-m', 'lejepa_jax.evaluate', '--noplots', *args,
                                 knn)     # after --config: absl wants the file first
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = args[0].split('=', 1)[1]
    figures.append([json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))][-1])
  assert figures[1]['step'] == 0 and figures[0]['step'] == 2
  assert figures[1]['eval/knn_top1'] == figures[0]['eval/knn_top1'] > 0.3, figures
