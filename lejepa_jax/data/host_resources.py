"""Grain worker processes and read threads that fit the CPU cores of THIS process.

`data.num_workers` and `data.num_threads` may be 'auto': they then follow the cores this
process may use, not the machine's. Under SLURM with one process per GPU
(launch/slurm_gpu.sh) eight processes share a node, so a fixed 32 workers per process
would start 256 worker processes on it.

This process's cores (`process_cores`):
  - SLURM_CPUS_PER_TASK, when set (bounded by the CPU affinity);
  - else the CPU affinity (`os.sched_getaffinity`: SLURM's and cgroups' CPU binding show
    there), divided among the processes of this host when they cannot each own that many
    cores (affinity x local processes > the host's cores: the affinity is shared, not bound
    per process). Local processes: SLURM_STEP_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE,
    OMPI_COMM_WORLD_LOCAL_SIZE or LOCAL_WORLD_SIZE.

'auto' (`choose`), for C cores: worker processes C - 1 (one core stays with the main
process, which feeds the devices; at most 32: each worker holds a copy of the pipeline),
none below 4 cores; read threads: C without workers, else max(2, C // workers) per worker
(at most 16; two overlap a read with the augmentation of another record). Explicit numbers
are kept, but capped at C with a warning.

`process_cores` and `choose` are pure; `grain_options` reads this process's affinity and
environment and logs the choice once.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from absl import logging

from lejepa_jax import config_schema

AUTO = 'auto'
MAX_AUTO_WORKERS = 32      # the per-host number configs/vitg.py had before 'auto'
MAX_AUTO_THREADS = 16
MIN_CORES_FOR_WORKERS = 4  # below: threads only (the main process needs a core of its own)
LOCAL_PROCESS_KEYS = ('SLURM_STEP_TASKS_PER_NODE', 'SLURM_NTASKS_PER_NODE',
                      'OMPI_COMM_WORLD_LOCAL_SIZE', 'LOCAL_WORLD_SIZE')


@dataclasses.dataclass(frozen=True)
class Workers:
  num_workers: int
  num_threads: int
  cores: int                 # cores this process may use
  reason: str                # where `cores` comes from
  warnings: tuple = ()       # explicit values that were capped

  def describe(self, what: str = 'data workers') -> str:
    return (f'{what}: {self.num_workers} worker processes x {self.num_threads} threads '
            f'(this process has {self.cores} cores: {self.reason})')


def as_count(value) -> int | None:
  """An int (or its decimal string: --config.KEY=8 on an 'auto' key gives '8'), else None."""
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, str) and value.strip().isdigit():
    return int(value)
  return None


def is_auto(value) -> bool:
  return isinstance(value, str) and value.strip().lower() == AUTO


def problems(data_config) -> list[str]:
  """Bad values of data.num_workers / data.num_threads, one message each."""
  out = []
  data_config = config_schema.resolve(data_config, 'data')
  for key, minimum in (('num_workers', 0), ('num_threads', 1)):
    value = data_config[key]
    count = as_count(value)
    if not is_auto(value) and (count is None or count < minimum):
      out.append(f"data.{key}={value!r}: 'auto' (from this process's CPU cores) or an integer "
                 f'>= {minimum}: set --config.data.{key}=auto')
  return out


def _tasks_on_this_node(value: str, node_id) -> int | None:
  """SLURM's '8', '8(x4)' or '2,1(x3)' -> this node's task count (the largest if unknown)."""
  counts = []
  try:
    for part in value.split(','):
      n, _, repeat = part.partition('(x')
      counts += [int(n)] * (int(repeat.rstrip(')')) if repeat else 1)
  except ValueError:
    return None
  node = as_count(node_id)
  if node is not None and node < len(counts):
    return counts[node]
  return max(counts) if counts else None


def local_processes(env: Mapping[str, str]) -> tuple[int, str] | None:
  """(processes on this host, the variable that says so), or None when nothing says."""
  for key in LOCAL_PROCESS_KEYS:
    value = env.get(key)
    if value:
      n = _tasks_on_this_node(value, env.get('SLURM_NODEID'))
      if n and n > 0:
        return n, f'{key}={value}'
  return None


def process_cores(affinity: int, host_cores: int, env: Mapping[str, str]) -> tuple[int, str]:
  """(cores this process may use, why): see the module docstring."""
  affinity, host_cores = max(1, affinity), max(1, host_cores or affinity)
  per_task = as_count(env.get('SLURM_CPUS_PER_TASK'))
  if per_task:
    if affinity < per_task:
      return affinity, f'SLURM_CPUS_PER_TASK={per_task}, CPU affinity {affinity}'
    return per_task, f'SLURM_CPUS_PER_TASK={per_task}'
  local = local_processes(env)
  # Processes bound to disjoint cores have affinity x count <= host cores; more means they
  # all see the same (shared) cores.
  if local and local[0] > 1 and affinity * local[0] > host_cores:
    n, source = local
    return max(1, affinity // n), f'{affinity} CPUs shared by {n} processes on this host ({source})'
  if affinity < host_cores:
    return affinity, f'CPU affinity {affinity} of the {host_cores} cores of this host'
  return affinity, f'all {host_cores} cores of this host'


def choose(num_workers, num_threads, *, cores: int, reason: str,
           worker_processes: bool = True) -> Workers:
  """Resolves 'auto' and caps explicit values at `cores`.

  worker_processes=False: a pipeline that runs in this process only (evaluation): no workers,
  and 'auto' threads are all the cores.
  """
  cores = max(1, cores)
  warnings = []

  def capped(key, value):
    count = as_count(value)
    if count is None or count < (1 if key == 'num_threads' else 0):
      raise ValueError(problems({key: value})[0])
    if count > cores:
      warnings.append(f'data.{key}={count} is more than the {cores} cores of this process '
                      f'({reason}): using {cores}; set --config.data.{key}=auto, or at most '
                      f'{cores}')
      return cores
    return count

  workers = 0
  if worker_processes and is_auto(num_workers):
    workers = 0 if cores < MIN_CORES_FOR_WORKERS else min(cores - 1, MAX_AUTO_WORKERS)
  elif worker_processes:
    workers = capped('num_workers', num_workers)
  if is_auto(num_threads):
    threads = min(cores if not workers else max(2, cores // workers), MAX_AUTO_THREADS)
  else:
    threads = capped('num_threads', num_threads)
  return Workers(workers, threads, cores, reason, tuple(warnings))


def this_process_cores() -> tuple[int, str]:
  """`process_cores` of this process (its affinity, the host's cores and os.environ)."""
  host = os.cpu_count() or 1
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:   # macOS has no sched_getaffinity
    affinity = host
  return process_cores(affinity, host, os.environ)


_logged: set = set()


def grain_options(data_config, *, worker_processes: bool = True) -> tuple[int, int]:
  """(num_threads, num_workers) for Grain from data.num_threads / data.num_workers; the
  choice is logged once (the capped values as warnings)."""
  cores, reason = this_process_cores()
  data_config = config_schema.resolve(data_config, 'data')
  w = choose(data_config.num_workers, data_config.num_threads, cores=cores, reason=reason,
             worker_processes=worker_processes)
  what = 'data workers' if worker_processes else 'evaluation data workers'
  for line in w.warnings + (w.describe(what),):
    if line not in _logged:
      _logged.add(line)
      (logging.warning if line in w.warnings else logging.info)(line)
  return w.num_threads, w.num_workers
