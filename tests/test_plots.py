"""PNG plots from metrics.jsonl and diagnostics.npz; the arrays file and its thinning."""
import json

import numpy as np
import pytest

from lejepa_jax import plots

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _arrays(rng, n=64, d=16, k=8):
  return {'emb_spectrum': np.sort(rng.exponential(size=d))[::-1],
          'proj_spectrum': np.sort(rng.exponential(size=k))[::-1],
          'emb_slices': rng.normal(size=(4, n)), 'proj_slices': rng.normal(size=(4, n))}


def _write_metrics(workdir, records, extra_lines=()):
  with open(workdir / 'metrics.jsonl', 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
    for line in extra_lines:
      f.write(line + '\n')


def _full_records():
  records = []
  for step in range(10, 210, 10):
    r = {'step': step, 'train/loss': 5.0 / step, 'train/inv': 2.0 / step,
         'train/sigreg': 30.0 / step, 'train/probe_top1': min(0.9, step / 200)}
    if step % 50 == 0:
      r.update({'diag/emb_rankme': 100 - step / 10, 'diag/proj_rankme': 40.0,
                'diag/emb_var_max': 1.0, 'diag/proj_sigreg': 3.0})
    records.append(r)
  records.append({'step': 200, 'eval/linear_probe_top1': 0.8, 'eval/knn_top1': 0.75,
                  'eval/fewshot_5shot_top1': 0.6})
  return records


def _assert_png(path):
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:8] == PNG_MAGIC
  assert len(data) > 10_000     # axes, lines and text, not an empty canvas


def test_write_plots_writes_five_pngs(tmp_path):
  rng = np.random.default_rng(0)
  _write_metrics(tmp_path, _full_records(), extra_lines=['{"step": 210, "train/lo', 'garbage'])
  for step in (0, 100, 200):
    plots.save_arrays(tmp_path, step, _arrays(rng))
  written = plots.write_plots(str(tmp_path))
  names = sorted(p.rsplit('/', 1)[-1] for p in written)
  assert names == sorted(f'{n}.png' for n in plots.PLOT_NAMES)
  for path in written:
    assert path.startswith(str(tmp_path / 'plots'))
    _assert_png(path)


def test_missing_data_skips_plots_without_raising(tmp_path):
  assert plots.write_plots(tmp_path) == []          # nothing at all
  # losses only: no accuracy, no diagnostics, no arrays file
  _write_metrics(tmp_path, [{'step': s, 'train/loss': 1.0 / s} for s in (1, 2, 3)])
  assert [p.rsplit('/', 1)[-1] for p in plots.write_plots(tmp_path)] == ['losses.png']
  # a corrupt arrays file is skipped too
  (tmp_path / plots.ARRAYS_FILE).write_bytes(b'not an npz')
  assert [p.rsplit('/', 1)[-1] for p in plots.write_plots(tmp_path)] == ['losses.png']
  # eval-only metrics (no train/*): accuracy only
  _write_metrics(tmp_path, [{'step': 5, 'eval/knn_top1': 0.5}, {'step': 7, 'eval/knn_top1': None}])
  assert [p.rsplit('/', 1)[-1] for p in plots.write_plots(tmp_path)] == ['accuracy.png']


def test_series_keeps_finite_values_and_last_duplicate():
  records = [{'step': 3, 'a': 1.0}, {'step': 1, 'a': 2.0}, {'step': 2}, {'step': 3, 'a': 5.0},
             {'step': 4, 'a': float('nan')}, {'step': 5, 'a': 'x'}]
  steps, values = plots.series(records, 'a')
  np.testing.assert_array_equal(steps, [1, 3])
  np.testing.assert_array_equal(values, [2.0, 5.0])


def test_save_arrays_thins_evenly_to_the_max(tmp_path):
  rng = np.random.default_rng(1)
  all_steps = list(range(0, 1001, 10))
  for step in all_steps:
    plots.save_arrays(tmp_path, step, _arrays(rng), max_steps=10)
  arrays = plots.load_arrays(tmp_path)
  kept = arrays['steps']
  assert len(kept) == 10
  assert kept[0] == 0 and kept[-1] == 1000 and np.all(np.diff(kept) > 0)
  gaps = np.diff(kept)
  assert gaps.max() <= 2.5 * gaps.min()        # evenly spread, not bunched at the end
  for name in ('emb_spectrum', 'proj_spectrum', 'emb_slices', 'proj_slices'):
    assert arrays[name].shape[0] == 10
  assert not list(tmp_path.glob('*.tmp'))


def test_save_arrays_values_resume_and_shape_change(tmp_path):
  rng = np.random.default_rng(2)
  saved = {s: _arrays(rng) for s in (10, 20, 30)}
  for s, a in saved.items():
    plots.save_arrays(tmp_path, s, a)
  arrays = plots.load_arrays(tmp_path)
  np.testing.assert_array_equal(arrays['steps'], [10, 20, 30])
  np.testing.assert_array_equal(arrays['proj_slices'][1], saved[20]['proj_slices'])
  # a resumed run saves step 20 again: the entries from 20 on are replaced
  again = _arrays(rng)
  plots.save_arrays(tmp_path, 20, again)
  arrays = plots.load_arrays(tmp_path)
  np.testing.assert_array_equal(arrays['steps'], [10, 20])
  np.testing.assert_array_equal(arrays['emb_spectrum'][1], again['emb_spectrum'])
  # a different shape (another batch size) starts the file afresh
  plots.save_arrays(tmp_path, 40, _arrays(rng, n=32))
  arrays = plots.load_arrays(tmp_path)
  np.testing.assert_array_equal(arrays['steps'], [40])
  assert arrays['emb_slices'].shape == (1, 4, 32)


def test_qq_points_of_a_gaussian_sample_follow_the_diagonal():
  rng = np.random.default_rng(3)
  theory, sample = plots.qq_points(rng.normal(size=20000))
  inner = np.abs(theory) < 2.5
  np.testing.assert_allclose(sample[inner], theory[inner], atol=0.06)
  assert theory[0] == pytest.approx(-theory[-1]) and np.all(np.diff(sample) >= 0)
  theory, sample = plots.qq_points(5.0 + 3.0 * rng.normal(size=20000), standardise=True)
  np.testing.assert_allclose(sample[inner], theory[inner], atol=0.06)
