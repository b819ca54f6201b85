"""The one line naming the CPU that the benchmarks print beside their figures.

Plain Python (no jax, no torch): the benchmarks' PyTorch children import it too.
"""
import os
import platform

_ISA = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')   # what decides matmul speed here


def cpu() -> str:
  """'MODEL, N logical CPUs, avx2/avx512f/...' from /proc/cpuinfo (platform's name elsewhere)."""
  model, flags = '', set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name') and not model:
          model = line.split(':', 1)[1].strip()
        elif line.startswith('flags') and not flags:
          flags = set(line.split(':', 1)[1].split())
  except OSError:
    pass
  isa = '/'.join(f for f in _ISA if f in flags) or 'no AVX2'
  return f'{model or platform.processor() or "?"}, {os.cpu_count()} logical CPUs, {isa}'


# Below this fraction of the reference dtype's matmul speed, a dtype "has no fast kernel" here.
MIN_SPEED_RATIO = 0.1


def probe_matmuls(matmuls: dict, *, repeats: int = 3, timer=None) -> dict:
  """{name: best seconds per call} of small matmuls (callables that block until done).

  A short probe (each call is a 256^2 or so matmul) that tells, on this machine, which
  dtypes have a fast kernel before a benchmark commits to timing big ones: PyTorch's
  bfloat16 2048^3 matmul takes minutes on AVX2-only CPUs, seconds elsewhere.
  """
  import time
  timer = timer or time.perf_counter
  out = {}
  for name, fn in matmuls.items():
    fn()                                         # compile / warm up
    best = float('inf')
    for _ in range(repeats):
      start = timer()
      fn()
      best = min(best, timer() - start)
    out[name] = best
  return out


def slow_dtypes(seconds: dict, reference: dict, min_ratio: float = MIN_SPEED_RATIO) -> dict:
  """{name: reason} for each probed matmul slower than min_ratio x its reference's speed.

  seconds: probe_matmuls' result; reference: {name: name of the matmul to compare with}
  (e.g. {'torch bf16': 'torch f32'})."""
  out = {}
  for name, ref in reference.items():
    ratio = seconds[ref] / seconds[name] if seconds[name] > 0 else float('inf')
    if ratio < min_ratio:
      out[name] = (f'{name} matmul runs at {ratio:.3f}x the speed of {ref} here (probe of a '
                   f'small matmul; below {min_ratio}x: no fast kernel on this CPU): skipped')
  return out


def apply_quick(flag_values, settings: dict) -> str:
  """--quick: sets each absl flag of `settings` to its quick value unless the command line
  gave it; returns what it set ('rounds=2 steps=15'), for the benchmark to print."""
  applied = []
  for name, value in settings.items():
    if not flag_values[name].present:
      flag_values[name].value = value
      applied.append(f'{name}={",".join(map(str, value)) if isinstance(value, list) else value}')
  return ' '.join(applied)
