"""Plan a run before renting the slice: compile it ahead of time for a TPU topology.

    python -m lejepa_jax.plan --config=configs/vitg.py --topology=v5p-128 [--search]
    python -m lejepa_jax.plan --config=configs/vitg.py --topology=v5p:4x4x4
    python -m lejepa_jax.plan --config=configs/vitg.py:runlocal --topology=v5p --devices=8
    python -m lejepa_jax.plan ... --config.model.remat=full --config.batch_size=1024

`--topology` is a Cloud TPU accelerator type (v4-N and v5p-N count TensorCores, so
v5p-128 is 64 chips; v5litepod-N and v6e-N count chips) or a topology string
(v5p:4x4x4, v5e:16x16, v4:4x4x4, v6e:8x8). libtpu (`pip install -e '.[tpu]'`)
provides compile-only devices for it; no TPU is needed. `--devices=N` compiles for N
simulated CPU devices instead (where libtpu is absent, or for GPU jobs: then
--topology may name just the chip, e.g. v5p or h100, for its memory and peak);
CPU compiles check the sharding, their memory numbers are the CPU compiler's.

Nothing is allocated: `steps.build` gives the state as ShapeDtypeStructs with the
run's shardings and the run's jitted functions, which plan lowers and compiles
(`jit(...).lower(abstract args).compile()`): the train step on
`steps.abstract_batch`, `features` on `steps.abstract_images(eval.batch_size)`, and
the evaluators' programs (`linear_probe.programs`, `knn.programs`) on
`features.abstract_features` of the train and test splits. What plan compiles is
what `train.train_and_evaluate` executes.

Output: a table per compiled function (per chip: argument, temporary, output,
aliased and code bytes, flops), then, as the LAST line, one JSON object:

  topology, topology_desc  as given / the topology string compiled for ('v5p:4x4x4')
  chip, chips, simulated_devices  chip generation, number of chips (= devices; v4 and
                        v5p are compiled as megacore: one device per chip)
  hbm_bytes_per_chip    published HBM of the chip (or --hbm_gib)
  usable_bytes_per_chip HBM minus a 5% margin (XLA itself refuses above ~96%:
                        30.75 of 32 GiB on v4; the rest covers the input pipeline's
                        next batch in flight and fragmentation)
  mesh, batch_size, batch_per_chip  resolved mesh, global batch, images per
                        data-parallel shard (batch / (data x fsdp))
  remat                 config.model.remat (a key of models.vit.REMAT_POLICIES)
  params                encoder parameters (leaves of the abstract state's
                        params['encoder']); params_total adds projector and probe
  state_bytes_per_chip  params + optimizer state + batch stats + step/rng per chip,
                        from the shardings (what stays in HBM for the whole run)
  functions             per compiled function: argument, temporary, output, alias,
                        code bytes (XLA's memory_analysis, per chip), resident (the
                        state and extracted features that stay in HBM during
                        evaluation but are not that function's arguments), total =
                        argument + temporary + output - alias + code + resident, and
                        flops per chip (train_step, features: the exact count below / chips;
                        the evaluators: XLA's cost_analysis, loop bodies once)
  train_step_bytes_per_chip  the train step's total
  bytes_per_chip        max of total over the compiled functions (when the compiler says
                        RESOURCE_EXHAUSTED: the train step's arguments + the temporaries it
                        asked for, a lower bound)
  fits                  bytes_per_chip <= usable_bytes_per_chip and everything compiled;
                        reason says why not (state vs temporaries, the compiler's
                        message for RESOURCE_EXHAUSTED, the parameter a mesh axis does not
                        divide) and what to change
  flops_per_step        flops of one train step over all chips, from XLA's cost analysis of
                        the program plan compiles, counted before partitioning: XLA counts
                        a loop body once (the scanned blocks, and on TPU the windowed-einsum
                        loops the SPMD partitioner makes of FSDP matmuls), so plan lowers the
                        same config unrolled (model.scan=False) at depth 1 and 2 on one CPU
                        device and extrapolates linearly in depth:
                        F(L) = F(1) + (L - 1) * (F(2) - F(1)) (see `exact_flops`). Includes
                        the remat policy's recomputation, the projector, SIGReg and the
                        optimizer. (--noexact_flops: the compiled scanned program's raw count
                        times chips, which is too low.)
  model_flops_per_step  analytic: batch x (6 x params x tokens_per_image
                        + 12 x depth x width x sum over views of seq_len^2), with
                        seq_len = (crop / patch)^2 + 1 + registers per view (the
                        projector and probe heads are left out)
  tokens_per_image      sum of seq_len over the views (814 for ViT-g/14, 2x224 + 6x98)
  total_steps, train_size  train.total_steps(config, train_size); train_size from a
                        table of known datasets, the local source, or --train_size
  peak_flops_per_chip   published bf16 peak
  estimated_hours       {'at_peak', 'at_50pct'}: total_steps x flops_per_step /
                        (chips x peak) / 3600, and twice that; hours_from names the flops
                        used (flops_per_step, or model_flops_per_step when there is none)
  search                with --search: the cheapest change that fits, as
                        --config.KEY=VALUE flags, its train step's bytes per chip, flops
                        and hours, and every candidate tried (candidates compile the
                        train step only; run plan with the flags for the whole report)
  compile_seconds       wall time of all compiles

`--search` tries, in this order of preference: keeping the batch (its science), the
config's mesh, then fsdp x tensor splits of the chips (tensor ascending), and for each
the remat policy with the least recomputation that fits (none < dots < dots_no_batch <
full; memory is assumed to fall in that order, so policies known to be worse are not
compiled); then half the global batch (the config's lr kept, warmup kept in images).
Exit status: 0 when it compiled or did not fit (fits: false and reason); 1 on usage
errors and on compile errors other than running out of memory or an indivisible
sharding, printed as the compiler gives them; with --check, 2 when it does not fit.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags
import ml_collections

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


def _libtpu_env(topology: Topology) -> None:
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


def model_flops(config, encoder, params: int) -> tuple[float, int]:
  """(analytic flops of one train step, tokens per image); see the module docstring."""
  d = config.data
  seqs = ([(d.global_size // encoder.patch_size) ** 2 + 1 + encoder.num_registers]
          * d.num_global_views +
          [(d.local_size // encoder.patch_size) ** 2 + 1 + encoder.num_registers]
          * d.num_local_views)
  tokens = sum(seqs)
  # The linear head (model.embedding_dim) runs on one CLS token per view, not on every token.
  head = encoder.head_dim * (encoder.width + 1)
  per_image = (6 * (params - head) * tokens + 6 * head * len(seqs) +
               12 * encoder.depth * encoder.width * sum(s * s for s in seqs))
  return float(config.batch_size * per_image), tokens


def per_chip_bytes(tree) -> int:
  """Bytes one device holds of the ShapeDtypeStruct leaves of `tree` (by their shardings)."""
  import jax
  total = 0
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.ShapeDtypeStruct):
      shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
      total += math.prod(shape) * x.dtype.itemsize
  return total


def sharding_problems(named_trees: dict) -> list[str]:
  """Array dimensions that their mesh axes do not divide (jit would refuse them)."""
  import jax
  groups = {}
  for label, tree in named_trees.items():
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      if not isinstance(x, jax.ShapeDtypeStruct) or x.sharding is None:
        continue
      mesh, spec = x.sharding.mesh, x.sharding.spec
      for size, axes in zip(x.shape, spec):
        if axes is None:
          continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        n = math.prod(mesh.shape[a] for a in axes)
        if size % n:
          key = (size, ' x '.join(f'{a}={mesh.shape[a]}' for a in axes))
          groups.setdefault(key, []).append(label + jax.tree_util.keystr(path))
  return [f'dimension {size} of {len(paths)} array(s) (e.g. {paths[0]}) does not divide by {axes}'
          for (size, axes), paths in groups.items()]


# ----------------------------------------------------------------------------- one config
@dataclasses.dataclass
class Assessment:
  """What compiling one configuration on one set of devices showed."""
  mesh: dict
  batch_size: int
  batch_per_chip: int
  remat: str
  params: int = 0
  params_total: int = 0
  state_bytes: int = 0
  functions: dict = dataclasses.field(default_factory=dict)
  fits: bool = False
  reason: str | None = None
  kind: str = 'ok'              # ok | sharding | oom | memory
  programs: Any = None          # steps.Programs
  encoder: Any = None           # the resolved ViTConfig
  compiled: dict = dataclasses.field(default_factory=dict)  # name -> jax.stages.Compiled
  oom_bytes: int | None = None  # RESOURCE_EXHAUSTED: arguments + the temporaries XLA asked for

  @property
  def train_bytes(self) -> int | None:
    f = self.functions.get('train_step')
    return f['total'] if f else None

  @property
  def bytes_per_chip(self) -> int | None:
    totals = [f['total'] for f in self.functions.values()] + [self.oom_bytes or 0]
    return max(totals) or None


def _gib(b) -> str:
  return 'n/a' if b is None else f'{b / GiB:.2f} GiB' if b >= GiB / 100 else f'{b / 2**20:.2f} MiB'


def _short(b: int) -> str:
  for unit, size in (('G', GiB), ('M', 1 << 20), ('K', 1 << 10)):
    if abs(b) >= size:
      return f'{b / size:.2f}{unit}'
  return f'{b}B'


def _parse_gib(text: str) -> float | None:
  m = re.search(r'([\d.]+)([KMGT])', text)
  if not m:
    return None
  return float(m[1]) * {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}[m[2]]


def _oom_summary(msg: str) -> str:
  """The compiler's own words for RESOURCE_EXHAUSTED, first sentence only."""
  line = next((l for l in msg.splitlines() if 'RESOURCE_EXHAUSTED' in l), msg.splitlines()[0])
  return line.split('RESOURCE_EXHAUSTED:', 1)[-1].strip().rstrip('.')[:400]


