"""Preemption-safe, bit-exact resume on any mesh; corrupt checkpoints; non-finite steps.

Subprocess tests run `python -m lejepa_jax.main` on the runlocal config (12 steps,
checkpoints every 4) and kill it; in-process tests call `train.train_and_evaluate` with
the final evaluation stubbed out (it is not what they test, and it costs compiles).
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import fmnist
from lejepa_jax import checkpoint as ckpt_lib
from lejepa_jax import train
from lejepa_jax.data import pipeline
from lejepa_jax.evaluators import suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 4
FLAGS = ['--config=configs/fmnist.py:runlocal', f'--config.total_steps={STEPS}',
         f'--config.checkpoint_every={EVERY}', '--config.log_every=1',
         '--config.eval.max_examples=500', '--config.evals.linear_probe.epochs=1', '--cpu_devices=8']
TIMING_KEYS = ('train/images_per_sec', 'train/step_seconds', 'train/data_wait_fraction')

pytestmark = pytest.mark.skipif(
    not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'),
    reason='needs the dataset-fashion-mnist Debian package')


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Subprocess environment; the runs share a persistent compilation cache (same programs,
  compiled once: the same executables a real rerun would load)."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env.update(PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return env


def _run(env, workdir, signal_at=None, sig=None):
  """Runs main on workdir; sends `sig` at the first step line for which signal_at(step) holds.

  Returns (exit status, output, the step whose line triggered the signal or None).
  """
  proc = subprocess.Popen([sys.executable, '-m', 'lejepa_jax.main', f'--workdir={workdir}'] + FLAGS,
                          cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines, sent = [], None
  try:
    for line in proc.stdout:
      lines.append(line)
      m = re.search(rf'step (\d+)/{STEPS}\b', line)
      if m and sent is None and signal_at is not None and signal_at(int(m.group(1))):
        proc.send_signal(sig)
        sent = int(m.group(1))
    proc.wait(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, ''.join(lines), sent


def _finalized_steps(workdir):
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(path) if s.isdigit()) if os.path.isdir(path) else []


def _metric_lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _train_lines(lines):
  return {l['step']: {k: v for k, v in l.items() if k not in TIMING_KEYS}
          for l in lines if 'train/loss' in l}


def _state(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))


def _assert_bitwise_equal(a, b):
  la, ta = jax.tree.flatten_with_path(a)[0], jax.tree.structure(a)
  assert ta == jax.tree.structure(b)
  for (path, x), y in zip(la, jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env):
  """The uninterrupted run: its workdir, final state and per-step metrics."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  rc, out, _ = _run(env, workdir)
  assert rc == 0, out[-3000:]
  lines = _metric_lines(workdir)
  assert sorted(_train_lines(lines)) == list(range(1, STEPS + 1))
  return {'workdir': workdir, 'state': _state(workdir, STEPS), 'train': _train_lines(lines),
          'eval': [l for l in lines if 'eval/knn_top1' in l]}


def _assert_resumed_like_reference(workdir, reference, resumed_from, kept_lines):
  """Lines up to the checkpoint are kept as they were; every step after it is logged once."""
  lines = _metric_lines(workdir)
  assert [l for l in lines if l['step'] <= resumed_from] == kept_lines
  lines = [l for l in lines if l['step'] > resumed_from]
  train_lines = _train_lines(lines)
  assert sorted(train_lines) == list(range(resumed_from + 1, STEPS + 1))
  assert len([l for l in lines if 'train/loss' in l]) == len(train_lines)   # no duplicates
  for step, values in train_lines.items():
    assert values == reference['train'][step], step     # every key, to the bit
  assert [l for l in lines if 'eval/knn_top1' in l] == reference['eval']
  _assert_bitwise_equal(_state(workdir, STEPS), reference['state'])


# ---------------------------------------------------------------- 1. kill and resume

