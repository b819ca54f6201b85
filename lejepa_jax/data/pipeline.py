"""Grain pipelines: multi-crop training batches and plain evaluation batches.

Both read ONE global order of records that does not depend on the number of
processes: a global batch is G = process_count * local_batch_size consecutive
records of it, and process p takes rows [p*L, (p+1)*L) of every global batch.
So the concatenation of all processes' batches at a step is exactly the batch
one process would read with local_batch_size G. Here "process" means a block of the
batch (`sharding.batch_feed`): processes that hold the same rows of the mesh (replicas
along 'tensor') pass the same block index and read identical records.

Training: source -> shuffle (reshuffled every epoch) -> repeat -> multi-crop
random_map keyed on the global position (uint8 crops and the views' random draws)
-> batch(L) -> every process_count-th batch from process_index -> the photometric
steps on the whole batch (float32 views). The stream starts at global batch `start_batch`: the
checkpoint stores that position once (not per process), so a run resumed on any
number of processes sees exactly the batches it would have seen.

Evaluation: records in source order, each once, the last global batch padded
with zeros (mask 0); every process yields ceil(N / G) batches.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import numpy as np

from lejepa_jax import config_schema
from lejepa_jax.data import augment
from lejepa_jax.data import host_resources


@dataclasses.dataclass(frozen=True)
class MultiCrop:
  """Grain random map, per record: uint8 crops of every view and their photometric draws.

  record -> {'global': uint8 (Vg,S,S,C), 'local': uint8 (Vl,s,s,C), 'global_draws',
  'local_draws', 'label'}; `FinishViews` turns a batch of these into float32 views.
  """
  num_global: int
  num_local: int
  global_view: augment.ViewSpec
  local_view: augment.ViewSpec
  spec: augment.AugmentSpec

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    image = record['image']
    (g, g_draws), (l, l_draws) = augment.crop_views(
        rng, image, [(self.global_view, self.num_global), (self.local_view, self.num_local)],
        self.spec)
    return {'global': g, 'global_draws': g_draws, 'local': l, 'local_draws': l_draws,
            'label': np.int32(record['label'])}


@dataclasses.dataclass(frozen=True)
class FinishViews:
  """Grain map, per batch: the photometric steps on all views of the batch at once.

  {'global': uint8 (B,Vg,S,S,C), 'global_draws', ...} -> {'global': float32 (B,Vg,S,S,C),
  'local': float32 (B,Vl,s,s,C), 'label'}.
  """
  spec: augment.AugmentSpec

  def __call__(self, batch: dict) -> dict:
    return {'global': augment.finish_views(batch['global'], batch['global_draws'], self.spec),
            'local': augment.finish_views(batch['local'], batch['local_draws'], self.spec),
            'label': batch['label']}


def augment_record(record: dict, rng: np.random.Generator, data_config) -> dict:
  """One record's float32 views, as the training pipeline makes them (a batch of one)."""
  crops = multi_crop(data_config)(record, rng)
  batch = {k: (np.asarray(v)[None] if not isinstance(v, dict) else
               {dk: dv[None] for dk, dv in v.items()}) for k, v in crops.items()}
  finished = FinishViews(augment_spec(data_config))(batch)
  return {k: v[0] for k, v in finished.items()}


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
                  process_index: int = 0, process_count: int = 1,
                  start_batch: int = 0) -> grain.IterDataset:
  """Infinite multi-crop batches: this process's rows of each global batch from `start_batch` on.

  process_index / process_count: this process's block of the batch and the number of
  blocks (`sharding.batch_feed(mesh)`: the process index and count unless replicas along
  'tensor' span processes).
  """
  data_config = config_schema.resolve(data_config, 'data')
  global_batch = process_count * local_batch_size
  if len(source) < global_batch:
    raise ValueError(f'data set of {len(source)} records is smaller than one global batch of '
                     f'{global_batch} ({process_count} processes x {local_batch_size}): lower '
                     f'batch_size or use a bigger data set')
  # ds.seed hashes `seed` into distinct seeds for shuffle and random_map. Passing `seed` to
  # shuffle directly would make run s's epoch e + 1 repeat run s + 1's epoch e (it reseeds
  # with seed + epoch).
  ds = grain.MapDataset.source(source).seed(seed).shuffle()
  # Indices past the shuffle are global positions: the shuffle reads the epoch off them (a
  # new order every epoch) and batches run on across epoch boundaries.
  ds = ds.repeat(None, reseed_each_epoch=True)
  # The augmentation rng is keyed on the global position, so it is the same whichever
  # process reads the record, and differs between processes' rows.
  ds = ds.random_map(multi_crop(data_config))
  # Lazy on the MapDataset: this process only reads and augments its own batches.
  ds = ds.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
  if start_batch:
    ds = ds[start_batch:]    # a resumed run: the global position, the same for any process count
  # Photometric steps vectorised over the batch (augment.py: NumPy overhead once per batch).
  ds = ds.map(FinishViews(augment_spec(data_config)))
  # 'auto' or capped at this process's cores (host_resources: one process per GPU shares a node).
  threads, workers = host_resources.grain_options(data_config)
  read = grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=data_config.prefetch)
  ds = ds.to_iter_dataset(read)
  if workers:
    # Workers take batches w::workers of this stream and interleave them back in order.
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


@dataclasses.dataclass(frozen=True)
class EvalSlot:
  """Slot k of this process's eval stream -> its preprocessed record, or padding past the end."""
  source: object
  preprocess: EvalPreprocess
  local_batch_size: int
  process_index: int
  process_count: int
  channels: int

  def __call__(self, k: int) -> dict:
    b, row = divmod(k, self.local_batch_size)
    index = (b * self.process_count + self.process_index) * self.local_batch_size + row
    if index >= len(self.source):
      size = self.preprocess.size
      return {'image': np.zeros((size, size, self.channels), np.float32),
              'label': np.int32(0), 'mask': np.float32(0)}
    return {**self.preprocess(self.source[index]), 'mask': np.float32(1)}


def eval_batches(source, data_config, *, local_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """This process's rows of the global eval batches: every record once, in source order.

  Global batch b holds records [b*G, (b+1)*G), G = process_count * local_batch_size, and
  process p gets rows [p*L, (p+1)*L) of it. 'mask' is 1 for real records, 0 for the zero
  padding past the end. Every process yields ceil(N / G) batches (global arrays need it).
  """
  data_config = config_schema.resolve(data_config, 'data')
  num_batches = -(-len(source) // (process_count * local_batch_size))
  preprocess = EvalPreprocess(data_config.global_size, augment_spec(data_config),
                              data_config.eval_crop_fraction)
  slot = EvalSlot(source, preprocess, local_batch_size, process_index, process_count,
                  data_config.channels)
  # Lazy: only this process's records are read and preprocessed, by Grain threads.
  ds = grain.MapDataset.range(num_batches * local_batch_size).map(slot)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  threads, _ = host_resources.grain_options(data_config, worker_processes=False)
  yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2))