class _OutOfMemory(Exception):
  pass


def _compile(fn, args):
  try:
    return fn.lower(*args).compile()
  except Exception as e:
    if 'RESOURCE_EXHAUSTED' in str(e):
      raise _OutOfMemory(str(e)) from None
    raise


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row = {'argument': int(m.argument_size_in_bytes), 'temporary': int(m.temp_size_in_bytes),
         'output': int(m.output_size_in_bytes), 'alias': int(m.alias_size_in_bytes),
         'code': int(m.generated_code_size_in_bytes), 'resident': 0,
         'flops': float((cost or {}).get('flops', 0.0))}
  row['total'] = row['argument'] + row['temporary'] + row['output'] - row['alias'] + row['code']
  return row


def _ids(tree) -> set:
  import jax
  return {id(x) for x in jax.tree.leaves(tree)}


def with_overrides(config, *, remat=None, mesh=None, batch_size=None, depth=None, scan=None):
  c = copy.deepcopy(config)
  with c.unlocked():
    if remat is not None:
      c.model.remat = remat
    if mesh is not None:
      c.mesh = ml_collections.ConfigDict(dict(mesh))
    if batch_size is not None:
      c.batch_size = batch_size
    if depth is not None:
      c.model.depth = depth
    if scan is not None:
      c.model.scan = scan
  return c