def test_sigkill_after_a_checkpoint_resumes_to_the_bit(tmp_path, env, reference):
  workdir = str(tmp_path / 'run')
  kill_at = random.randint(EVERY + 1, 2 * EVERY - 1)      # a step between two checkpoints
  rc, out, killed = _run(env, workdir, sig=signal.SIGKILL,
                         signal_at=lambda s: s >= kill_at and _finalized_steps(workdir))
  assert killed is not None and rc == -signal.SIGKILL, (kill_at, out[-3000:])
  on_disk = _finalized_steps(workdir)
  assert on_disk and max(on_disk) < STEPS, on_disk
  lines_before = _metric_lines(workdir)

  rc, out, _ = _run(env, workdir)
  assert rc == 0, out[-3000:]
  resumed_from = int(re.search(r'restored checkpoint at step (\d+)', out).group(1))
  assert resumed_from == max(on_disk), (on_disk, out[-3000:])
  _assert_resumed_like_reference(workdir, reference, resumed_from,
                                 [l for l in lines_before if l['step'] <= resumed_from])


def test_sigterm_checkpoints_at_the_next_step_exits_0_and_resumes_to_the_bit(tmp_path, env,
                                                                            reference):
  workdir = str(tmp_path / 'run')
  term_at = random.randint(2, STEPS - 4)        # early enough to land before the last step
  rc, out, sent = _run(env, workdir, sig=signal.SIGTERM, signal_at=lambda s: s >= term_at)
  assert sent is not None and rc == 0, (term_at, out[-3000:])
  stopped = int(re.search(r'preemption notice \(SIGTERM\): saved the checkpoint of step (\d+)',
                          out).group(1))
  assert sent <= stopped < STEPS
  assert max(_finalized_steps(workdir)) == stopped            # a checkpoint at the step it stopped
  lines = _metric_lines(workdir)
  assert max(_train_lines(lines)) == stopped and not any('eval/knn_top1' in l for l in lines)

  rc, out, _ = _run(env, workdir)
  assert rc == 0, out[-3000:]
  assert f'restored checkpoint at step {stopped}' in out
  _assert_resumed_like_reference(workdir, reference, stopped, lines)


# ---------------------------------------------------------------- in-process runs

@pytest.fixture
def no_final_eval(monkeypatch):
  monkeypatch.setattr(suite.Runner, '__call__', lambda *a, **k: {'eval/linear_probe_top1': 0.0,
                                                                 'eval/knn_top1': 0.0})


def _config(**overrides):
  c = fmnist.get_config('runlocal')
  c.log_every = 1
  c.diagnostics.every = 0     # metric lines here are the training steps' (diagnostics: test_collapse)
  for key, value in overrides.items():
    setattr(c, key, value)
  return c


# ---------------------------------------------------------------- 1b. notice latency

def _signal_from_the_device(monkeypatch, program, when):
  """Wraps `steps.Programs.<program>` so that, as each call's result is computed ON THE
  DEVICE, the call number n is recorded and SIGTERM is sent to this process when
  when(n) holds: the notice arrives exactly while the device works through call n."""
  import dataclasses
  import jax.numpy as jnp
  from jax.experimental import io_callback
  from lejepa_jax import steps
  done = []

  def on_device(n):
    done.append(int(n))
    if when(int(n)):
      os.kill(os.getpid(), signal.SIGTERM)
    return np.int32(0)

  @jax.jit
  def mark(x, n):
    tick = io_callback(on_device, jax.ShapeDtypeStruct((), jnp.int32), n)
    return x + tick.astype(x.dtype)      # x unchanged, but available only after the callback

  original_build = steps.build

  def build(*args, **kwargs):
    programs = original_build(*args, **kwargs)
    calls = [0]

    def wrap(fn):
      def wrapped(*a):
        calls[0] += 1
        out = fn(*a)
        if program == 'train_step':
          state, metrics = out
          return state, dict(metrics, **{'train/loss': mark(metrics['train/loss'], calls[0])})
        return mark(out, calls[0])
      return wrapped
    if program == 'features':   # the evaluators extract through features_of(kinds)
      return dataclasses.replace(programs, features=wrap(programs.features),
                                 features_of=lambda kinds: wrap(programs.features_of(kinds)))
    return dataclasses.replace(programs, **{program: wrap(getattr(programs, program))})

  monkeypatch.setattr(steps, 'build', build)
  return done


