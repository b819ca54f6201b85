"""Every test sees 8 fake CPU devices, so sharded code paths run on every run.

One persistent compilation cache serves the session, in-process runs and the subprocesses
they start (they inherit the environment): many tests build the same programs (the runlocal
configs), which are then compiled once, as a real rerun of a run loads its executables.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='lejepa_jax_tests_jax_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update('jax_num_cpu_devices', 8)