def _resolved_mesh(config, devices) -> dict:
  from lejepa_jax import sharding as sharding_lib
  return dict(zip(sharding_lib.MESH_AXES, sharding_lib.mesh_shape(config.get('mesh'), len(devices))))


def assess(config, devices, *, total_steps: int, usable: int, sizes=None,
           with_eval: bool = True, log=print) -> Assessment:
  """Builds the run's programs on `devices` and compiles them; never raises for OOM/sharding."""
  import jax
  from lejepa_jax import sharding as sharding_lib
  from lejepa_jax import models
  from lejepa_jax import steps
  mesh_sizes = _resolved_mesh(config, devices)
  dp = mesh_sizes['data'] * mesh_sizes['fsdp']
  out = Assessment(mesh=mesh_sizes, batch_size=config.batch_size,
                   batch_per_chip=config.batch_size // dp if config.batch_size % dp == 0 else 0,
                   remat=config.model.remat)
  mesh = sharding_lib.make_mesh(config.get('mesh'), devices=devices)
  programs = steps.build(config, mesh, total_steps)
  out.programs, out.encoder = programs, programs.model.encoder
  state = programs.abstract_state
  out.params = sum(x.size for x in jax.tree.leaves(state.params['encoder']))
  out.params_total = sum(x.size for x in jax.tree.leaves(state.params))
  batch = steps.abstract_batch(config, mesh)
  images = steps.abstract_images(config, mesh, config.eval.batch_size)
  problems = sharding_problems({'state': state, 'batch': batch, 'eval_images': images})
  if problems:
    out.kind = 'sharding'
    splits = [f'fsdp={m["fsdp"]} x tensor={m["tensor"]}' for m in
              _mesh_candidates(config, programs.model.encoder, len(devices), config.batch_size)]
    out.reason = (f'mesh {mesh_sizes} cannot shard this config: ' + '; '.join(problems) +
                  '. Choose a mesh whose fsdp divides the width and the batch (data x fsdp) and '
                  'whose tensor divides heads and mlp_dim' +
                  (f' ({", ".join(splits[:3])} do)' if splits else '') +
                  '; --search compiles them')
    return out
  out.state_bytes = per_chip_bytes(state)
  variables = steps.variables(state)
  jobs = [('train_step', programs.train_step, (state, batch))]
  feature_sets = None
  if with_eval:
    from lejepa_jax.evaluators import suite
    all_specs = suite.specs(config)
    # One encoder pass gives every kind of features the evaluators read (suite.Runner).
    kinds = tuple(dict.fromkeys(suite.feature_kind(config, s) for s in all_specs)) or (
        config.eval.get('features') or 'probe',)
    jobs.append(('features', programs.features_of(kinds), (variables, images)))
    if sizes:
      from lejepa_jax.evaluators import features as features_lib
      e = config.eval
      dims = models.feature_dims(programs.model)
      by_size = {}       # evaluators with the same cap share one feature extraction
      for spec in all_specs:
        cap = suite.cap(config, spec)
        n = tuple(min(k, cap) if cap else k for k in sizes)
        dim = dims[suite.feature_kind(config, spec)]
        if (n, dim) not in by_size:
          by_size[n, dim] = [features_lib.abstract_features(k, e.batch_size, dim, mesh)
                             for k in n]
        jobs += suite.programs(spec, *by_size[n, dim], config.data.num_classes, mesh=mesh,
                               probe=variables['params']['probe'])
      if by_size:        # resident during evaluation: all kinds of the largest extraction
        n = max((n for n, _ in by_size), key=sum)
        total = sum(dims[k] for k in kinds)
        # One kind: the evaluators' own inputs. Several: the concatenation, beside which each
        # evaluator holds a copy of its columns (counted with its arguments).
        feature_sets = by_size.get((n, total)) if len(kinds) == 1 else [
            features_lib.abstract_features(k, e.batch_size, total, mesh) for k in n]
  # What stays in HBM while the evaluation runs: the train state and the (largest) features.
  resident = [state] + ([tuple(f[:2]) for f in feature_sets] if feature_sets else [])
  resident_ids = set().union(*(_ids(t) for t in resident))
  resident_bytes = sum(per_chip_bytes(t) for t in resident)
  with sharding_lib.activate(mesh):
    for name, fn, args in jobs:
      t = time.perf_counter()
      try:
        compiled = _compile(fn, args)
      except _OutOfMemory as e:
        out.kind, out.fits = 'oom', False
        summary = _oom_summary(str(e))
        m = re.search(r'temporaries \(([\d.]+[KMGT])', summary)
        if m and name == 'train_step':   # at least: its arguments and the compiler's temporaries
          out.oom_bytes = per_chip_bytes(args) + int(_parse_gib(m[1]))
        out.reason = f'{name} does not compile: {summary}. {_advice(out, usable, summary, name)}'
        log(f'  {name}: RESOURCE_EXHAUSTED after {time.perf_counter() - t:.0f}s')
        return out
      out.compiled[name] = compiled
      row = _memory(compiled)
      if name != 'train_step':     # the state (and features) stay resident during evaluation
        overlap = sum(per_chip_bytes(x) for x in jax.tree.leaves(args) if id(x) in resident_ids)
        row['resident'] = resident_bytes - overlap
        row['total'] += row['resident']
      out.functions[name] = row
      log(f'  {name}: {_gib(row["total"])} per chip, compiled in {time.perf_counter() - t:.0f}s')
  worst = max(out.functions, key=lambda k: out.functions[k]['total'])
  out.fits = out.bytes_per_chip <= usable
  if not out.fits:
    out.kind = 'memory'
    out.reason = (f'{worst} needs {_gib(out.bytes_per_chip)} per chip, more than the usable '
                  f'{_gib(usable)}. {_advice(out, usable, worst=worst)}')
  return out


