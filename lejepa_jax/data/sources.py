"""Random-access data sources yielding {'image': uint8 (H, W, C), 'label': int}.

- 'fashion_mnist': the IDX files of the Debian package dataset-fashion-mnist
  (or any directory holding the four *-idx?-ubyte[.gz] files);
- 'tfds:NAME': `tfds.data_source` over a prepared TFDS directory (ImageNet at
  scale; array_record files, random access, no TensorFlow graph);
- 'folder': DIR/SPLIT/CLASS/*.{png,jpg,jpeg}, converted to data.channels (1 or 3); with
  data.labels='none' every image under DIR/SPLIT (or DIR), at any depth, unlabelled;
- 'arrays': DIR/SPLIT.npz (uint8 'images' (N, H, W[, C]), optional int 'labels' (N,)) or
  DIR/SPLIT.npy (images only; memory-mapped).

Unlabelled records (data.labels='none', a .npy file, an .npz without labels, TFDS with
data.label_key='') carry label -1 and the source's `labelled` is False: pretraining and
the diagnostics need no labels; the online probe skips label -1 and the evaluators refuse
an unlabelled source.

A source may have `known_labels()`: the int label of every record when it knows them
without reading images (Fashion-MNIST, folders), else None (TFDS); `sample` uses them to
draw stratified subsets (the evaluation caps and the diagnostics batch).

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

from lejepa_jax import config_schema

# Seeded subsets of a source (evaluation caps, the diagnostics batch): lejepa_jax/data/subsets.py,
# re-exported here where callers found them first.
from lejepa_jax.data.subsets import Subset, known_labels, sample, subset_indices  # noqa: F401

NAMES = "'fashion_mnist', 'tfds:NAME', 'folder' or 'arrays'"


def known_name(name) -> bool:
  """Whether `name` is a data.name that `open_source` reads (NAMES)."""
  return name in ('fashion_mnist', 'folder', 'arrays') or str(name).startswith('tfds:')


def image_channels(source) -> int | None:
  """Channels of a source's first image (None: the source has no records)."""
  if not len(source):
    return None
  image = np.asarray(source[0]['image'])
  return image.shape[-1] if image.ndim == 3 else 1
LABELS = ('auto', 'none')
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


UNLABELLED = -1     # the label of a record whose source has none


