"""`select` and the checkpoint set-aside on an object store (gs://), without a network.

`ObjectStore` is an etils.epath backend with GCS's semantics: a flat map of object names to
bytes, where a "folder" is only a prefix of names. mkdir makes nothing (an empty folder
cannot exist), a prefix exists only while objects are under it, and only objects can be
renamed (gcsfs emulates a prefix rename object by object; etils' fsspec backend first
checks that the target's folder exists, which after a no-op mkdir it does not). It is
installed for gs:// in place of gcsfs / TensorFlow.
"""
import fnmatch
import io
import json
import os
import subprocess
import sys

import ml_collections
import pytest
from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath
from etils.epath import stat_utils

from lejepa_jax import checkpoint as ckpt_lib
from lejepa_jax import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ObjectStore(backend_lib.Backend):
  """gs://NAME -> bytes; folders are name prefixes (see the module docstring)."""

  def __init__(self):
    self.objects = {}

  @staticmethod
  def _key(path) -> str:
    path = os.fspath(path)
    assert path.startswith('gs://'), path
    return path[len('gs://'):].rstrip('/')

  def _under(self, key):
    return [k for k in self.objects if k.startswith(key + '/')]

  def open(self, path, mode):
    key, store = self._key(path), self
    if 'r' in mode:
      if key not in self.objects:
        raise FileNotFoundError(path)
      data = self.objects[key]
      return io.BytesIO(data) if 'b' in mode else io.StringIO(data.decode())

    class Upload(io.BytesIO if 'b' in mode else io.StringIO):
      def close(self):   # the object appears whole when the upload ends
        if not self.closed:
          value = self.getvalue()
          store.objects[key] = value if isinstance(value, bytes) else value.encode()
        super().close()

    upload = Upload()
    if 'a' in mode and key in self.objects:
      data = self.objects[key]
      upload.write(data if 'b' in mode else data.decode())
    return upload

  def exists(self, path):
    key = self._key(path)
    return key in self.objects or bool(self._under(key))

  def isdir(self, path):
    return bool(self._under(self._key(path)))

  def listdir(self, path):
    key = self._key(path)
    if not self._under(key):
      raise FileNotFoundError(path)
    return sorted({k[len(key) + 1:].split('/', 1)[0] for k in self._under(key)})

  def glob(self, path):
    pattern = self._key(path)
    names = set(self.objects)
    for k in self.objects:
      parts = k.split('/')
      names.update('/'.join(parts[:i]) for i in range(1, len(parts)))
    return sorted('gs://' + n for n in names if fnmatch.fnmatchcase(n, pattern))

  def walk(self, top, *, top_down=True, on_error=None):
    raise NotImplementedError('walk: not needed here')

  def makedirs(self, path, *, exist_ok=False, mode=None):
    pass   # nothing to make: a folder exists once an object is under it

  def mkdir(self, path, *, exist_ok=False, mode=None):
    pass

  def rmtree(self, path):
    under = self._under(self._key(path))
    if not under:
      raise FileNotFoundError(path)
    for k in under:
      del self.objects[k]

  def remove(self, path):
    key = self._key(path)
    if key not in self.objects:
      raise FileNotFoundError(path)
    del self.objects[key]

  def rename(self, path, dst):
    parent = os.fspath(dst).rsplit('/', 1)[0]
    if not self.exists(parent):   # what etils' fsspec backend checks first
      raise FileNotFoundError(f'folder {parent} does not exist')
    if self._key(path) not in self.objects:
      raise OSError(f'{path}: an object store renames objects, not prefixes')
    self.replace(path, dst)

  def replace(self, path, dst):
    self.objects[self._key(dst)] = self.objects.pop(self._key(path))

  def copy(self, path, dst, overwrite):
    key = self._key(path)
    if key not in self.objects:
      raise IsADirectoryError(f'{path} is not an object')
    if self.exists(dst) and not overwrite:
      raise FileExistsError(dst)
    self.objects[self._key(dst)] = self.objects[key]

  def stat(self, path):
    key = self._key(path)
    return stat_utils.StatResult(is_directory=key not in self.objects,
                                 length=len(self.objects.get(key, b'')), mtime=0)


def install(monkeypatch=None) -> ObjectStore:
  """Routes gs:// paths of etils.epath to a fresh ObjectStore (monkeypatch: undone after)."""
  store = ObjectStore()
  patches = [(gpath._PREFIX_TO_BACKEND, 'gs', store),
             (gpath, '_is_tf_installed', lambda: False),      # else epath picks TensorFlow
             (gpath, '_GCS_BACKENDS', gpath._GCS_BACKENDS | {store})]
  for target, name, value in patches:
    if isinstance(target, dict):
      (monkeypatch.setitem if monkeypatch else dict.__setitem__)(target, name, value)
    else:
      (monkeypatch.setattr if monkeypatch else setattr)(target, name, value)
  return store


@pytest.fixture
def gcs(monkeypatch):
  return install(monkeypatch)


def test_the_fake_store_has_no_folders(gcs):
  folder = epath.Path('gs://bucket/w/checkpoints_unreadable')
  folder.mkdir(parents=True, exist_ok=True)
  assert not folder.exists()                  # mkdir made nothing
  (epath.Path('gs://bucket/w/checkpoints/6') / 'a').write_text('x')
  with pytest.raises(FileNotFoundError):      # the old set-aside: mkdir, then rename
    epath.Path('gs://bucket/w/checkpoints/6').rename(folder / '6')
  with pytest.raises(OSError):
    epath.Path('gs://bucket/w/checkpoints/6').rename('gs://bucket/w/other')


