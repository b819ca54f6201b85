"""The pod and cluster launch scripts parse, and run plan, then selftest, then training, in that
order on the right workers (DRY_RUN=1 prints the commands instead of running them)."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('launch/tpu_pod.sh', 'launch/slurm_gpu.sh', 'launch/sweep.sh',
           'launch/cpu_multiprocess.sh')


def _dry_run(script, *args, **env):
  result = subprocess.run(['bash', script, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, 'DRY_RUN': '1', **env}, timeout=60)
  assert result.returncode == 0, result.stderr
  # one '+ COMMAND' per command run; a command's own text may span lines
  return [c.strip() for c in ('\n' + result.stdout).split('\n+ ')[1:]]


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_parse(script):
  subprocess.run(['bash', '-n', script], cwd=ROOT, check=True)


def test_tpu_pod_runs_plan_on_worker_0_then_selftest_and_training_on_all():
  commands = _dry_run('launch/tpu_pod.sh', 'mytpu', 'us-east5-a', 'gs://b/run',
                      'configs/vitg.py', '--config.lamb=0.02', ACCEL='v5p-64')
  steps = [next(m for m in ('pip install', 'lejepa_jax.plan', 'lejepa_jax.selftest',
                            'lejepa_jax.main') if m in c) for c in commands]
  assert steps == ['pip install', 'lejepa_jax.plan', 'lejepa_jax.selftest', 'lejepa_jax.main']
  assert '--worker=0' in commands[1] and '--topology=v5p-64' in commands[1]
  for c in commands[2:]:
    assert '--worker=all' in c and '--workdir=gs://b/run' in c and '--config.lamb=0.02' in c
  skipped = _dry_run('launch/tpu_pod.sh', 'mytpu', 'zone', 'gs://b/run', SKIP_PLAN='1',
                     SKIP_SELFTEST='1')
  assert [c for c in skipped if 'lejepa_jax.' in c and 'lejepa_jax.main' not in c] == []


def test_slurm_runs_plan_here_then_selftest_and_training_on_every_task():
  commands = _dry_run('launch/slurm_gpu.sh', '/w', 'configs/vitl14.py', '--config.batch_size=512',
                      SLURM_NTASKS='16', SLURM_JOB_NUM_NODES='2')
  assert commands[0].startswith('python -m lejepa_jax.plan')
  assert '--topology=h100-2x8' in commands[0]       # the job's GPUs, compiled without them
  assert commands[1].startswith('srun python -m lejepa_jax.selftest')
  assert commands[2].startswith('srun python -m lejepa_jax.main')
  assert all('--config.batch_size=512' in c for c in commands)
  assert len(_dry_run('launch/slurm_gpu.sh', '/w', SLURM_NTASKS='16', SKIP_SELFTEST='1')) == 2


def test_slurm_one_process_per_node_drives_all_gpus_of_the_node():
  commands = _dry_run('launch/slurm_gpu.sh', '/w', 'configs/vitl14.py', SLURM_NTASKS='2',
                      SLURM_JOB_NUM_NODES='2', SLURM_GPUS_ON_NODE='8')
  assert '--topology=h100-2x8' in commands[0]
  for c in commands[1:]:
    assert c.startswith('srun --ntasks-per-node=1 ') and '--gpus_per_process=all' in c
  per_gpu = _dry_run('launch/slurm_gpu.sh', '/w', SLURM_NTASKS='16', SLURM_JOB_NUM_NODES='2')
  assert all('--gpus_per_process=one' in c for c in per_gpu[1:])
  bad = subprocess.run(['bash', 'launch/slurm_gpu.sh', '/w'], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, 'DRY_RUN': '1', 'SLURM_NTASKS': '8',
                                       'PROCESSES': 'socket'}, timeout=60)
  assert bad.returncode == 2 and 'PROCESSES must be gpu' in bad.stdout


SLURM_TASK = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'gpu[001-004]', 'SLURM_NTASKS': '4',
              'SLURM_PROCID': '1', 'SLURM_LOCALID': '0', 'SLURM_NODEID': '1'}


def test_jax_alone_binds_a_slurm_task_to_one_gpu():
  # Private on purpose: the JAX behaviour that --gpus_per_process works around (one task per
  # node would drive GPU 0 only); if JAX changes it, this test says so.
  from unittest import mock
  from jax._src.clusters import ClusterEnv
  with mock.patch.dict(os.environ, SLURM_TASK):
    _, processes, index, local_ids = ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, None)
  assert (processes, index, local_ids) == (4, 1, [0])


def test_gpus_per_process_under_slurm():
  from lejepa_jax.cli import slurm_local_device_ids
  one_per_node = {**SLURM_TASK, 'SLURM_STEP_TASKS_PER_NODE': '1(x4)', 'SLURM_GPUS_ON_NODE': '8'}
  assert slurm_local_device_ids('auto', one_per_node) == list(range(8))
  assert slurm_local_device_ids('one', one_per_node) is None           # JAX: SLURM_LOCALID
  one_per_gpu = {**one_per_node, 'SLURM_STEP_TASKS_PER_NODE': '8(x4)'}
  assert slurm_local_device_ids('auto', one_per_gpu) is None
  assert slurm_local_device_ids('all', one_per_gpu) == list(range(8))
  visible = {**SLURM_TASK, 'SLURM_STEP_TASKS_PER_NODE': '1(x4)', 'CUDA_VISIBLE_DEVICES': '4,5,6,7'}
  assert slurm_local_device_ids('auto', visible) == [0, 1, 2, 3]    # indices of visible GPUs
  assert slurm_local_device_ids('auto', {**one_per_node, 'JAX_LOCAL_DEVICE_IDS': '0,1'}) is None
  assert slurm_local_device_ids('all', {'CUDA_VISIBLE_DEVICES': '0,1'}) is None   # not SLURM
  with pytest.raises(ValueError, match='GPU count is unknown'):
    slurm_local_device_ids('all', {**SLURM_TASK, 'SLURM_STEP_TASKS_PER_NODE': '1(x4)'})
