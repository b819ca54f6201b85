"""Metric sinks: DIR/metrics.jsonl, TensorBoard event files, console progress.

Only process 0 writes; other processes get a writer that does nothing.
"""
from __future__ import annotations

import json
import math
import os
import time

from absl import logging
import numpy as np


class MetricWriter:
  """Appends {'step': ..., 'train/loss': ...} lines to metrics.jsonl and TensorBoard scalars."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', buffering=1)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **clean}) + '\n')
    for k, v in clean.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """Images/s and ETA from wall time between reports (first report excludes compile)."""

  def __init__(self, total_steps: int, global_batch: int, start_step: int):
    self.total_steps, self.global_batch = total_steps, global_batch
    self._t, self._step = time.perf_counter(), start_step

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    steps = max(step - self._step, 1)
    sec_per_step = (now - self._t) / steps
    self._t, self._step = now, step
    return {'images_per_sec': self.global_batch / sec_per_step,
            'eta_sec': sec_per_step * (self.total_steps - step)}


def log_line(step: int, total: int, scalars: dict, eta_sec: float) -> None:
  parts = [f'{k.split("/")[-1]}={v:.4g}' for k, v in scalars.items()]
  eta = time.strftime('%H:%M:%S', time.gmtime(max(eta_sec, 0)))
  logging.info('step %d/%d  %s  eta %s', step, total, '  '.join(parts), eta)
