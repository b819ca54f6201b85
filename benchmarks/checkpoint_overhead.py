"""What asynchronous checkpointing costs a training run.

  python benchmarks/checkpoint_overhead.py [--config=configs/fmnist.py:runlocal]
      [--steps=300] [--every=50] [--pairs=3] [--batch_size=128] [--quick]

The same run (`train.train_and_evaluate`, final evaluation left out) is timed with a
checkpoint every `--every` steps and with none but the final one (checkpoint_every =
steps), alternating A B A B ... in one process, each in a fresh workdir. Printed per
run and as medians:
  wall     from the call to the end of training (setup, compile, the final save's wait);
  steady   from the first logged step (compiled by then) to the last one: the saves in
           between (their blocking part and the background writing competing for the
           machine) are the only difference between A and B;
  in save  the time the loop spent inside the saves of the steady part (all but the
           final save): the directly attributable, noise-robust part of the cost.
A warm-up pair runs first and is not counted: it fills a persistent compilation cache
that the timed runs load from, and pays the one-off costs of a process's first save
(Orbax compiles its per-shape slicing of replicated arrays then: seconds on a CPU with
several devices).
"""
import statistics
import tempfile
import time

import machine as machine_lib   # benchmarks/machine.py, beside this script

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lejepa_jax import checkpoint as ckpt_lib
from lejepa_jax import metrics as metrics_lib
from lejepa_jax import train
from lejepa_jax.evaluators import suite

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fmnist.py:runlocal', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Training steps per run.')
_EVERY = flags.DEFINE_integer('every', 50, 'Checkpoint interval of the checkpointing runs.')
_PAIRS = flags.DEFINE_integer('pairs', 3, 'Timed (checkpointing, not) pairs after a warm-up pair.')
_BATCH = flags.DEFINE_integer('batch_size', 128, "Global batch (0: the config's). 128 makes a "
                               'runlocal step ~0.1 s on a CPU core, so 50 steps are ~5 s.')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', None, 'Simulated CPU devices (default: 1).')
_QUICK = flags.DEFINE_bool('quick', False, 'An answer in under 3 minutes (60 steps, a checkpoint '
                           'every 20, one timed pair)')
QUICK = {'steps': 60, 'every': 20, 'pairs': 1}


def _timed_run(config, checkpoint_every: int) -> dict:
  config = config.copy_and_resolve_references()
  config.batch_size = _BATCH.value or config.batch_size
  config.total_steps = _STEPS.value
  config.checkpoint_every = checkpoint_every
  config.log_every = _EVERY.value
  written = {}
  original_write = metrics_lib.MetricWriter.write

  def write(self, step, scalars):
    written.setdefault(step, time.perf_counter())
    original_write(self, step, scalars)

  blocked = []
  original_save = ckpt_lib.save

  def save(*args, **kwargs):
    t = time.perf_counter()
    original_save(*args, **kwargs)
    blocked.append(time.perf_counter() - t)

  original_evaluate = suite.Runner.__call__
  metrics_lib.MetricWriter.write = write
  ckpt_lib.save = save
  suite.Runner.__call__ = lambda *a, **k: {'eval/linear_probe_top1': 0.0, 'eval/knn_top1': 0.0}
  try:
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      train.train_and_evaluate(config, workdir)     # returns after the last save is written
      wall = time.perf_counter() - start
  finally:
    metrics_lib.MetricWriter.write = original_write
    ckpt_lib.save = original_save
    suite.Runner.__call__ = original_evaluate
  logged = sorted(written)
  return {'wall': wall, 'steady': written[logged[-1]] - written[logged[0]],
          'saves': len(blocked), 'blocked': sum(blocked[:-1])}


def main(argv):
  del argv
  if _QUICK.value:
    print('--quick:', machine_lib.apply_quick(flags.FLAGS, QUICK))
  import jax
  logging.set_verbosity(logging.WARNING)
  if _CPU_DEVICES.value:
    jax.config.update('jax_num_cpu_devices', _CPU_DEVICES.value)
  # Every run compiles the same programs: after the warm-up pair they load from this cache,
  # so that 'wall' is not mostly compile time.
  cache = tempfile.TemporaryDirectory()
  jax.config.update('jax_compilation_cache_dir', cache.name)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  config = _CONFIG.value
  runs = {'ckpt': [], 'none': []}
  names = {'ckpt': f'checkpoint every {_EVERY.value}', 'none': 'no checkpoints'}
  print(f'{jax.device_count()} {jax.default_backend()} device(s); {_STEPS.value} steps of '
        f'{_BATCH.value or config.batch_size} images; model {config.model.variant} width {config.model.width}',
        flush=True)
  for pair in range(_PAIRS.value + 1):
    for kind, every in (('ckpt', _EVERY.value), ('none', _STEPS.value)):
      r = _timed_run(config, every)
      label = 'warm-up' if pair == 0 else f'pair {pair}'
      print(f'{label:8s} {names[kind]:20s} wall {r["wall"]:7.2f} s   steady {r["steady"]:7.2f} s'
            f'   {r["saves"]} saves, {r["blocked"]:.2f} s of the steady part in save calls',
            flush=True)
      if pair:
        runs[kind].append(r)
  for key in ('wall', 'steady'):
    a = statistics.median(r[key] for r in runs['ckpt'])
    b = statistics.median(r[key] for r in runs['none'])
    pairs = ', '.join(f'{x[key] / y[key]:.3f}' for x, y in zip(runs['ckpt'], runs['none']))
    print(f'median {key:6s}: {names["ckpt"]} {a:.2f} s, {names["none"]} {b:.2f} s, '
          f'ratio {a / b:.3f} (per pair: {pairs})', flush=True)


if __name__ == '__main__':
  app.run(main)
