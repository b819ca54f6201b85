"""python -m lejepa_jax.evaluate on a finished workdir, and evaluators during training."""
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import fmnist
from lejepa_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'),
    reason='needs the dataset-fashion-mnist Debian package')


def _lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A finished runlocal run: 20 steps, a k-NN curve every 10 steps, the full suite at the end."""
  c = fmnist.get_config('runlocal')
  c.eval.max_examples = 1000
  c.evals.online_probe = dict(type='online_probe', every=10)
  workdir = str(tmp_path_factory.mktemp('run'))
  results = train.train_and_evaluate(c, workdir, devices=jax.devices()[:4])
  return c, workdir, results


def _evaluate(workdir, *flags):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'lejepa_jax.evaluate', f'--workdir={workdir}',
                         '--noplots', *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def test_training_runs_the_evaluators_periodically_and_at_the_end(run):
  c, workdir, results = run
  lines = _lines(workdir)
  curve = [l['step'] for l in lines if 'eval/knn_curve_top1' in l]
  assert curve == [10, 20]                 # every=10 during training, and at the end
  online = [l['eval/online_probe_top1'] for l in lines if 'eval/online_probe_top1' in l]
  assert len(online) == 2 and all(0.0 <= a <= 1.0 for a in online)
  final = lines[-1]
  assert final['step'] == c.total_steps
  for key in ('eval/linear_probe_top1', 'eval/knn_top1', 'eval/knn_k10_top1',
              'eval/knn_k50_top1', 'eval/fewshot_1shot_top1', 'eval/fewshot_5shot_top1',
              'eval/fewshot_5shot_top1_std'):
    assert key in final and final[key] == pytest.approx(results[key]), key
  assert 0.2 < results['eval/linear_probe_top1'] <= 1.0          # 10 classes: chance is 0.1
  assert 0.1 < results['eval/fewshot_5shot_top1'] <= 1.0
  train_lines = [l for l in lines if 'train/loss' in l]
  assert all(0.0 <= l['train/data_wait_fraction'] <= 1.0 and l['train/step_seconds'] > 0
             for l in train_lines)


def test_evaluate_command_agrees_with_the_end_of_training_and_appends_a_line(run):
  c, workdir, results = run
  before = _lines(workdir)
  out = _evaluate(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  after = _lines(workdir)
  assert after[:len(before)] == before and len(after) == len(before) + 1
  line = after[-1]
  assert line['step'] == c.total_steps
  # the same checkpoint, features and seeds: the same figures (the issue allows 0.5 points)
  assert abs(line['eval/linear_probe_top1'] - results['eval/linear_probe_top1']) <= 0.005
  assert line['eval/knn_top1'] == pytest.approx(results['eval/knn_top1'], abs=0.005)
  assert line['eval/fewshot_5shot_top1'] == pytest.approx(results['eval/fewshot_5shot_top1'],
                                                          abs=0.005)
  assert 'linear probe top-1' in out.stdout and 'fewshot_5shot_top1' in out.stdout


def test_evaluate_an_earlier_step_with_chosen_evaluators_and_overrides(run):
  c, workdir, _ = run
  n = len(_lines(workdir))
  out = _evaluate(workdir, '--step=10', '--evals=knn', '--config.evals.knn.ks=(1,3)')
  assert out.returncode == 0, out.stderr[-3000:]
  line = _lines(workdir)[n]
  assert line['step'] == 10
  assert set(line) == {'step', 'eval/knn_top1', 'eval/knn_k1_top1', 'eval/knn_k3_top1'}
  # The projector's output instead of the probe features: its own keys, never mixed up.
  out = _evaluate(workdir, '--evals=knn', '--config.eval.features=projection')
  assert out.returncode == 0, out.stderr[-3000:]
  line = _lines(workdir)[n + 1]
  assert set(line) == {'step', 'eval/projection/knn_top1', 'eval/projection/knn_k10_top1',
                       'eval/projection/knn_k20_top1', 'eval/projection/knn_k50_top1'}
  assert 0.1 < line['eval/projection/knn_top1'] <= 1.0


@pytest.mark.parametrize('flags, message', [
    (('--step=7',), 'no checkpoint of step 7'),
    (('--evals=nope',), 'no evaluator named nope'),
    (('--config.evals.knn.kk=3',), 'kk'),
])
def test_evaluate_bad_input_exits_2_with_one_line(run, flags, message):
  _, workdir, _ = run
  n = len(_lines(workdir))
  out = _evaluate(workdir, *flags)
  assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
  errors = [l for l in out.stderr.splitlines() if l.startswith('[lejepa_jax] error:')]
  assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
  assert len(_lines(workdir)) == n


def test_evaluate_on_a_directory_without_a_run_says_what_is_missing(tmp_path):
  out = _evaluate(str(tmp_path))
  assert out.returncode == 2
  assert 'config.json does not exist' in out.stderr


def test_a_workdir_stored_by_an_earlier_version_evaluates_as_it_did(run, tmp_path):
  """Configs stored before 2026-12-02 (no model.gelu; every evaluator on eval.features =
  'probe') are read as they ran: the same features, under the same metric names."""
  import shutil
  c, workdir, results = run
  old = str(tmp_path / 'old')
  shutil.copytree(workdir, old)
  path = os.path.join(old, 'config.json')
  stored = json.load(open(path))
  for key in ('gelu', 'embedding_dim', 'online_probe_input', 'projector_activation'):
    stored['model'].pop(key, None)
  stored['eval']['features'] = 'probe'
  stored['evals'] = {name: {k: v for k, v in entry.items() if k != 'features'}
                     for name, entry in stored['evals'].items() if entry['type'] != 'online_probe'}
  json.dump(stored, open(path, 'w'))
  out = _evaluate(old, '--evals=knn,fewshot')
  assert out.returncode == 0, out.stderr[-3000:]
  line = _lines(old)[-1]
  assert {'eval/knn_top1', 'eval/fewshot_5shot_top1'} <= set(line)
  assert not any(k.startswith('eval/probe/') for k in line)
  assert line['eval/knn_top1'] == pytest.approx(results['eval/knn_top1'], abs=0.005)
  assert line['eval/fewshot_5shot_top1'] == pytest.approx(results['eval/fewshot_5shot_top1'],
                                                          abs=0.005)
