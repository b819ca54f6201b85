"""SIGReg forward+backward: this package against the PyTorch reference algorithm, same CPU, same run.

python benchmarks/sigreg.py                      # N=1024, D=512, M=1024, T=17 (the reference sizes)
python benchmarks/sigreg.py --n=512 --repeats=5  # other sizes
python benchmarks/sigreg.py --quick              # under 3 minutes: N=512, M=256, 3 repeats

Needs `pip install -e .[bench]` (torch==2.13.0) for the comparison (skipped, with a message, without it).
The PyTorch side is the reference algorithm as the authors' library computes it: slices
from a generator seeded with the step, normalised Gaussian directions, x @ A, then cos and
sin of the (N, M, T) tensor x * t, means over samples, (err @ weights) * N, mean over slices,
autograd backward to the embeddings. Both sides use every core of this machine.

Prints: the median time of value-and-gradient w.r.t. the embeddings for
  jax-fast     lejepa_jax.sigreg.sigreg (powers of one complex exponential, hand-written VJP),
  jax-autodiff the same statistic with a complex exponential per knot, differentiated by JAX
               (this package before the fast path),
  torch        the reference algorithm,
the ratios, the values (same slices on both sides, as a correctness check), the compiled
temporary memory of value-and-gradient at N=8192 against the 4 * N * M * 4 bytes budget, and
the time at N, 2N and 4N.
"""
import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lejepa_jax import sigreg

try:
  import torch
except ImportError:   # the comparison needs it; the JAX measurements do not
  torch = None


def median_seconds(fn, repeats):
  fn(0)                                   # compile / warm up
  times = []
  for step in range(1, repeats + 1):
    start = time.perf_counter()
    fn(step)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_value_and_grad(num_slices, num_points, implementation):
  """jit(value and gradient of sigreg w.r.t. the embeddings), as (z, key) -> (value, grad)."""
  return jax.jit(jax.value_and_grad(
      lambda z, key: sigreg.sigreg(z, key, num_slices=num_slices, num_points=num_points,
                                   implementation=implementation)))


def jax_step_fn(z, num_slices, num_points, implementation):
  value_and_grad = jax_value_and_grad(num_slices, num_points, implementation)
  base = jax.random.key(0)
  return lambda i: jax.block_until_ready(value_and_grad(z, jax.random.fold_in(base, i)))


def torch_reference(num_points, t_max=3.0):
  """The reference Epps-Pulley (trapezoid on [0, t_max], doubled) as a function of x (N, M)."""
  t = torch.linspace(0, t_max, num_points, dtype=torch.float32)
  dt = t_max / (num_points - 1)
  weights = torch.full((num_points,), 2 * dt, dtype=torch.float32)
  weights[[0, -1]] = dt
  phi = (-0.5 * t.square()).exp()
  weights = weights * phi

  def statistic(x):
    x_t = x.unsqueeze(-1) * t
    err = (torch.cos(x_t).mean(-3) - phi).square() + torch.sin(x_t).mean(-3).square()
    return (err @ weights) * x.size(-2)
  return statistic


def torch_step_fn(z_np, num_slices, num_points):
  z = torch.tensor(z_np, requires_grad=True)
  statistic = torch_reference(num_points)
  generator = torch.Generator()

  def step(i):
    generator.manual_seed(i)
    with torch.no_grad():
      slices = torch.randn((z.size(-1), num_slices), generator=generator)
      slices /= slices.norm(p=2, dim=0)
    z.grad = None
    loss = statistic(z @ slices).mean()
    loss.backward()
    return loss, z.grad
  return step


def temp_bytes(n, dim, num_slices, num_points, implementation):
  fn = jax_value_and_grad(num_slices, num_points, implementation)
  compiled = fn.lower(jax.ShapeDtypeStruct((n, dim), jnp.float32), jax.random.key(0)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--n', type=int, default=1024, help='samples N')
  parser.add_argument('--dim', type=int, default=512, help='embedding dimension D')
  parser.add_argument('--slices', type=int, default=1024, help='slices M')
  parser.add_argument('--knots', type=int, default=17, help='knots T')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--memory_n', type=int, default=8192, help='N for the memory figure')
  parser.add_argument('--quick', action='store_true',
                      help='an answer in under 3 minutes: N=512, M=256, 3 repeats, memory at N=2048 '
                           '(flags given explicitly win)')
  args = parser.parse_args()
  if args.quick:
    quick = {'n': 512, 'slices': 256, 'repeats': 3, 'memory_n': 2048}
    for name, value in quick.items():
      if getattr(args, name) == parser.get_default(name):
        setattr(args, name, value)
    print('--quick:', ' '.join(f'{k}={getattr(args, k)}' for k in quick))
  n, d, m, k = args.n, args.dim, args.slices, args.knots
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores'
        + (f'; torch {torch.__version__}, {torch.get_num_threads()} threads' if torch else ''))
  print(f'N={n} D={d} M={m} T={k}: value and gradient w.r.t. the embeddings, '
        f'median of {args.repeats}')
  z_np = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
  z = jnp.asarray(z_np)

  times = {}
  for impl in ('fast', 'autodiff'):
    step = jax_step_fn(z, m, k, impl)
    times[f'jax-{impl}'] = median_seconds(step, args.repeats)
  if torch is not None:
    times['torch'] = median_seconds(torch_step_fn(z_np, m, k), args.repeats)
  for name, seconds in times.items():
    print(f'  {name:13s} {seconds * 1e3:9.2f} ms')
  print(f'  jax-fast is {times["jax-autodiff"] / times["jax-fast"]:.2f}x faster than jax-autodiff')
  if torch is not None:
    print(f'  jax-fast is {times["torch"] / times["jax-fast"]:.2f}x faster than the torch reference')
    # Same slices on both sides: the statistics must agree.
    generator = torch.Generator().manual_seed(0)
    slices = torch.randn((d, m), generator=generator)
    slices /= slices.norm(p=2, dim=0)
    ref = torch_reference(k)(torch.tensor(z_np) @ slices).mean().item()
    ours = float(jnp.mean(sigreg.epps_pulley(z @ jnp.asarray(slices.numpy()), num_points=k)))
    print(f'  same slices: torch {ref:.6f}, jax {ours:.6f} (relative difference '
          f'{abs(ours - ref) / abs(ref):.1e})')
  else:
    print('  torch is not installed (pip install torch==2.13.0): no reference timing')

  budget = 4 * args.memory_n * m * 4
  print(f'compiled temporary memory of value-and-gradient, N={args.memory_n} D={d} M={m} T={k} '
        f'(budget 4*N*M*4 = {budget / 2**20:.0f} MiB):')
  for impl in ('fast', 'autodiff'):
    used = temp_bytes(args.memory_n, d, m, k, impl)
    print(f'  jax-{impl:9s} {used / 2**20:9.1f} MiB ({used / budget:.2f} of the budget)')

  print('scaling in N (jax-fast):')
  base_time = None
  for factor in (1, 2, 4):
    step = jax_step_fn(jnp.asarray(np.random.default_rng(factor).normal(
        size=(factor * n, d)).astype(np.float32)), m, k, 'fast')
    seconds = median_seconds(step, args.repeats)
    base_time = base_time or seconds
    print(f'  N={factor * n:6d} {seconds * 1e3:9.2f} ms  time/time(N) = {seconds / base_time:.2f}')


if __name__ == '__main__':
  main()