def _advice(a: Assessment, usable: int, oom: str = '', worst: str = 'train_step') -> str:
  """Why it does not fit: the state against the activations, and what would change it."""
  if worst != 'train_step':
    return (f'The train state ({_gib(a.state_bytes)} per chip) and the extracted features stay '
            f'in memory during evaluation; {worst} needs the rest: lower --config.eval.batch_size '
            '(features) or --config.evals.linear_probe.batch_size (linear probe), or use more chips')
  f = a.functions.get('train_step')
  if f:
    temps = f['temporary']
  else:                          # the compiler's 'HLO temporaries (44.36G)'
    m = re.search(r'temporaries \(([\d.]+[KMGT])', oom)
    temps = _parse_gib(m[1]) if m else None
  state = a.state_bytes
  text = (f'State (params + optimizer + batch stats) is {_gib(state)} per chip, temporaries '
          f'(activations) {_gib(temps)} with remat={a.remat} at {a.batch_per_chip} images per '
          'data-parallel shard')
  if state > usable:
    need = math.ceil(state * a.mesh['data'] / usable) if usable else 0
    return (text + f'; the state alone exceeds the usable memory: shard it over more chips '
            f'(fsdp) or rent a slice with >= {need}x the chips')
  more = list(RECOMPUTE_ORDER[RECOMPUTE_ORDER.index(a.remat) + 1:]) if a.remat in RECOMPUTE_ORDER else []
  hints = []
  if more:
    hints.append('more recomputation (--config.model.remat=' + ' or '.join(more) + ')')
  hints.append('a smaller batch per chip (a smaller --config.batch_size or more chips)')
  return text + '; activations dominate: try ' + ', '.join(hints) + ' (--search compiles them)'


