"""Entry point: python -m lejepa_jax.main --config=configs/fmnist.py --workdir=DIR.

Flags only; the loop lives in `lejepa_jax.train.train_and_evaluate`.
Multi-process runs (TPU pods, GPU clusters, gloo on CPU) call
`jax.distributed.initialize` first: automatically on TPU pods and under
SLURM/Open MPI, or from --coordinator_address/--num_processes/--process_id.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

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
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
