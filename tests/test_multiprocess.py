"""Two JAX processes on this machine (gloo collectives), as on a pod or a GPU cluster.

FSDP across processes: the parameters of `configs/vitg.py:runlocal` (mesh fsdp=-1) are
split over 4 devices that live in 2 processes, so every step needs both hosts. Training,
checkpointing and the final sharded evaluation must give the figures of one process with
the same 4 devices, and a run checkpointed on 2 processes must resume on 1 (and 1 on 2)
exactly: the data stream's position is stored once, not per process.

Tensor axis across processes: with mesh tensor=4 on 2 processes x 2 devices, both
processes hold every batch row (replicas along 'tensor'), so both must read the same
records; the losses must equal one process with the same mesh.
"""
import json
import os
import re
import shutil

import pytest

import gloo_processes   # tests/gloo_processes.py

FLAGS = ['--config=configs/vitg.py:runlocal', '--config.total_steps=12',
         '--config.checkpoint_every=6', '--config.log_every=1', '--config.diagnostics.plots=false']
TRAIN_KEYS = ('train/loss', 'train/inv', 'train/sigreg', 'train/probe_loss', 'train/grad_norm')

pytestmark = pytest.mark.skipif(
    not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'),
    reason='needs the dataset-fashion-mnist Debian package')


def _launch(workdir, processes, devices_per_process, flags=FLAGS):
  results = gloo_processes.run('lejepa_jax.main', [f'--workdir={workdir}', *flags], processes,
                               devices_per_process)
  for out, code in results:
    assert code == 0, out[-4000:]
  return [out for out, _ in results]


def _metrics(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  train = {l['step']: l for l in lines if 'train/loss' in l}
  evals = [l for l in lines if 'eval/knn_top1' in l]
  assert len(evals) == 1, lines
  return train, evals[0]


def _assert_same_training(train, reference, steps):
  assert sorted(train) == list(steps), sorted(train)
  for step in steps:
    for key in TRAIN_KEYS:
      assert train[step][key] == pytest.approx(reference[step][key], rel=1e-5), (step, key)


def _assert_same_evaluation(final, reference):
  for key in ('eval/linear_probe_top1', 'eval/knn_top1'):
    assert final[key] == pytest.approx(reference[key], abs=1e-9), key
  assert 0.3 < final['eval/knn_top1'] <= 1.0


def _mesh_line(output):
  return next(l for l in output.splitlines() if '] mesh ' in l)


def _cut_after_first_checkpoint(src, dst):
  """A copy of run `src` as if it had been stopped after its step-6 checkpoint."""
  shutil.copytree(src, dst)
  shutil.rmtree(os.path.join(dst, 'checkpoints', '12'))
  os.remove(os.path.join(dst, 'metrics.jsonl'))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """One uninterrupted 12-step run on 1 process x 4 devices and one on 2 x 2."""
  root = tmp_path_factory.mktemp('multiprocess')
  single, multi = str(root / 'single'), str(root / 'multi')
  out_single = _launch(single, processes=1, devices_per_process=4)
  out_multi = _launch(multi, processes=2, devices_per_process=2)
  return root, single, multi, out_single, out_multi


def test_fsdp_across_two_processes_equals_one_process(runs):
  _, single, multi, out_single, out_multi = runs
  assert "'fsdp': 4" in out_single[0], out_single[0][-2000:]
  assert "'fsdp': 4" in out_multi[0] and '2 processes' in out_multi[0], out_multi[0][-2000:]
  print('2 processes:', _mesh_line(out_multi[0]))
  ref_train, ref_eval = _metrics(single)
  train, final = _metrics(multi)
  _assert_same_training(train, ref_train, range(1, 13))
  _assert_same_evaluation(final, ref_eval)
  position = json.load(open(os.path.join(multi, 'checkpoints', '6', 'data_position',
                                         'metadata')))
  assert position == {'next_batch': 6, 'global_batch_size': 32}, position


@pytest.mark.parametrize('saved_on,resumed_on', [(2, 1), (1, 2)])
def test_resume_on_another_process_count(runs, saved_on, resumed_on):
  root, single, multi, *_ = runs
  workdir = str(root / f'resume_{saved_on}_to_{resumed_on}')
  _cut_after_first_checkpoint(multi if saved_on == 2 else single, workdir)
  out = _launch(workdir, processes=resumed_on, devices_per_process=4 // resumed_on)
  assert 'restored checkpoint at step 6' in out[0], out[0][-3000:]
  assert f'{resumed_on} processes' in out[0] or resumed_on == 1, out[0][-3000:]
  ref_train, ref_eval = _metrics(single)
  train, final = _metrics(workdir)
  _assert_same_training(train, ref_train, range(7, 13))
  _assert_same_evaluation(final, ref_eval)


def test_tensor_axis_across_processes_equals_one_process(tmp_path):
  """mesh tensor=4 on 2 processes x 2 devices: each process holds half of every tensor
  group, so both hold all batch rows and must read the same records."""
  flags = ['--config=configs/vitg.py:runlocal', '--config.total_steps=4',
           '--config.checkpoint_every=4', '--config.log_every=1',
           '--config.mesh.data=1', '--config.mesh.fsdp=1', '--config.mesh.tensor=4',
           '--config.model.num_heads=4', '--config.diagnostics.every=0',
           '--config.eval.max_examples=256', '--config.diagnostics.plots=false']
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  out_single = _launch(single, processes=1, devices_per_process=4, flags=flags)
  out_multi = _launch(multi, processes=2, devices_per_process=2, flags=flags)
  line = _mesh_line(out_multi[0])
  print('1 process: ', _mesh_line(out_single[0]))
  print('2 processes:', line)
  assert "'tensor': 4" in line and 'processes [[[0 0 1 1]]]' in line, line
  assert 'block 0 of 1, shared with 1 replica process' in line, line
  assert re.search(r'block 0 of 1, shared with 1 replica', _mesh_line(out_multi[1]))
  ref_train, ref_eval = _metrics(single)
  train, final = _metrics(multi)
  _assert_same_training(train, ref_train, range(1, 5))
  _assert_same_evaluation(final, ref_eval)
