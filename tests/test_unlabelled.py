"""Pretraining on images without labels: a nested folder of mixed formats and sizes, NumPy
arrays (.npz without labels, .npy memory-mapped), and the refusals when labels are needed."""
import json
import os

import numpy as np
import pytest

import test_folder   # tests/test_folder.py: patterns saved in every PIL mode
from configs import fmnist
from lejepa_jax import config as config_lib
from lejepa_jax.data import sources


def make_unlabelled_folder(root, n: int, seed: int = 0) -> str:
  """n images at several depths (root/a/..., root/b/c/..., root itself), every kind and size."""
  rng = np.random.default_rng(seed)
  places = ['', 'a', os.path.join('b', 'c'), os.path.join('b', 'd', 'e')]
  for i in range(n):
    folder = os.path.join(root, places[i % len(places)])
    os.makedirs(folder, exist_ok=True)
    h, w = test_folder.SIZES[i % len(test_folder.SIZES)]
    test_folder._save(os.path.join(folder, f'{i:03d}'),
                      test_folder._pattern(i % 4, h, w, rng),
                      test_folder.KINDS[i % len(test_folder.KINDS)], rng)
  return str(root)


def _config(name, root, labels='auto'):
  c = fmnist.get_config('runlocal')
  c.data.name, c.data.dir, c.data.labels = name, str(root), labels
  return c


def test_unlabelled_folder_finds_images_at_any_depth(tmp_path):
  root = make_unlabelled_folder(tmp_path / 'pool' / 'train', 14)
  (tmp_path / 'pool' / 'train' / 'notes.txt').write_text('not an image')
  src = sources.get_source(_config('folder', tmp_path / 'pool', 'none').data, 'train')
  assert len(src) == 14 and not src.labelled and src.known_labels() is None
  records = [src[i] for i in range(len(src))]
  assert {r['label'] for r in records} == {sources.UNLABELLED}
  assert {r['image'].shape[:2] for r in records} == set(test_folder.SIZES)
  assert all(r['image'].dtype == np.uint8 and r['image'].shape[-1] == 1 for r in records)
  # No SPLIT folder: the whole of data.dir is the pool (train and test alike).
  flat = sources.get_source(_config('folder', root, 'none').data, 'test')
  assert len(flat) == 14
  # The same folder read with labels: its sub-folders would be taken for classes.
  labelled = sources.get_source(_config('folder', tmp_path / 'pool').data, 'train')
  assert labelled.labelled and labelled.classes == ['a', 'b']


def test_arrays_with_and_without_labels(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 12)
  np.savez(tmp_path / 'train.npz', images=images, labels=labels)
  np.savez(tmp_path / 'test.npz', images=images[:4])
  np.save(tmp_path / 'pool.npy', images[..., None])
  train = sources.get_source(_config('arrays', tmp_path).data, 'train')
  assert train.labelled and [train[i]['label'] for i in range(12)] == labels.tolist()
  np.testing.assert_array_equal(train[3]['image'][..., 0], images[3])
  test = sources.get_source(_config('arrays', tmp_path).data, 'test')
  assert not test.labelled and test[0]['label'] == sources.UNLABELLED
  pool = sources.get_source(_config('arrays', tmp_path).data, 'pool')
  assert isinstance(pool.images, np.memmap) and not pool.labelled
  np.testing.assert_array_equal(pool[11]['image'][..., 0], images[11])
  ignored = sources.get_source(_config('arrays', tmp_path, 'none').data, 'train')
  assert not ignored.labelled and ignored.known_labels() is None


@pytest.mark.parametrize('case, error, words', [
    ('missing', sources.MissingDataError, 'neither'),
    ('floats', sources.BadDataError, 'dtype float32'),
    ('no_images', sources.BadDataError, 'no "images"'),
    ('bad_labels', sources.BadDataError, 'labels of dtype float64'),
    ('not_numpy', sources.BadDataError, 'cannot be read'),
])
def test_bad_arrays_say_what_is_wrong(tmp_path, case, error, words):
  if case == 'floats':
    np.savez(tmp_path / 'train.npz', images=np.zeros((2, 8, 8), np.float32))
  elif case == 'no_images':
    np.savez(tmp_path / 'train.npz', pixels=np.zeros((2, 8, 8), np.uint8))
  elif case == 'bad_labels':
    np.savez(tmp_path / 'train.npz', images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(2))
  elif case == 'not_numpy':
    (tmp_path / 'train.npy').write_bytes(b'PNG but not really')
  with pytest.raises(error, match=words):
    sources.get_source(_config('arrays', tmp_path).data, 'train')


