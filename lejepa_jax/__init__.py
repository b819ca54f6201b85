"""LeJEPA in JAX/Flax: self-supervised pretraining with SIGReg."""
import glob as _glob
import importlib.util as _importlib_util
import os as _os

__version__ = '0.1.0'

__all__ = ['load_encoder']


def __getattr__(name):
  # Lazy: `import lejepa_jax` stays cheap (no JAX, Flax or safetensors until used).
  if name == 'load_encoder':
    from lejepa_jax.encoder import load_encoder
    return load_encoder
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


# Why JAX was put on the CPU at import, or None (an explicit JAX_PLATFORMS, an accelerator
# on the PCI bus, or no libtpu). `cli.setup` logs it as a warning; `lejepa_jax.main` refuses a
# config that needs an accelerator under it (cli.check_cpu_fallback).
CPU_FALLBACK = None

PCI_DEVICES = '/sys/bus/pci/devices'
# PCI vendor ids: 0x1ae0 Google (TPU), 0x10de NVIDIA, 0x1002 AMD (GPU).
ACCELERATOR_VENDORS = frozenset({'0x1ae0', '0x10de', '0x1002'})


def cpu_fallback_reason(environ, libtpu_installed: bool, pci_devices: str = PCI_DEVICES):
  """Why JAX should be put on the CPU (a one-line reason), or None to let JAX choose.

  Only with libtpu installed (the `tpu` extra), no explicit JAX_PLATFORMS, and no TPU or GPU
  vendor among the PCI devices (`pci_devices`/*/vendor).
  """
  if 'JAX_PLATFORMS' in environ or not libtpu_installed:
    return None
  vendors = set()
  for path in _glob.glob(_os.path.join(pci_devices, '*', 'vendor')):
    with open(path) as f:
      vendors.add(f.read().strip())
  if vendors & ACCELERATOR_VENDORS:
    return None
  seen = (f'none of the PCI devices in {pci_devices} is a TPU or GPU' if vendors else
          f'no PCI devices are visible in {pci_devices} (a container may hide them)')
  return f'JAX runs on the CPU: libtpu is installed but {seen}'


def _skip_absent_tpu() -> None:
  """With libtpu installed on a machine without TPU or GPU, use the CPU (`cpu_fallback_reason`).

  Otherwise JAX probes for a TPU before falling back, and libtpu prints pages of warnings on
  every CPU run. Runs at import, before JAX picks a backend; the reason is kept in CPU_FALLBACK
  (nothing is printed here: `import lejepa_jax` stays quiet).
  """
  global CPU_FALLBACK
  reason = cpu_fallback_reason(_os.environ, _importlib_util.find_spec('libtpu') is not None)
  if reason:
    import jax
    jax.config.update('jax_platforms', 'cpu')
    CPU_FALLBACK = reason


_skip_absent_tpu()
