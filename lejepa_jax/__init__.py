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


def _skip_absent_tpu() -> None:
  """With libtpu installed (the `tpu` extra) on a machine without TPU or GPU, use the CPU.

  Otherwise JAX probes for a TPU before falling back, and libtpu prints pages
  of warnings on every CPU run. Runs at import, before JAX picks a backend; an
  explicit JAX_PLATFORMS wins. PCI vendor ids: 0x1ae0 Google (TPU), 0x10de
  NVIDIA, 0x1002 AMD (GPU).
  """
  if 'JAX_PLATFORMS' in _os.environ or _importlib_util.find_spec('libtpu') is None:
    return
  vendors = set()
  for path in _glob.glob('/sys/bus/pci/devices/*/vendor'):
    with open(path) as f:
      vendors.add(f.read().strip())
  if not vendors & {'0x1ae0', '0x10de', '0x1002'}:
    import jax
    jax.config.update('jax_platforms', 'cpu')


_skip_absent_tpu()
