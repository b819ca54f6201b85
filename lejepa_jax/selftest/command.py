"""`python -m lejepa_jax.selftest`: flags, the table and the JSON line (usage in __init__.py)."""
from __future__ import annotations

import json
import sys

from absl import flags
import jax
from ml_collections import config_flags

from lejepa_jax import cli

F: dict = {}


def define_flags() -> None:
  F['config'] = config_flags.DEFINE_config_file(
      'config', None, 'Config file (configs/NAME.py[:ARGS]).', lock_config=True)
  F['workdir'] = flags.DEFINE_string(
      'workdir', None, "The run's workdir (local or gs://): the checkpoint check writes "
      'WORKDIR/selftest/ and removes it.')
  F['break'] = flags.DEFINE_list('break', [], 'Rows to feed a deliberately wrong input (to see '
                                 'what a failure looks like; the tests do).')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv) -> None:
  del argv
  cli.setup()
  config = F['config'].value
  cli.check_cpu_fallback(config)
  from lejepa_jax import config as config_lib
  from lejepa_jax import selftest
  from lejepa_jax.data import sources
  try:
    rows = selftest.run(config, F['workdir'].value, broken=tuple(F['break'].value))
  except (config_lib.ConfigError, sources.DataError, ValueError) as e:
    cli.fail(str(e))
  passed = all(r.ok is not False for r in rows)
  if jax.process_index() == 0:
    print(f'\nselftest on {jax.device_count()} {jax.devices()[0].platform} devices, '
          f'{jax.process_count()} process(es):')
    print(selftest.table(rows))
    print(json.dumps({'selftest': {r.check: {'result': r.status, **r.figures} for r in rows},
                      'passed': passed}), flush=True)
  sys.exit(0 if passed else 1)