def exact_flops(config, *, total_steps: int, depth: int, names=('train_step', 'features')) -> dict:
  """Flops of one call of train_step / features at full depth, over all chips together.

  XLA's cost analysis counts a loop body once: the scanned blocks, and on TPU also the
  windowed-einsum loops its SPMD partitioner makes of FSDP matmuls (measured: ViT-H/14 on
  v5p-64, the compiled count is 44% of the analytic one). So this counts the program
  before partitioning: the same config unrolled (model.scan=False) at depth 1 and 2,
  lowered (not compiled) on one CPU device, `Lowered.cost_analysis()`, extrapolated
  linearly in depth: F(L) = F(1) + (L - 1) * (F(2) - F(1)). The remat policy's
  recomputation is explicit in the lowered program, so it is counted. The unrolled ViT
  computes only the CLS tokens in its last block (model.cls_only_last); that is kept for
  unrolled configs and turned off for scanned ones, whose blocks compute every token.
  """
  import jax
  from lejepa_jax import sharding as sharding_lib
  from lejepa_jax import steps
  counts = {}
  for d in (1, 2):
    c = with_overrides(config, depth=d, scan=False, mesh={'data': 1, 'fsdp': 1, 'tensor': 1})
    with c.unlocked():   # count what the run executes: scanned blocks compute every token
      c.model.cls_only_last = bool(config.model.get('cls_only_last', True)) and not config.model.scan
    mesh = sharding_lib.make_mesh(c.get('mesh'), devices=jax.devices('cpu')[:1])
    p = steps.build(c, mesh, total_steps)
    s = p.abstract_state
    v = steps.variables(s)
    jobs = {'train_step': (p.train_step, (s, steps.abstract_batch(c, mesh))),
            'features': (p.features, (v, steps.abstract_images(c, mesh, c.eval.batch_size)))}
    with sharding_lib.activate(mesh):
      for name in names:
        fn, args = jobs[name]
        cost = fn.lower(*args).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        counts[name, d] = float(cost['flops'])
  return {name: counts[name, 1] + (depth - 1) * (counts[name, 2] - counts[name, 1])
          for name in names}


# ----------------------------------------------------------------------------- search
def _mesh_candidates(config, encoder, chips: int, batch: int) -> list[dict]:
  """fsdp x tensor = chips splits that divide width, heads, mlp and the batch, tensor ascending."""
  out = []
  for t in range(1, chips + 1):
    f = chips // t
    if chips % t or encoder.num_heads % t or encoder.mlp_dim % t:
      continue
    if encoder.width % f or batch % f or config.eval.batch_size % f:
      continue
    out.append({'data': 1, 'fsdp': f, 'tensor': t})
  return out


def _flags(base, cand: dict) -> list[str]:
  """--config.KEY=VALUE flags that turn the base config into a candidate."""
  out = []
  if cand['remat'] != base.model.remat:
    out.append(f'--config.model.remat={cand["remat"]}')
  if cand['mesh'] != cand['base_mesh']:
    out += [f'--config.mesh.{k}={v}' for k, v in cand['mesh'].items()]
  if cand['batch_size'] != base.batch_size:
    ratio = cand['batch_size'] / base.batch_size   # lr as the config has it; warmup in images
    out += [f'--config.batch_size={cand["batch_size"]}',
            f'--config.optim.warmup_steps={round(base.optim.warmup_steps / ratio)}']
  return out


