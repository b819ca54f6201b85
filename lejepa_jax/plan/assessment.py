"""Compile a run's programs ahead of time and read what they need: `assess`, `exact_flops`."""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from typing import Any

import ml_collections

from lejepa_jax import config_schema
from lejepa_jax.plan.topologies import GiB, RECOMPUTE_ORDER



def model_flops(config, encoder, params: int) -> tuple[float, int | None]:
  """(analytic flops of one train step, tokens per image); see the module docstring.
  ResNets: 3 x the forward convolutions' flops of every view (no tokens: None)."""
  d = config.data
  if not hasattr(encoder, 'patch_size'):
    from lejepa_jax.models import resnet
    per_image = 3 * (d.num_global_views * resnet.forward_flops(encoder, d.global_size, d.channels)
                     + d.num_local_views * resnet.forward_flops(encoder, d.local_size, d.channels))
    return float(config.batch_size * per_image), None
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


def gib(b) -> str:
  return 'n/a' if b is None else f'{b / GiB:.2f} GiB' if b >= GiB / 100 else f'{b / 2**20:.2f} MiB'


def short_bytes(b: int) -> str:
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


# Deviceless GPU compiles cannot autotune: some Triton gemms then find no tiling ("Couldn't
# find output tile sizes"); cuBLAS gemms need none.
GPU_COMPILER_OPTIONS = {'xla_gpu_enable_triton_gemm': False}


def _compile(fn, args, platform: str = 'tpu'):
  try:
    lowered = fn.lower(*args)
    if platform in ('gpu', 'cuda'):
      return lowered.compile(GPU_COMPILER_OPTIONS)
    return lowered.compile()
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
         'flops': float(cost['flops']) if cost and 'flops' in cost else 0.0}
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
  return dict(zip(sharding_lib.MESH_AXES, sharding_lib.mesh_shape(config_schema.resolve(config).mesh,
                                                             len(devices))))


def own_data_sizes(config, spec) -> tuple[int, int] | None:
  """(train, test) sizes of an evaluator's own data (evals.NAME.data), or None if unknown."""
  from lejepa_jax.evaluators import suite
  from lejepa_jax.plan.topologies import eval_sizes
  c = copy.deepcopy(config)
  with c.unlocked():
    c.data = suite.data_of(config, spec)
  return eval_sizes(c, None, None)


