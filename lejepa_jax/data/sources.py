"""Random-access data sources yielding {'image': uint8 (H, W, C), 'label': int}.

- 'fashion_mnist': the IDX files of the Debian package dataset-fashion-mnist
  (or any directory holding the four *-idx?-ubyte[.gz] files);
- 'tfds:NAME': `tfds.data_source` over a prepared TFDS directory (ImageNet at
  scale; array_record files, random access, no TensorFlow graph);
- 'folder': DIR/SPLIT/CLASS/*.{png,jpg,jpeg}.

Missing or malformed data fails when the source is built (before anything compiles or
writes), with a `DataError` naming the path and what to do. Checked at construction: IDX
magic, header and length (the whole file is read anyway); for folders, every image file's
header and structure with PIL's `Image.verify()` (data.verify_images: 'auto' checks every
file up to 50,000 and a fixed random sample of 50,000 beyond; 'all'; 'none'). verify()
parses the header and, for PNG, reads the chunks and their checksums, but decodes no
pixels. Measured from the page cache on one core: 26 us per file (a 500x375 JPEG or a
64x64 PNG; decoding the JPEG takes 1.8 ms), 40-65 us through the 16 threads used here
(they cost a little locally and hide the latency of network file systems). So 'auto'
costs 1-3 s at most; 'all' on the 1.3M ImageNet JPEGs about a minute from a warm local
disk, but tens of minutes on a network file system with 10 ms per open (hence the sample),
and decoding them all would take ~40 core-minutes.
A JPEG cut short inside its pixel data passes verify(); decoding it during training
raises a `BadDataError` naming the file.
"""
from __future__ import annotations

import concurrent.futures
import gzip
import os
import pathlib
import zlib

import numpy as np

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
VERIFY_MODES = ('auto', 'all', 'none')
VERIFY_SAMPLE = 50_000
_REINSTALL = ('reinstall it (`apt-get install --reinstall dataset-fashion-mnist`) or point '
              '--config.data.dir at a directory holding intact IDX files')


class DataError(Exception):
  """Missing or malformed data; the message names the path and what to do."""


class MissingDataError(DataError, FileNotFoundError):
  pass


class BadDataError(DataError, ValueError):
  pass


_FMNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def _read_idx(path: pathlib.Path) -> np.ndarray:
  opener = gzip.open if path.suffix == '.gz' else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:   # truncated or corrupt gzip, unreadable file
    raise BadDataError(f'{path} cannot be read ({e}): {_REINSTALL}') from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
    raise BadDataError(f'{path} is not an unsigned-byte IDX file (its first bytes are '
                       f'{data[:4].hex() or "missing"}, not 000008..): {_REINSTALL}')
  ndim = data[3]
  offset = 4 + 4 * ndim
  if len(data) < offset:
    raise BadDataError(f'{path} is truncated inside its IDX header: {_REINSTALL}')
  dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
  expected = int(np.prod(dims))
  if len(data) - offset != expected:
    raise BadDataError(f'{path}: the IDX header says {dims} ({expected} bytes) but the file '
                       f'holds {len(data) - offset} (truncated or corrupt): {_REINSTALL}')
  return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
  for name in (stem + '.gz', stem):
    if (directory / name).exists():
      return directory / name
  raise MissingDataError(
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
    raise MissingDataError(f'Fashion-MNIST has no split {split!r}: set --config.data.train_split / '
                           f'--config.data.test_split to one of {sorted(_FMNIST_FILES)}')
  directory = pathlib.Path(data_dir or FASHION_MNIST_DIR)
  image_path, label_path = (_find(directory, stem) for stem in _FMNIST_FILES[split])
  images, labels = _read_idx(image_path), _read_idx(label_path)
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise BadDataError(f'{image_path} holds images of shape {images.shape} and {label_path} '
                       f'labels of shape {labels.shape}; expected (N, H, W) and (N,): '
                       f'{_REINSTALL}')
  return ArraySource(images, labels)


class TfdsSource:
  """`tfds.data_source` records mapped to {'image', 'label'}."""

  def __init__(self, name: str, split: str, data_dir: str | None,
               image_key: str = 'image', label_key: str = 'label'):
    import tensorflow_datasets as tfds  # imported lazily: heavy, and only needed here
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for a missing dataset
      raise MissingDataError(
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


_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
_VERIFIED: set = set()     # (root, file count, mode) already checked in this process


def _verify_one(path: pathlib.Path) -> str | None:
  """None if PIL can parse the file's header and structure, else the reason."""
  from PIL import Image
  try:
    with Image.open(path) as img:
      img.verify()
  except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError...)
    return f'{type(e).__name__}: {e}'
  return None


def verify_images(paths: list, mode: str = 'auto', *, root=None) -> int:
  """Runs `Image.verify()` on `paths` (all, or a fixed sample; see the module docstring).

  Raises BadDataError naming up to 5 unreadable files and what to do; returns the number
  of files checked.
  """
  if mode not in VERIFY_MODES:
    raise ValueError(f'data.verify_images={mode!r}: one of {VERIFY_MODES}')
  if mode == 'none':
    return 0
  if mode == 'auto' and len(paths) > VERIFY_SAMPLE:
    pick = np.random.default_rng(0).choice(len(paths), VERIFY_SAMPLE, replace=False)
    paths = [paths[i] for i in np.sort(pick)]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    reasons = list(pool.map(_verify_one, paths))
  bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
  if bad:
    shown = '; '.join(f'{p} ({r})' for p, r in bad[:5])
    more = f' and {len(bad) - 5} more' if len(bad) > 5 else ''
    raise BadDataError(
        f'{len(bad)} unreadable image file(s) under {root or "the image folder"}: {shown}{more}. '
        'Delete or replace them (re-download or re-extract the data set), then rerun '
        "(data.verify_images = 'none' in the config skips this check).")
  return len(paths)


class FolderSource:
  """DIR/SPLIT/CLASS/*.{png,jpg,jpeg}, classes in sorted order.

  Every file (or a sample, see the module docstring) is checked with `Image.verify()` when
  the source is built; `verify` is one of VERIFY_MODES.
  """

  def __init__(self, data_dir: str, split: str, verify: str = 'auto'):
    root = pathlib.Path(data_dir) / split
    layout = (f'expected data.dir/{split}/CLASS/IMAGE.{{png,jpg,jpeg}}, one folder per class: '
              'fix --config.data.dir or the folder layout')
    if not root.is_dir():
      raise MissingDataError(f'image folder {root} does not exist; {layout}')
    self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    self.files = [(f, i) for i, c in enumerate(self.classes)
                  for f in sorted((root / c).iterdir())
                  if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not self.files:
      found = f'class folders {self.classes[:5]} hold' if self.classes else 'it has no class folders and'
      raise MissingDataError(f'no .png/.jpg/.jpeg images under {root}: {found} no images; {layout}')
    key = (str(root.resolve()), len(self.files), verify)
    if key not in _VERIFIED:
      verify_images([f for f, _ in self.files], verify, root=root)
      _VERIFIED.add(key)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    from PIL import Image
    path, label = self.files[index]
    try:
      with Image.open(path) as img:
        image = np.asarray(img.convert('RGB'))
    except Exception as e:  # PIL raises many types for corrupt or truncated files
      raise BadDataError(f'{path} cannot be decoded ({type(e).__name__}: {e}): delete or '
                         'replace it (re-download or re-extract the data set), then rerun the '
                         'same command to resume from the last checkpoint') from e
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
      raise MissingDataError('data.name="folder" needs data.dir: pass --config.data.dir=DIR '
                             '(DIR/SPLIT/CLASS/IMAGE.png)')
    return FolderSource(os.fspath(data_config.dir), split,
                        verify=data_config.get('verify_images', 'auto'))
  raise ValueError(f"data.name must be 'fashion_mnist', 'tfds:NAME' or 'folder', got {name!r}")
