"""With libtpu installed (the `tpu` extra) but no TPU, CPU runs stay quiet."""
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_the_package_skips_the_absent_tpu():
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip('libtpu is not installed: nothing to skip')
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['PYTHONPATH'] = ROOT
  code = 'import lejepa_jax, jax; print(jax.default_backend(), jax.device_count())'
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  has_accelerator = any(open(p).read().strip() in ('0x1ae0', '0x10de', '0x1002')
                        for p in glob.glob('/sys/bus/pci/devices/*/vendor'))
  if has_accelerator:
    pytest.skip('this machine has an accelerator: JAX should use it')
  assert out.stdout.split() == ['cpu', '1']
  assert 'TPU' not in out.stderr and 'libtpu' not in out.stderr, out.stderr[-2000:]
