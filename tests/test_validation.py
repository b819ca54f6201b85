"""Bad config values and bad data fail before anything compiles or writes.

Every case runs `python -m lejepa_jax.main` as a subprocess (fast: validation fails
before JAX compiles anything, ~1.5 s each) and checks the exit status 2, the single
`[lejepa_jax] error:` line naming the key or the path and the fix, and that the workdir
(a previous run's metrics.jsonl, checkpoints and events) is byte-for-byte as it was, or
still absent. Then the metrics de-duplication on resume, in-process.
"""
import gzip
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import fmnist, imagenette_vits8, vitg
from lejepa_jax import config_schema, metrics, train
from lejepa_jax.evaluators import suite
from lejepa_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = '/usr/share/datasets/fashion-mnist'


def _env():
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['PYTHONPATH'] = ROOT
  return env


def _main(workdir, *flags, config='configs/fmnist.py:runlocal'):
  cmd = [sys.executable, '-m', 'lejepa_jax.main', f'--config={config}', f'--workdir={workdir}',
         *flags]
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _snapshot(path):
  """{relative path: bytes (files) or None (directories)}; None if the path does not exist."""
  if not os.path.exists(path):
    return None
  out = {}
  for dirpath, dirnames, filenames in os.walk(path):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), path)] = None
    for f in filenames:
      with open(os.path.join(dirpath, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(dirpath, f), path)] = fh.read()
  return out


def _previous_run(workdir):
  """A workdir as an earlier run left it: metrics, a checkpoint directory, an events file."""
  os.makedirs(os.path.join(workdir, 'checkpoints', '10', 'state'))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for step in (5, 10):
      f.write(json.dumps({'step': step, 'train/loss': 1.0 / step}) + '\n')
  with open(os.path.join(workdir, 'checkpoints', '10', 'state', 'data'), 'wb') as f:
    f.write(bytes(range(256)))
  with open(os.path.join(workdir, 'events.out.tfevents.1.host'), 'wb') as f:
    f.write(b'\x00\x01events')


# ------------------------------------------------------------------------------ bad data made here

def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
  with open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _idx_dir(root, corrupt=None):
  """The four Fashion-MNIST IDX files (64 / 32 random 28x28 images); `corrupt` edits one."""
  os.makedirs(root)
  rng = np.random.default_rng(0)
  for split, n in (('train', 64), ('t10k', 32)):
    _write_idx(os.path.join(root, f'{split}-images-idx3-ubyte'),
               rng.integers(0, 256, (n, 28, 28)))
    _write_idx(os.path.join(root, f'{split}-labels-idx1-ubyte'), rng.integers(0, 10, n))
  if corrupt:
    corrupt(os.path.join(root, 'train-images-idx3-ubyte'))
  return root


def _bad_magic(path):
  data = bytearray(open(path, 'rb').read())
  data[2] = 0x0D                      # float32 IDX, not unsigned bytes
  open(path, 'wb').write(bytes(data))


def _truncate(path):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])


