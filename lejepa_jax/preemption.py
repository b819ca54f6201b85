"""Preemption notices: "checkpoint and exit 0" at one point that every host agrees on.

`Watcher.poll()` is called at every training step and between the batches and
evaluators of an evaluation, on every process in the same order, and returns True at
the same call everywhere once a notice came in:

- JAX's preemption service, when it runs: `jax.distributed.initialize` starts it by
  default (TPU pods, SLURM, --coordinator_address). It takes SIGTERM (and a TPU
  maintenance notice) on any host, agrees on the sync point max(hosts' counters) + 1,
  and `multihost_utils.reached_preemption_sync_point(n)` turns True there on all
  hosts. The counter is the number of polls, which every host makes in the same order.
- Otherwise a SIGTERM handler sets a flag. One process reads it at every poll; several
  processes (service disabled) OR it across processes with an all-gather at every poll,
  so they all stop at the same one.

No host-device synchronisation here; the training loop keeps at most two steps in
flight, so a notice acts within about two steps. The loop then saves, waits for the
save and raises `Preempted`, a SystemExit with code 0, so that `python -m
lejepa_jax.main` exits 0 and a rerun on the workdir resumes.
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


class NoticeDuringEvaluation(Exception):
  """A notice came in while an evaluation ran: the evaluation is abandoned, the loop saves
  the step's checkpoint and raises Preempted."""


def _jax_service_running() -> bool:
  """True when jax.distributed runs a preemption sync manager (it owns SIGTERM then)."""
  return (jax.distributed.is_initialized() and jax.process_count() > 1 and
          bool(jax.config.jax_enable_preemption_service))


class Watcher:
  """Context manager: installs the SIGTERM handler (when JAX's service is not running)."""

  def __init__(self):
    self.source = None         # 'jax preemption service' | 'SIGTERM' | None (no notice source)
    self._flag = False
    self._previous = None
    self._polls = 0

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
    self._flag = True     # acted on at the next poll

  def poll(self) -> bool:
    """Whether to checkpoint and exit now. Every process must make the same polls in the
    same order (one per training step, and the same ones during an evaluation)."""
    self._polls += 1
    if self.source == 'jax preemption service':
      return multihost_utils.reached_preemption_sync_point(self._polls)
    if jax.process_count() == 1:
      return self._flag
    flags = multihost_utils.process_allgather(np.int32(self._flag))
    return bool(np.any(flags))