class ArraySource:
  """In-memory (or memory-mapped) images (N, H, W, C) uint8 and labels (N,); labels None:
  unlabelled (every record's label is UNLABELLED)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None):
    if images.ndim == 3:
      images = images[..., None]
    self.labelled = labels is not None
    if labels is None:
      labels = np.full(len(images), UNLABELLED, np.int32)
    if len(images) != len(labels):
      raise ValueError(f'{len(images)} images but {len(labels)} labels')
    self.images = images if isinstance(images, np.memmap) else np.ascontiguousarray(images)
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {'image': self.images[index], 'label': int(self.labels[index])}

  def known_labels(self) -> np.ndarray | None:
    return self.labels if self.labelled else None


def arrays(data_dir: str, split: str, labelled: bool = True) -> ArraySource:
  """DIR/SPLIT.npz ('images', optional 'labels') or DIR/SPLIT.npy (images, memory-mapped)."""
  base = pathlib.Path(data_dir) / split
  layout = ('expected data.dir/SPLIT.npz (uint8 "images" (N, H, W[, C]), optional "labels" '
            '(N,)) or data.dir/SPLIT.npy (images only)')
  try:
    if base.with_suffix('.npz').exists():
      with np.load(base.with_suffix('.npz')) as f:
        if 'images' not in f.files:
          raise BadDataError(f'{base}.npz holds {f.files}, no "images" array; {layout}')
        images = f['images']
        labels = f['labels'] if labelled and 'labels' in f.files else None
    elif base.with_suffix('.npy').exists():
      images, labels = np.load(base.with_suffix('.npy'), mmap_mode='r'), None
    else:
      raise MissingDataError(f'neither {base}.npz nor {base}.npy exists; {layout}')
  except DataError:
    raise
  except (OSError, ValueError) as e:    # not a NumPy file, truncated, pickled objects
    raise BadDataError(f'{base}.np[yz] cannot be read ({type(e).__name__}: {e}); {layout}') from None
  if images.dtype != np.uint8 or images.ndim not in (3, 4) or not len(images):
    raise BadDataError(f'{base}: images of dtype {images.dtype} and shape {images.shape}; '
                       f'{layout}')
  if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in 'iu'):
    raise BadDataError(f'{base}.npz: labels of dtype {labels.dtype} and shape {labels.shape} '
                       f'for {len(images)} images; {layout}')
  return ArraySource(images, labels)


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
    self.labelled = bool(label_key)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    image = np.asarray(record[self._image_key])
    if image.ndim == 2:
      image = image[..., None]
    label = int(record[self._label_key]) if self.labelled else UNLABELLED
    return {'image': image, 'label': label}

  def known_labels(self) -> None:
    return None       # each record would be read (and its image decoded) to get its label


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


FOLDER_CHANNELS = {1: 'L', 3: 'RGB'}   # data.channels -> the PIL mode images are converted to
_16_BIT_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


def load_image(path, channels: int = 3, resize_shorter: int = 0) -> np.ndarray:
  """The uint8 (H, W, channels) pixels of an image file, whatever its mode.

  channels 1: PIL's `convert('L')` (ITU-R 601-2 luma of RGB); 3: `convert('RGB')` (a
  grayscale image repeated). Alpha is dropped, as PIL's convert does (RGBA, LA and palette
  images with transparency keep the colours of transparent pixels); palettes are looked up.
  16-bit grayscale PNGs (which PIL's convert would clip at 255) keep their high byte, as PIL
  does for 16-bit RGB PNGs. resize_shorter > 0 resizes (bilinear, antialiased) so that the
  shorter side has that many pixels, the aspect ratio kept; 0 keeps the stored size (the
  crops of the pipeline resize any size).
  """
  from PIL import Image
  mode = FOLDER_CHANNELS[channels]
  with Image.open(path) as img:
    if resize_shorter and img.format == 'JPEG':
      # DCT-domain downscaling while decoding, never below the target size: large photos
      # decode several times faster.
      scale = resize_shorter / min(img.size)
      img.draft(mode, (max(1, int(img.size[0] * scale)), max(1, int(img.size[1] * scale))))
    if img.mode in _16_BIT_MODES:
      high = (np.clip(np.asarray(img, np.int64), 0, 65535) >> 8).astype(np.uint8)
      img = Image.fromarray(high, 'L').convert(mode)
    elif img.mode == 'P' and 'transparency' in img.info:
      img = img.convert('RGBA').convert(mode)   # what convert(mode) gives, without its warning
    else:
      img = img.convert(mode)
    if resize_shorter and min(img.size) != resize_shorter:
      w, h = img.size
      scale = resize_shorter / min(w, h)
      size = ((resize_shorter, max(1, round(h * scale))) if w <= h else
              (max(1, round(w * scale)), resize_shorter))
      img = img.resize(size, Image.Resampling.BILINEAR)
    image = np.asarray(img)
  return image[..., None] if image.ndim == 2 else image


class FolderSource:
  """DIR/SPLIT/CLASS/*.{png,jpg,jpeg}, classes in sorted order.

  Every image comes out as uint8 (H, W, channels) (1: grayscale, 3: RGB; any PIL mode is
  converted, see `load_image`), so a folder of mixed grayscale, RGB, RGBA and palette
  files feeds a config of either channel count. Sizes may differ: the pipeline crops and
  resizes each image before batching (resize_shorter > 0 also resizes them on loading).
  Every file (or a sample, see the module docstring) is checked with `Image.verify()` when
  the source is built; `verify` is one of VERIFY_MODES.
  """

  def __init__(self, data_dir: str, split: str, verify: str = 'auto', *, channels: int = 3,
               resize_shorter: int = 0, labelled: bool = True):
    if channels not in FOLDER_CHANNELS:
      raise BadDataError(f'data.channels={channels}: images of a folder are converted to 1 '
                         '(grayscale) or 3 (RGB) channels: set --config.data.channels=1 or 3, '
                         'with as many values in data.mean and data.std')
    if resize_shorter < 0:
      raise BadDataError(f'resize_shorter={resize_shorter}: must be >= 0 (0: keep the size)')
    self.channels, self.resize_shorter = channels, int(resize_shorter)
    self.labelled = labelled
    root = pathlib.Path(data_dir) / split
    if labelled:
      layout = (f'expected data.dir/{split}/CLASS/IMAGE.{{png,jpg,jpeg}}, one folder per class: '
                "fix --config.data.dir or the folder layout (data.labels='none' reads a folder "
                'without classes)')
      if not root.is_dir():
        raise MissingDataError(f'image folder {root} does not exist; {layout}')
      self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
      self.files = [(f, i) for i, c in enumerate(self.classes)
                    for f in sorted((root / c).iterdir())
                    if f.suffix.lower() in _IMAGE_SUFFIXES]
    else:                 # any depth; DIR itself when it has no SPLIT folder (one pool)
      root = root if root.is_dir() else pathlib.Path(data_dir)
      layout = (f'expected .png/.jpg/.jpeg files at any depth under data.dir/{split} or '
                'data.dir: fix --config.data.dir')
      if not root.is_dir():
        raise MissingDataError(f'image folder {root} does not exist; {layout}')
      self.classes = []
      self.files = [(f, UNLABELLED) for f in sorted(root.rglob('*'))
                    if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file()]
    self._labels = np.array([i for _, i in self.files], np.int32)
    self._labels.flags.writeable = False     # shared with every caller of known_labels
    if not self.files:
      found = ('' if not labelled else f'class folders {self.classes[:5]} hold no images; '
               if self.classes else 'it has no class folders; ')
      raise MissingDataError(f'no .png/.jpg/.jpeg images under {root}: {found}{layout}')
    key = (str(root.resolve()), len(self.files), verify)
    if key not in _VERIFIED:
      verify_images([f for f, _ in self.files], verify, root=root)
      _VERIFIED.add(key)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    path, label = self.files[index]
    try:
      image = load_image(path, self.channels, self.resize_shorter)
    except Exception as e:  # PIL raises many types for corrupt or truncated files
      raise BadDataError(f'{path} cannot be decoded ({type(e).__name__}: {e}): delete or '
                         'replace it (re-download or re-extract the data set), then rerun the '
                         'same command to resume from the last checkpoint') from e
    return {'image': image, 'label': label}

  def known_labels(self) -> np.ndarray | None:
    return self._labels if self.labelled else None     # from the paths: no image is read


def get_source(data_config, split: str):
  """The source named by data_config.name for `split`."""
  data_config = config_schema.resolve(data_config, 'data')
  name, data_dir = data_config.name, data_config.dir or None
  labelled = data_config.labels != 'none'
  if name == 'fashion_mnist':
    source = fashion_mnist(data_dir, split)
    return source if labelled else ArraySource(source.images, None)
  if name.startswith('tfds:'):
    return TfdsSource(name[len('tfds:'):], split, data_dir, data_config.image_key,
                      data_config.label_key if labelled else '')
  if name in ('folder', 'arrays') and not data_dir:
    raise MissingDataError(f'data.name="{name}" needs data.dir: pass --config.data.dir=DIR '
                           f'({"DIR/SPLIT/CLASS/IMAGE.png" if name == "folder" else "DIR/SPLIT.npz"})')
  if name == 'folder':
    return FolderSource(os.fspath(data_dir), split, verify=data_config.verify_images,
                        channels=data_config.channels,
                        resize_shorter=data_config.resize_shorter, labelled=labelled)
  if name == 'arrays':
    return arrays(os.fspath(data_dir), split, labelled)
  raise ValueError(f'data.name must be {NAMES}, got {name!r}')
