"""Chips, TPU topologies and what plan knows about datasets: `parse_topology`, compile-only devices."""
from __future__ import annotations

import dataclasses
import math
import os
import re


GiB = 1 << 30
MARGIN = 0.05                   # of HBM kept free; see the module docstring


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int
  peak_flops: float             # published dense bf16 peak per chip
  counts_cores: bool            # the Cloud accelerator type counts TensorCores (2 per chip)
  dims: int                     # torus dimensions; 0: not a TPU (--devices only)


# Public specifications (per chip). GPUs only for --devices (sharding checks of GPU jobs).
CHIPS = {
    'v4': Chip('v4', 32 * GiB, 275e12, True, 3),
    'v5e': Chip('v5e', 16 * GiB, 197e12, False, 2),
    'v5p': Chip('v5p', 95 * GiB, 459e12, True, 3),
    'v6e': Chip('v6e', 32 * GiB, 918e12, False, 2),
    'a100': Chip('a100', 80 * GiB, 312e12, False, 0),
    'h100': Chip('h100', 80 * GiB, 989e12, False, 0),
}
_ALIASES = {'v5litepod': 'v5e'}
_TPU_NAMES = ('v4', 'v5p', 'v5litepod', 'v5e', 'v6e')
# Remat policies from least to most recomputation (= most to least activation memory).
RECOMPUTE_ORDER = ('none', 'dots', 'dots_no_batch', 'full')
# Split sizes of datasets plan knows without reading them.
KNOWN_SPLIT_SIZES = {
    'imagenet2012': {'train': 1281167, 'validation': 50000},
    'imagenette': {'train': 9469, 'validation': 3925},
    'fashion_mnist': {'train': 60000, 'test': 10000},
}


class PlanError(ValueError):
  """A usage error: bad --topology, unknown dataset size, ..."""


@dataclasses.dataclass(frozen=True)
class Topology:
  spec: str                     # as given
  chip: Chip
  chips: int
  shape: tuple[int, ...] | None  # torus shape (None: --devices without a TPU shape)

  @property
  def desc(self) -> str:
    if self.shape is None:
      return f'{self.chip.name} x {self.chips}'
    return f'{self.chip.name}:' + 'x'.join(map(str, self.shape))


def default_shape(chip: Chip, chips: int) -> tuple[int, ...]:
  """The torus shape Cloud TPU gives an accelerator type of `chips` chips.

  3-D (v4, v5p): 4 chips = 2x2x1, then the smallest axis doubles (the last of equals):
  2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... 2-D (v5e, v6e): 1x1, 2x2, 2x4, 4x4, 4x8, ..., 16x16.
  """
  if chip.dims == 2 and chips == 1:
    return (1, 1)
  if chips < 4 or chips & (chips - 1):
    raise PlanError(f'{chips} chips: accelerator types of {chip.name} have 4, 8, 16, ... chips; '
                    f'give a topology string such as {chip.name}:2x2x3 for other shapes')
  if chip.dims == 2 and chips > 256:
    raise PlanError(f'{chip.name} slices have at most 256 chips; multislice is not planned here')
  shape = [2, 2] if chip.dims == 2 else [2, 2, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
  return tuple(shape)


def parse_topology(spec: str, devices: int | None = None) -> Topology:
  """--topology (and --devices) -> Topology. v5p-128 -> 64 chips on v5p:4x4x4."""
  spec = (spec or '').strip()
  usage = (f'--topology={spec!r}: expected a Cloud TPU accelerator type (v5p-128, v4-128, '
           'v5litepod-256, v6e-64), a topology (v5p:4x4x4, v5e:16x16)'
           + (', or with --devices a chip name (' + ', '.join(sorted(CHIPS)) + ')'))
  names = '|'.join(_TPU_NAMES)
  if m := re.fullmatch(rf'({names})-(\d+)', spec):
    chip = CHIPS[_ALIASES.get(m[1], m[1])]
    n = int(m[2])
    if chip.counts_cores and n % 2:
      raise PlanError(f'{usage}; {m[1]}-N counts TensorCores, 2 per chip, so N is even')
    chips = n // 2 if chip.counts_cores else n
    shape = default_shape(chip, chips)
  elif m := re.fullmatch(rf'({names}):(\d+(?:x\d+)+)', spec):
    chip = CHIPS[_ALIASES.get(m[1], m[1])]
    shape = tuple(int(s) for s in m[2].split('x'))
    if len(shape) != chip.dims or 0 in shape:
      raise PlanError(f'{usage}; {chip.name} topologies have {chip.dims} dimensions')
    chips = math.prod(shape)
  elif devices and _ALIASES.get(spec, spec) in CHIPS:
    chip, shape, chips = CHIPS[_ALIASES.get(spec, spec)], None, devices
  else:
    raise PlanError(usage)
  if devices is not None:
    if devices < 1:
      raise PlanError(f'--devices={devices}: must be >= 1')
    if shape is not None and devices != chips:
      raise PlanError(f'--devices={devices} but {spec} has {chips} chips; give --topology='
                      f'{chip.name} to use only its memory and peak')
  return Topology(spec, chip, chips, shape)


def libtpu_env(topology: Topology) -> None:
  """Env vars that keep libtpu from probing for a pod it is not on (call before jax starts)."""
  if topology.shape is not None:
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    # Compile-only devices never touch a TPU: do not contend for libtpu's lockfile with
    # other processes on this machine (a training run on this TPU VM, other jax processes).
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', {'v5e': 'v5litepod'}.get(
        topology.chip.name, topology.chip.name) + ('-8' if topology.chip.counts_cores else '-4'))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def tpu_devices(topology: Topology) -> list:
  """Compile-only devices of the slice, one per chip (v4 as megacore)."""
  from jax.experimental import topologies
  kwargs = {'chip_config_name': 'megacore'} if topology.chip.name == 'v4' else {}
  try:
    desc = topologies.get_topology_desc(topology_name=topology.desc, platform='tpu', **kwargs)
  except Exception as e:  # no libtpu, or a topology libtpu refuses
    raise PlanError(f'cannot make compile-only devices for {topology.desc}: {e}\n'
                    "(install libtpu with pip install -e '.[tpu]', or use --devices=N)") from e
  devices = list(desc.devices)
  if len(devices) != topology.chips:
    raise PlanError(f'{topology.desc}: libtpu gives {len(devices)} devices for {topology.chips} chips')
  return devices


# ----------------------------------------------------------------------------- sizes
def split_size(config, split: str, override: int | None = None) -> int | None:
  """Examples in `split`: --train_size/--test_size, the known table, or the local source."""
  if override:
    return override
  d = config.data
  dataset = d.name.removeprefix('tfds:').split('/')[0].split(':')[0]
  known = KNOWN_SPLIT_SIZES.get(dataset, {}).get(split.split('[')[0])
  if known:
    return known
  if '://' in str(d.get('dir') or ''):
    return None                 # remote data: do not touch it
  try:
    from lejepa_jax.data import sources
    return len(sources.get_source(d, split))
  except Exception:  # not local, not prepared: the caller says what to pass
    return None


def eval_sizes(config, train_size, test_size) -> tuple[int, int] | None:
  n_train = split_size(config, config.data.train_split, train_size)
  n_test = split_size(config, config.data.test_split, test_size)
  if not n_train or not n_test:
    return None
  return n_train, n_test          # each evaluator applies its own cap (evaluators.suite.cap)
