"""Metric sinks: DIR/metrics.jsonl, TensorBoard event files, console progress.

Only process 0 writes; other processes get a writer that does nothing. The
workdir may be local or a gs:// URL: every access goes through etils.epath.
"""
from __future__ import annotations

import contextlib
import json
import math
import time

from absl import logging
from etils import epath
import numpy as np

from lejepa_jax import workdir as workdir_lib


class MetricWriter:
  """Appends {'step': ..., 'train/loss': ...} lines to metrics.jsonl and TensorBoard scalars.

  Object stores cannot append, so on a URL workdir the file is rewritten whole
  (it stays small: one line per logged step).

  A run resumed from the checkpoint of step S logs steps S+1... again, so `resume(S)`
  first drops the lines with step > S that the interrupted run had
  written after that checkpoint, keeping every line up to S (and any line that is not a
  JSON object with a step; a last line cut short by a kill goes too), and has TensorBoard
  purge its events after S.
  """

  def __init__(self, workdir, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._tb = None
    self._tensorboard = tensorboard
    self._purge_step = None
    if not enabled:
      return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._workdir = workdir
    self._path = workdir / workdir_lib.METRICS_FILE
    self._appendable = '://' not in str(workdir)
    self._lines = [] if self._appendable or not self._path.exists() else \
        self._path.read_text().splitlines(keepends=True)

  def resume(self, step: int) -> int:
    """Drops the lines with step > `step` (a resumed run writes them again); returns how many.

    The file is rewritten only when something is dropped: atomically (a temporary file
    renamed over it) on a local workdir, whole on a URL one.
    """
    if not self.enabled:
      return 0
    self._purge_step = int(step) + 1
    lines = self._lines if not self._appendable else (
        self._path.read_text().splitlines(keepends=True) if self._path.exists() else [])
    kept = [line for line in lines if not _after(line, step)]
    if kept and not kept[-1].endswith('\n') and not _parses(kept[-1]):
      # Cut short by a kill while writing: lines precede the save of their step, so that
      # step was not checkpointed and this run logs it again.
      kept.pop()
    dropped = len(lines) - len(kept)
    if kept and not kept[-1].endswith('\n'):
      kept[-1] += '\n'     # the next append starts a new line
    if kept != lines:
      if self._appendable:
        tmp = self._path.parent / (self._path.name + '.tmp')
        tmp.write_text(''.join(kept))
        tmp.replace(self._path)
      else:
        self._lines = kept
        self._path.write_text(''.join(kept))
    if dropped:
      logging.info('%s: dropped %d lines past step %d (the resumed run logs them again)',
                   self._path, dropped, step)
    return dropped

  def _tensorboard_writer(self):
    if self._tb is None and self._tensorboard:
      from tensorboardX import SummaryWriter  # gs:// needs google-cloud-storage (the tpu extra)
      # purge_step: TensorBoard hides the events of the interrupted run from there on.
      self._tb = SummaryWriter(logdir=str(self._workdir), flush_secs=30,
                               purge_step=self._purge_step)
    return self._tb

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
    tb = self._tensorboard_writer()
    if tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _parses(line: str) -> bool:
  try:
    json.loads(line)
  except ValueError:
    return False
  return True


def _after(line: str, step: int) -> bool:
  """Whether a metrics.jsonl line is a record of a step later than `step`."""
  try:
    record = json.loads(line)
  except ValueError:
    return False
  return isinstance(record, dict) and isinstance(record.get('step'), int) and record['step'] > step


class Progress:
  """Images/s, seconds per step, data-wait fraction and ETA from wall time between reports.

  `waited(seconds)` adds time the loop spent blocked on the data (iterator and
  host-to-device copy); time inside `paused()` (evaluation) counts as neither.
  """

  def __init__(self, total_steps: int, global_batch: int, start_step: int):
    self.total_steps, self.global_batch = total_steps, global_batch
    self._t, self._step, self._wait = time.perf_counter(), start_step, 0.0

  def waited(self, seconds: float) -> None:
    self._wait += seconds

  @contextlib.contextmanager
  def paused(self):
    t = time.perf_counter()
    try:
      yield
    finally:
      self._t += time.perf_counter() - t

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    steps = max(step - self._step, 1)
    wall = max(now - self._t, 1e-9)
    sec_per_step = wall / steps
    wait = min(self._wait / wall, 1.0)
    self._t, self._step, self._wait = now, step, 0.0
    return {'images_per_sec': self.global_batch / sec_per_step, 'step_seconds': sec_per_step,
            'data_wait_fraction': wait, 'eta_sec': sec_per_step * (self.total_steps - step)}


def log_line(step: int, total: int, scalars: dict, eta_sec: float) -> None:
  parts = [f'{k.split("/")[-1]}={v:.4g}' for k, v in scalars.items()]
  eta = time.strftime('%H:%M:%S', time.gmtime(max(eta_sec, 0)))
  logging.info('step %d/%d  %s  eta %s', step, total, '  '.join(parts), eta)