def test_sigterm_during_slow_steps_checkpoints_within_two_steps(tmp_path, monkeypatch,
                                                                no_final_eval):
  """Slow steps (a wide model), logging and checkpoints far apart: the host must not run
  ahead of the device, or the notice would be acted on dozens of steps late."""
  notice_at = 3
  done = _signal_from_the_device(monkeypatch, 'train_step', lambda n: n == notice_at)
  workdir = str(tmp_path / 'run')
  c = _config(total_steps=60, checkpoint_every=1000, log_every=1000)
  c.evals.knn_curve.every = 0                     # no evaluation (a sync point) on the way
  c.model.width, c.model.mlp_dim, c.model.depth, c.model.num_heads = 384, 1536, 4, 4
  with pytest.raises(SystemExit) as e:    # one device: the CPU dispatches it fully asynchronously
    train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  assert e.value.code == 0
  saved = _finalized_steps(workdir)
  assert len(saved) == 1 and notice_at <= saved[0] <= notice_at + 2, (saved, done)
  assert max(done) <= notice_at + 2, done       # nothing dispatched far beyond it either


def test_sigterm_during_an_evaluation_abandons_it_saves_and_exits_0(tmp_path, monkeypatch):
  """An intermediate evaluation (k-NN on 10,000 images every 4 steps) gets the notice in its
  first feature batch: it stops there, the step's checkpoint is written, exit 0; the rerun
  resumes from it."""
  done = _signal_from_the_device(monkeypatch, 'features', lambda n: n == 1)
  workdir = str(tmp_path / 'run')
  c = _config(total_steps=8, checkpoint_every=1000, log_every=1000)
  c.evals = {'knn': dict(type='knn', every=4, max_examples=10_000, k=5, ks=(5,),
                         temperature=0.07)}
  with pytest.raises(SystemExit) as e:
    train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  assert e.value.code == 0
  assert _finalized_steps(workdir) == [4]
  batches = -(-10_000 // c.eval.batch_size)
  assert len(done) <= 3 < batches, (done, batches)    # abandoned after a batch or two
  lines = _metric_lines(workdir) if os.path.exists(os.path.join(workdir, 'metrics.jsonl')) else []
  assert not any('eval/knn_top1' in l for l in lines)


# ---------------------------------------------------------------- 2. another mesh

@pytest.fixture(scope='module')
def checkpointed_on_8_devices(tmp_path_factory):
  """Checkpointed at step 4 on 8 devices with parameters sharded (fsdp=4); its step 5 on
  the same mesh is the uninterrupted reference."""
  workdir = str(tmp_path_factory.mktemp('eight'))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(suite.Runner, '__call__', lambda *a, **k: {})
    train.train_and_evaluate(_config(total_steps=5, checkpoint_every=4,
                                     mesh={'data': 2, 'fsdp': 4}), workdir)
  assert _finalized_steps(workdir) == [4, 5]
  return workdir, _train_lines(_metric_lines(workdir))[5]


@pytest.mark.parametrize('num_devices,mesh', [(4, {'data': 4}),
                                              (8, {'data': 2, 'fsdp': 2, 'tensor': 2})])
def test_resume_on_another_device_count_and_mesh_gives_the_next_step_loss(
    tmp_path, checkpointed_on_8_devices, no_final_eval, num_devices, mesh):
  first, reference = checkpointed_on_8_devices
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(first, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '5'))
  os.remove(os.path.join(resumed, 'metrics.jsonl'))
  c = _config(total_steps=5, checkpoint_every=4, mesh=mesh)
  train.train_and_evaluate(c, resumed, devices=jax.devices()[:num_devices])
  after = _train_lines(_metric_lines(resumed))
  assert sorted(after) == [5]
  for key in ('train/loss', 'train/inv', 'train/sigreg', 'train/probe_loss', 'train/grad_norm'):
    assert after[5][key] == pytest.approx(reference[key], rel=1e-5), key
  assert _state(resumed, 5)['step'] == 5


# ---------------------------------------------------------------- 3. corrupt checkpoints

@pytest.fixture(scope='module')
def two_checkpoints(tmp_path_factory):
  """A finished 6-step run with checkpoints 3 and 6, and the state of 6."""
  workdir = str(tmp_path_factory.mktemp('two_checkpoints'))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(suite.Runner, '__call__', lambda *a, **k: {})
    train.train_and_evaluate(_config(total_steps=6, checkpoint_every=3), workdir)
  assert _finalized_steps(workdir) == [3, 6]
  return workdir, _state(workdir, 6)