def search(config, devices, base: Assessment, *, total_steps: int, usable: int,
           log=print) -> dict:
  """The cheapest (batch, mesh, remat) whose train step fits; order in the module docstring.

  Candidates compile the train step only (the evaluation programs are far smaller).
  """
  tried, cache = [], {}
  chips = len(devices)
  base_mesh = dict(base.mesh)
  policies = [p for p in RECOMPUTE_ORDER if p in _remat_policies()]
  if base.kind != 'sharding':
    cache[(config.batch_size, tuple(base_mesh.items()), base.remat)] = base
    if base.state_bytes > usable:
      return {'flags': None, 'fits': False, 'tried': tried,
              'reason': f'the state alone ({_gib(base.state_bytes)} per chip) exceeds the usable '
                        f'{_gib(usable)}: no remat, split or batch changes that; use more chips'}

  def attempt(batch, mesh, remat) -> Assessment:
    key = (batch, tuple(mesh.items()), remat)
    if key not in cache:
      log(f'search: batch {batch}, mesh {mesh}, remat {remat}')
      a = assess(with_overrides(config, remat=remat, mesh=mesh, batch_size=batch), devices,
                 total_steps=total_steps, usable=usable, with_eval=False, log=log)
      cache[key] = a
      tried.append({'batch_size': batch, 'mesh': mesh, 'remat': remat, 'fits': a.fits,
                    'train_step_bytes_per_chip': a.train_bytes or a.oom_bytes,
                    **({'reason': a.reason} if a.reason else {})})
    return cache[key]

  def cheapest(batch, mesh, first: bool) -> str | None:
    """Least-recompute policy that fits at (batch, mesh), memory falling along `policies`."""
    start = policies.index(base.remat) if base.remat in policies else len(policies) - 1
    if not first and not attempt(batch, mesh, policies[-1]).fits:
      return None              # another mesh: worth a scan only if the leanest policy fits
    if attempt(batch, mesh, policies[start]).fits:
      best = policies[start]   # walk down to less recomputation while it still fits
      for p in reversed(policies[:start]):
        if not attempt(batch, mesh, p).fits:
          break
        best = p
      return best
    return next((p for p in policies[start + 1:] if attempt(batch, mesh, p).fits), None)

  batch = config.batch_size
  while batch >= 1:
    meshes = [m for m in _mesh_candidates(config, base.encoder, chips, batch) if m != base_mesh]
    if base.kind != 'sharding' and batch % (base_mesh['data'] * base_mesh['fsdp']) == 0:
      meshes.insert(0, base_mesh)
    for i, mesh in enumerate(meshes):
      remat = cheapest(batch, mesh, first=i == 0)
      if remat is not None:
        a = cache[(batch, tuple(mesh.items()), remat)]
        cand = {'remat': remat, 'mesh': mesh, 'base_mesh': base_mesh, 'batch_size': batch}
        return {'flags': _flags(config, cand), 'batch_size': batch, 'mesh': mesh, 'remat': remat,
                'batch_per_chip': a.batch_per_chip, 'train_step_bytes_per_chip': a.train_bytes,
                'fits': True, 'tried': tried}
    if batch % 2:
      break
    batch //= 2
  return {'flags': None, 'fits': False, 'tried': tried,
          'reason': 'no remat policy, fsdp x tensor split or smaller batch that was tried fits'}


def _remat_policies():
  from lejepa_jax.models import vit
  return vit.REMAT_POLICIES


# ----------------------------------------------------------------------------- report
def _table(rows: dict, note: str) -> str:
  head = (f'{"function":<30}{"argument":>11}{"temporary":>11}{"output":>11}{"alias":>11}'
          f'{"code":>9}{"resident":>11}{"total":>11}{"flops/chip":>12}')
  lines = [head, '-' * len(head)]
  g = _short
  for name, r in rows.items():
    lines.append(f'{name:<30}{g(r["argument"]):>11}{g(r["temporary"]):>11}{g(r["output"]):>11}'
                 f'{g(r["alias"]):>11}{g(r["code"]):>9}{g(r["resident"]):>11}{g(r["total"]):>11}'
                 f'{r["flops"]:>12.3g}')
  return '\n'.join(lines + [note])