def assess(config, devices, *, total_steps: int, usable: int, sizes=None,
           with_eval: bool = True, log=print) -> Assessment:
  """Builds the run's programs on `devices` and compiles them; never raises for OOM/sharding."""
  import jax
  from lejepa_jax import sharding as sharding_lib
  from lejepa_jax import models
  from lejepa_jax import steps
  config = config_schema.resolve(config)
  mesh_sizes = _resolved_mesh(config, devices)
  dp = mesh_sizes['data'] * mesh_sizes['fsdp']
  out = Assessment(mesh=mesh_sizes, batch_size=config.batch_size,
                   batch_per_chip=config.batch_size // dp if config.batch_size % dp == 0 else 0,
                   remat=config.model.remat)
  mesh = sharding_lib.make_mesh(config.mesh, devices=devices)
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
              mesh_candidates(config, programs.model.encoder, len(devices), config.batch_size)]
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
    kinds = suite.feature_kinds(config, all_specs)
    jobs.append(('features', programs.features_of(kinds), (variables, images)))
    if sizes:
      from lejepa_jax.evaluators import features as features_lib
      e = config.eval
      dims = models.feature_dims(programs.model)
      by_size = {}       # evaluators with the same cap share one feature extraction
      for spec in all_specs:
        cap = suite.cap(config, spec)
        own = sizes if not spec.data else own_data_sizes(config, spec)
        if not own:
          log(f'  {spec.name}: not compiled (the size of its own data is unknown here)')
          continue
        n = tuple(min(k, cap) if cap else k for k in own)
        dim = dims[suite.feature_kind(config, spec)]
        if (n, dim) not in by_size:
          by_size[n, dim] = [features_lib.abstract_features(k, e.batch_size, dim, mesh)
                             for k in n]
        jobs += suite.programs(spec, *by_size[n, dim], suite.data_of(config, spec).num_classes,
                               mesh=mesh,
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
        compiled = _compile(fn, args, devices[0].platform)
      except _OutOfMemory as e:
        out.kind, out.fits = 'oom', False
        summary = _oom_summary(str(e))
        m = re.search(r'temporaries \(([\d.]+[KMGT])', summary)
        if m and name == 'train_step':   # at least: its arguments and the compiler's temporaries
          out.oom_bytes = per_chip_bytes(args) + int(_parse_gib(m[1]))
        out.reason = f'{name} does not compile: {summary}. {advice(out, usable, summary, name)}'
        log(f'  {name}: RESOURCE_EXHAUSTED after {time.perf_counter() - t:.0f}s')
        return out
      out.compiled[name] = compiled
      row = _memory(compiled)
      if name != 'train_step':     # the state (and features) stay resident during evaluation
        overlap = sum(per_chip_bytes(x) for x in jax.tree.leaves(args) if id(x) in resident_ids)
        row['resident'] = resident_bytes - overlap
        row['total'] += row['resident']
      out.functions[name] = row
      log(f'  {name}: {gib(row["total"])} per chip, compiled in {time.perf_counter() - t:.0f}s')
  worst = max(out.functions, key=lambda k: out.functions[k]['total'])
  out.fits = out.bytes_per_chip <= usable
  if not out.fits:
    out.kind = 'memory'
    out.reason = (f'{worst} needs {gib(out.bytes_per_chip)} per chip, more than the usable '
                  f'{gib(usable)}. {advice(out, usable, worst=worst)}')
  return out


def advice(a: Assessment, usable: int, oom: str = '', worst: str = 'train_step') -> str:
  """Why it does not fit: the state against the activations, and what would change it."""
  if worst != 'train_step':
    return (f'The train state ({gib(a.state_bytes)} per chip) and the extracted features stay '
            f'in memory during evaluation; {worst} needs the rest: lower --config.eval.batch_size '
            '(features) or --config.evals.linear_probe.batch_size (linear probe), or use more chips')
  f = a.functions.get('train_step')
  if f:
    temps = f['temporary']
  else:                          # the compiler's 'HLO temporaries (44.36G)'
    m = re.search(r'temporaries \(([\d.]+[KMGT])', oom)
    temps = _parse_gib(m[1]) if m else None
  state = a.state_bytes
  text = (f'State (params + optimizer + batch stats) is {gib(state)} per chip, temporaries '
          f'(activations) {gib(temps)} with remat={a.remat} at {a.batch_per_chip} images per '
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
  from lejepa_jax.models import resnet
  config = config_schema.resolve(config)
  counts = {}
  # A ResNet has no loops: its program is counted as it is.
  depths = (None,) if resnet.is_resnet(config.model.variant) else (1, 2)
  for d in depths:
    c = with_overrides(config, depth=d, scan=False if d else None,
                       mesh={'data': 1, 'fsdp': 1, 'tensor': 1})
    with c.unlocked():   # count what the run executes: scanned blocks compute every token
      c.model.cls_only_last = bool(config.model.cls_only_last) and not config.model.scan
    mesh = sharding_lib.make_mesh(c.mesh, devices=jax.devices('cpu')[:1])
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
  if depths == (None,):
    return {name: counts[name, None] for name in names}
  return {name: counts[name, 1] + (depth - 1) * (counts[name, 2] - counts[name, 1])
          for name in names}


# ----------------------------------------------------------------------------- search


def mesh_candidates(config, encoder, chips: int, batch: int) -> list[dict]:
  """fsdp x tensor = chips splits that divide width, heads, mlp and the batch, tensor ascending
  (ResNets: fsdp only, dividing the first stage's channels)."""
  out = []
  for t in range(1, chips + 1):
    f = chips // t
    if chips % t:
      continue
    if not hasattr(encoder, 'num_heads'):             # a ResNet: no tensor parallelism
      if t == 1 and encoder.width % f == 0 and batch % f == 0 and config.eval.batch_size % f == 0:
        out.append({'data': 1, 'fsdp': f, 'tensor': 1})
      continue
    if encoder.num_heads % t or encoder.mlp_dim % t:
      continue
    if encoder.width % f or batch % f or config.eval.batch_size % f:
      continue
    out.append({'data': 1, 'fsdp': f, 'tensor': t})
  return out
