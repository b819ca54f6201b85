"""Seeded evaluation subsets (eval.max_examples, diagnostics.num_images): stratified by class
where a source knows its labels, uniform where it does not, the same on every process."""
import collections
import types

import numpy as np
import pytest
from PIL import Image

from configs import fmnist
from lejepa_jax import diagnostics
from lejepa_jax import sharding as sharding_lib
from lejepa_jax.data import pipeline, sources
from lejepa_jax.evaluators import suite

NUM_CLASSES, PER_CLASS = 10, 20


def _pixel(cls: int, i: int) -> tuple:
  """An image's constant RGB colour: red codes the class, green the image within it."""
  return (20 * cls + 10, 10 * i + 5, 128)


def _class_ordered_folder(root) -> str:
  """root/{train,test}/cCC/III.png: 10 classes of 20 constant 8x8 images, stored in class
  order (as FolderSource lists them), so that the first N records hold the first classes."""
  for split in ('train', 'test'):
    for c in range(NUM_CLASSES):
      (root / split / f'c{c:02d}').mkdir(parents=True)
      for i in range(PER_CLASS):
        image = np.ascontiguousarray(np.broadcast_to(np.uint8(_pixel(c, i)), (8, 8, 3)))
        Image.fromarray(image).save(root / split / f'c{c:02d}' / f'{i:03d}.png')
  return str(root)


def _config(root, seed=0):
  c = fmnist.get_config('runlocal')
  c.seed = seed
  c.data.name, c.data.dir, c.data.channels = 'folder', str(root), 3
  c.data.mean, c.data.std = (0.5,) * 3, (0.25,) * 3
  c.data.num_classes = NUM_CLASSES
  c.data.num_threads = 1
  return c


def _real_rows(source, data_config, process_count: int, local_batch_size: int) -> list:
  """Sorted (label, image bytes) of the real rows all processes' eval batches hold."""
  rows = []
  for p in range(process_count):
    for batch in pipeline.eval_batches(source, data_config, local_batch_size=local_batch_size,
                                       process_index=p, process_count=process_count):
      for image, label, mask in zip(batch['image'], batch['label'], batch['mask']):
        if mask:
          rows.append((int(label), image.tobytes()))
  return sorted(rows)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return _class_ordered_folder(tmp_path_factory.mktemp('class_ordered'))


def test_eval_cap_keeps_every_class_in_proportion_on_any_process_count(folder):
  c = _config(folder)
  c.eval.max_examples = NUM_CLASSES * PER_CLASS // 10       # 10% of each split: 2 per class
  spec = suite.Spec('knn', 'knn', every=0, max_examples=0, options={})
  cap = suite.cap(c, spec)
  assert cap == 20
  runner = suite.Runner(c, programs=None)
  for split in (c.data.train_split, c.data.test_split):
    capped = runner.capped(split, cap)
    assert len(capped) == cap
    counts = collections.Counter(sources.known_labels(capped).tolist())
    assert counts == {k: 2 for k in range(NUM_CLASSES)}
    assert np.all(np.diff(capped.indices) > 0)             # ascending: local reads
    # Records read match the labels it claims, and the same choice at every call.
    assert [capped[i]['label'] for i in range(cap)] == sources.known_labels(capped).tolist()
    np.testing.assert_array_equal(runner.capped(split, cap).indices, capped.indices)
    np.testing.assert_array_equal(suite.Runner(c, programs=None).capped(split, cap).indices,
                                  capped.indices)
    # The union of the real rows is the same for 1 and 2 processes (all processes pick alike).
    one = _real_rows(capped, c.data, process_count=1, local_batch_size=8)
    two = _real_rows(suite.Runner(c, programs=None).capped(split, cap), c.data,
                     process_count=2, local_batch_size=4)
    assert len(one) == cap and one == two
    assert sorted(label for label, _ in one) == sorted(list(range(NUM_CLASSES)) * 2)
    # Another seed: another subset, still stratified.
    other = suite.Runner(_config(folder, seed=1), programs=None).capped(split, cap)
    assert not np.array_equal(other.indices, capped.indices)
    assert collections.Counter(sources.known_labels(other).tolist()) == counts
  # Private on purpose: no cap must hand out the opened source itself, not a copy.
  assert runner.capped(c.data.test_split, 0) is runner._sources['', c.data.test_split]


def _monitor(config):
  mesh = sharding_lib.make_mesh({'data': -1}, None)
  model = types.SimpleNamespace(encoder=types.SimpleNamespace(width=16, head_dim=0), projector_out=8)
  test = sources.get_source(config.data, config.data.test_split)
  return diagnostics.Monitor(config, types.SimpleNamespace(mesh=mesh, model=model), test), test


