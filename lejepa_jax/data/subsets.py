"""Seeded subsets of a data source, stratified by class where the labels are known without
reading images: the evaluation caps and the diagnostics batch (`sample`)."""
from __future__ import annotations

import numpy as np


def known_labels(source) -> np.ndarray | None:
  """The int label of every record, in order, when `source` knows them without reading
  images (its `known_labels()` method), else None (a source without the method included)."""
  method = getattr(source, 'known_labels', None)
  return None if method is None else method()


def _class_shares(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """Records per class for n of sum(counts) records: the largest-remainder rounding of the
  proportional shares n * counts / sum(counts), in exact integer arithmetic.

  Equal remainders are ordered at random from rng, not by class (which would favour the
  first classes). When n >= the number of classes, a class whose share rounded to 0 gets
  one record, taken from the class furthest above its exact share (with two or more), so
  every class is present.
  """
  total = int(counts.sum())
  ties = rng.permutation(len(counts))
  share, remainder = np.divmod(n * counts.astype(np.int64), total)
  order = np.lexsort((ties, -remainder))   # largest remainder first
  share[order[:n - int(share.sum())]] += 1
  if n >= len(counts):
    for empty in np.flatnonzero(share == 0):
      surplus = share * total - n * counts             # (share - exact share) * total
      surplus[share < 2] = np.iinfo(np.int64).min      # never a donor's last record
      donor = ties[np.argmax(surplus[ties])]           # ties at random, as above
      share[donor] -= 1
      share[empty] += 1
  return share


def subset_indices(num_records: int, n: int, seed: int,
                   labels: np.ndarray | None = None) -> np.ndarray:
  """Sorted indices of n of num_records records, a pure function of the arguments.

  labels (num_records,) given: stratified, each class gets its proportional share
  (`_class_shares`: largest remainder, every class present when n >= the number of classes)
  and that many of its records are drawn at random. None: a uniform random sample without
  replacement (proportional to the classes only in expectation). All records when
  n >= num_records. Ascending, so that reads stay local on disk.
  """
  n = int(n)
  if n < 1:
    raise ValueError(f'a subset of n={n} records: n must be >= 1')
  if n >= num_records:
    return np.arange(num_records)
  rng = np.random.default_rng(seed)
  if labels is None:
    return np.sort(rng.choice(num_records, n, replace=False))
  labels = np.asarray(labels)
  if labels.shape != (num_records,):
    raise ValueError(f'labels of shape {labels.shape} for {num_records} records')
  _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  shares = _class_shares(counts, n, rng)
  by_class = np.argsort(inverse, kind='stable')     # records grouped by class
  starts = np.cumsum(counts) - counts
  picked = [rng.choice(by_class[s:s + c], k, replace=False)
            for s, c, k in zip(starts, counts, shares) if k]
  return np.sort(np.concatenate(picked))


class Subset:
  """Records `indices` of a source, read lazily (records keep their own sizes, so a folder
  of images of mixed sizes can be subset; np.stack of them could not)."""

  def __init__(self, source, indices):
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or (len(indices) and
                             not 0 <= indices.min() <= indices.max() < len(source)):
      raise IndexError(f'subset indices must be a 1-D array in [0, {len(source)})')
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    if not -len(self.indices) <= index < len(self.indices):
      raise IndexError(f'index {index} out of range for {len(self.indices)} records')
    return self.source[int(self.indices[index])]

  def known_labels(self) -> np.ndarray | None:
    labels = known_labels(self.source)
    return None if labels is None else labels[self.indices]


def sample(source, n: int, *, seed: int):
  """n records of `source` chosen by `seed` (the source itself when n >= len(source)).

  The evaluation caps (eval.max_examples, evals.NAME.max_examples) and the diagnostics batch
  use it with config.seed. The choice is `subset_indices(len(source), n, seed,
  known_labels(source))`: a pure function of the source, n and seed, so every process, any
  process count, and a resumed or re-evaluated run see the same records (with the same
  numpy version). Stratified by class where the source knows its labels without decoding
  images (Fashion-MNIST arrays, folders: from the paths), so a source stored in class order
  keeps every class; a uniform random sample where it does not (TFDS: reading each record's
  label would read the whole data set). Records stay in source order and are read lazily.
  """
  if n >= len(source):
    return source
  return Subset(source, subset_indices(len(source), n, seed, known_labels(source)))