def _make_legacy(step_dir, files):
  """Rewrites a checkpoint into the layout of earlier versions: Grain's iterator state, one
  `process_I-of-N.json` per process, instead of the one data_position file."""
  shutil.rmtree(os.path.join(step_dir, 'data_position'))
  os.makedirs(os.path.join(step_dir, 'data'))
  step = int(os.path.basename(step_dir))
  for name in files:
    with open(os.path.join(step_dir, 'data', name), 'w') as f:
      json.dump({'next_index': step}, f, indent=4)
  meta_path = os.path.join(step_dir, '_CHECKPOINT_METADATA')
  meta = json.load(open(meta_path))
  handlers = meta['item_handlers']
  handlers.pop('data_position')
  handlers['data'] = 'grain._src.python.checkpoint.handler.CheckpointHandler'
  json.dump(meta, open(meta_path, 'w'))


@pytest.mark.parametrize('files', [['process_0-of-1.json'],
                                   ['process_0-of-2.json', 'process_1-of-2.json']])
def test_checkpoints_of_earlier_versions_resume_exactly(tmp_path, two_checkpoints, no_final_eval,
                                                        files):
  """Per-process Grain iterator files (saved on 1 or on 2 processes) resume on 1 process."""
  source, _ = two_checkpoints
  reference = _train_lines(_metric_lines(source))
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
  _make_legacy(os.path.join(workdir, 'checkpoints', '3'), files)
  train.train_and_evaluate(_config(total_steps=6, checkpoint_every=3), workdir)
  resumed = _train_lines(_metric_lines(workdir))
  assert sorted(resumed) == [4, 5, 6]
  for step in (4, 5, 6):
    assert resumed[step] == reference[step], step
  assert json.load(open(os.path.join(workdir, 'checkpoints', '6', 'data_position', 'metadata'))
                   ) == {'next_batch': 6, 'global_batch_size': 32}


def _largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _listing(directory):
  return sorted((os.path.relpath(os.path.join(r, f), directory), os.path.getsize(os.path.join(r, f)))
                for r, _, fs in os.walk(directory) for f in fs)


