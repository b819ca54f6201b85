"""Evaluate a workdir's checkpoint without training: python -m lejepa_jax.evaluate --workdir=DIR.

  python -m lejepa_jax.evaluate --workdir=DIR [--step=S] [--evals=linear_probe,fewshot]
      [--config.evals.knn.ks="(5,10,20)"] [--config.eval.max_examples=N] [--noplots]

Runs the evaluators of the run's config (DIR/config.json, written when training starts;
or --config=configs/NAME.py for older workdirs) on the checkpoint of step S (default: the
newest), on a finished or a still-running workdir. With --config.init_from=EXPORT (an export
or a timm state dict) and no checkpoint in DIR, it evaluates that encoder as it is (step 0):
the frozen baseline an in-domain run is compared with. Results are printed, appended to
DIR/metrics.jsonl as one line at step S (eval/NAME_KEY, like the evaluations made during
training) and plotted into DIR/plots/. --config.KEY=VALUE changes any key of the stored
config for this evaluation only (evaluator options, eval batch size, the mesh...).
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from lejepa_jax import cli
from lejepa_jax import run_config

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run\'s output directory.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the newest).')
_EVALS = flags.DEFINE_list('evals', None, 'Names in config.evals to run (default: all of them).')
_PLOTS = flags.DEFINE_bool('plots', True, 'Write the PNG plots into DIR/plots/ afterwards.')
flags.mark_flags_as_required(['workdir'])

# eval.* keys a workdir's stored config may lack, with the default the run used.
def evaluate_workdir(config, workdir, *, step: int | None = None, names=None,
                     devices=None) -> tuple[int, dict]:
  """(step, {'eval/NAME_KEY': value}) of the evaluators `names` (default: all of
  config.evals) on checkpoint `step` (default: newest) of `workdir`; appends them to
  WORKDIR/metrics.jsonl. Nothing else in the workdir changes."""
  from lejepa_jax import checkpoint as ckpt_lib
  from lejepa_jax import metrics as metrics_lib
  from lejepa_jax import sharding as sharding_lib
  from lejepa_jax import steps
  from lejepa_jax import config as config_lib
  from lejepa_jax.evaluators import suite

  config_lib.validate(config)
  config = config_lib.resolve(config)
  try:
    run_specs = suite.specs(config, names)
  except KeyError as e:
    raise config_lib.ConfigError(f'--evals: {e.args[0]}') from None
  run = config_lib.prepare(config, devices)
  mesh, programs = run.mesh, run.programs
  train_source, test_source = run.train_source, run.test_source
  has_checkpoints = ckpt_lib.directory(workdir).exists()
  if config.init_from and not has_checkpoints and step in (None, 0):
    # No run here: evaluate the encoder of init_from itself (step 0; e.g. a transfer baseline).
    from lejepa_jax import init_from
    init_from.check(config, programs.abstract_state.params['encoder'])
    with sharding_lib.activate(mesh):
      state = init_from.apply(programs.init(np.int32(config.seed)), config.init_from,
                              config.model.depth, config.model.scan)
    step = 0
  else:
    state, step = ckpt_lib.restore_state(workdir, programs.abstract_state, step)
  logging.info('evaluating %s at step %d: %s', workdir, step, ', '.join(s.name for s in run_specs))
  runner = suite.Runner(config, programs, train_source=train_source, test_source=test_source,
                        eval_sources=run.eval_sources)
  with sharding_lib.activate(mesh):
    results = runner(steps.variables(state), run_specs)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.write(step, results)
  writer.close()
  return step, results


def main(argv):
  del argv
  cli.setup()
  from lejepa_jax import train
  from lejepa_jax.data import sources
  config = flags.FLAGS.config
  if not config:     # no --config and no DIR/config.json: say how to get one
    try:
      run_config.load(_WORKDIR.value)
    except FileNotFoundError as e:
      cli.fail(str(e))
  try:
    step, results = evaluate_workdir(config, _WORKDIR.value, step=_STEP.value, names=_EVALS.value)
  except (train.ConfigError, sources.DataError, FileNotFoundError) as e:
    cli.fail(str(e))
  for key, value in results.items():
    print(f'{key} = {value:.4f}')
  print(f'[lejepa_jax] evaluation of {_WORKDIR.value} at step {step}: {train.summary(results)} '
        '(appended to metrics.jsonl)', flush=True)
  if _PLOTS.value and jax.process_index() == 0:
    _write_plots(_WORKDIR.value)


def _write_plots(workdir) -> None:
  from lejepa_jax import plots
  for path in plots.write_plots(workdir):
    print(f'plot: {path}')


def define_config_flag(argv) -> None:
  """--config: the given config file, else the workdir's stored config (so --config.KEY=VALUE
  overrides work on either); must run before absl parses argv."""
  if cli.flag_value(argv, 'config'):
    config_flags.DEFINE_config_file('config', None, 'Config file (default: DIR/config.json).',
                                    lock_config=True)
    return
  workdir = cli.flag_value(argv, 'workdir')
  try:
    # every key present (workdir.load_config): --config.KEY=VALUE works on any of them
    config = run_config.load(workdir) if workdir else ml_collections.ConfigDict()
  except FileNotFoundError:
    config = ml_collections.ConfigDict()      # main() reports it
  try:     # the config dict flag applies --config.KEY=VALUE of argv here already
    config_flags.DEFINE_config_dict('config', config, 'The run\'s config (DIR/config.json).',
                                    lock_config=True)
  except (AttributeError, KeyError) as e:
    cli.fail(cli.unknown_override_message(argv, e))


def define_flags() -> None:
  """The flags `python -m lejepa_jax.evaluate` defines when run (--config among them)."""
  define_config_flag([])


if __name__ == '__main__':
  define_config_flag(sys.argv)
  app.run(main, flags_parser=cli.parse_flags)
