"""Entry point: python -m lejepa_jax.main --config=configs/fmnist.py --workdir=DIR.

Flags only; the loop lives in `lejepa_jax.train.train_and_evaluate`.
Multi-process runs (TPU pods, GPU clusters, gloo on CPU) call
`jax.distributed.initialize` first: automatically on TPU pods and under
SLURM/Open MPI, or from --coordinator_address/--num_processes/--process_id.

Bad config values (unknown keys on the command line or in the config file included) and
missing or malformed data fail before anything compiles or touches the workdir: one line
`[lejepa_jax] error: ...` on stderr naming the key or the path and what to do, exit status 2.
So does a config that needs an accelerator (bfloat16, a mesh of more devices than the CPU has)
when JAX fell back to the CPU by itself (libtpu installed, no TPU or GPU visible; logged as a
warning): make the accelerator visible, set JAX_PLATFORMS, or pass --allow_cpu_fallback.
"""
from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from lejepa_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/NAME.py[:ARGS]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory; rerunning on it resumes.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  cli.setup()
  cli.check_cpu_fallback(_CONFIG.value)   # ViT-g on a CPU nobody asked for: refuse
  from lejepa_jax import train  # after distributed init: importing is cheap, devices are not
  from lejepa_jax.data import sources
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.ConfigError, sources.DataError) as e:
    cli.fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