def _classes_of(images, config) -> list:
  """The class of each preprocessed constant image, read back from its red channel."""
  red = np.asarray(images)[..., 0].mean(axis=(1, 2)) * config.data.std[0] + config.data.mean[0]
  return sorted(int(round((r * 255 - 10) / 20)) for r in red)


def test_diagnostics_batch_covers_every_class_of_a_class_ordered_split(folder):
  c = _config(folder)
  c.diagnostics = dict(every=10, num_images=16)   # 16 of 200 test images, 10 classes
  monitor, test = _monitor(c)
  assert monitor.images.shape[0] == 16
  classes = _classes_of(monitor.images, c)
  assert set(classes) == set(range(NUM_CLASSES))
  assert max(collections.Counter(classes).values()) == 2      # 16 = 10 x 1.6: 1 or 2 each
  # The batch is `sources.sample` of the test split, read alike by 1 or 2 processes.
  chosen = sources.sample(test, 16, seed=c.seed)
  images = sorted(np.asarray(x).tobytes() for x in monitor.images)
  assert images == sorted(x for _, x in _real_rows(chosen, c.data, 2, 8))
  again, _ = _monitor(c)
  np.testing.assert_array_equal(np.asarray(again.images), np.asarray(monitor.images))
  reseeded = _config(folder, seed=1)
  reseeded.diagnostics = c.diagnostics
  other, _ = _monitor(reseeded)
  assert set(_classes_of(other.images, c)) == set(range(NUM_CLASSES))
  assert sorted(np.asarray(x).tobytes() for x in other.images) != images


class _NoLabels:
  """A source that cannot give its labels without reading its records (like TFDS)."""

  def __len__(self):
    return 100

  def __getitem__(self, index):
    return {'image': np.full((2, 2, 1), index, np.uint8), 'label': index % 3}


def test_seeded_uniform_sample_without_cheap_labels():
  src = _NoLabels()
  assert sources.known_labels(src) is None
  assert sources.TfdsSource.known_labels(object.__new__(sources.TfdsSource)) is None
  chosen = sources.sample(src, 30, seed=5)
  assert len(chosen) == 30 and sources.known_labels(chosen) is None
  indices = chosen.indices
  assert len(set(indices.tolist())) == 30 and np.all(np.diff(indices) > 0)
  assert 0 <= indices.min() and indices.max() < 100
  assert [chosen[i]['image'][0, 0, 0] for i in range(30)] == indices.tolist()
  np.testing.assert_array_equal(sources.sample(src, 30, seed=5).indices, indices)
  assert not np.array_equal(sources.sample(src, 30, seed=6).indices, indices)
  assert sources.sample(src, 100, seed=5) is src and sources.sample(src, 500, seed=5) is src
  with pytest.raises(ValueError, match='n must be >= 1'):
    sources.sample(src, 0, seed=5)
  with pytest.raises(IndexError):
    chosen[30]


def test_array_source_sample_is_stratified():
  labels = np.repeat(np.arange(4), [50, 30, 15, 5])          # class-ordered, unbalanced
  src = sources.ArraySource(np.zeros((100, 2, 2), np.uint8), labels)
  chosen = sources.sample(src, 20, seed=0)
  assert np.bincount(sources.known_labels(chosen)).tolist() == [10, 6, 3, 1]


def test_class_shares_are_largest_remainder_and_keep_every_class():
  rng = np.random.default_rng(0)
  for trial in range(300):
    counts = rng.integers(1, 60, rng.integers(1, 12))
    n = int(rng.integers(1, counts.sum() + 1))      # n = all records included
    labels = np.repeat(np.arange(len(counts)), counts)
    chosen = sources.subset_indices(len(labels), n, trial, labels)
    shares = np.bincount(labels[chosen], minlength=len(counts))
    exact = n * counts / counts.sum()
    assert len(chosen) == n and len(np.unique(chosen)) == n
    assert np.all(shares <= counts)
    if n >= len(counts):
      assert np.all(shares >= 1)
    if np.all(np.floor(exact) >= 1) or n < len(counts):   # no class lifted to its first record
      assert np.all(np.abs(shares - exact) < 1)
  # One large class and many small ones: each small class still gets its record.
  labels = np.repeat(np.arange(6), [1000, 1, 1, 1, 1, 1])
  shares = np.bincount(labels[sources.subset_indices(len(labels), 8, 0, labels)])
  assert shares.tolist() == [3, 1, 1, 1, 1, 1]