def test_empty_folder_and_folder_of_non_images(tmp_path):
  (tmp_path / 'empty' / 'train' / 'deep').mkdir(parents=True)
  with pytest.raises(sources.MissingDataError, match='no .png/.jpg/.jpeg images'):
    sources.get_source(_config('folder', tmp_path / 'empty', 'none').data, 'train')
  junk = tmp_path / 'junk' / 'train'
  junk.mkdir(parents=True)
  for i in range(3):
    (junk / f'{i}.png').write_bytes(b'not a png at all')
  with pytest.raises(sources.BadDataError, match='3 unreadable image file'):
    sources.get_source(_config('folder', tmp_path / 'junk', 'none').data, 'train')


def test_labels_none_needs_no_evaluators():
  c = _config('folder', '/nowhere', 'none')
  with pytest.raises(config_lib.ConfigError, match=r"--config.evals=\{\}"):
    config_lib.validate(c)
  c.evals = {}
  config_lib.validate(c)
  c.data.labels = 'maybe'
  with pytest.raises(config_lib.ConfigError, match="data.labels='maybe'"):
    config_lib.validate(c)


def test_unlabelled_arrays_with_evaluators_exit_2_before_writing(tmp_path):
  np.save(tmp_path / 'train.npy', np.zeros((64, 28, 28, 1), np.uint8))
  np.save(tmp_path / 'test.npy', np.zeros((32, 28, 28, 1), np.uint8))
  workdir = tmp_path / 'run'
  result = test_folder._python(str(tmp_path), '-m', 'lejepa_jax.main',
                               '--config=configs/fmnist.py:runlocal', f'--workdir={workdir}',
                               '--config.data.name=arrays', f'--config.data.dir={tmp_path}')
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('[lejepa_jax] error:')]
  assert len(errors) == 1 and 'have no labels' in errors[0], result.stderr[-3000:]
  assert not workdir.exists()


# ---------------------------------------------------- probing on a labelled set of its own

def _evals(**entries) -> str:
  return '--config.evals=' + json.dumps(entries)


