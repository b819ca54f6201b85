"""Random-access data sources yielding {'image': uint8 (H, W, C), 'label': int}.

- 'fashion_mnist': the IDX files of the Debian package dataset-fashion-mnist
  (or any directory holding the four *-idx?-ubyte[.gz] files);
- 'tfds:NAME': `tfds.data_source` over a prepared TFDS directory (ImageNet at
  scale; array_record files, random access, no TensorFlow graph);
- 'folder': DIR/SPLIT/CLASS/*.{png,jpg,jpeg}.
"""
from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_FMNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def _read_idx(path: pathlib.Path) -> np.ndarray:
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
    raise ValueError(f'{path} is not an unsigned-byte IDX file')
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
  offset = 4 + 4 * ndim
  expected = int(np.prod(dims))
  if len(data) - offset != expected:
    raise ValueError(f'{path}: header says {dims} ({expected} bytes), file has {len(data) - offset}')
  return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
  for name in (stem + '.gz', stem):
    if (directory / name).exists():
      return directory / name
  raise FileNotFoundError(
      f'Fashion-MNIST file {stem}[.gz] not found in {directory}. Install it with '
      f'`apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DIR}) '
      f'or point --config.data.dir at a directory holding the IDX files.')


class ArraySource:
  """In-memory images (N, H, W, C) uint8 and labels (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim == 3:
      images = images[..., None]
    if len(images) != len(labels):
      raise ValueError(f'{len(images)} images but {len(labels)} labels')
    self.images = np.ascontiguousarray(images)
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {'image': self.images[index], 'label': int(self.labels[index])}


def fashion_mnist(data_dir: str | None, split: str) -> ArraySource:
  if split not in _FMNIST_FILES:
    raise ValueError(f'Fashion-MNIST split must be one of {sorted(_FMNIST_FILES)}, got {split!r}')
  directory = pathlib.Path(data_dir or FASHION_MNIST_DIR)
  image_stem, label_stem = _FMNIST_FILES[split]
  return ArraySource(_read_idx(_find(directory, image_stem)), _read_idx(_find(directory, label_stem)))


class TfdsSource:
  """`tfds.data_source` records mapped to {'image', 'label'}."""

  def __init__(self, name: str, split: str, data_dir: str | None,
               image_key: str = 'image', label_key: str = 'label'):
    import tensorflow_datasets as tfds  # imported lazily: heavy, and only needed here
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for a missing dataset
      raise FileNotFoundError(
          f'TFDS dataset {name!r} split {split!r} not found under data.dir={data_dir!r}: prepare '
          f'it there first (tfds build {name} --data_dir=DIR --file_format=array_record). '
          f'Cause: {e}') from e
    self._image_key, self._label_key = image_key, label_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    image = np.asarray(record[self._image_key])
    if image.ndim == 2:
      image = image[..., None]
    return {'image': image, 'label': int(record[self._label_key])}


class FolderSource:
  """DIR/SPLIT/CLASS/*.{png,jpg,jpeg}, classes in sorted order."""

  def __init__(self, data_dir: str, split: str):
    root = pathlib.Path(data_dir) / split
    if not root.is_dir():
      raise FileNotFoundError(f'image folder {root} does not exist (data.dir/split/class/*.png)')
    self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    self.files = [(f, i) for i, c in enumerate(self.classes)
                  for f in sorted((root / c).iterdir())
                  if f.suffix.lower() in ('.png', '.jpg', '.jpeg')]
    if not self.files:
      raise FileNotFoundError(f'no .png/.jpg images under {root}/CLASS/')

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    from PIL import Image
    path, label = self.files[index]
    with Image.open(path) as img:
      image = np.asarray(img.convert('RGB'))
    return {'image': image, 'label': label}


def get_source(data_config, split: str):
  """The source named by data_config.name for `split`."""
  name = data_config.name
  if name == 'fashion_mnist':
    return fashion_mnist(data_config.get('dir'), split)
  if name.startswith('tfds:'):
    return TfdsSource(name[len('tfds:'):], split, data_config.get('dir'),
                      data_config.get('image_key', 'image'), data_config.get('label_key', 'label'))
  if name == 'folder':
    if not data_config.get('dir'):
      raise ValueError('data.name="folder" needs data.dir')
    return FolderSource(os.fspath(data_config.dir), split)
  raise ValueError(f"data.name must be 'fashion_mnist', 'tfds:NAME' or 'folder', got {name!r}")
