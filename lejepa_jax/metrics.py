"""Metric sinks: DIR/metrics.jsonl, TensorBoard event files, console progress.

Only process 0 writes; other processes get a writer that does nothing. The
workdir may be local or a gs:// URL: every access goes through etils.epath.
"""
from __future__ import annotations

import json
import math
import time

from absl import logging
from etils import epath
import numpy as np


class MetricWriter:
  """Appends {'step': ..., 'train/loss': ...} lines to metrics.jsonl and TensorBoard scalars.

  Object stores cannot append, so on a URL workdir the file is rewritten whole
  (it stays small: one line per logged step).
  """

  def __init__(self, workdir, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._path = workdir / 'metrics.jsonl'
    self._appendable = '://' not in str(workdir)
    self._lines = [] if self._appendable or not self._path.exists() else \
        self._path.read_text().splitlines(keepends=True)
    if tensorboard:
      from tensorboardX import SummaryWriter  # gs:// needs google-cloud-storage (the tpu extra)
      self._tb = SummaryWriter(logdir=str(workdir), flush_secs=30)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    line = json.dumps({'step': int(step), **clean}) + '\n'
    if self._appendable:
      with self._path.open('a') as f:
        f.write(line)
    else:
      self._lines.append(line)
      self._path.write_text(''.join(self._lines))
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
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
