"""The `plan` command: flags, the report table and its JSON line."""
from __future__ import annotations

import json
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from lejepa_jax.plan.assessment import assess, exact_flops, gib, model_flops, short_bytes, with_overrides
from lejepa_jax.plan.fit_search import search
from lejepa_jax.plan.topologies import (GiB, MARGIN, PlanError, Topology, eval_sizes,
                                        gpu_devices, gpu_memory_fraction, libtpu_env,
                                        parse_topology, split_size, tpu_devices)



def _table(rows: dict, note: str) -> str:
  head = (f'{"function":<30}{"argument":>11}{"temporary":>11}{"output":>11}{"alias":>11}'
          f'{"code":>9}{"resident":>11}{"total":>11}{"flops/chip":>12}')
  lines = [head, '-' * len(head)]
  g = short_bytes
  for name, r in rows.items():
    lines.append(f'{name:<30}{g(r["argument"]):>11}{g(r["temporary"]):>11}{g(r["output"]):>11}'
                 f'{g(r["alias"]):>11}{g(r["code"]):>9}{g(r["resident"]):>11}{g(r["total"]):>11}'
                 f'{r["flops"]:>12.3g}')
  return '\n'.join(lines + [note])


def plan(config, topology: Topology, devices, *, search_: bool = False, hbm_bytes=None,
         train_size=None, test_size=None, with_eval=True, with_exact_flops=True,
         log=print) -> dict:
  """Compiles `config` for `devices` and returns the report (the JSON object)."""
  from lejepa_jax import config as config_lib
  try:
    config_lib.validate(config)
  except ValueError as e:
    raise PlanError(str(e)) from None
  config = config_lib.resolve(config)
  t0 = time.perf_counter()
  hbm = int(hbm_bytes or topology.chip.hbm_bytes)
  # A GPU run gets the fraction of memory JAX preallocates; XLA's GPU compiler never reports
  # running out (it compiled 359 GB of temporaries for an 80 GB H100), so `fits` is plan's total.
  fraction = gpu_memory_fraction() if topology.chip.gpu else 1.0
  usable = int(hbm * fraction * (1 - MARGIN))
  n_train = split_size(config, config.data.train_split, train_size)
  if config.total_steps:
    steps_total = int(config.total_steps)
  elif n_train:
    steps_total = config_lib.total_steps(config, n_train)
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
    exact = exact_flops(config, total_steps=steps_total, depth=getattr(a.encoder, 'depth', 0))
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
      'chips': chips, 'platform': topology.platform,
      'simulated_devices': devices[0].platform == 'cpu',
      **({'gpu_memory_fraction': fraction} if topology.chip.gpu else {}),
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
      f = exact_flops(chosen, total_steps=steps_total, depth=getattr(a.encoder, 'depth', 0),
                      names=('train_step',))['train_step']
      steps_chosen = config_lib.total_steps(chosen, n_train) if n_train else steps_total
      secs = steps_chosen * f / (chips * topology.chip.peak_flops)
      found.update(flops_per_step=f, total_steps=steps_chosen,
                   estimated_hours={'at_peak': secs / 3600, 'at_50pct': 2 * secs / 3600})
    report['search'] = found
  report['compile_seconds'] = round(time.perf_counter() - t0, 1)
  return report


def compile_devices(topology: Topology, devices: int | None):
  """Env and jax config before any backend starts; returns the devices to compile for."""
  libtpu_env(topology)
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
  if topology.platform == 'cuda':
    return gpu_devices(topology)
  return tpu_devices(topology)


def _compiles(s: dict) -> str:
  n = len(s['tried'])
  return f'{n} compile' + ('' if n == 1 else 's')


def _print_report(report: dict) -> None:
  fns = report['functions']
  print(f'{report["topology"]} = {report["topology_desc"]}: {report["chips"]} chips x '
        f'{gib(report["hbm_bytes_per_chip"])} HBM ({gib(report["usable_bytes_per_chip"])} usable)'
        f', mesh {report["mesh"]}, batch {report["batch_size"]} '
        f'({report["batch_per_chip"]} per data-parallel shard), remat {report["remat"]}')
  print(f'encoder params {report["params"] / 1e6:.1f}M; state {gib(report["state_bytes_per_chip"])}'
        ' per chip')
  if fns:
    print(_table(fns, 'bytes per chip; flops per chip: train_step and features from flops_per_step'
                      "'s count, the evaluators' from XLA (their loop bodies counted once)"))
  h = report['estimated_hours']
  flops = report['flops_per_step']
  print(f'flops per step: {flops:.3g}' if flops else 'flops per step: n/a', end='')
  print(f', model {report["model_flops_per_step"]:.3g}; {report["total_steps"]} steps: '
        f'{h["at_peak"]:.1f} h at peak, {h["at_50pct"]:.1f} h at 50% (from {report["hours_from"]})')
  print(('FITS' if report['fits'] else 'DOES NOT FIT') + f': {gib(report["bytes_per_chip"])} per chip'
        + (f' -- {report["reason"]}' if report['reason'] else ''))
  s = report.get('search')
  if s:
    if s['flags'] is not None:
      print(f'search: fits with {" ".join(s["flags"]) or "the config as it is"} '
            f'(batch {s["batch_size"]}, mesh {s["mesh"]}, remat {s["remat"]}, train step '
            f'{gib(s["train_step_bytes_per_chip"])} per chip; {_compiles(s)})'
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
    devices = compile_devices(topology, F['devices'].value)
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
