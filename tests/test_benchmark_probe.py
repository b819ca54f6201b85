"""The benchmarks' dtype probe: a dtype whose matmul is far below float32's here is skipped,
and the benchmark says so (PyTorch bfloat16 on AVX2-only CPUs took minutes per call)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import machine  # noqa: E402  (benchmarks/machine.py)


import pytest


def _fake_timer(seconds_per_call):
  """A clock that advances by the probed matmul's cost at each call of it."""
  state = {'t': 0.0}

  def tick():
    return state['t']

  def matmul(name):
    def run():
      state['t'] += seconds_per_call[name]
    return run
  return tick, {n: matmul(n) for n in seconds_per_call}


def test_a_dtype_far_below_float32_is_skipped_and_said_so():
  timer, fns = _fake_timer({'torch f32': 0.001, 'torch bf16': 0.05, 'jnp f32': 0.001,
                            'jnp bf16': 0.004})
  seconds = machine.probe_matmuls(fns, timer=timer)
  assert seconds == pytest.approx({'torch f32': 0.001, 'torch bf16': 0.05, 'jnp f32': 0.001,
                                   'jnp bf16': 0.004})
  slow = machine.slow_dtypes(seconds, {'torch bf16': 'torch f32', 'jnp bf16': 'jnp f32'})
  assert list(slow) == ['torch bf16']               # 0.02x: skipped; 0.25x is kept
  assert 'skipped' in slow['torch bf16'] and '0.020x' in slow['torch bf16']


def test_quick_sets_the_flags_not_given_on_the_command_line():
  from absl import flags
  values = flags.FlagValues()
  flags.DEFINE_integer('rounds', 6, '', flag_values=values)
  flags.DEFINE_integer('steps', 40, '', flag_values=values)
  flags.DEFINE_list('minutes', ['10', '20'], '', flag_values=values)
  values(['benchmark', '--steps=7'])
  said = machine.apply_quick(values, {'rounds': 2, 'steps': 15, 'minutes': ['1']})
  assert (values.rounds, values.steps, values.minutes) == (2, 7, ['1'])
  assert said == 'rounds=2 minutes=1'
