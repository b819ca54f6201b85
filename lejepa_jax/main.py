"""Entry point: python -m lejepa_jax.main --config=configs/fmnist.py --workdir=DIR.

Flags only; the loop lives in `lejepa_jax.train.train_and_evaluate`.
Multi-process runs (TPU pods, GPU clusters, gloo on CPU) call
`jax.distributed.initialize` first: automatically on TPU pods and under
SLURM/Open MPI, or from --coordinator_address/--num_processes/--process_id.

Bad config values (unknown keys on the command line or in the config file included) and
missing or malformed data fail before anything compiles or touches the workdir: one line
`[lejepa_jax] error: ...` on stderr naming the key or the path and what to do, exit status 2.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from lejepa_jax import config_schema

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/NAME.py[:ARGS]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory; rerunning on it resumes.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'yes', 'no'],
                                 'Call jax.distributed.initialize (auto: when a multi-process '
                                 'environment or --coordinator_address is present).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', None,
                                    'Simulate this many CPU devices per process (testing).')
flags.mark_flags_as_required(['config', 'workdir'])

_MULTIPROCESS_ENV = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'MEGASCALE_COORDINATOR_ADDRESS',
                     'TPU_WORKER_HOSTNAMES')


def _maybe_initialize_distributed() -> None:
  wanted = _DISTRIBUTED.value == 'yes' or (
      _DISTRIBUTED.value == 'auto' and
      (_COORDINATOR.value or any(k in os.environ for k in _MULTIPROCESS_ENV)))
  if not wanted:
    return
  kwargs = {}
  if _COORDINATOR.value:
    kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                  process_id=_PROCESS_ID.value)
  jax.distributed.initialize(**kwargs)


class _QuietLibraries:
  """Drops INFO chatter of checkpointing/data libraries from the console; warnings pass."""
  PREFIXES = ('orbax', 'grain', 'tensorstore', 'etils')

  def filter(self, record) -> bool:
    if record.levelno >= 30:
      return True
    return not any(f'/{p}/' in record.pathname or f'/{p}_' in record.pathname
                   for p in self.PREFIXES)


EXIT_BAD_INPUT = 2


def _fail(message: str) -> None:
  """One line on stderr, exit status 2: the fix is in the message, a traceback adds nothing."""
  sys.stderr.write(f'[lejepa_jax] error: {message}\n')
  sys.stderr.flush()
  sys.exit(EXIT_BAD_INPUT)


def _override_keys(argv) -> list[str]:
  """The KEY of every --config.KEY=VALUE (or --config.KEY VALUE) argument."""
  return [a[len('--config.'):].partition('=')[0] for a in argv if a.startswith('--config.')]


def _unknown_override_message(argv, error) -> str:
  """--config.KEY naming a key the config does not have (lock_config=True refuses it)."""
  problems = []
  for key in _override_keys(argv):
    free = next((f for f in config_schema.FREE_FORM if key.startswith(f + '.')), None)
    if key not in config_schema.KEYS and not free:
      problems.append(f'--config.{config_schema.describe_unknown(key)}')
  if problems:
    return 'bad command line: ' + '; '.join(problems)
  config_arg = next((a for a in argv if a.startswith('--config=')), '--config=...')
  overrides = _override_keys(argv)
  keys = [k for k in overrides if k.split('.')[-1] in str(error)] or overrides
  guess = re.search(r'Did you mean "([^"]+)"', str(error))   # ml_collections' suggestion
  hint = ''
  if guess and len(keys) == 1:
    section = keys[0].rpartition('.')[0]
    hint = f' (did you mean {section + "." if section else ""}{guess.group(1)}?)'
  return (f'bad command line: --config.{" / --config.".join(keys)}{hint}: the config file '
          f'({config_arg[len("--config="):]}) does not set this key, and --config.KEY can only '
          'change keys the file sets: fix the name, or add the key to the config file (what it '
          f'does and its default: {config_schema.SCHEMA_FILE})')


def _parse_flags(argv):
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:   # ml_collections: --config.KEY the config lacks
    _fail(_unknown_override_message(argv, e))


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _CPU_DEVICES.value:
    jax.config.update('jax_num_cpu_devices', _CPU_DEVICES.value)
  if _COORDINATOR.value:
    # CPU processes exchange collectives through gloo (harmless on GPU/TPU).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  _maybe_initialize_distributed()
  logging.info('JAX %s, process %d/%d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  from lejepa_jax import train  # after distributed init: importing is cheap, devices are not
  from lejepa_jax.data import sources
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.ConfigError, sources.DataError) as e:
    _fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
