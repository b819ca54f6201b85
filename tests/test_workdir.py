"""A gs:// workdir stays a gs:// path from the command line to Orbax and the metric files."""
import json

from etils import epath
from etils.epath import testing as epath_testing
import pytest

from configs import fmnist
from lejepa_jax import checkpoint, metrics, train


@pytest.fixture
def fake_bucket(tmp_path):
  """gs://... paths served from tmp_path/gs/... through etils.epath (and only through it)."""
  def local(path):
    return str(path).replace('gs://', str(tmp_path / 'gs') + '/')

  def forward(name):
    def fn(original, path, *args, **kwargs):
      return original(local(path), *args, **kwargs)
    return fn
  names = ('open', 'exists', 'isdir', 'listdir', 'makedirs', 'mkdir', 'glob', 'remove', 'stat')
  with epath_testing.mock_epath(**{n: forward(n) for n in names}):
    yield tmp_path / 'gs'


def test_checkpoint_directory_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  assert str(checkpoint.directory('gs://bucket/run')) == 'gs://bucket/run/checkpoints'
  monkeypatch.chdir(tmp_path)
  assert str(checkpoint.directory('rel/run')) == str(tmp_path / 'rel' / 'run' / 'checkpoints')


def test_metrics_reach_a_gs_workdir_through_epath(fake_bucket):
  writer = metrics.MetricWriter('gs://bucket/run', tensorboard=False)
  writer.write(1, {'train/loss': 2.5})
  writer.write(2, {'train/loss': 1.5})
  writer.close()
  path = fake_bucket / 'bucket' / 'run' / 'metrics.jsonl'
  assert [json.loads(l) for l in path.read_text().splitlines()] == [
      {'step': 1, 'train/loss': 2.5}, {'step': 2, 'train/loss': 1.5}]
  # A resumed run keeps the lines already there (object stores cannot append).
  again = metrics.MetricWriter('gs://bucket/run', tensorboard=False)
  again.write(3, {'train/loss': 0.5})
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2, 3]


def test_train_hands_the_gs_workdir_to_orbax_unchanged(fake_bucket, monkeypatch):
  if not epath.Path('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz').exists():
    pytest.skip('needs the dataset-fashion-mnist Debian package')
  seen = {}

  class Stop(Exception):
    pass

  def fake_manager(workdir, **kwargs):
    seen['checkpoints'] = str(checkpoint.directory(workdir))
    raise Stop
  monkeypatch.setattr(checkpoint, 'manager', fake_manager)
  monkeypatch.setattr(metrics, 'MetricWriter', lambda workdir, **kw: seen.update(metrics=str(workdir)))
  with pytest.raises(Stop):
    train.train_and_evaluate(fmnist.get_config('runlocal'), 'gs://bucket/run')
  assert seen == {'checkpoints': 'gs://bucket/run/checkpoints', 'metrics': 'gs://bucket/run'}
  assert (fake_bucket / 'bucket' / 'run').is_dir()      # created through epath
