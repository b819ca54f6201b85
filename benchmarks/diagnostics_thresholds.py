"""Where to put the collapse thresholds: embedding diagnostics with and without SIGReg.

  python benchmarks/diagnostics_thresholds.py [--config=configs/fmnist.py] [--steps=300]
      [--every=50] [--num_images=512] [--lambs=0.0,0.1] [--workdir=/tmp/diag_thresholds]
      [--quick]

Trains the config from scratch once per lamb (lamb=0: invariance only, collapse expected;
the config's lamb: healthy) for --steps steps of the config's schedule, and every --every
steps computes `diagnostics.make_fn` on the same --num_images test images with the same
key. Prints one table row per (lamb, step) and what `collapse_warning` says with the
default thresholds. Each run also leaves WORKDIR/lamb_X/{metrics.jsonl,diagnostics.npz}
and WORKDIR/lamb_X/plots/*.png (`lejepa_jax.plots`).
"""
import time

import machine as machine_lib   # benchmarks/machine.py, beside this script

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from lejepa_jax import diagnostics
from lejepa_jax import metrics as metrics_lib
from lejepa_jax import plots
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import steps as steps_lib
from lejepa_jax.data import pipeline
from lejepa_jax.data import sources

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fmnist.py', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Training steps per run.')
_EVERY = flags.DEFINE_integer('every', 50, 'Diagnostics every this many steps.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 512, 'Fixed test images for diagnostics.')
_LAMBS = flags.DEFINE_list('lambs', ['0.0', 'config'], "lamb values ('config': the config's).")
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/diag_thresholds', 'Where runs write.')
_QUICK = flags.DEFINE_bool('quick', False, 'An answer in under 3 minutes (60 steps, diagnostics '
                           'every 20 on 128 images: the early signal only)')
QUICK = {'steps': 60, 'every': 20, 'num_images': 128}
_TRAIN = flags.DEFINE_bool('train', True, 'False: only print the table (and plots) of the '
                           'runs already in --workdir, e.g. after changing thresholds.')

COLUMNS = ('emb_rankme', 'emb_rankme_centred', 'proj_rankme', 'proj_rankme_centred',
           'emb_var_mean', 'proj_var_mean', 'proj_var_max', 'emb_mean_norm', 'proj_mean_norm',
           'emb_sigreg_std', 'proj_sigreg')


def run(config, lamb, mesh, images, workdir):
  config = config.copy_and_resolve_references()
  config.lamb = lamb
  total = int(config.total_steps)      # the config's schedule: the first steps of a real run
  programs = steps_lib.build(config, mesh, total)
  source = sources.get_source(config.data, config.data.train_split)
  data = iter(pipeline.train_dataset(source, config.data, seed=config.seed,
                                     local_batch_size=config.batch_size))
  fn = diagnostics.make_fn(programs.model, mesh, num_slices=config.sigreg.num_slices,
                           t_max=config.sigreg.t_max, num_points=config.sigreg.num_points)
  dims = diagnostics.max_ranks(programs.model, images.shape[0])
  writer = metrics_lib.MetricWriter(workdir, tensorboard=False)
  writer.resume(-1)
  key = jax.random.key(1234)
  with sharding_lib.activate(mesh):
    state = programs.init(np.int32(config.seed))
    train_metrics = {}
    t0 = time.perf_counter()
    for step in range(0, _STEPS.value + 1):
      if step:
        batch = sharding_lib.to_global_batch(next(data), mesh)
        state, train_metrics = programs.train_step(state, batch)
      if step % _EVERY.value:
        continue
      scalars, arrays = jax.device_get(fn(steps_lib.variables(state), images, key))
      scalars = {k: float(v) for k, v in scalars.items()}
      train = {k: float(v) for k, v in jax.device_get(train_metrics).items()
               if k not in ('train/finite', 'train/grads_finite', 'train/nonfinite_streak')}
      writer.write(step, {**train, **{f'diag/{k}': v for k, v in scalars.items()}})
      plots.save_arrays(workdir, step, arrays)
      warning = diagnostics.collapse_warning(scalars, dims)
      print(f'lamb={lamb:g} step {step:4d} ({time.perf_counter() - t0:5.0f}s) '
            f'emb_rankme={scalars["emb_rankme"]:.2f} proj_rankme={scalars["proj_rankme"]:.2f} '
            f'warning={warning is not None}', flush=True)
  writer.close()
  print('plots:', *plots.write_plots(workdir), sep='\n  ')


def table(workdirs, dims):
  """The table and the warnings of the runs in `workdirs` ({lamb: dir}), from metrics.jsonl."""
  print(f'\nmax ranks (min(N, D)): {dims}; thresholds: RankMe < '
        f'{diagnostics.MIN_RANK_FRACTION:g} x max rank, proj_var_mean < '
        f'{diagnostics.MIN_PROJ_VAR:g}, var_max < {diagnostics.MIN_VAR_RATIO:g} x mean_norm^2')
  head = '| lamb | step | probe_top1 | ' + ' | '.join(COLUMNS) + ' | warns |'
  print(head)
  print('|' + '---|' * (head.count('|') - 1))
  warnings = []
  for lamb, workdir in workdirs.items():
    for r in plots.read_metrics(workdir):
      if 'diag/emb_rankme' not in r:
        continue
      warning = diagnostics.collapse_warning(r, dims)
      print(f'| {lamb:g} | {r["step"]} | {r.get("train/probe_top1", float("nan")):.3f} | ' +
            ' | '.join(f'{r["diag/" + c]:.4g}' for c in COLUMNS) +
            f' | {"yes" if warning else "no"} |')
      if warning:
        warnings.append(f'lamb={lamb:g} step {r["step"]}: {warning}')
  print(*warnings, sep='\n')


def main(argv):
  del argv
  if _QUICK.value:
    print('--quick:', machine_lib.apply_quick(flags.FLAGS, QUICK))
  config = _CONFIG.value
  mesh = sharding_lib.make_mesh(config.get('mesh'))
  test = sources.get_source(config.data, config.data.test_split)
  batch = next(iter(pipeline.eval_batches(test, config.data, local_batch_size=_NUM_IMAGES.value)))
  images = sharding_lib.to_global_batch(batch, mesh)['image']
  workdirs = {}
  for lamb in _LAMBS.value:
    lamb = float(config.lamb) if lamb == 'config' else float(lamb)
    workdirs[lamb] = f'{_WORKDIR.value}/lamb_{lamb:g}'
    if _TRAIN.value:
      run(config, lamb, mesh, images, workdirs[lamb])
    else:
      print('plots:', *plots.write_plots(workdirs[lamb]), sep='\n  ')
  dims = diagnostics.max_ranks(steps_lib.build(config, mesh, 1).model, _NUM_IMAGES.value)
  table(workdirs, dims)


if __name__ == '__main__':
  app.run(main)
