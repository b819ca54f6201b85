"""A few minutes on the real slice, before the long job: what the CPU suite proves by
simulation (gloo processes, simulated devices), checked on the hardware the run will use.

    python -m lejepa_jax.selftest --config=configs/vitg.py --workdir=gs://bucket/run
    python -m lejepa_jax.selftest --config=configs/vitg.py:runlocal --workdir=/tmp/st --cpu_devices=8

Run it on every host of the slice, as training runs (launch/tpu_pod.sh and
launch/slurm_gpu.sh do, after plan and before training). Exit status 0 when every row passes
or is skipped, 1 when one fails, 2 on a bad config or data. --break=ROW feeds that row a
deliberately wrong input (to see what a failure looks like).

Rows (lejepa_jax/selftest/checks.py): SIGReg sharded == one device (value and gradient);
a few train steps on the full mesh == the same steps on a smaller mesh; every host's batch
rows are the global positions promised and no two hosts draw the same views; the host feed
keeps up with the step; a checkpoint of the real state restores bitwise on every host (and
is removed); a preemption notice reaches every host. `run` returns the rows; the command
prints them as a table and one JSON line and exits 1 when a row fails.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from lejepa_jax import config as config_lib
from lejepa_jax import sharding as sharding_lib
from lejepa_jax.selftest import checks
from lejepa_jax.selftest.checks import Row
from lejepa_jax.selftest.command import define_flags, main

__all__ = ['CHECKS', 'Row', 'define_flags', 'main', 'run', 'table']

# Row names in order; `broken` names one (or more) of them to break on purpose.
CHECKS = ('sigreg_sharded_equals_single_device', 'train_steps_equal_on_a_smaller_mesh',
          'host_rows_are_the_promised_global_positions', 'host_feed_covers_the_step',
          'checkpoint_restores_bitwise', 'preemption_notice_reaches_every_host')


def _step_rate(run, num_steps: int = 3):
  """(state after num_steps + 1 real steps, images/s per host of one step) on the run's
  mesh, from real batches of its pipeline."""
  from lejepa_jax.data import pipeline
  config, programs, feed = run.config, run.programs, run.feed
  local = config.batch_size // feed.count
  batches = iter(pipeline.train_dataset(run.train_source, config.data, seed=config.seed,
                                        local_batch_size=local, process_index=feed.index,
                                        process_count=feed.count))
  with sharding_lib.activate(run.mesh):
    state = programs.init(jnp.int32(config.seed))
    state, metrics = programs.train_step(
        state, sharding_lib.to_global_batch(next(batches), run.mesh))   # compiles
    jax.block_until_ready(metrics)
    inputs = [sharding_lib.to_global_batch(next(batches), run.mesh) for _ in range(num_steps)]
    t = time.perf_counter()
    for batch in inputs:
      state, metrics = programs.train_step(state, batch)
    jax.block_until_ready(metrics)
  return state, num_steps * local / (time.perf_counter() - t)


def run(config, workdir, *, broken=(), log=print) -> list[Row]:
  """Every check of CHECKS on all devices; `broken` names rows to feed a wrong input."""
  unknown = set(broken) - set(CHECKS)
  if unknown:
    raise ValueError(f'no check named {sorted(unknown)}; the checks: {", ".join(CHECKS)}')
  prepared = config_lib.prepare(config)
  config, mesh = prepared.config, prepared.mesh
  rows = []

  def add(row):
    rows.append(row)
    log(f'[selftest] {row.status}: {row.check}: {row.detail}')

  add(checks.sigreg_across_devices(config, mesh, broken=CHECKS[0] in broken))
  add(checks.replay_on_smaller_mesh(config, mesh, broken=CHECKS[1] in broken))
  add(checks.host_rows(config, prepared.train_source, broken=CHECKS[2] in broken))
  state, step_rate = _step_rate(prepared)
  add(checks.feed_rate(config, prepared.train_source, step_rate, broken=CHECKS[3] in broken))
  add(checks.checkpoint_round_trip(prepared.programs, state, workdir,
                                   broken=CHECKS[4] in broken))
  add(checks.preemption_notice(broken=CHECKS[5] in broken))
  return rows


def table(rows: list[Row]) -> str:
  lines = ['| check | result | what was compared |', '| --- | --- | --- |']
  lines += [f'| {r.check} | {r.status} | {r.detail} |' for r in rows]
  return '\n'.join(lines)
