"""Does the input pipeline slow training? The CPU default's step fed by its real pipeline
against the same step on one fixed batch, alternating, in one run.

  python benchmarks/data_wait.py [--config=configs/fmnist.py] [--rounds=6] [--steps=40] [--quick]

Fed: `pipeline.train_dataset` on the config's training split (Grain threads, multi-crop,
photometric steps) feeding `steps.build(...).train_step` the way `train.py` does: at most
two steps in flight (after dispatching a step, wait for the one before it, so that a
preemption notice acts within two steps), and the next batch is read and put on the devices
while the step just dispatched runs; the seconds blocked on the iterator and the copy are
the data wait. Fed, unbounded: the same without the wait for the previous step (the loop
before 2026-12-02, whose host ran up to log_every steps ahead of the device). Alone: the
same jitted step on one batch already on the devices (what `benchmarks/train_step.py`
times). Each round times `--steps` steps of each side in turn (the state carries on),
synchronised at the end of the side. Printed: per side the median images per second, the
fed/alone ratios (medians of per-round ratios) and the fed sides' data-wait fractions.
The sides share the cores with nothing else; run it on a quiet machine.
"""
import statistics
import time

import machine as machine_lib   # benchmarks/machine.py, beside this script

from absl import app
from absl import flags
from ml_collections import config_flags

import jax
import numpy as np

from lejepa_jax import sharding as sharding_lib
from lejepa_jax import steps
from lejepa_jax.data import pipeline
from lejepa_jax.data import sources

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fmnist.py', 'training config')
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'alternating rounds')
_STEPS = flags.DEFINE_integer('steps', 40, 'steps per side and round')
_QUICK = flags.DEFINE_bool('quick', False, 'An answer in under 3 minutes (2 rounds of 15 steps; '
                           'a rougher ratio)')
QUICK = {'rounds': 2, 'steps': 15}


def main(argv):
  del argv
  config = _CONFIG.value
  print('machine:', machine_lib.cpu())
  if _QUICK.value:
    print('--quick:', machine_lib.apply_quick(flags.FLAGS, QUICK))
  mesh = sharding_lib.make_mesh(config.get('mesh'))
  programs = steps.build(config, mesh, config.total_steps)
  source = sources.get_source(config.data, config.data.train_split)
  data_iter = iter(pipeline.train_dataset(source, config.data, seed=config.seed,
                                          local_batch_size=config.batch_size))
  images = config.batch_size * _STEPS.value

  with sharding_lib.activate(mesh):
    state = programs.init(np.int32(config.seed))
    fixed = sharding_lib.to_global_batch(next(data_iter), mesh)

    def fed(state, bounded=True):
      read = copy = 0.0
      batch, previous = fixed, None
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        state, metrics = programs.train_step(state, batch)
        if bounded and previous is not None:
          jax.block_until_ready(previous['train/loss'])   # as train.py: two steps in flight
        previous = metrics
        t0 = time.perf_counter()
        host = next(data_iter)                                    # overlaps the step
        t1 = time.perf_counter()
        batch = sharding_lib.to_global_batch(host, mesh)
        read, copy = read + t1 - t0, copy + time.perf_counter() - t1
      jax.block_until_ready(metrics)
      return state, time.perf_counter() - start, (read, copy)

    def alone(state):
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        state, metrics = programs.train_step(state, fixed)
      jax.block_until_ready(metrics)
      return state, time.perf_counter() - start, (0.0, 0.0)

    sides = (('fed', fed), ('fed, unbounded', lambda s: fed(s, bounded=False)),
             ('alone', alone))
    for _, side in sides:        # warm-up: compile, fill Grain's prefetch buffer
      state, *_ = side(state)
    rows = {name: [] for name, _ in sides}
    for r in range(_ROUNDS.value):
      for name, side in sides:
        state, seconds, (read, copy) = side(state)
        rows[name].append((images / seconds, (read + copy) / seconds, read / seconds))
      print(f'round {r}: ' + ', '.join(
          f'{name} {rows[name][-1][0]:.1f} images/s' + (
              f' (data wait {rows[name][-1][1]:.1%}, of which the iterator '
              f'{rows[name][-1][2]:.1%})' if name != 'alone' else '') for name, _ in sides),
          flush=True)

  median = lambda name, i: statistics.median(row[i] for row in rows[name])
  ratio = lambda name: statistics.median(f[0] / a[0] for f, a in zip(rows[name], rows['alone']))
  print(f'\n{_STEPS.value} steps of {config.batch_size} images per side and round, '
        f'{_ROUNDS.value} rounds (medians):')
  for name in ('fed', 'fed, unbounded'):
    print(f'  step {name} by the pipeline: {median(name, 0):.1f} images/s, data wait '
          f'{median(name, 1):.1%} (the iterator {median(name, 2):.1%}, the rest the copy)')
  print(f'  step alone (fixed batch): {median("alone", 0):.1f} images/s')
  print(f'  fed / alone: {ratio("fed"):.3f} (two steps in flight, as train.py); '
        f'fed, unbounded / alone: {ratio("fed, unbounded"):.3f}')


if __name__ == '__main__':
  app.run(main)