@pytest.mark.parametrize('damage', ['truncate', 'delete'])
def test_unreadable_newest_checkpoint_is_reported_and_the_previous_one_used(
    tmp_path, two_checkpoints, no_final_eval, caplog, damage):
  source, state6 = two_checkpoints
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  bad = os.path.join(workdir, 'checkpoints', '6')
  victim = _largest_file(os.path.join(bad, 'state'))        # the array data
  if damage == 'truncate':
    os.truncate(victim, os.path.getsize(victim) // 2)
  else:
    os.remove(victim)
  damaged = _listing(bad)

  train.train_and_evaluate(_config(total_steps=6, checkpoint_every=3), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert any(f'checkpoint {bad} is unreadable' in w for w in warnings), warnings
  assert sorted(_train_lines(_metric_lines(workdir))) == [4, 5, 6]    # resumed from step 3
  _assert_bitwise_equal(_state(workdir, 6), state6)                   # and retrained step 6
  aside = os.path.join(workdir, 'checkpoints_unreadable', '6')
  assert _listing(aside) == damaged                                   # nothing deleted


def test_no_readable_checkpoint_stops_and_deletes_nothing(tmp_path, two_checkpoints,
                                                          no_final_eval):
  source, _ = two_checkpoints
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  for step in (3, 6):
    victim = _largest_file(os.path.join(workdir, 'checkpoints', str(step), 'state'))
    os.truncate(victim, os.path.getsize(victim) // 2)
  before = _listing(workdir)
  with pytest.raises(RuntimeError, match='no readable checkpoint') as e:
    train.train_and_evaluate(_config(total_steps=6, checkpoint_every=3), workdir)
  for step in (3, 6):
    assert os.path.join(workdir, 'checkpoints', str(step)) in str(e.value)
  after = _listing(workdir)
  assert set(before) <= set(after), set(before) - set(after)     # every file, every byte
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_unreadable'))


def test_manager_keeps_the_newest_and_every_keep_every_step(tmp_path):
  mngr = ckpt_lib.manager(tmp_path, max_to_keep=2, keep_every=4)
  state = {'w': jax.numpy.arange(8.0)}
  for step in range(1, 11):
    ckpt_lib.save(mngr, step, jax.tree.map(lambda x: x + step, state),
                  {'next_batch': step, 'global_batch_size': 2})
  mngr.wait_until_finished()
  assert _finalized_steps(str(tmp_path)) == [4, 8, 9, 10]
  assert not [d for d in os.listdir(tmp_path / 'checkpoints') if not d.isdigit()]  # no tmp dirs
  target = {'w': jax.ShapeDtypeStruct((8,), np.float32, sharding=state['w'].sharding)}
  restored, step, position = ckpt_lib.restore_latest(mngr, target)
  assert step == 10 and np.array_equal(restored['w'], np.arange(8.0) + 10)
  assert position == {'next_batch': 10, 'global_batch_size': 2}   # the data stream's too
  mngr.close()


# ---------------------------------------------------------------- 4. non-finite values

class _Poisoned(grain.IterDataset):
  """The training stream with one NaN pixel in the batches number `bad` (1-based)."""

  def __init__(self, parent, bad):
    super().__init__(parent)
    self.bad = frozenset(bad)

  def __iter__(self):
    return _PoisonedIterator(self._parent.__iter__(), self.bad)


class _PoisonedIterator(grain.DatasetIterator):

  def __init__(self, parent, bad):
    super().__init__(parent)
    self.bad, self.count = bad, 0

  def __next__(self):
    batch = next(self._parent)
    self.count += 1
    if self.count in self.bad:
      batch = dict(batch, **{'global': np.array(batch['global'])})
      batch['global'][0, 0, 0, 0, 0] = np.nan
    return batch

  def get_state(self):
    return {'parent': self._parent.get_state(), 'count': self.count}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self.count = state['count']


def _poison(monkeypatch, bad):
  original = pipeline.train_dataset
  monkeypatch.setattr(pipeline, 'train_dataset',
                      lambda *a, **k: _Poisoned(original(*a, **k), bad))


def test_nonfinite_stop_names_step_terms_and_last_good_checkpoint(tmp_path, monkeypatch,
                                                                  no_final_eval):
  _poison(monkeypatch, bad={5})
  workdir = str(tmp_path / 'run')
  c = _config(total_steps=8, checkpoint_every=3, log_every=4, nonfinite='stop')
  with pytest.raises(FloatingPointError) as e:
    train.train_and_evaluate(c, workdir)
  message = str(e.value)
  assert 'non-finite values at step 5' in message, message
  for term in ('inv=nan', 'sigreg=nan', 'grads'):
    assert term in message, message
  assert os.path.join(workdir, 'checkpoints', '3') in message
  # Found at step 6, a checkpoint step: the check came first, nothing non-finite was saved.
  assert _finalized_steps(workdir) == [3]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_state(workdir, 3)['params']))
  assert [l['step'] for l in _metric_lines(workdir)] == [4]


def test_nonfinite_skip_drops_the_update_counts_it_and_stops_after_k_in_a_row(
    tmp_path, monkeypatch, no_final_eval):
  _poison(monkeypatch, bad={3, 6, 7})
  workdir = str(tmp_path / 'run')
  c = _config(total_steps=10, checkpoint_every=1, checkpoint_max_to_keep=100, nonfinite='skip',
              nonfinite_max_skips=2)
  with pytest.raises(FloatingPointError, match=r'2 non-finite steps in a row, the last at step 7'):
    train.train_and_evaluate(c, workdir)
  metrics = _train_lines(_metric_lines(workdir))
  assert sorted(metrics) == [1, 2, 3, 4, 5, 6]             # step 7 ended the run unwritten
  assert [metrics[s]['train/skipped_steps'] for s in range(1, 7)] == [0, 0, 1, 1, 1, 2]
  assert np.isfinite(metrics[4]['train/loss']) and np.isfinite(metrics[5]['train/loss'])
  assert not np.isfinite(metrics[3]['train/loss'])
  assert _finalized_steps(workdir) == [1, 2, 3, 4, 5, 6]
  s = {step: _state(workdir, step) for step in (2, 3, 4, 5, 6)}
  for key in ('params', 'opt_state', 'batch_stats'):      # dropped: as before the bad batch
    _assert_bitwise_equal(s[3][key], s[2][key])
    _assert_bitwise_equal(s[6][key], s[5][key])
  assert not np.array_equal(jax.tree.leaves(s[4]['params'])[0], jax.tree.leaves(s[3]['params'])[0])
  assert (s[3]['step'], s[3]['skipped_steps'], s[3]['nonfinite_streak']) == (3, 1, 1)
  assert (s[5]['skipped_steps'], s[5]['nonfinite_streak']) == (1, 0)
  assert (s[6]['skipped_steps'], s[6]['nonfinite_streak']) == (2, 1)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(s[6]['params']))
