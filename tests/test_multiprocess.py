"""Two JAX processes on this machine (gloo collectives): the multi-host code path end to end."""
import json
import os
import subprocess
import sys

import portpicker
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_train_checkpoint_and_evaluate(tmp_path):
  if not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'):
    pytest.skip('needs the dataset-fashion-mnist Debian package')
  port = portpicker.pick_unused_port()
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['PYTHONPATH'] = ROOT
  workdir = str(tmp_path / 'mp')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'lejepa_jax.main', '--config=configs/fmnist.py:runlocal',
       f'--workdir={workdir}', '--cpu_devices=2', f'--coordinator_address=localhost:{port}',
       '--num_processes=2', f'--process_id={i}', '--config.total_steps=6',
       '--config.checkpoint_every=3'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert '4 global devices' in outputs[0] or "'data': 4" in outputs[0], outputs[0][-2000:]
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [l['step'] for l in lines if 'train/loss' in l] == [5, 6]
  final = [l for l in lines if 'eval/knn_top1' in l]
  assert len(final) == 1 and 0 < final[0]['eval/knn_top1'] <= 1
  data_files = os.listdir(os.path.join(workdir, 'checkpoints', '6', 'data'))
  assert len([f for f in data_files if 'process' in f]) == 2, data_files
