"""lejepa_jax.select: label-free model selection from workdirs (no training, no JAX)."""
import json
import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from scipy import stats

from lejepa_jax import run_config
from lejepa_jax import select

REPO = pathlib.Path(__file__).resolve().parents[1]


def _write_run(d, *, lamb, lr=1e-3, losses=(), accuracy=None, step=None, extra_lines=()):
  """A fake workdir: config.json via run_config.save and a hand-written metrics.jsonl.

  losses: train/loss logged every 10 steps; the eval line (if accuracy is given) goes at the
  last step, as train.py writes it.
  """
  d = pathlib.Path(d)
  d.mkdir(parents=True, exist_ok=True)
  run_config.save(d, ml_collections.ConfigDict({
      'lamb': lamb, 'loss_convention': 'convex', 'total_steps': 10 * max(len(losses), 1),
      'optim': {'lr': lr, 'warmup_steps': 1}, 'model': {'width': 8}}))
  lines = [{'step': 10 * (i + 1), 'train/loss': float(v), 'train/inv': 0.1, 'train/sigreg': 1.0}
           for i, v in enumerate(losses)]
  if accuracy is not None:
    lines.append({'step': step or 10 * len(losses), 'eval/linear_probe_top1': float(accuracy),
                  'eval/knn_top1': float(accuracy) - 0.01})
  text = ''.join(json.dumps(x) + '\n' for x in lines) + ''.join(extra_lines)
  (d / 'metrics.jsonl').write_text(text)
  return str(d)


def _synthetic(seed=1, n=12):
  """Accuracy a decreasing function of loss / lamb^0.4; the loss itself is not monotone in it."""
  rng = np.random.default_rng(seed)
  lamb = np.geomspace(0.01, 0.5, n)
  rng.shuffle(lamb)
  s = rng.permutation(np.linspace(1.0, 2.0, n))      # the 'true' scaled loss
  loss = s * lamb ** 0.4
  acc = 0.95 - 0.2 * (s - 1.0)
  return loss, lamb, acc


# ------------------------------------------------------------------------------- math

