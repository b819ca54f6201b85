"""The pod table of docs/pod.md, measured again: `plan` for each config x slice, one at a time.

  python benchmarks/plan_table.py [--rows=vitg:v5p-128,vitl14:v4-128] [--noeval] [--search]
      [--json_out=PATH]

Each row runs `python -m lejepa_jax.plan --config=configs/CONFIG.py --topology=SLICE` in its
own process (nothing else from this script runs beside it) and prints one markdown row:
images per chip, GiB per chip (usable), fits (or the first sentence of plan's reason), PFLOP per step (compiled /
model), estimated hours (at the chip's bf16 peak / at 50% of it) and the wall time of that
`plan` process. The first line names the CPU, since the wall times depend on it (libtpu's
compiler; the evaluators' programs are compiled too unless --noeval). `--json_out` keeps every
row's JSON line as plan printed it. With --search (train step only, as --noeval), each row is
what `plan --search` picks where the config does not fit: its flags, the train step's GiB per
chip, PFLOP per step and hours with them, and the wall time of the search. Needs libtpu
(`pip install -e '.[tpu]'`).
"""
import json
import os
import re
import subprocess
import sys
import time

import machine as machine_lib   # benchmarks/machine.py, beside this script

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The rows of docs/pod.md's table: the three ViT paper configs on the slices users ask about.
ROWS = ('vitg:v5p-128,vitg:v5p-64,vitg:v4-128,vitg:v5litepod-256,'
        'vith14:v5p-64,vith14:v5p-32,vith14:v4-128,vith14:v5litepod-256,'
        'vitl14:v5p-32,vitl14:v5p-16,vitl14:v4-128,vitl14:v5litepod-256')

_ROWS = flags.DEFINE_string('rows', ROWS, 'Comma-separated CONFIG:SLICE pairs (configs/CONFIG.py).')
_NOEVAL = flags.DEFINE_bool('noeval', False, "Pass --noeval: the train step's program only.")
_SEARCH = flags.DEFINE_bool('search', False, 'Pass --search --noeval and print what it picks.')
_JSON_OUT = flags.DEFINE_string('json_out', '', 'Append each row\'s JSON line to this file.')
_TIMEOUT = flags.DEFINE_integer('timeout', 1800, 'Seconds before one plan run is abandoned.')

GIB = 2 ** 30


def run_plan(config: str, topology: str, extra: list, timeout: int) -> tuple[dict | None, float, str]:
  """(plan's JSON report or None, wall seconds, the end of stderr) of one plan process."""
  cmd = [sys.executable, '-m', 'lejepa_jax.plan', f'--config=configs/{config}.py',
         f'--topology={topology}', *extra]
  start = time.perf_counter()
  try:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return None, time.perf_counter() - start, f'timed out after {timeout} s'
  wall = time.perf_counter() - start
  lines = [l for l in done.stdout.splitlines() if l.startswith('{')]
  report = json.loads(lines[-1]) if done.returncode == 0 and lines else None
  return report, wall, done.stderr.strip()[-500:]


def markdown_row(config: str, r: dict, wall: float) -> str:
  """One row: config | slice (chips) | images per chip | GiB (usable) | fits | PFLOP | hours | wall."""
  usable = f'({r["usable_bytes_per_chip"] / GIB:.1f})'
  if r['bytes_per_chip'] is None:               # nothing compiled (an axis that does not divide)
    memory = f'- {usable}'
  else:   # no compiled train step: RESOURCE_EXHAUSTED, the bytes XLA asked for are a lower bound
    at_least = '' if 'train_step' in r['functions'] else '>= '
    memory = f'{at_least}{r["bytes_per_chip"] / GIB:.1f} {usable}'
  fits = 'yes' if r['fits'] else f'no: {re.split(r"[.] (?=[A-Z])", r["reason"])[0]}'  # 1st sentence
  flops = f'{r["flops_per_step"] / 1e15:.2f} / {r["model_flops_per_step"] / 1e15:.2f}'
  hours = r['estimated_hours']
  return (f'| {config} | {r["topology"]} ({r["chips"]}) | {r["batch_per_chip"]} | {memory} | '
          f'{fits} | {flops} | {hours["at_peak"]:.1f} / {hours["at_50pct"]:.1f} | {wall:.0f} s |')


def search_row(config: str, r: dict, wall: float) -> str:
  """One row: config | slice | what --search picks | train step GiB | PFLOP | hours | wall."""
  s = r.get('search')
  if r['fits'] or not s:
    return f'| {config} | {r["topology"]} | (fits as it is) | | | | {wall:.0f} s |'
  if not s['fits']:
    return f'| {config} | {r["topology"]} | nothing fits: {s["reason"]} | | | | {wall:.0f} s |'
  hours = s.get('estimated_hours') or r['estimated_hours']
  flops = s.get('flops_per_step') or r['flops_per_step']
  picks = ' '.join(f'`{f}`' for f in s['flags'])
  return (f'| {config} | {r["topology"]} | {picks} | {s["train_step_bytes_per_chip"] / GIB:.1f} | '
          f'{flops / 1e15:.2f} | {hours["at_peak"]:.1f} / {hours["at_50pct"]:.1f} | {wall:.0f} s |')


def main(argv):
  del argv
  extra = ['--search', '--noeval'] if _SEARCH.value else ['--noeval'] if _NOEVAL.value else []
  print(f'# {machine_lib.cpu()}; plan {" ".join(extra) or "with the evaluators"}', flush=True)
  if _SEARCH.value:
    print('| config | slice | `--search` picks | train step GiB per chip | PFLOP per step | hours '
          '| wall |')
    print('| --- | --- | --- | --- | --- | --- | --- |', flush=True)
  else:
    print('| config | slice (chips) | images per chip | GiB per chip (usable) | fits | '
          'PFLOP per step | hours | plan wall |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- |', flush=True)
  for pair in _ROWS.value.split(','):
    config, topology = pair.strip().split(':')
    report, wall, err = run_plan(config, topology, extra, _TIMEOUT.value)
    if report is None:
      print(f'| {config} | {topology} | plan failed after {wall:.0f} s: '
            f'{err.splitlines()[-1] if err else "?"} |', flush=True)
      continue
    print((search_row if _SEARCH.value else markdown_row)(config, report, wall), flush=True)
    if _JSON_OUT.value:
      with open(_JSON_OUT.value, 'a') as f:
        f.write(json.dumps(dict(report, plan_wall_seconds=round(wall, 1))) + '\n')


if __name__ == '__main__':
  app.run(main)
