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
