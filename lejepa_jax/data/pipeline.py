"""Grain pipelines: multi-crop training batches and plain evaluation batches.

Training: source -> per-process shard -> shuffle (reshuffled every epoch) ->
repeat -> multi-crop random_map -> batch. The iterator is a Grain
DatasetIterator whose state (a position, a few bytes) is checkpointed with the
train state, so a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import numpy as np

from lejepa_jax.data import augment


@dataclasses.dataclass(frozen=True)
class MultiCrop:
  """Grain random map: record -> {'global': (Vg,S,S,C), 'local': (Vl,s,s,C), 'label'}."""
  num_global: int
  num_local: int
  global_view: augment.ViewSpec
  local_view: augment.ViewSpec
  spec: augment.AugmentSpec

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    image = record['image']
    views = {
        'global': np.stack([augment.augment_view(rng, image, self.global_view, self.spec)
                            for _ in range(self.num_global)]),
        'label': np.int32(record['label']),
    }
    local = [augment.augment_view(rng, image, self.local_view, self.spec)
             for _ in range(self.num_local)]
    c = image.shape[-1]
    views['local'] = (np.stack(local) if local else
                      np.zeros((0, self.local_view.size, self.local_view.size, c), np.float32))
    return views


def augment_spec(data_config) -> augment.AugmentSpec:
  a = data_config.augment
  return augment.AugmentSpec(
      flip_prob=a.flip_prob, jitter_prob=a.jitter_prob, brightness=a.brightness,
      contrast=a.contrast, saturation=a.saturation, hue=a.hue,
      grayscale_prob=a.grayscale_prob, blur_prob=a.blur_prob, blur_sigma=tuple(a.blur_sigma),
      solarize_prob=a.solarize_prob, mean=tuple(data_config.mean), std=tuple(data_config.std))


def multi_crop(data_config) -> MultiCrop:
  d = data_config
  return MultiCrop(
      num_global=d.num_global_views, num_local=d.num_local_views,
      global_view=augment.ViewSpec(d.global_size, tuple(d.global_scale)),
      local_view=augment.ViewSpec(d.local_size, tuple(d.local_scale)),
      spec=augment_spec(d))


def train_dataset(source, data_config, *, seed: int, local_batch_size: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Infinite multi-crop batches of this process's shard of `source`."""
  if len(source) < process_count * local_batch_size:
    raise ValueError(f'data set of {len(source)} records is smaller than one global batch '
                     f'({process_count} x {local_batch_size})')
  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(multi_crop(data_config), seed=seed + 1)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  read = grain.ReadOptions(num_threads=data_config.get('num_threads', 2),
                           prefetch_buffer_size=data_config.get('prefetch', 4))
  ds = ds.to_iter_dataset(read)
  workers = data_config.get('num_workers', 0)
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


@dataclasses.dataclass(frozen=True)
class EvalPreprocess:
  size: int
  spec: augment.AugmentSpec
  crop_fraction: float = 1.0

  def __call__(self, record: dict) -> dict:
    return {'image': augment.eval_view(record['image'], self.size, self.spec, self.crop_fraction),
            'label': np.int32(record['label'])}


def _pad(batch: dict, size: int) -> dict:
  n = len(batch['label'])
  padded = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}
  padded['mask'] = (np.arange(size) < n).astype(np.float32)
  return padded


def eval_batches(source, data_config, *, local_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """This process's share of `source`, every record once, in fixed-size batches.

  The last batches are padded; 'mask' is 1 for real records, 0 for padding.
  Every process yields the same number of batches (global arrays need it).
  """
  n = len(source)
  per_process = -(-n // process_count)
  num_batches = -(-per_process // local_batch_size)
  start, stop = min(process_index * per_process, n), min((process_index + 1) * per_process, n)
  preprocess = EvalPreprocess(data_config.global_size, augment_spec(data_config),
                              data_config.get('eval_crop_fraction', 1.0))
  ds = grain.MapDataset.source(source)[start:stop].map(preprocess)
  ds = ds.batch(local_batch_size, drop_remainder=False)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.get('num_threads', 2),
                                            prefetch_buffer_size=2))
  emitted = 0
  for batch in ds:
    emitted += 1
    yield _pad(batch, local_batch_size)
  size = data_config.global_size
  empty = {'image': np.zeros((0, size, size, data_config.channels), np.float32),
           'label': np.zeros((0,), np.int32)}
  for _ in range(num_batches - emitted):
    yield _pad(empty, local_batch_size)
