"""What the commands (`main`, `evaluate`, `export`, ...) share: the device and multi-process
flags, their setup, quiet library logging and the one-line error exit.

Importing this module defines the flags; call `setup()` first thing in a command's main.
"""
from __future__ import annotations

import math
import os
import re
import sys
from typing import Mapping

from absl import app
from absl import flags
from absl import logging
import jax

import lejepa_jax
from lejepa_jax import config_schema
from lejepa_jax.data import host_resources

_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'yes', 'no'],
                                 'Call jax.distributed.initialize (auto: when a multi-process '
                                 'environment or --coordinator_address is present).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_GPUS_PER_PROCESS = flags.DEFINE_enum(
    'gpus_per_process', 'auto', ['auto', 'one', 'all'],
    "Under SLURM on GPUs, the GPUs each process drives. one: the GPU numbered SLURM_LOCALID "
    "(one task per GPU; JAX's own choice under SLURM); all: every GPU of the node (one task "
    "per node); auto: all when this node runs one task, else one.")
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', None,
                                    'Simulate this many CPU devices per process (testing).')
_ALLOW_CPU_FALLBACK = flags.DEFINE_bool(
    'allow_cpu_fallback', False, 'Train on the CPU even when JAX fell back to it (libtpu '
    'installed, no TPU or GPU visible) and the config asks for an accelerator (model.dtype '
    'other than float32, or a mesh of more devices than the CPU has).')

_MULTIPROCESS_ENV = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'MEGASCALE_COORDINATOR_ADDRESS',
                     'TPU_WORKER_HOSTNAMES')
EXIT_BAD_INPUT = 2


class _QuietLibraries:
  """Drops INFO chatter of checkpointing/data libraries from the console; warnings pass."""
  PREFIXES = ('orbax', 'grain', 'tensorstore', 'etils')

  def filter(self, record) -> bool:
    if record.levelno >= 30:
      return True
    return not any(f'/{p}/' in record.pathname or f'/{p}_' in record.pathname
                   for p in self.PREFIXES)


def _gpu_count(env: Mapping[str, str]) -> int | None:
  """GPUs of this node (SLURM_GPUS_ON_NODE, else the CUDA_VISIBLE_DEVICES list), or None."""
  count = env.get('SLURM_GPUS_ON_NODE', '')
  if count.isdigit() and int(count) > 0:
    return int(count)
  visible = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  return len(visible) or None


def slurm_local_device_ids(choice: str, env: Mapping[str, str]) -> list[int] | None:
  """The local_device_ids to give jax.distributed.initialize, or None to let JAX choose.

  Under SLURM JAX binds each process to the one GPU numbered SLURM_LOCALID: right for one
  task per GPU, but a single task per node would drive GPU 0 and leave the others idle.
  'all' (or 'auto' with one task on this node) asks for every GPU of the node instead.
  JAX_LOCAL_DEVICE_IDS, when set, wins (JAX reads it itself).
  """
  if 'SLURM_LOCALID' not in env or env.get('JAX_LOCAL_DEVICE_IDS') or choice == 'one':
    return None
  local = host_resources.local_processes(env)
  if choice == 'auto' and (local is None or local[0] != 1):
    return None
  gpus = _gpu_count(env)
  if gpus is None:
    if choice == 'all':
      raise ValueError('--gpus_per_process=all: this node\'s GPU count is unknown (neither '
                       'SLURM_GPUS_ON_NODE nor CUDA_VISIBLE_DEVICES is set); set '
                       'JAX_LOCAL_DEVICE_IDS=0,1,...')
    return None
  return list(range(gpus))


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
  try:
    local_device_ids = slurm_local_device_ids(_GPUS_PER_PROCESS.value, os.environ)
  except ValueError as e:
    fail(str(e))
  if local_device_ids is not None:
    kwargs['local_device_ids'] = local_device_ids
    logging.info('this process drives GPUs %s of its node (--gpus_per_process=%s)',
                 local_device_ids, _GPUS_PER_PROCESS.value)
  jax.distributed.initialize(**kwargs)


def setup() -> None:
  """Quiet library logs, simulated CPU devices, gloo on CPU, jax.distributed when wanted;
  logs lejepa_jax.CPU_FALLBACK (a warning unless --cpu_devices asked for the CPU)."""
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
  if lejepa_jax.CPU_FALLBACK:
    # --cpu_devices asks for the CPU: then it is no surprise.
    (logging.info if _CPU_DEVICES.value else logging.warning)(
        '%s; set JAX_PLATFORMS=cpu to choose the CPU (and silence this), or make the TPU/GPU '
        'visible to this process', lejepa_jax.CPU_FALLBACK)


