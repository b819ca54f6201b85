"""Two JAX processes on this machine (gloo collectives) with FSDP across both of them.

The parameters of `configs/vitg.py:runlocal` (mesh fsdp=-1) are split over 4 devices
that live in 2 processes, so every step needs both hosts. Training, checkpointing,
resuming and the final sharded evaluation must give the figures of one process with
the same 4 devices.
"""
import json
import os
import shutil
import subprocess
import sys

import portpicker
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ['--config=configs/vitg.py:runlocal', '--config.total_steps=6',
         '--config.checkpoint_every=3', '--config.log_every=1']


def _env():
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['PYTHONPATH'] = ROOT
  return env


def _launch(workdir, processes, devices_per_process):
  base = [sys.executable, '-m', 'lejepa_jax.main', f'--workdir={workdir}',
          f'--cpu_devices={devices_per_process}'] + FLAGS
  if processes > 1:
    port = portpicker.pick_unused_port()
    commands = [base + [f'--coordinator_address=localhost:{port}',
                        f'--num_processes={processes}', f'--process_id={i}']
                for i in range(processes)]
  else:
    commands = [base]
  procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c in commands]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs


def _metrics(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  train = {l['step']: l for l in lines if 'train/loss' in l}
  evals = [l for l in lines if 'eval/knn_top1' in l]
  assert len(evals) == 1, lines
  return train, evals[0]


def _assert_same_training(train, reference, steps):
  assert sorted(train) == list(steps), sorted(train)
  for step in steps:
    for key in ('train/loss', 'train/inv', 'train/sigreg', 'train/probe_loss', 'train/grad_norm'):
      assert train[step][key] == pytest.approx(reference[step][key], rel=1e-5), (step, key)


def test_fsdp_across_two_processes_equals_one_process(tmp_path):
  if not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'):
    pytest.skip('needs the dataset-fashion-mnist Debian package')
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  out = _launch(single, processes=1, devices_per_process=4)
  assert "'fsdp': 4" in out[0], out[0][-2000:]
  ref_train, ref_eval = _metrics(single)

  out = _launch(multi, processes=2, devices_per_process=2)
  assert "'fsdp': 4" in out[0] and '2 processes' in out[0], out[0][-2000:]
  train, final = _metrics(multi)
  _assert_same_training(train, ref_train, range(1, 7))
  data_files = os.listdir(os.path.join(multi, 'checkpoints', '6', 'data'))
  assert len([f for f in data_files if 'process' in f]) == 2, data_files

  # Pre-empted after the step-3 checkpoint: both processes resume there.
  shutil.rmtree(os.path.join(multi, 'checkpoints', '6'))
  os.remove(os.path.join(multi, 'metrics.jsonl'))
  out = _launch(multi, processes=2, devices_per_process=2)
  assert 'restored checkpoint at step 3' in out[0], out[0][-3000:]
  train, final = _metrics(multi)
  _assert_same_training(train, ref_train, range(4, 7))
  for key in ('eval/linear_probe_top1', 'eval/knn_top1'):
    assert final[key] == pytest.approx(ref_eval[key], abs=1e-9), key
  assert 0.3 < final['eval/knn_top1'] <= 1.0
