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