def accelerator_needs(config, cpu_devices: int) -> list[str]:
  """What in `config` asks for a TPU or GPU, one phrase each (empty: the CPU will do)."""
  needs = []
  config = config_schema.resolve(config)
  dtype = str(config.model.dtype)
  if dtype != 'float32':
    needs.append(f'model.dtype={dtype!r} (CPUs have no fast {dtype})')
  mesh = dict(config.mesh)
  try:
    fixed = math.prod(int(v) for v in mesh.values() if int(v) != -1)
  except (TypeError, ValueError):
    fixed = 1   # a malformed mesh: config.validate names it
  if fixed > cpu_devices:
    needs.append(f'mesh {mesh} needs {fixed} devices, the CPU has {cpu_devices}')
  return needs


def cpu_fallback_problem(config, *, fallback: str | None, allowed: bool,
                         cpu_devices: int) -> str | None:
  """The refusal when JAX fell back to the CPU by itself (`fallback`, lejepa_jax.CPU_FALLBACK)
  and `config` needs an accelerator, or None. `allowed`: the CPU was asked for
  (--allow_cpu_fallback or --cpu_devices)."""
  if not fallback or allowed:
    return None
  needs = accelerator_needs(config, cpu_devices)
  if not needs:
    return None
  return (f'{fallback}, and the config asks for an accelerator: {"; ".join(needs)}. Make the '
          'TPU/GPU visible to this process (a container needs the device and /sys/bus/pci), or '
          'set JAX_PLATFORMS (tpu, cuda or cpu) to choose the platform yourself, or pass '
          '--allow_cpu_fallback to train on the CPU anyway')


def check_cpu_fallback(config) -> None:
  """`fail` (exit 2) with `cpu_fallback_problem`'s message; call after `setup`, before
  anything compiles or touches the workdir."""
  problem = cpu_fallback_problem(
      config, fallback=lejepa_jax.CPU_FALLBACK,
      allowed=_ALLOW_CPU_FALLBACK.value or bool(_CPU_DEVICES.value),
      cpu_devices=jax.device_count())
  if problem:
    fail(problem)


def describe_error(e: Exception, limit: int = 300) -> str:
  """'TypeName: message' on one line, cut to `limit` characters (for one-line errors)."""
  text = f'{type(e).__name__}: {e}'.replace('\n', ' ')
  return text if len(text) <= limit else text[:limit] + '...'


def fail(message: str) -> None:
  """One line on stderr, exit status 2: the fix is in the message, a traceback adds nothing."""
  sys.stderr.write(f'[lejepa_jax] error: {message}\n')
  sys.stderr.flush()
  sys.exit(EXIT_BAD_INPUT)


def flag_value(argv, name: str) -> str | None:
  """The value of --NAME=V or --NAME V in argv, before absl parses it (None if absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _override_keys(argv) -> list[str]:
  """The KEY of every --config.KEY=VALUE (or --config.KEY VALUE) argument."""
  return [a[len('--config.'):].partition('=')[0] for a in argv if a.startswith('--config.')]


def unknown_override_message(argv, error) -> str:
  """--config.KEY naming a key the config does not have (lock_config=True refuses it)."""
  problems = []
  for key in _override_keys(argv):
    free = next((f for f in config_schema.FREE_FORM if key.startswith(f + '.')), None)
    if key not in config_schema.KEYS and not free:
      problems.append(f'--config.{config_schema.describe_unknown(key)}')
  if problems:
    return 'bad command line: ' + '; '.join(problems)
  config_arg = next((a for a in argv if a.startswith('--config=')), '--config=DIR/config.json')
  overrides = _override_keys(argv)
  keys = [k for k in overrides if k.split('.')[-1] in str(error)] or overrides
  guess = re.search(r'Did you mean "([^"]+)"', str(error))   # ml_collections' suggestion
  hint = ''
  if guess and len(keys) == 1:
    section = keys[0].rpartition('.')[0]
    hint = f' (did you mean {section + "." if section else ""}{guess.group(1)}?)'
  return (f'bad command line: --config.{" / --config.".join(keys)}{hint}: the config '
          f'({config_arg[len("--config="):]}) does not set this key, and --config.KEY can only '
          'change keys the file sets: fix the name, or add the key to the config file (what it '
          f'does and its default: {config_schema.SCHEMA_FILE})')


def parse_flags(argv):
  """absl's parser; an unknown --config.KEY becomes one line and exit 2 (`fail`)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:   # ml_collections: --config.KEY the config lacks
    fail(unknown_override_message(argv, e))