def plan(config, topology: Topology, devices, *, search_: bool = False, hbm_bytes=None,
         train_size=None, test_size=None, with_eval=True, with_exact_flops=True,
         log=print) -> dict:
  """Compiles `config` for `devices` and returns the report (the JSON object)."""
  from lejepa_jax import train
  try:
    train.validate(config)
  except ValueError as e:
    raise PlanError(str(e)) from None
  t0 = time.perf_counter()
  hbm = int(hbm_bytes or topology.chip.hbm_bytes)
  usable = int(hbm * (1 - MARGIN))
  n_train = split_size(config, config.data.train_split, train_size)
  if config.get('total_steps'):
    steps_total = int(config.total_steps)
  elif n_train:
    steps_total = train.total_steps(config, n_train)
  else:
    raise PlanError(f'the size of {config.data.name} {config.data.train_split} is unknown and its '
                    'data is not local: pass --train_size=N or set --config.total_steps')
  sizes = eval_sizes(config, train_size, test_size) if with_eval else None
  log(f'plan: {topology.desc} ({topology.chips} chips), {steps_total} steps')
  a = assess(config, devices, total_steps=steps_total, usable=usable, sizes=sizes,
             with_eval=with_eval, log=log)
  chips = topology.chips
  flops_step = None
  if with_exact_flops:
    exact = exact_flops(config, total_steps=steps_total, depth=a.encoder.depth)
    flops_step = exact['train_step']
    for name in ('train_step', 'features'):
      if name in a.functions:
        a.functions[name]['flops'] = exact[name] / chips
  elif 'train_step' in a.functions:
    flops_step = a.functions['train_step']['flops'] * chips
  mflops, tokens = model_flops(config, a.encoder, a.params)
  basis = flops_step or mflops
  seconds = steps_total * basis / (chips * topology.chip.peak_flops)
  report = {
      'topology': topology.spec, 'topology_desc': topology.desc, 'chip': topology.chip.name,
      'chips': chips, 'simulated_devices': devices[0].platform == 'cpu',
      'hbm_bytes_per_chip': hbm, 'usable_bytes_per_chip': usable,
      'mesh': a.mesh, 'batch_size': a.batch_size, 'batch_per_chip': a.batch_per_chip,
      'remat': a.remat, 'params': a.params, 'params_total': a.params_total,
      'state_bytes_per_chip': a.state_bytes if a.kind != 'sharding' else None,
      'functions': a.functions,
      'train_step_bytes_per_chip': a.train_bytes or a.oom_bytes, 'bytes_per_chip': a.bytes_per_chip,
      'fits': bool(a.fits), 'reason': a.reason,
      'flops_per_step': flops_step, 'model_flops_per_step': mflops, 'tokens_per_image': tokens,
      'total_steps': steps_total, 'train_size': n_train,
      'peak_flops_per_chip': topology.chip.peak_flops,
      'estimated_hours': {'at_peak': seconds / 3600, 'at_50pct': 2 * seconds / 3600},
      'hours_from': 'flops_per_step' if flops_step else 'model_flops_per_step',
  }
  if with_eval and not sizes:
    report['eval_skipped'] = ('split sizes unknown: pass --train_size and --test_size to '
                              'compile the linear probe and k-NN')
  if search_:
    found = search(config, devices, a, total_steps=steps_total, usable=usable, log=log)
    if found['flags'] and with_exact_flops:   # remat and batch change the flops and hours
      chosen = with_overrides(config, remat=found['remat'], mesh=found['mesh'],
                              batch_size=found['batch_size'])
      f = exact_flops(chosen, total_steps=steps_total, depth=a.encoder.depth,
                      names=('train_step',))['train_step']
      steps_chosen = train.total_steps(chosen, n_train) if n_train else steps_total
      secs = steps_chosen * f / (chips * topology.chip.peak_flops)
      found.update(flops_per_step=f, total_steps=steps_chosen,
                   estimated_hours={'at_peak': secs / 3600, 'at_50pct': 2 * secs / 3600})
    report['search'] = found
  report['compile_seconds'] = round(time.perf_counter() - t0, 1)
  return report


def _setup_jax(topology: Topology, devices: int | None):
  """Env and jax config before any backend starts; returns the devices to compile for."""
  _libtpu_env(topology)
  import jax
  jax.config.update('jax_platforms', 'cpu')   # never grab a local accelerator
  if devices:
    jax.config.update('jax_num_cpu_devices', devices)
    cpus = jax.devices('cpu')
    if len(cpus) != devices:
      raise PlanError(f'--devices={devices}: the CPU backend already has {len(cpus)} devices')
    return cpus
  if topology.shape is None:
    raise PlanError(f'--topology={topology.spec} names no slice: give an accelerator type or '
                    'a topology, or --devices=N')
  return tpu_devices(topology)


def _compiles(s: dict) -> str:
  n = len(s['tried'])
  return f'{n} compile' + ('' if n == 1 else 's')


