"""Chips, TPU slices and GPU nodes, and what plan knows about datasets: `parse_topology`,
compile-only devices (libtpu's for TPUs; the CUDA plugin's from a device description for GPUs)."""
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
  dims: int                     # torus dimensions; 0: not a TPU
  gpu: dict | None = None       # a GPU's device description (GPU_SPECS), for deviceless compiles


# What XLA's GPU compiler needs to know of a GPU it cannot see (xla's GpuDeviceInfoProto), from
# NVIDIA's public specifications: SMs, compute capability, boost clock, L2, memory bandwidth
# (the A100 and H100 datasheets and architecture whitepapers; the H200 is the H100's GH100 with
# 141 GB of HBM3e at 4.8 TB/s). Memory: what CUDA reports on the device; for the H100 the
# value in the public target config of jax-ml/jax issue 28376, 564 MiB below nvidia-smi's
# total (81559 MiB); the A100 80GB (81920 MiB) and H200 (143771 MiB) totals less the same.
_MIB = 1 << 20
GPU_SPECS = {
    'h100': dict(name='NVIDIA H100 80GB HBM3', major=9, minor=0, sms=132, fpus=128,
                 clock_ghz=1.98, l2=50 * _MIB, bandwidth=3.35e12, smem_core=228 * 1024,
                 smem_optin=227 * 1024, memory=84_929_347_584),
    'h200': dict(name='NVIDIA H200', major=9, minor=0, sms=132, fpus=128, clock_ghz=1.98,
                 l2=50 * _MIB, bandwidth=4.8e12, smem_core=228 * 1024, smem_optin=227 * 1024,
                 memory=(143_771 - 564) * _MIB),
    'a100': dict(name='NVIDIA A100-SXM4-80GB', major=8, minor=0, sms=108, fpus=64,
                 clock_ghz=1.41, l2=40 * _MIB, bandwidth=2.039e12, smem_core=164 * 1024,
                 smem_optin=163 * 1024, memory=(81_920 - 564) * _MIB),
}
# Public specifications (per chip): memory, dense bf16 peak (GPUs: the SXM parts).
CHIPS = {
    'v4': Chip('v4', 32 * GiB, 275e12, True, 3),
    'v5e': Chip('v5e', 16 * GiB, 197e12, False, 2),
    'v5p': Chip('v5p', 95 * GiB, 459e12, True, 3),
    'v6e': Chip('v6e', 32 * GiB, 918e12, False, 2),
    'a100': Chip('a100', GPU_SPECS['a100']['memory'], 312e12, False, 0, GPU_SPECS['a100']),
    'h100': Chip('h100', GPU_SPECS['h100']['memory'], 989e12, False, 0, GPU_SPECS['h100']),
    'h200': Chip('h200', GPU_SPECS['h200']['memory'], 989e12, False, 0, GPU_SPECS['h200']),
}
_GPU_NAMES = ('a100', 'h100', 'h200')
# JAX preallocates this fraction of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, JAX's
# "GPU memory allocation" notes); a run can use no more.
DEFAULT_GPU_MEMORY_FRACTION = 0.75
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
  shape: tuple[int, ...] | None  # TPU torus, or GPUs (nodes, per node); None: --devices

  @property
  def desc(self) -> str:
    if self.shape is None:
      return f'{self.chip.name} x {self.chips}'
    return f'{self.chip.name}:' + 'x'.join(map(str, self.shape))

  @property
  def platform(self) -> str:
    """'tpu', 'cuda' (compile-only devices of that platform) or 'cpu' (--devices)."""
    if self.shape is None:
      return 'cpu'
    return 'cuda' if self.chip.gpu else 'tpu'


def gpu_memory_fraction() -> float:
  return float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', DEFAULT_GPU_MEMORY_FRACTION))


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
           'v5litepod-256, v6e-64), a topology (v5p:4x4x4, v5e:16x16), GPU nodes (h100-8: '
           'one node of 8, h100-2x8: two; ' + ', '.join(_GPU_NAMES) + ')'
           + (', or with --devices a chip name (' + ', '.join(sorted(CHIPS)) + ')'))
  names = '|'.join(_TPU_NAMES)
  gpus = '|'.join(_GPU_NAMES)
  if m := re.fullmatch(rf'({gpus})-(?:(\d+)x)?(\d+)', spec):
    chip, nodes, per_node = CHIPS[m[1]], int(m[2] or 1), int(m[3])
    if nodes < 1 or per_node < 1:
      raise PlanError(f'{usage}; nodes and GPUs per node are >= 1')
    shape, chips = (nodes, per_node), nodes * per_node
  elif m := re.fullmatch(rf'({names})-(\d+)', spec):
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


def gpu_target_config(spec: dict, *, dnn=(9, 8), runtime=(12, 8)) -> str:
  """The text form of XLA's GpuTargetConfigProto for a GPU of GPU_SPECS: what the compiler
  would read off the device. dnn / runtime: the cuDNN and CUDA versions the job will run with
  (cuDNN's fused attention needs one that supports it)."""
  fields = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 * 1024,
                shared_memory_per_core=spec['smem_core'], threads_per_core_limit=2048,
                core_count=spec['sms'], fpus_per_core=spec['fpus'],
                block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
                memory_bandwidth=int(spec['bandwidth']), l2_cache_size=spec['l2'],
                clock_rate_ghz=spec['clock_ghz'], device_memory_size=spec['memory'],
                shared_memory_per_block_optin=spec['smem_optin'],
                registers_per_core_limit=65536, registers_per_block_limit=65536)
  info = '\n'.join(f'  {k}: {v}' for k, v in fields.items())
  return (f'gpu_device_info {{\n{info}\n  cuda_compute_capability {{ major: {spec["major"]} '
          f'minor: {spec["minor"]} }}\n}}\nplatform_name: "CUDA"\n'
          f'dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} }}\n'
          f'runtime_version {{ major: {runtime[0]} minor: {runtime[1]} }}\n'
          f'device_description_str: "{spec["name"]}"\n')


def gpu_devices(topology: Topology) -> list:
  """Compile-only GPUs of `topology` (nodes x GPUs), from the CUDA plugin and a device
  description: no GPU needed."""
  from jax.experimental import topologies
  try:
    import jax_cuda12_plugin  # noqa: F401  (the CUDA PJRT plugin: pip install -e '.[gpu]')
  except ImportError:
    raise PlanError(f'--topology={topology.spec} compiles for GPUs with the CUDA plugin, which is '
                    "not installed: pip install -e '.[gpu]' (about 5.5 GB), or plan the sharding "
                    f'on simulated CPU devices: --topology={topology.chip.name} '
                    f'--devices={topology.chips}') from None
  nodes, per_node = topology.shape
  try:
    desc = topologies.get_topology_desc(platform='cuda', topology=f'1x{nodes}x{per_node}',
                                        target_config=gpu_target_config(topology.chip.gpu))
  except Exception as e:  # pylint: disable=broad-except
    raise PlanError(f'cannot make compile-only GPUs for {topology.desc}: {e}') from e
  devices = list(desc.devices)
  if len(devices) != topology.chips:
    raise PlanError(f'{topology.desc}: the CUDA plugin gives {len(devices)} devices for '
                    f'{topology.chips} GPUs')
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