class _Manager:
  """What `_set_aside` uses of an Orbax CheckpointManager."""

  def __init__(self, directory):
    self.directory = epath.Path(directory)
    self.reloads = 0

  def reload(self):
    self.reloads += 1


CHECKPOINT = {'_CHECKPOINT_METADATA': b'{"step": 12}', 'state/_METADATA': b'{}',
              'state/manifest.ocdbt': b'\x00\x01', 'state/ocdbt.process_0/d/abc': b'\x02' * 99,
              'data_position/metadata': b'{"next_batch": 12}'}


def _write(base, files):
  for name, data in files.items():
    path = epath.Path(base) / name
    path.parent.mkdir(parents=True, exist_ok=True)   # a local disk needs it; gs:// ignores it
    path.write_bytes(data)


def _tree(base):
  base = epath.Path(base)
  out = {}

  def walk(p):
    for child in p.iterdir():
      if child.is_dir():
        walk(child)
      else:
        out[str(child)[len(str(base)) + 1:]] = child.read_bytes()

  if base.exists():
    walk(base)
  return out


def test_unreadable_checkpoint_is_set_aside_on_an_object_store(gcs):
  # Private helper: a restore failure that reaches it needs a broken Orbax tree on fake GCS.
  mngr = _Manager('gs://bucket/run/checkpoints')
  _write('gs://bucket/run/checkpoints/12', CHECKPOINT)
  _write('gs://bucket/run/checkpoints/6', {'_CHECKPOINT_METADATA': b'{"step": 6}'})
  # A step 12 set aside by an earlier attempt: this one goes to 12.1.
  _write('gs://bucket/run/checkpoints_unreadable/12', {'_CHECKPOINT_METADATA': b'old'})
  ckpt_lib._set_aside(mngr, [12])
  assert _tree('gs://bucket/run/checkpoints_unreadable/12.1') == CHECKPOINT
  assert _tree('gs://bucket/run/checkpoints_unreadable/12') == {'_CHECKPOINT_METADATA': b'old'}
  assert not epath.Path('gs://bucket/run/checkpoints/12').exists()
  assert _tree('gs://bucket/run/checkpoints') == {'6/_CHECKPOINT_METADATA': b'{"step": 6}'}
  assert mngr.reloads == 1


def test_unreadable_checkpoint_is_renamed_on_a_local_disk(tmp_path):
  mngr = _Manager(tmp_path / 'checkpoints')
  _write(tmp_path / 'checkpoints' / '12', {k: v for k, v in CHECKPOINT.items() if '/' not in k})
  ckpt_lib._set_aside(mngr, [12])
  assert os.listdir(tmp_path / 'checkpoints_unreadable' / '12') == ['_CHECKPOINT_METADATA']
  assert not (tmp_path / 'checkpoints' / '12').exists()


def _write_run(d, *, lamb, losses, accuracy=None):
  """A workdir as train.py leaves it: config.json and metrics.jsonl (see tests/test_select.py)."""
  run_config.save(d, ml_collections.ConfigDict({
      'lamb': lamb, 'loss_convention': 'convex', 'total_steps': 10 * len(losses),
      'optim': {'lr': 1e-3}}))
  lines = [{'step': 10 * (i + 1), 'train/loss': v} for i, v in enumerate(losses)]
  if accuracy is not None:
    lines.append({'step': 10 * len(losses), 'eval/linear_probe_top1': accuracy})
  (epath.Path(d) / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))


# `python -m lejepa_jax.select gs://...` with gs:// served by the ObjectStore of this process.
_SELECT = """
import sys
sys.path.insert(0, {tests!r})
import test_epath_backends as t
from absl import flags
from lejepa_jax import select
store = t.install()
sweep = 'gs://bucket/sweep'
for i, (lamb, loss, acc) in enumerate([(0.01, 0.5, 0.70), (0.05, 0.6, 0.80), (0.1, 0.9, 0.75),
                                      (0.2, 1.2, 0.60)]):
  t._write_run(f'{{sweep}}/run{{i}}', lamb=lamb, losses=[loss] * 3, accuracy=acc)
t._write_run(f'{{sweep}}/unfinished', lamb=0.1, losses=[1.0])
store.objects['bucket/sweep/sweep.log'] = b'not a run'
runs = [f'{{sweep}}/{{n}}' for n in ('run0', 'run1', 'run2', 'run3', 'unfinished', 'sweep.log')]
select.main(flags.FLAGS(['select', *runs]))
print('PNG', store.objects['bucket/sweep/select.png'][:8])
"""


def test_select_reads_runs_on_an_object_store():
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS',)}
  env['PYTHONPATH'] = ROOT
  code = _SELECT.format(tests=os.path.join(ROOT, 'tests'))
  res = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  lines = res.stdout.strip().splitlines()
  assert lines[-1] == "PNG b'\\x89PNG\\r\\n\\x1a\\n'"
  summary = json.loads(lines[-2])
  assert (summary['runs'], summary['skipped']) == (4, 1)
  assert summary['plot'] == 'gs://bucket/sweep/select.png'
  # loss / lamb^0.4: run1's (0.6 / 0.05^0.4 = 1.99) is the lowest, and run1 the most accurate.
  assert summary['picked'] == summary['best_run'] == 'gs://bucket/sweep/run1'
  assert 'ignored 1 plain file(s): sweep.log' in res.stdout
  assert 'skipped gs://bucket/sweep/unfinished: no eval/linear_probe_top1' in res.stdout
