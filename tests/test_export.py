"""Export a run's encoder (safetensors + JSON) and load it in a fresh process.

One short runlocal training (final evaluation stubbed) is exported with the CLI; a fresh
Python process that never imports the training code loads it with `load_encoder`, and its
features must equal those of the checkpoint computed here through `steps.build`.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from configs import fmnist
from lejepa_jax import checkpoint as ckpt_lib
from lejepa_jax import run_config
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import steps
from lejepa_jax import train
from lejepa_jax.data import augment
from lejepa_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4

pytestmark = pytest.mark.skipif(
    not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'),
    reason='needs the dataset-fashion-mnist Debian package')


def _env():
  """A plain process: one CPU device, no test settings."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS',)}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return env


def _export(*args):
  return subprocess.run([sys.executable, '-m', 'lejepa_jax.export', *args], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 4-step runlocal workdir (scanned ViT, 8 devices) and its exported encoder."""
  workdir = str(tmp_path_factory.mktemp('run'))
  c = fmnist.get_config('runlocal')
  c.total_steps, c.checkpoint_every, c.log_every = STEPS, STEPS, 2
  c.evals = {}                 # no evaluators: not what this tests
  train.train_and_evaluate(c, workdir)
  out = str(tmp_path_factory.mktemp('export') / 'encoder')
  result = _export(f'--workdir={workdir}', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, out, result.stdout


def test_the_run_stores_its_config_with_every_key(run):
  """config.json holds every key (defaults included): the run reads the same way whatever
  defaults a later version has, and --config.KEY=VALUE of evaluate finds each key."""
  from lejepa_jax import config_schema
  workdir, _, _ = run
  stored = json.load(open(os.path.join(workdir, 'config.json')))
  assert set(config_schema.flatten(stored)) == set(config_schema.KEYS)
  assert stored['model']['gelu'] == fmnist.get_config('runlocal').model.gelu
  assert stored['evals'] == {} and stored['optim']['end_lr'] == -1.0


def test_an_export_made_before_gelu_and_head_dim_reads_as_it_ran(run, tmp_path):
  from lejepa_jax import encoder as encoder_lib
  _, out, _ = run
  meta = json.load(open(os.path.join(out, 'config.json')))
  for key in ('gelu', 'head_dim'):
    del meta['model'][key]
  (tmp_path / 'config.json').write_text(json.dumps(meta))
  model = encoder_lib.read_config(tmp_path)['model']
  assert (model['gelu'], model['head_dim']) == ('tanh', 0)
  assert encoder_lib.vit_config(encoder_lib.read_config(tmp_path)).gelu == 'tanh'


def _checkpoint(workdir):
  config = run_config.load(workdir)
  mesh = sharding_lib.make_mesh(config.get('mesh'))
  programs = steps.build(config, mesh, 1)
  state, step = ckpt_lib.restore_state(workdir, programs.abstract_state)
  return config, programs, state, step


def _images(n=16):
  """The first n Fashion-MNIST test images, uint8 (n, 28, 28, 1)."""
  return sources.fashion_mnist(None, 'test').images[:n]


def _in_a_fresh_process(script, images, export_dir, result_file):
  """Runs `script` with argv (images .npy, export_dir, result_file) in a new Python process;
  returns what it saved in result_file."""
  np.save(result_file.parent / 'images.npy', images)
  result = subprocess.run([sys.executable, '-c', script, str(result_file.parent / 'images.npy'),
                           export_dir, str(result_file)], cwd=str(result_file.parent), env=_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return np.load(result_file)


def test_export_prints_where_and_how_many_parameters(run):
  workdir, out, stdout = run
  config, programs, state, step = _checkpoint(workdir)
  n = sum(x.size for x in jax.tree.leaves(state.params['encoder']))
  assert out in stdout and f'{n:,} parameters' in stdout, stdout
  meta = json.load(open(os.path.join(out, 'config.json')))
  m = config.model
  assert meta['model'] == {
      'variant': m.variant, 'width': m.width, 'depth': m.depth, 'mlp_dim': m.mlp_dim,
      'num_heads': m.num_heads, 'patch_size': m.patch_size, 'image_size': 28,
      'num_registers': 0, 'dtype': 'float32', 'scan': True, 'attention': None,
      'gelu': m.gelu, 'head_dim': 0}
  assert meta['features_dim'] == meta['outputs']['features']['dim'] == 2 * m.width
  assert meta['embedding_dim'] == meta['outputs']['embedding']['dim'] == m.width
  assert (meta['input_size'], meta['channels']) == (28, 1)
  assert meta['mean'] == list(config.data.mean) and meta['std'] == list(config.data.std)
  assert meta['eval_crop_fraction'] == 1.0
  assert meta['step'] == step == STEPS and meta['workdir'] == workdir
  assert meta['num_params'] == n and meta['lejepa_jax_version']


def test_safetensors_names_and_values_are_the_encoder_param_tree(run):
  workdir, out, _ = run
  config, _, state, _ = _checkpoint(workdir)
  tensors = safetensors.numpy.load_file(os.path.join(out, 'model.safetensors'))
  # Expected, spelt out from the checkpoint's tree: scanned leaves 'blocks/...' of shape
  # (depth, ...) become 'block_i/...'; everything else keeps its path.
  expected = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.params['encoder'])[0]:
    keys = [p.key for p in path]
    leaf = np.asarray(leaf)
    if keys[0] == 'blocks':
      for i in range(config.model.depth):
        expected['/'.join(['encoder', f'block_{i}'] + keys[1:])] = leaf[i]
    else:
      expected['/'.join(['encoder'] + keys)] = leaf
  assert sorted(tensors) == sorted(expected)
  assert 'encoder/block_1/attn/qkv_kernel' in tensors and 'encoder/cls' in tensors
  assert not any(k.startswith(('projector', 'probe')) for k in tensors)
  for name, value in expected.items():
    assert tensors[name].dtype == np.float32
    np.testing.assert_array_equal(tensors[name], value, err_msg=name)


_LOAD = '''
import sys
import numpy as np
import lejepa_jax
images = np.load(sys.argv[1])
enc = lejepa_jax.load_encoder(sys.argv[2])
emb = lejepa_jax.load_encoder(sys.argv[2], output='embedding')
norm = lejepa_jax.load_encoder(sys.argv[2], normalized=True)
pre = np.stack([norm.preprocess(x) for x in images])
np.savez(sys.argv[3], uint8=np.asarray(enc(images)),
         float=np.asarray(enc(images.astype(np.float32) / 255)),
         embedding=np.asarray(emb(images)), preprocessed=np.asarray(norm(pre)), pre=pre,
         dim=enc.dim)
training = [m for m in ('orbax', 'orbax.checkpoint', 'ml_collections', 'grain', 'optax',
                        'configs', 'lejepa_jax.train', 'lejepa_jax.steps',
                        'lejepa_jax.checkpoint') if m in sys.modules]
assert not training, training
'''


def test_load_encoder_in_a_fresh_process_equals_the_checkpoint_features(run, tmp_path):
  workdir, out, _ = run
  images = _images()
  got = _in_a_fresh_process(_LOAD, images, out, tmp_path / 'out.npz')

  config, programs, state, _ = _checkpoint(workdir)
  d = config.data
  spec = augment.AugmentSpec(mean=tuple(d.mean), std=tuple(d.std))
  # The evaluation pipeline's input: x / 255, then (x - mean) / std (eval_view at full size).
  normalised = np.stack([augment.eval_view(x, d.global_size, spec, d.eval_crop_fraction)
                         for x in images])
  np.testing.assert_allclose(normalised, augment.normalize(images / np.float32(255), spec),
                             atol=1e-6)
  np.testing.assert_allclose(got['pre'], normalised, atol=0)
  with sharding_lib.activate(programs.mesh):
    x = jax.device_put(normalised, sharding_lib.batch_sharding(programs.mesh))
    want = np.asarray(programs.features(steps.variables(state), x))
    embedding = np.asarray(jax.jit(lambda v, x: programs.model.apply(
        v, x, method=lambda m, x: m.net(x)['cls']))(steps.variables(state), x))

  assert want.shape == (16, 2 * config.model.width) and int(got['dim']) == want.shape[1]
  assert np.all(np.isfinite(want)) and np.abs(want).max() > 1e-3
  scale = np.abs(want).max()
  for key in ('uint8', 'float', 'preprocessed'):
    assert got[key].shape == want.shape and got[key].dtype == np.float32
    assert np.abs(got[key] - want).max() <= 1e-6 * scale, (key, np.abs(got[key] - want).max())
  assert np.abs(got['uint8'] - got['float']).max() <= 1e-6 * scale
  assert got['embedding'].shape == (16, config.model.width)
  assert np.abs(got['embedding'] - embedding).max() <= 1e-6 * np.abs(embedding).max()


def test_load_encoder_rejects_bad_inputs(run):
  import lejepa_jax
  _, out, _ = run
  with pytest.raises(ValueError, match='output must be one of'):
    lejepa_jax.load_encoder(out, output='logits')
  enc = lejepa_jax.load_encoder(out)
  assert enc.config['channels'] == 1 and 'encoder' not in enc.params   # the ViT's own tree
  with pytest.raises(ValueError, match=r'\(B, H, W, 1\)'):
    enc(np.zeros((2, 28, 28, 3), np.uint8))
  with pytest.raises(TypeError, match='uint8'):
    enc(np.zeros((2, 28, 28, 1), np.int32))
  with pytest.raises(FileNotFoundError, match='not a lejepa_jax export'):
    lejepa_jax.load_encoder(os.path.dirname(out))


def _one_error_line(result):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  errors = [l for l in result.stderr.splitlines() if l.startswith('[lejepa_jax] error:')]
  assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  return errors[0]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(run, tmp_path):
  workdir, out, _ = run
  empty = tmp_path / 'empty'
  empty.mkdir()
  # No config.json: the CLI names the file.
  line = _one_error_line(_export(f'--workdir={empty}', f'--out={tmp_path / "a"}'))
  assert f'{empty}/config.json does not exist' in line
  assert not (tmp_path / 'a').exists()
  # A non-empty --out without --overwrite.
  line = _one_error_line(_export(f'--workdir={workdir}', f'--out={out}', '--step=2'))
  assert f'--out={out} exists and is not empty' in line and '--overwrite' in line
  # The rest through the library function the CLI calls (one process, no recompiles).
  from lejepa_jax import export
  (empty / 'config.json').write_text(open(os.path.join(workdir, 'config.json')).read())
  with pytest.raises(export.ExportError, match='no checkpoint in .*train first'):
    export.export(str(empty), str(tmp_path / 'b'))
  with pytest.raises(export.ExportError, match=r'no checkpoint of step 3 .*\[4\].*--step'):
    export.export(workdir, str(tmp_path / 'b'), step=3)
  (tmp_path / 'file').write_text('x')
  with pytest.raises(export.ExportError, match='is a file'):
    export.export(workdir, str(tmp_path / 'file'))
  assert sorted(os.listdir(tmp_path)) == ['empty', 'file']
  # --overwrite replaces the two files and leaves others alone.
  other = tmp_path / 'c'
  other.mkdir()
  (other / 'notes.txt').write_text('keep')
  (other / 'config.json').write_text('{}')
  meta = export.export(workdir, str(other), overwrite=True)
  assert meta['step'] == STEPS
  assert sorted(os.listdir(other)) == ['config.json', 'model.safetensors', 'notes.txt']
  assert json.load(open(other / 'config.json')) == meta


_TIMM = '''
import json, sys
import numpy as np
import safetensors.torch, timm, torch
images, out = np.load(sys.argv[1]), sys.argv[2]
# The three lines of the README, as a PyTorch user types them:
model = timm.create_model(**json.load(open(out + '/timm.json')))
model.load_state_dict(safetensors.torch.load_file(out + '/model.safetensors'))
model.eval()
config = json.load(open(out + '/config.json'))
x = (images.astype(np.float32) / 255 - np.float32(config['mean'])) / np.float32(config['std'])
with torch.no_grad():
  embedding = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
np.save(sys.argv[3], embedding)
'''


def test_export_for_timm_loads_in_pytorch_and_equals_the_checkpoint_embedding(run, tmp_path):
  """`--format=timm` on the run's checkpoint (a custom-size, one-channel, scanned ViT):
  timm.create_model + load_state_dict as the README shows, in a fresh process, give the
  final-norm CLS the checkpoint computes here (rel 1e-4, float32)."""
  from test_timm import import_timm
  import_timm()
  workdir, _, _ = run
  out = str(tmp_path / 'timm')
  result = _export(f'--workdir={workdir}', f'--out={out}', '--format=timm')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'timm.create_model' in result.stdout
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors', 'timm.json']
  meta = json.load(open(os.path.join(out, 'config.json')))
  assert meta['format'] == 'timm' and meta['timm'] == json.load(open(os.path.join(out,
                                                                                 'timm.json')))
  with pytest.raises(ValueError, match='timm'):   # not for load_encoder, and it says so
    import lejepa_jax
    lejepa_jax.load_encoder(out)
  images = _images()
  got = _in_a_fresh_process(_TIMM, images, out, tmp_path / 'emb.npy')

  config, programs, state, _ = _checkpoint(workdir)
  d = config.data
  spec = augment.AugmentSpec(mean=tuple(d.mean), std=tuple(d.std))
  x = augment.normalize(images / np.float32(255), spec)
  with sharding_lib.activate(programs.mesh):
    x = jax.device_put(x, sharding_lib.batch_sharding(programs.mesh))
    want = np.asarray(programs.features_of(('embedding',))(steps.variables(state), x))
  assert got.shape == want.shape == (16, config.model.width)
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