def _print_report(report: dict) -> None:
  fns = report['functions']
  print(f'{report["topology"]} = {report["topology_desc"]}: {report["chips"]} chips x '
        f'{_gib(report["hbm_bytes_per_chip"])} HBM ({_gib(report["usable_bytes_per_chip"])} usable)'
        f', mesh {report["mesh"]}, batch {report["batch_size"]} '
        f'({report["batch_per_chip"]} per data-parallel shard), remat {report["remat"]}')
  print(f'encoder params {report["params"] / 1e6:.1f}M; state {_gib(report["state_bytes_per_chip"])}'
        ' per chip')
  if fns:
    print(_table(fns, 'bytes per chip; flops per chip: train_step and features from flops_per_step'
                      "'s count, the evaluators' from XLA (their loop bodies counted once)"))
  h = report['estimated_hours']
  flops = report['flops_per_step']
  print(f'flops per step: {flops:.3g}' if flops else 'flops per step: n/a', end='')
  print(f', model {report["model_flops_per_step"]:.3g}; {report["total_steps"]} steps: '
        f'{h["at_peak"]:.1f} h at peak, {h["at_50pct"]:.1f} h at 50% (from {report["hours_from"]})')
  print(('FITS' if report['fits'] else 'DOES NOT FIT') + f': {_gib(report["bytes_per_chip"])} per chip'
        + (f' -- {report["reason"]}' if report['reason'] else ''))
  s = report.get('search')
  if s:
    if s['flags'] is not None:
      print(f'search: fits with {" ".join(s["flags"]) or "the config as it is"} '
            f'(batch {s["batch_size"]}, mesh {s["mesh"]}, remat {s["remat"]}, train step '
            f'{_gib(s["train_step_bytes_per_chip"])} per chip; {_compiles(s)})'
            + (f'; {s["estimated_hours"]["at_peak"]:.1f} h at peak, '
               f'{s["estimated_hours"]["at_50pct"]:.1f} h at 50%' if 'estimated_hours' in s else ''))
    else:
      print(f'search: {s["reason"]} ({_compiles(s)})')


# Flags live in a function so that importing this module (tests, notebooks) defines none:
# `lejepa_jax.main` defines --config too.
F: dict = {}


def define_flags() -> None:
  F['config'] = config_flags.DEFINE_config_file(
      'config', None, 'Config file (configs/NAME.py[:ARGS]).', lock_config=True)
  F['topology'] = flags.DEFINE_string(
      'topology', None, 'Cloud TPU accelerator type (v5p-128, v4-128, v5litepod-256, v6e-64) or '
      'topology (v5p:4x4x4, v5e:16x16); with --devices also just a chip (v5p, h100).')
  F['devices'] = flags.DEFINE_integer(
      'devices', None, 'Compile for this many simulated CPU devices instead of TPU compile-only '
      'devices.')
  F['search'] = flags.DEFINE_bool(
      'search', False, 'Try remat policies, mesh splits and smaller batches; report the cheapest '
      'that fits.')
  F['hbm_gib'] = flags.DEFINE_float('hbm_gib', None, "Memory per chip in GiB (default: the chip's HBM).")
  F['train_size'] = flags.DEFINE_integer(
      'train_size', None, 'Examples in the train split (when the dataset is neither known nor local).')
  F['test_size'] = flags.DEFINE_integer('test_size', None, 'Examples in the test split (ditto).')
  F['eval'] = flags.DEFINE_bool('eval', True, 'Also compile the frozen-evaluation programs.')
  F['exact_flops'] = flags.DEFINE_bool(
      'exact_flops', True, 'Count flops on depth-1 and depth-2 unrolled lowerings (see exact_flops) '
      'instead of the compiled scanned program (too low).')
  F['check'] = flags.DEFINE_bool('check', False, 'Exit with status 2 when the run does not fit.')
  flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  log = lambda *a: print(*a, file=sys.stderr, flush=True)
  try:
    topology = parse_topology(F['topology'].value, F['devices'].value)
    devices = _setup_jax(topology, F['devices'].value)
    report = plan(F['config'].value, topology, devices, search_=F['search'].value,
                  hbm_bytes=F['hbm_gib'].value and int(F['hbm_gib'].value * GiB),
                  train_size=F['train_size'].value, test_size=F['test_size'].value,
                  with_eval=F['eval'].value, with_exact_flops=F['exact_flops'].value, log=log)
  except PlanError as e:
    print(f'plan: {e}', file=sys.stderr)
    return 1
  except Exception as e:
    if type(e).__name__ not in ('JaxRuntimeError', 'XlaRuntimeError'):
      raise                     # a bug, not the compiler's verdict: keep the traceback
    # any other compile error: as the compiler gives it
    print(f'plan: compile error:\n{e}', file=sys.stderr)
    return 1
  _print_report(report)
  print(json.dumps(report), flush=True)
  return 2 if F['check'].value and not report['fits'] else 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
