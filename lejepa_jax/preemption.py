"""Preemption notices: "checkpoint and exit 0" at one step that every host agrees on.

`Watcher.reached(step)` is called once per training step on every process and is True
at the same step everywhere once a notice came in:

- JAX's preemption service, when it runs: `jax.distributed.initialize` starts it by
  default (TPU pods, SLURM, --coordinator_address). It takes SIGTERM (and a TPU
  maintenance notice) on any host, agrees on the step max(hosts' steps) + 1, and
  `multihost_utils.reached_preemption_sync_point(step)` turns True there on all hosts.
- Otherwise a SIGTERM handler sets a flag. One process reads it every step; several
  processes (service disabled) OR it across processes with an all-gather at steps that
  are multiples of `check_every`, so they all stop at the same one.

No per-step host-device synchronisation either way. The training loop then saves,
waits for the save and raises `Preempted`, a SystemExit with code 0, so that
`python -m lejepa_jax.main` exits 0 and a rerun on the workdir resumes.
"""
from __future__ import annotations

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is written; exit status 0."""

  def __init__(self, step: int, message: str):
    super().__init__(0)
    self.step = step
    self.message = message

  def __str__(self) -> str:
    return self.message


def _jax_service_running() -> bool:
  """True when jax.distributed runs a preemption sync manager (it owns SIGTERM then)."""
  try:
    from jax._src import distributed  # the public API exposes no "is it on?" query
  except ImportError:
    return False
  state = getattr(distributed, 'global_state', None)
  return (getattr(state, 'client', None) is not None and
          getattr(state, 'preemption_sync_manager', None) is not None)


class Watcher:
  """Context manager: installs the SIGTERM handler (when JAX's service is not running)."""

  def __init__(self, check_every: int = 1):
    self.check_every = max(1, int(check_every))
    self.source = None         # 'jax preemption service' | 'SIGTERM' | None (no notice source)
    self._flag = False
    self._previous = None

  def __enter__(self) -> Watcher:
    if _jax_service_running():
      self.source = 'jax preemption service'
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self.source = 'SIGTERM'
    else:
      logging.warning('not in the main thread: SIGTERM cannot be caught, so a preemption '
                      'notice will kill the run (it resumes from the last checkpoint)')
    logging.info('preemption notices: %s', self.source)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._flag = True     # acted on at the next step boundary

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and exit after `step` (call at every step, on every process)."""
    if self.source == 'jax preemption service':
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() == 1:
      return self._flag
    if step % self.check_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self._flag))
    return bool(np.any(flags))