def _metrics(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def _pattern_arrays(n: int, seed: int):
  """n 28x28 grayscale patterns of the 4 classes of test_folder, and their labels."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 4
  images = np.stack([(test_folder._pattern(c, 28, 28, rng) * 255).astype(np.uint8)
                     for c in labels])
  return images, labels


def _labelled_arrays(directory, *, train: int, test: int, seed: int) -> str:
  """directory/{train,test}.npz holding labelled patterns."""
  directory.mkdir()
  for split, n in (('train', train), ('test', test)):
    images, labels = _pattern_arrays(n, seed + (split == 'test'))
    np.savez(directory / f'{split}.npz', images=images, labels=labels)
  return str(directory)


def test_pretrain_on_an_unlabelled_folder_and_probe_on_a_labelled_one(tmp_path):
  """The paper's in-domain setting: an unlabelled pool to pretrain on, a small labelled folder
  (another directory) for the evaluators; then `evaluate` points the finished run at a third,
  labelled set of arrays."""
  pool = make_unlabelled_folder(tmp_path / 'pool', 40)
  labelled = test_folder.make_folder(tmp_path / 'labelled', {'train': 8, 'test': 6}, seed=1)
  own = {'name': 'folder', 'dir': labelled, 'num_classes': 4}
  workdir = tmp_path / 'run'
  result = test_folder._python(
      str(tmp_path), '-m', 'lejepa_jax.main', '--config=configs/fmnist.py:runlocal',
      f'--workdir={workdir}', '--config.data.name=folder', f'--config.data.dir={pool}',
      '--config.data.labels=none', '--config.total_steps=6',
      _evals(probe={'type': 'linear_probe', 'lrs': [0.01], 'epochs': 5, 'data': own},
             knn={'type': 'knn', 'k': 5, 'data': own}))
  assert result.returncode == 0, result.stderr[-4000:]
  lines = _metrics(workdir)
  train, final = [l for l in lines if 'train/loss' in l], lines[-1]
  assert final['step'] == 6 and train and (workdir / 'checkpoints').is_dir()
  # No label reaches the online probe: its loss and accuracy count no image.
  assert all(l['train/probe_loss'] == 0.0 and l['train/probe_top1'] == 0.0 for l in train)
  assert all(np.isfinite(l['train/loss']) and l['train/sigreg'] > 0 for l in train)
  # 32 labelled training images, 24 test images, 4 classes (chance 0.25); measured 0.875 / 0.958
  assert 0.5 <= final['eval/probe_top1'] <= 1.0 and 0.5 <= final['eval/knn_top1'] <= 1.0, final

  arrays = _labelled_arrays(tmp_path / 'arrays', train=40, test=20, seed=2)
  result = test_folder._python(
      str(tmp_path), '-m', 'lejepa_jax.evaluate', f'--workdir={workdir}', '--noplots',
      _evals(transfer={'type': 'knn', 'k': 5,
                       'data': {'name': 'arrays', 'dir': arrays, 'num_classes': 4}}))
  assert result.returncode == 0, result.stderr[-4000:]
  line = _metrics(workdir)[-1]
  assert line['step'] == 6 and 0.5 <= line['eval/transfer_top1'] <= 1.0, line   # measured 1.0


def test_pretrain_on_unlabelled_arrays_and_probe_on_labelled_arrays(tmp_path):
  pool = tmp_path / 'pool'
  pool.mkdir()
  images, _ = _pattern_arrays(48, 0)
  np.savez(pool / 'train.npz', images=images)          # no labels: an unlabelled pool
  np.savez(pool / 'test.npz', images=images[:16])
  labelled = _labelled_arrays(tmp_path / 'labelled', train=32, test=16, seed=1)
  workdir = tmp_path / 'run'
  result = test_folder._python(
      str(tmp_path), '-m', 'lejepa_jax.main', '--config=configs/fmnist.py:runlocal',
      f'--workdir={workdir}', '--config.data.name=arrays', f'--config.data.dir={pool}',
      '--config.total_steps=4',
      _evals(knn={'type': 'knn', 'k': 5,
                  'data': {'name': 'arrays', 'dir': labelled, 'num_classes': 4}}))
  assert result.returncode == 0, result.stderr[-4000:]
  final = _metrics(workdir)[-1]
  assert final['step'] == 4 and 0.5 <= final['eval/knn_top1'] <= 1.0, final    # measured 1.0


def test_an_evaluator_given_unlabelled_data_exits_2_before_writing(tmp_path):
  pool = make_unlabelled_folder(tmp_path / 'pool', 40)
  np.save(tmp_path / 'train.npy', np.zeros((8, 28, 28), np.uint8))
  np.save(tmp_path / 'test.npy', np.zeros((8, 28, 28), np.uint8))
  workdir = tmp_path / 'run'
  result = test_folder._python(
      str(tmp_path), '-m', 'lejepa_jax.main', '--config=configs/fmnist.py:runlocal',
      f'--workdir={workdir}', '--config.data.name=folder', f'--config.data.dir={pool}',
      '--config.data.labels=none',
      _evals(knn={'type': 'knn', 'data': {'name': 'arrays', 'dir': str(tmp_path),
                                          'num_classes': 4}}))
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('[lejepa_jax] error:')]
  assert len(errors) == 1 and 'evaluator knn reads arrays' in errors[0], result.stderr[-3000:]
  assert 'has no labels' in errors[0] and not workdir.exists()


def test_evaluator_data_keys_are_checked():
  c = _config('folder', '/nowhere', 'none')
  c.evals = {'a': {'type': 'knn', 'data': {'global_size': 32}},
             'b': {'type': 'online_probe', 'data': {'dir': '/x'}},
             'c': {'type': 'knn', 'data': {'name': 'lmdb', 'labels': 'none'}}}
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  for words in ('evals.a.data.global_size cannot be set per evaluator',
                'evals.b.data: the online probe', "evals.c.data.name='lmdb'",
                'evals.c.data.labels cannot be set per evaluator'):
    assert words in str(e.value), (words, str(e.value))


@pytest.mark.parametrize('case, words', [
    ('unlabelled_folder_to_an_evaluator', 'evaluator knn (evals.knn.data) reads labelled images'),
    ('empty_folder', 'no .png/.jpg/.jpeg images'),
    ('folder_of_non_images', 'unreadable image file'),
])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(tmp_path, case, words):
  pool = make_unlabelled_folder(tmp_path / 'pool', 40)
  flags = ['--config.data.name=folder', '--config.data.labels=none']
  if case == 'unlabelled_folder_to_an_evaluator':     # images straight in train/ and test/
    flat, rng = tmp_path / 'flat', np.random.default_rng(0)
    for split in ('train', 'test'):
      (flat / split).mkdir(parents=True)
      for i in range(3):
        test_folder._save(str(flat / split / f'{i}'), test_folder._pattern(i, 28, 28, rng),
                          'L.png', rng)
    flags += [f'--config.data.dir={pool}',
              _evals(knn={'type': 'knn', 'data': {'name': 'folder', 'dir': str(flat),
                                                  'num_classes': 4}})]
  else:
    bad = tmp_path / 'bad' / 'train' / 'deeper'
    bad.mkdir(parents=True)
    if case == 'folder_of_non_images':
      for i in range(40):
        (bad / f'{i}.jpg').write_text('a text file named like an image')
    flags += [f'--config.data.dir={tmp_path / "bad"}', '--config.evals={}']
  workdir = tmp_path / 'run'
  result = test_folder._python(str(tmp_path), '-m', 'lejepa_jax.main',
                               '--config=configs/fmnist.py:runlocal', f'--workdir={workdir}',
                               *flags)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('[lejepa_jax] error:')]
  assert len(errors) == 1 and words in errors[0], result.stderr[-3000:]
  assert 'Traceback' not in result.stderr and not workdir.exists()