def test_ranks_average_ties():
  np.testing.assert_array_equal(select.ranks([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
  np.testing.assert_array_equal(select.ranks([3, 3, 3]), [2, 2, 2])


def test_spearman_hand_computed():
  # a ranks 1..5; b = [5, 6, 7, 8, 7] ranks [1, 2, 3.5, 5, 3.5]; Pearson of the centred ranks
  # (-2,-1,0,1,2) . (-2,-1,0.5,2,0.5) = 4+1+0+2+1 = 8; |a| = sqrt(10), |b| = sqrt(4+1+.25+4+.25)
  assert select.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(10 * 9.5))
  assert select.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
  assert math.isnan(select.spearman([1, 2, 3], [4, 4, 4]))     # constant: nothing to rank
  assert math.isnan(select.spearman([1.0], [2.0]))
  with pytest.raises(ValueError, match='lengths'):
    select.spearman([1, 2], [1, 2, 3])


@pytest.mark.parametrize('seed', range(5))
def test_spearman_matches_scipy_with_ties(seed):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 6, size=15).astype(float)                # many ties
  b = a + rng.integers(-3, 4, size=15)
  assert select.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
  c = rng.normal(size=30)
  d = -c ** 3 + rng.normal(size=30)
  assert select.spearman(c, d) == pytest.approx(stats.spearmanr(c, d).statistic, abs=1e-12)


def test_scaled_loss():
  np.testing.assert_allclose(select.scaled_loss([1.0, 2.0], [0.25, 0.04], 0.5), [2.0, 10.0])
  np.testing.assert_allclose(select.scaled_loss([1.0, 2.0], [0.0, 0.5], 0.0), [1.0, 2.0])
  with pytest.raises(ValueError, match='lamb must be > 0'):
    select.scaled_loss([1.0, 2.0], [0.0, 0.5], 0.4)


def test_alpha_grid():
  g = select.alpha_grid('0:2:0.05')
  assert len(g) == 41 and g[0] == 0.0 and g[-1] == 2.0 and 0.4 in g
  np.testing.assert_array_equal(select.alpha_grid('0.4, 0, 1'), [0.0, 0.4, 1.0])
  for bad in ('0:2:0', '2:0:0.1', 'a,b', ''):
    with pytest.raises(ValueError, match='alphas'):
      select.alpha_grid(bad)


def test_best_alpha_recovers_the_generating_exponent():
  loss, lamb, acc = _synthetic()
  grid = select.alpha_grid('0:2:0.05')
  fit = select.best_alpha(loss, lamb, acc, grid)
  assert fit.alpha == pytest.approx(0.4)
  assert fit.rho == pytest.approx(-1.0)
  assert fit.alpha_range[0] <= 0.4 <= fit.alpha_range[1]
  # every grid point against scipy on the explicitly scaled loss
  ref = [stats.spearmanr(loss / lamb ** a, acc).statistic for a in grid]
  np.testing.assert_allclose(fit.rhos, ref, atol=1e-12)
  # before scaling, the loss ranks the runs badly
  rho0 = select.spearman(loss, acc)
  assert rho0 == pytest.approx(stats.spearmanr(loss, acc).statistic)
  assert rho0 > -0.5


def test_best_alpha_plateau_middle():
  # 3 runs; rho = -1 exactly for alpha in a band: best_alpha is the band's middle grid point.
  loss = np.array([1.0, 1.0, 1.0]) * np.array([0.1, 0.2, 0.4]) ** 0.5
  lamb = np.array([0.1, 0.2, 0.4])
  acc = np.array([0.9, 0.8, 0.7])      # decreasing in lamb: scaled loss must increase in lamb
  grid = np.round(np.arange(0, 2.01, 0.1), 10)
  fit = select.best_alpha(loss, lamb, acc, grid)
  # loss / lamb^a = lamb^(0.5 - a): increasing in lamb (rho = -1) for a < 0.5, constant at 0.5
  assert fit.alpha_range == (0.0, 0.4)
  assert fit.alpha == pytest.approx(0.2)
  assert math.isnan(fit.rhos[5])        # a = 0.5: all scores equal
  assert fit.rhos[6] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ reading

def test_metrics_later_line_wins_and_final_loss(tmp_path):
  d = _write_run(tmp_path / 'r', lamb=0.1, losses=[5.0, 4.0, 3.0], accuracy=None, extra_lines=[
      json.dumps({'step': 30, 'train/loss': 2.5}) + '\n',        # resumed: step 30 again
      json.dumps({'step': 40, 'train/loss': 2.0}) + '\n',
      json.dumps({'step': 40, 'eval/linear_probe_top1': 0.5}) + '\n',
      json.dumps({'step': 40, 'eval/linear_probe_top1': 0.6}) + '\n',  # re-evaluated
      json.dumps({'step': 50, 'train/loss': 0.1}) + '\n',        # after the evaluation
      '{"step": 60, "train/lo',                                   # cut short by a kill
  ])
  records = select.read_metrics(os.path.join(d, 'metrics.jsonl'))
  assert records[30]['train/loss'] == 2.5 and records[30]['train/inv'] == 0.1
  assert records[40] == {'step': 40, 'train/loss': 2.0, 'eval/linear_probe_top1': 0.6}
  assert 60 not in records
  run = select.load_run(d, 'eval/linear_probe_top1', 'train/loss', last_n=3)
  assert run.accuracy == 0.6 and run.step == 40
  assert run.loss_steps == (20, 30, 40)                          # not step 50: after the eval
  assert run.loss == pytest.approx((4.0 + 2.5 + 2.0) / 3)
  assert select.load_run(d, 'eval/linear_probe_top1', 'train/loss', last_n=1).loss == 2.0
  assert run.lamb == 0.1 and run.lr == 1e-3


def test_skipped_runs_have_reasons(tmp_path):
  ok = _write_run(tmp_path / 'ok', lamb=0.1, losses=[1.0], accuracy=0.7)
  unfinished = _write_run(tmp_path / 'unfinished', lamb=0.1, losses=[1.0, 0.9])
  nan_loss = _write_run(tmp_path / 'nan', lamb=0.1, losses=[1.0, float('nan')], accuracy=0.1)
  (tmp_path / 'noconfig').mkdir()
  (tmp_path / 'select.png').write_bytes(b'x')
  runs, skipped, files = select.load_runs(
      [ok, unfinished, nan_loss, str(tmp_path / 'noconfig'), str(tmp_path / 'missing'),
       str(tmp_path / 'select.png'), ok], 'eval/linear_probe_top1', 'train/loss', 3)
  assert [r.dir for r in runs] == [ok]
  reasons = dict(skipped)
  assert 'unfinished' in reasons[unfinished] and 'step 20 of 20' in reasons[unfinished]
  assert 'nan' in reasons[nan_loss]
  assert 'config.json' in reasons[str(tmp_path / 'noconfig')]
  assert 'does not exist' in reasons[str(tmp_path / 'missing')]
  assert files == [str(tmp_path / 'select.png')]


def test_select_with_lamb_zero_run():
  loss, lamb, acc = _synthetic(n=8)
  runs = [select.Run(dir=f'r{i}', lamb=float(lamb[i]), lr=1e-3, loss=float(loss[i]),
                     accuracy=float(acc[i]), step=10, loss_steps=(10,), convention='convex')
          for i in range(len(loss))]
  # lamb = 0: the lowest loss of all (no SIGReg term) and a collapsed, poor encoder
  zero = select.Run(dir='zero', lamb=0.0, lr=1e-3, loss=1e-3, accuracy=0.2, step=10,
                    loss_steps=(10,), convention='convex')
  grid = select.alpha_grid('0:2:0.05')
  sel = select.select(runs + [zero], grid, pick_alpha=0.4)
  # the alpha search uses the 8 runs with lamb > 0 only
  ref = select.best_alpha(loss, lamb, acc, grid)
  assert sel.fit.alpha == ref.alpha == pytest.approx(0.4)
  np.testing.assert_allclose(sel.fit.rhos, ref.rhos)
  assert sel.rho_alpha0 == pytest.approx(
      stats.spearmanr(np.append(loss, 1e-3), np.append(acc, 0.2)).statistic)
  assert sel.rho_alpha0_scalable == pytest.approx(stats.spearmanr(loss, acc).statistic)
  # pick at 0.4: the best run; the lamb = 0 run is listed last, unscored
  best = int(np.argmax(acc))
  assert sel.picked.dir == f'r{best}' and sel.best.dir == f'r{best}'
  assert sel.runs[-1].dir == 'zero' and math.isnan(sel.scores[-1])
  assert sel.rho_pick == pytest.approx(-1.0)
  # pick at alpha 0 (the raw loss) falls for the lamb = 0 run
  assert select.select(runs + [zero], grid, pick_alpha=0.0).picked.dir == 'zero'
  with pytest.raises(ValueError, match='need at least 3'):
    select.select(runs[:2], grid)


# ---------------------------------------------------------------------------------- CLI

def _cli(args, cwd):
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, '-m', 'lejepa_jax.select', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_table_json_and_plot(tmp_path):
  out = tmp_path / 'sweep'
  loss, lamb, acc = _synthetic(n=8)
  dirs = []
  for i in range(len(loss)):
    # three logged losses whose mean is loss[i]; the eval line at the last step
    dirs.append(_write_run(out / f'run{i}', lamb=float(lamb[i]),
                           losses=[loss[i] + 0.01, loss[i] - 0.02, loss[i] + 0.01],
                           accuracy=acc[i]))
  dirs.append(_write_run(out / 'unfinished', lamb=0.1, losses=[1.0]))
  dirs.append(_write_run(out / 'zero', lamb=0.0, losses=[1e-3] * 3, accuracy=0.2))
  (out / 'sweep.log').write_text('not a run\n')
  res = _cli(sorted(str(p) for p in out.iterdir()), cwd=tmp_path)   # what OUTDIR/* expands to
  assert res.returncode == 0, res.stderr
  lines = res.stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  assert summary['runs'] == 9 and summary['skipped'] == 1
  assert summary['best_alpha'] == pytest.approx(0.4)
  assert summary['spearman_best'] == pytest.approx(-1.0)
  assert summary['pick_alpha'] == pytest.approx(0.4)
  best = int(np.argmax(acc))
  assert summary['picked'] == str(out / f'run{best}')
  assert summary['picked_accuracy'] == summary['best_accuracy'] == pytest.approx(acc[best], abs=1e-4)
  rho0 = stats.spearmanr(np.append(loss, 1e-3), np.append(acc, 0.2)).statistic
  assert summary['spearman_alpha0'] == pytest.approx(rho0, abs=1e-4)
  # default plot path: beside the runs (OUTDIR/select.png), a real PNG
  assert summary['plot'] == str(out / 'select.png')
  assert (out / 'select.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  text = res.stdout
  assert 'skipped ' + str(out / 'unfinished') in text and 'unfinished' in text
  assert 'lamb = 0' in text and 'sweep.log' in text
  assert f'plot: {out / "select.png"}' in text


def test_cli_needs_three_runs(tmp_path):
  a = _write_run(tmp_path / 'a', lamb=0.1, losses=[1.0], accuracy=0.5)
  b = _write_run(tmp_path / 'b', lamb=0.2, losses=[1.0], accuracy=0.6)
  c = _write_run(tmp_path / 'c', lamb=0.2, losses=[1.0])                 # unfinished
  res = _cli([a, b, c, '--plot=none'], cwd=tmp_path)
  assert res.returncode == 2
  err = res.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('select: 2 usable run') and 'at least 3' in err[0]
  assert not (tmp_path / 'select.png').exists()
