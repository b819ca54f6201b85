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


def _pci_tree(root, vendors):
  for i, vendor in enumerate(vendors):
    device = root / f'0000:00:0{i}.0'
    device.mkdir(parents=True)
    (device / 'vendor').write_text(vendor + '\n')
  return str(root)


def test_the_cpu_fallback_decision_and_its_reason(tmp_path):
  import lejepa_jax
  reason = lejepa_jax.cpu_fallback_reason
  virtio = _pci_tree(tmp_path / 'virtio', ['0x1af4', '0x8086'])
  assert reason({}, True, virtio) == (
      f'JAX runs on the CPU: libtpu is installed but none of the PCI devices in {virtio} is a '
      'TPU or GPU')
  hidden = str(tmp_path / 'hidden')       # a container without /sys/bus/pci
  assert 'no PCI devices are visible' in reason({}, True, hidden)
  for vendor in ('0x1ae0', '0x10de', '0x1002'):   # a TPU, an NVIDIA or an AMD GPU: JAX picks
    assert reason({}, True, _pci_tree(tmp_path / vendor, ['0x8086', vendor])) is None
  assert reason({'JAX_PLATFORMS': 'cpu'}, True, hidden) is None   # the user chose
  assert reason({}, False, hidden) is None                        # no libtpu: JAX's own choice


def test_a_config_needing_an_accelerator_is_refused_under_the_fallback(tmp_path):
  import lejepa_jax
  from configs import fmnist
  from configs import vitg
  from lejepa_jax import cli
  fallback = lejepa_jax.cpu_fallback_reason({}, True, str(tmp_path / 'hidden'))
  g = vitg.get_config()
  problem = cli.cpu_fallback_problem(g, fallback=fallback, allowed=False, cpu_devices=1)
  assert problem.startswith(fallback + ", and the config asks for an accelerator: "
                            "model.dtype='bfloat16'")
  assert '--allow_cpu_fallback' in problem and 'JAX_PLATFORMS' in problem
  # A mesh of more devices than the CPU has.
  f = fmnist.get_config()
  f.mesh = {'data': 1, 'fsdp': 4, 'tensor': 2}
  assert cli.accelerator_needs(f, cpu_devices=4) == [
      "mesh {'data': 1, 'fsdp': 4, 'tensor': 2} needs 8 devices, the CPU has 4"]
  assert cli.accelerator_needs(f, cpu_devices=8) == []
  # Accepted: with the flag (or --cpu_devices), when JAX_PLATFORMS was explicit (no fallback),
  # and for the CPU configs, runlocal ones included.
  assert cli.cpu_fallback_problem(g, fallback=fallback, allowed=True, cpu_devices=1) is None
  explicit = lejepa_jax.cpu_fallback_reason({'JAX_PLATFORMS': 'cpu'}, True, str(tmp_path))
  assert cli.cpu_fallback_problem(g, fallback=explicit, allowed=False, cpu_devices=1) is None
  for c in (fmnist.get_config(), fmnist.get_config('runlocal'), vitg.get_config('runlocal')):
    assert cli.cpu_fallback_problem(c, fallback=fallback, allowed=False, cpu_devices=1) is None


def _cpu_fallback_here():
  import lejepa_jax
  return lejepa_jax.cpu_fallback_reason({}, importlib.util.find_spec('libtpu') is not None)


def test_main_refuses_vitg_on_the_fallback_cpu_and_says_why(tmp_path):
  if not _cpu_fallback_here():
    pytest.skip('no libtpu, or an accelerator is visible: no CPU fallback here')
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['PYTHONPATH'] = ROOT
  workdir = tmp_path / 'w'
  base = [sys.executable, '-m', 'lejepa_jax.main', '--config=configs/vitg.py',
          f'--workdir={workdir}']
  out = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('[lejepa_jax] error: JAX runs on the CPU: libtpu is installed'), last
  assert "model.dtype='bfloat16'" in last and '--allow_cpu_fallback' in last
  assert 'JAX runs on the CPU' in out.stderr.splitlines()[-2]     # the warning, logged before
  assert not workdir.exists()
  # With the flag, or JAX_PLATFORMS=cpu, it goes on (to the missing data folder here).
  data = ['--config.data.name=folder', f'--config.data.dir={tmp_path / "none"}']
  for extra, run_env in ((['--allow_cpu_fallback'], env), ([], dict(env, JAX_PLATFORMS='cpu'))):
    out = subprocess.run(base + data + extra, cwd=ROOT, env=run_env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and 'image folder' in out.stderr, out.stderr[-2000:]
    assert '--allow_cpu_fallback' not in out.stderr
