"""Grain workers and threads follow the CPU cores of this process (data/host_resources.py)."""
import ml_collections
import pytest

from configs import fmnist
from configs import imagenette_vits8
from configs import vitg
from lejepa_jax import train
from lejepa_jax.data import host_resources as hr

# sbatch --ntasks-per-node=8 --gpus-per-node=8, inside srun: one process per GPU.
SLURM_8_PER_NODE = {'SLURM_NTASKS': '32', 'SLURM_NTASKS_PER_NODE': '8',
                    'SLURM_STEP_TASKS_PER_NODE': '8(x4)', 'SLURM_NODEID': '1'}


def _auto(cores, reason='test'):
  return hr.choose('auto', 'auto', cores=cores, reason=reason)


def test_slurm_one_process_per_gpu_shares_the_node():
  # No --cpus-per-task, no binding: all 8 processes see all 96 cores.
  cores, reason = hr.process_cores(96, 96, SLURM_8_PER_NODE)
  assert cores == 12
  assert reason == '96 CPUs shared by 8 processes on this host (SLURM_STEP_TASKS_PER_NODE=8(x4))'
  w = hr.choose('auto', 'auto', cores=cores, reason=reason)
  assert (w.num_workers, w.num_threads, w.warnings) == (11, 2, ())
  # The old fixed numbers (32 workers x 16 threads per process) are capped, with a warning each.
  old = hr.choose(32, 16, cores=cores, reason=reason)
  assert (old.num_workers, old.num_threads) == (12, 12)
  assert old.warnings[0] == ('data.num_workers=32 is more than the 12 cores of this process '
                             f'({reason}): using 12; set --config.data.num_workers=auto, or at '
                             'most 12')
  assert old.warnings[1].startswith('data.num_threads=16 is more than the 12 cores')


@pytest.mark.parametrize('env, local', [
    ({'SLURM_NTASKS_PER_NODE': '8'}, 8),
    ({'SLURM_STEP_TASKS_PER_NODE': '4,2(x3)', 'SLURM_NODEID': '2'}, 2),
    ({'SLURM_STEP_TASKS_PER_NODE': '4,2(x3)'}, 4),        # node unknown: the most
    ({'OMPI_COMM_WORLD_LOCAL_SIZE': '4'}, 4),
    ({'LOCAL_WORLD_SIZE': '2'}, 2),
    ({}, None),
])
def test_local_process_count_from_the_launcher(env, local):
  found = hr.local_processes(env)
  assert (found and found[0]) == local


def test_slurm_cpus_per_task_wins():
  env = dict(SLURM_8_PER_NODE, SLURM_CPUS_PER_TASK='10')
  assert hr.process_cores(96, 96, env) == (10, 'SLURM_CPUS_PER_TASK=10')
  # ...but never beyond the cores the process may run on.
  assert hr.process_cores(6, 96, env) == (6, 'SLURM_CPUS_PER_TASK=10, CPU affinity 6')


def test_affinity_bound_per_process_is_not_divided_again():
  # srun --cpu-bind=cores: each of the 8 processes is bound to its own 12 cores.
  assert hr.process_cores(12, 96, SLURM_8_PER_NODE) == (
      12, 'CPU affinity 12 of the 96 cores of this host')
  # A container (cgroup cpuset) of 16 of 64 cores, one process.
  assert hr.process_cores(16, 64, {}) == (16, 'CPU affinity 16 of the 64 cores of this host')
  # One process per host (a TPU VM): all of it.
  assert hr.process_cores(240, 240, {}) == (240, 'all 240 cores of this host')
  w = _auto(240)
  assert (w.num_workers, w.num_threads) == (hr.MAX_AUTO_WORKERS, 7)


def test_auto_on_a_two_core_laptop_is_the_cpu_default():
  cores, reason = hr.process_cores(2, 2, {})
  w = hr.choose('auto', 'auto', cores=cores, reason=reason)
  # What configs/fmnist.py sets by hand: threads in this process, no worker processes.
  assert (w.num_workers, w.num_threads) == (0, 2)
  assert w.describe() == ('data workers: 0 worker processes x 2 threads (this process has 2 '
                          'cores: all 2 cores of this host)')
  assert (_auto(3).num_workers, _auto(4).num_workers, _auto(4).num_threads) == (0, 3, 2)


def test_explicit_values_within_the_cores_are_kept():
  w = hr.choose(0, 2, cores=2, reason='r')     # configs/fmnist.py on its 2-core VM
  assert (w.num_workers, w.num_threads, w.warnings) == (0, 2, ())
  w = hr.choose('3', '2', cores=8, reason='r')  # --config.data.num_workers=3 on an 'auto' key
  assert (w.num_workers, w.num_threads, w.warnings) == (3, 2, ())
  # Evaluation runs in this process: no workers, 'auto' threads are all the cores.
  w = hr.choose('auto', 'auto', cores=12, reason='r', worker_processes=False)
  assert (w.num_workers, w.num_threads) == (0, 12)
  with pytest.raises(ValueError, match='data.num_threads=0'):
    hr.choose(0, 0, cores=2, reason='r')


def test_grain_options_logs_the_choice_once(monkeypatch):
  monkeypatch.setattr(hr, 'this_process_cores', lambda: (12, 'r'))
  monkeypatch.setattr(hr, '_logged', set())
  lines = []
  monkeypatch.setattr(hr.logging, 'info', lambda msg: lines.append(('info', msg)))
  monkeypatch.setattr(hr.logging, 'warning', lambda msg: lines.append(('warning', msg)))
  d = ml_collections.ConfigDict({'num_threads': 16, 'num_workers': 'auto'})
  assert hr.grain_options(d) == (12, 11)
  assert hr.grain_options(d) == (12, 11)
  assert hr.grain_options(d, worker_processes=False) == (12, 0)
  assert lines == [
      ('warning', 'data.num_threads=16 is more than the 12 cores of this process (r): using 12; '
                  'set --config.data.num_threads=auto, or at most 12'),
      ('info', 'data workers: 11 worker processes x 12 threads (this process has 12 cores: r)'),
      ('info', 'evaluation data workers: 0 worker processes x 12 threads (this process has 12 '
               'cores: r)')]


def test_configs_and_validation():
  # The CPU default keeps its hand-set values; the pod recipes follow the cores.
  assert (fmnist.get_config().data.num_workers, fmnist.get_config().data.num_threads) == (0, 2)
  for c in (vitg.get_config(), imagenette_vits8.get_config()):
    assert (c.data.num_workers, c.data.num_threads) == ('auto', 'auto')
  assert vitg.get_config('runlocal').data.num_workers == 0    # toy runs: fmnist's values
  assert hr.problems(vitg.get_config().data) == []
  c = fmnist.get_config()
  c.data.num_workers, c.data.num_threads = -1, 0
  with pytest.raises(train.ConfigError) as e:
    train.validate(c)
  assert ("data.num_workers=-1: 'auto' (from this process's CPU cores) or an integer >= 0: set "
          '--config.data.num_workers=auto') in str(e.value)
  assert 'data.num_threads=0' in str(e.value)
