"""Does the input pipeline slow training? The CPU default's step fed by its real pipeline
against the same step on one fixed batch, alternating, in one run.

  python benchmarks/data_wait.py [--config=configs/fmnist.py] [--rounds=6] [--steps=40]

Fed: `pipeline.train_dataset` on the config's training split (Grain threads, multi-crop,
photometric steps) feeding `steps.build(...).train_step` the way `train.py` does: the next
batch is read and put on the devices while the step just dispatched runs; the seconds
blocked on the iterator and the copy are the data wait. Alone: the same jitted step on one
batch already on the devices (what `benchmarks/train_step.py` times). Each round times
`--steps` steps of each side (fed first, then alone; the state carries on), synchronised
at the end of the round. Printed: per side the median images per second, the fed/alone
ratio (median of per-round ratios) and the fed side's data-wait fraction. Both sides
share the cores with nothing else; run it on a quiet machine.
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


def main(argv):
  del argv
  config = _CONFIG.value
  print('machine:', machine_lib.cpu())
  mesh = sharding_lib.make_mesh(config.get('mesh'))
  programs = steps.build(config, mesh, config.total_steps)
  source = sources.get_source(config.data, config.data.train_split)
  data_iter = iter(pipeline.train_dataset(source, config.data, seed=config.seed,
                                          local_batch_size=config.batch_size))
  images = config.batch_size * _STEPS.value

  with sharding_lib.activate(mesh):
    state = programs.init(np.int32(config.seed))
    fixed = sharding_lib.to_global_batch(next(data_iter), mesh)

    def fed(state):
      read = copy = 0.0
      batch = fixed
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        state, metrics = programs.train_step(state, batch)
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

    state, *_ = fed(state)       # warm-up: compile, fill Grain's prefetch buffer
    state, *_ = alone(state)
    rows = {'fed': [], 'alone': []}
    for r in range(_ROUNDS.value):
      for name, side in (('fed', fed), ('alone', alone)):
        state, seconds, (read, copy) = side(state)
        rows[name].append((images / seconds, (read + copy) / seconds, read / seconds))
      print(f'round {r}: fed {rows["fed"][-1][0]:.1f} images/s (data wait '
            f'{rows["fed"][-1][1]:.1%}, of which the iterator {rows["fed"][-1][2]:.1%}), '
            f'alone {rows["alone"][-1][0]:.1f} images/s', flush=True)

  fed_ips = statistics.median(x for x, *_ in rows['fed'])
  alone_ips = statistics.median(x for x, *_ in rows['alone'])
  ratio = statistics.median(f[0] / a[0] for f, a in zip(rows['fed'], rows['alone']))
  wait = statistics.median(w for _, w, _ in rows['fed'])
  read = statistics.median(r for *_, r in rows['fed'])
  print(f'\n{_STEPS.value} steps of {config.batch_size} images per side and round, '
        f'{_ROUNDS.value} rounds (medians):')
  print(f'  step fed by the pipeline: {fed_ips:.1f} images/s, data wait {wait:.1%} '
        f'(the iterator {read:.1%}, the rest the copy to the devices)')
  print(f'  step alone (fixed batch): {alone_ips:.1f} images/s')
  print(f'  fed / alone: {ratio:.3f}')


if __name__ == '__main__':
  app.run(main)