def _truncated_gzip(path):
  data = gzip.compress(open(path, 'rb').read())
  os.remove(path)
  open(path + '.gz', 'wb').write(data[:len(data) // 2])


def _folder(root, corrupt=None, empty=False):
  """root/{train,test}/CLASS/*.png, 4 RGB images per class; `corrupt(dir)` adds a bad file."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for cls in ('a', 'b'):
      d = os.path.join(root, split, cls)
      os.makedirs(d)
      for i in range(0 if empty else 4):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(f'{d}/{i}.png')
  if corrupt:
    corrupt(os.path.join(root, 'train', 'b'))
  return root


def _truncated_png(d):
  data = open(os.path.join(d, '0.png'), 'rb').read()
  open(os.path.join(d, 'cut.png'), 'wb').write(data[:len(data) - 40])


def _not_a_jpeg(d):
  open(os.path.join(d, 'junk.jpg'), 'wb').write(b'<html>404 Not Found</html>')


# ---------------------------------------------------------------------------------- the cases
# id -> (flags, setup(tmp) -> extra flags, substrings the one error line must hold)
FOLDER = ['--config.data.name=folder', '--config.data.channels=3',
          '--config.data.mean=(0.5,0.5,0.5)', '--config.data.std=(0.25,0.25,0.25)']
CASES = {
    'unknown key on the command line': (
        ['--config.lamdba=0.1'], None, ['--config.lamdba', 'did you mean lamb?']),
    'unknown key in the config file': (
        [], 'config_file', ['optim.weight_decy', 'did you mean optim.weight_decay?']),
    'batch size vs data-parallel devices': (
        ['--cpu_devices=8', '--config.batch_size=30'], None,
        ['batch_size=30', 'data-parallel size 8', '--config.batch_size']),
    'eval batch size vs devices': (
        ['--cpu_devices=8', '--config.eval.batch_size=1001'], None,
        ['eval.batch_size=1001', '--config.eval.batch_size']),
    'global crop vs patch size': (
        ['--config.data.global_size=30'], None,
        ['data.global_size=30', 'model.patch_size=7', '28 or 35']),
    'local crop vs patch size': (
        ['--config.data.local_size=10'], None, ['data.local_size=10', '7 or 14']),
    'lambda outside [0, 1]': (
        ['--config.lamb=1.5'], None, ['lamb=1.5', '[0, 1]', 'loss_convention=additive']),
    'mean and std lengths vs channels': (
        ['--config.data.mean=(0.5,0.5,0.5)'], None,
        ['data.mean=(0.5, 0.5, 0.5)', 'data.channels=1']),
    'missing IDX files': (
        [], 'missing_idx', ['train-images-idx3-ubyte', 'apt-get install dataset-fashion-mnist',
                            '--config.data.dir']),
    'wrong IDX magic': (
        [], 'bad_magic', ['train-images-idx3-ubyte', 'not an unsigned-byte IDX file',
                          '--config.data.dir']),
    'truncated IDX file': (
        [], 'truncated_idx', ['train-images-idx3-ubyte', 'truncated or corrupt', 'reinstall']),
    'truncated gzip IDX file': (
        [], 'truncated_gzip', ['train-images-idx3-ubyte.gz', 'cannot be read', 'reinstall']),
    'empty image folder': (
        FOLDER, 'empty_folder', ['no .png/.jpg/.jpeg images under', 'train',
                                 '--config.data.dir']),
    'corrupt PNG and non-image JPEG in a folder': (
        FOLDER, 'corrupt_folder', ['2 unreadable image file(s)', 'cut.png', 'junk.jpg',
                                   'Delete or replace them']),
}
# (A folder of RGB images under a 1-channel config is converted, not refused: tests/test_folder.py.)


def _setup(kind, tmp):
  if kind is None:
    return []
  if kind == 'config_file':
    path = os.path.join(tmp, 'typo_config.py')
    with open(path, 'w') as f:
      f.write('from configs import fmnist\n\n\ndef get_config(arg=None):\n'
              '  c = fmnist.get_config(arg)\n  c.optim.weight_decy = 0.1\n  return c\n')
    return [f'--config={path}:runlocal']
  if kind == 'missing_idx':
    return [f'--config.data.dir={os.path.join(tmp, "nowhere")}']
  if kind.endswith('folder'):
    corrupt = (lambda d: (_truncated_png(d), _not_a_jpeg(d))) if kind == 'corrupt_folder' else None
    return [f'--config.data.dir={_folder(os.path.join(tmp, "images"), corrupt, kind == "empty_folder")}']
  corrupt = {'bad_magic': _bad_magic, 'truncated_idx': _truncate,
             'truncated_gzip': _truncated_gzip}[kind]
  return [f'--config.data.dir={_idx_dir(os.path.join(tmp, "idx"), corrupt)}']


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_exits_2_naming_the_key_or_path_and_leaves_the_workdir(tmp_path, case):
  flags, kind, expected = CASES[case]
  extra = _setup(kind, str(tmp_path))
  config = [f[len('--config='):] for f in extra if f.startswith('--config=')]
  extra = [f for f in extra if not f.startswith('--config=')]
  # Half the cases on a workdir that a previous run filled, half on one that does not exist.
  workdir = str(tmp_path / 'run')
  existing = list(CASES).index(case) % 2 == 0
  if existing:
    _previous_run(workdir)
  before = _snapshot(workdir)
  result = _main(workdir, *flags, *extra, **({'config': config[0]} if config else {}))
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('[lejepa_jax] error:')]
  assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  for text in expected:
    assert text in errors[0], (text, errors[0])
  for path in extra:       # data paths are named in full
    if path.startswith('--config.data.dir=') and kind not in ('empty_folder', 'good_folder'):
      assert path.split('=', 1)[1] in errors[0], errors[0]
  assert _snapshot(workdir) == before
  if not existing:
    assert not os.path.exists(workdir)


# --------------------------------------------------------------------------- in-process checks

def test_every_problem_of_a_config_in_one_message():
  c = fmnist.get_config('runlocal')
  c.lamb = 2.0
  c.data.local_size = 10
  c.data.std = (0.3, 0.3)
  with pytest.raises(train.ConfigError) as e:
    train.validate(c)
  message = str(e.value)
  assert message.count(';') == 2
  for key in ('lamb=2.0', 'data.local_size=10', 'data.std=(0.3, 0.3)'):
    assert key in message
  # no local views: the local size is free
  c = fmnist.get_config('runlocal')
  c.data.num_local_views, c.data.local_size = 0, 10
  train.validate(c)


def test_unknown_and_missing_keys_of_a_config_dict():
  c = fmnist.get_config('runlocal')
  with c.unlocked():
    c.data.augment.flip_porb = 0.5
    c.mesh.pipeline = 2            # mesh is free-form: not reported
    c.sigreg.options.alpha = 1.0   # so is sigreg.options
    del c.data['channels']
  with pytest.raises(train.ConfigError) as e:
    train.validate(c)
  message = str(e.value)
  assert 'data.augment.flip_porb is not a known config key (did you mean data.augment.flip_prob?' \
      in message
  assert 'data.channels is missing' in message and 'pipeline' not in message


def _without_optional_keys(config):
  """`config` with every key that has a default removed (sections left empty), but the
  step count (one of total_steps and epochs must be given) and a ViT's patch size."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for key, spec in config_schema.KEYS.items():
      *path, leaf = key.split('.')
      node = c
      for part in path:
        node = node[part] if part in node else None
        if node is None:
          break
      if (not spec.required and node is not None and leaf in node
          and key not in ('total_steps', 'epochs', 'model.patch_size')):
        del node[leaf]
  return c


def test_resolve_gives_every_missing_key_its_default_and_keeps_the_rest():
  given = fmnist.get_config('runlocal')
  bare = _without_optional_keys(given)
  assert 'gelu' not in bare.model and 'evals' not in bare
  before = bare.to_json()
  full = config_schema.resolve(bare)
  bare_keys = set(config_schema.flatten(bare))
  assert bare.to_json() == before                      # the given config is not changed
  assert set(config_schema.flatten(full)) == set(config_schema.KEYS)
  for key, spec in config_schema.KEYS.items():
    value = full
    for part in key.split('.'):
      value = value[part]
    if not spec.required and key not in bare_keys:
      got = value.to_dict() if hasattr(value, 'to_dict') else value
      assert got == spec.default, key
  assert config_schema.resolve(full) is full           # nothing missing: the same object
  # A value the config sets is kept; None counts as absent; a section resolves alone.
  with given.unlocked():
    given.model.gelu, given.model.attention = 'exact', None
  kept = config_schema.resolve(given)
  assert (kept.model.gelu, kept.model.attention) == ('exact', '')
  assert config_schema.resolve(bare.data, 'data').num_threads == 2
  # The bare config is a valid one: validate fills the same defaults.
  train.validate(bare)


# The defaults as they were read where each key was used, before the table (24ac89d). Stored
# configs of earlier runs lack the keys added since; they resume and re-evaluate as they ran
# only while these stay as they are (a new key's default must be the behaviour before it).
DEFAULTS_OF_EARLIER_VERSIONS = {
    'total_steps': 0, 'epochs': 0, 'checkpoint_max_to_keep': 2, 'checkpoint_keep_every': 0,
    'nonfinite': 'stop', 'nonfinite_max_skips': 10, 'mesh': {'data': -1},
    'sigreg.quadrature': 'trapezoid', 'sigreg.statistic': 'epps_pulley', 'sigreg.options': {},
    'data.dir': '', 'data.image_key': 'image', 'data.label_key': 'label',
    'data.verify_images': 'auto', 'data.resize_shorter': 0, 'data.eval_crop_fraction': 1.0,
    'data.num_threads': 2, 'data.prefetch': 4, 'data.num_workers': 0,
    'model.width': 0, 'model.depth': 0, 'model.mlp_dim': 0, 'model.num_heads': 0,
    'model.num_registers': 0, 'model.dtype': 'float32', 'model.remat': 'none',
    'model.drop_path_rate': 0.0, 'model.gelu': 'tanh', 'model.scan': True,
    'model.cls_only_last': True, 'model.attention': '', 'model.embedding_dim': 0,
    'model.online_probe_input': 'probe', 'model.projector_activation': 'gelu',
    'optim.end_lr': -1.0, 'optim.warmup_start_factor': 0.0, 'optim.weight_decay_on': 'kernels',
    'optim.clip_norm': 0.0, 'eval.max_examples': 0, 'eval.features': '',
    'diagnostics.every': 0, 'diagnostics.num_images': 512, 'diagnostics.min_rank_fraction': 0.1,
    'diagnostics.min_proj_var': 0.1, 'diagnostics.plots': True,
    'evals': {'linear_probe': {'type': 'linear_probe'}, 'knn': {'type': 'knn'}},
    # added since, each defaulting to the behaviour before it:
    'data.labels': 'auto', 'init_from': '', 'model.stem': 'imagenet', 'model.conv': 'xla',
    # required until ResNets came (every earlier config set it); 0 now means "no patches"
    'model.patch_size': 0,
}


def test_defaults_are_those_earlier_runs_ran_with():
  table = {k: spec.default for k, spec in config_schema.KEYS.items() if not spec.required}
  assert table == DEFAULTS_OF_EARLIER_VERSIONS
  # and the model a config without them builds is the one those versions built
  from lejepa_jax import models
  enc = models.build_model(_without_optional_keys(fmnist.get_config('runlocal'))).encoder
  assert (enc.gelu, enc.head_dim, enc.num_registers, enc.remat, enc.scan, enc.attention,
          enc.drop_path_rate) == ('tanh', 0, 0, 'none', True, None, 0.0)


def test_schema_matches_the_shipped_configs_and_the_code():
  """Every shipped config passes; every required key is in each; no key is dead."""
  shipped = [fmnist.get_config(), fmnist.get_config('runlocal'), vitg.get_config(),
             vitg.get_config('runlocal'), imagenette_vits8.get_config()]
  used = set()
  for c in shipped:
    train.validate(c)
    used |= set(config_schema.flatten(c))
  optional = {k for k, spec in config_schema.KEYS.items() if not spec.required}
  assert set(config_schema.KEYS) - used <= optional
  code = ''
  for dirpath, _, files in os.walk(os.path.join(ROOT, 'lejepa_jax')):
    for f in files:
      if f.endswith('.py') and f != 'config_schema.py':
        code += open(os.path.join(dirpath, f)).read()
  dead = [k for k in config_schema.KEYS if k.split('.')[-1] not in code]
  assert not dead, dead


def test_folder_verification_checks_all_files_or_a_sample(tmp_path, monkeypatch):
  _folder(str(tmp_path), corrupt=_not_a_jpeg)
  images = sorted(str(p) for p in tmp_path.glob('*/*/*.png'))
  junk = str(tmp_path / 'train' / 'b' / 'junk.jpg')
  assert len(images) == 16 and sources.verify_images(images, 'all') == 16
  assert sources.verify_images(images + [junk], 'none') == 0
  with pytest.raises(sources.BadDataError, match='junk.jpg'):
    sources.verify_images(images + [junk], 'auto')
  monkeypatch.setattr(sources, 'VERIFY_SAMPLE', 3)    # 'auto' beyond it: a fixed sample
  assert sources.verify_images(images, 'auto') == 3
  assert sources.verify_images(images, 'all') == 16


def _lines(path):
  return [json.loads(l) for l in open(path)]


def test_metric_writer_drops_lines_past_the_resumed_step(tmp_path):
  w = metrics.MetricWriter(tmp_path, tensorboard=False)
  for step in (5, 10, 15, 20):
    w.write(step, {'train/loss': step})
  w.close()
  path = tmp_path / 'metrics.jsonl'
  with open(path, 'a') as f:
    f.write('{"step": 25, "train/lo')       # killed in the middle of a line
  w = metrics.MetricWriter(tmp_path, tensorboard=False)
  assert w.resume(10) == 3          # steps 15, 20 and the cut-short 25
  w.write(15, {'train/loss': -15})
  assert _lines(path) == [{'step': 5, 'train/loss': 5}, {'step': 10, 'train/loss': 10},
                          {'step': 15, 'train/loss': -15}]
  # nothing to drop: the file is not rewritten
  before = path.read_bytes(), os.stat(path).st_mtime_ns
  assert metrics.MetricWriter(tmp_path, tensorboard=False).resume(15) == 0
  assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before


@pytest.mark.skipif(not os.path.exists(f'{FMNIST}/train-images-idx3-ubyte.gz'),
                    reason='needs the dataset-fashion-mnist Debian package')
def test_resumed_run_logs_every_step_once(tmp_path, monkeypatch):
  """Killed after the step-2 checkpoint (step 4's files gone), the rerun logs 3 and 4 once."""
  import shutil
  monkeypatch.setattr(suite.Runner, '__call__', lambda *a, **k: {'eval/linear_probe_top1': 0.5,
                                                                 'eval/knn_top1': 0.5})
  c = fmnist.get_config('runlocal')
  c.total_steps, c.checkpoint_every, c.log_every = 4, 2, 1
  workdir = str(tmp_path)
  devices = jax.devices()[:2]        # two devices compile and run faster than eight on 2 cores
  train.train_and_evaluate(c, workdir, devices=devices)
  first = _lines(os.path.join(workdir, 'metrics.jsonl'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  train.train_and_evaluate(c, workdir, devices=devices)
  lines = _lines(os.path.join(workdir, 'metrics.jsonl'))
  assert [l['step'] for l in lines] == [1, 2, 3, 4, 4]
  assert 'eval/knn_top1' in lines[-1] and 'train/loss' in lines[-2]
  assert lines[:2] == first[:2]                             # the lines up to step 2 kept as they were
  assert lines[2]['train/loss'] == pytest.approx(first[2]['train/loss'], rel=1e-5)
