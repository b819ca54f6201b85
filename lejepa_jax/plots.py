"""PNG plots of a run: losses, accuracies, embedding diagnostics, spectra and Q-Q plots.

  python -m lejepa_jax.plots --workdir=DIR

reads DIR/metrics.jsonl (one JSON object per logged step) and DIR/diagnostics.npz
(the arrays `save_arrays` keeps) and writes DIR/plots/{losses,accuracy,diagnostics,
spectrum,qq}.png. A plot whose data is missing is skipped with a logged reason.
DIR may be any etils.epath path (gs://... too).
"""
from __future__ import annotations

import io
import math

from absl import app
from absl import flags
from absl import logging
from etils import epath
import numpy as np

from lejepa_jax import workdir as workdir_lib

PLOT_NAMES = ('losses', 'accuracy', 'diagnostics', 'spectrum', 'qq')
# The run directory's files, read from lejepa_jax/workdir.py (re-exported: the names plots
# had first).
ARRAYS_FILE, MAX_ARRAY_STEPS = workdir_lib.ARRAYS_FILE, workdir_lib.MAX_ARRAY_STEPS
load_arrays, save_arrays = workdir_lib.load_arrays, workdir_lib.save_arrays
read_metrics = workdir_lib.read_metrics


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one key, finite values only, sorted by step (a step logged twice
  keeps its last value)."""
  by_step = {}
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and math.isfinite(v):
      by_step[int(r['step'])] = float(v)
  steps = np.array(sorted(by_step), np.int64)
  return steps, np.array([by_step[s] for s in steps], np.float64)


def _keys(records, predicate) -> list[str]:
  return sorted({k for r in records for k in r if k != 'step' and predicate(k)})


# ---------------------------------------------------------------- plotting
def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: epath.Path) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
  _pyplot().close(fig)
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_bytes(buf.getvalue())
  tmp.replace(path)
  return str(path)


def _line(ax, steps, values, label, log_if_positive=True, **kw):
  marker = 'o' if len(steps) <= 3 else None
  ax.plot(steps, values, label=label, marker=marker, markersize=4, **kw)
  if log_if_positive and len(values) and np.all(values > 0) and values.max() / values.min() > 20:
    ax.set_yscale('log')


def plot_losses(records, path):
  keys = [k for k in ('train/loss', 'train/inv', 'train/sigreg', 'train/probe_loss')
          if len(series(records, k)[0])]
  if not keys:
    return None, 'no train/loss, train/inv, train/sigreg or train/probe_loss in metrics.jsonl'
  plt = _pyplot()
  cols = min(len(keys), 2)
  rows = -(-len(keys) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 3.4 * rows), squeeze=False)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis('off')
  titles = {'train/loss': 'total loss', 'train/inv': 'invariance term',
            'train/sigreg': 'SIGReg term', 'train/probe_loss': 'online probe loss'}
  for ax, key in zip(axes.flat, keys):
    _line(ax, *series(records, key), key)
    ax.set(title=titles[key], xlabel='step', ylabel=key)
    ax.grid(alpha=0.3, which='both')
  fig.suptitle('Training losses (log scale where they span > 20x)')
  fig.tight_layout()
  return _save(fig, path), None


def plot_accuracy(records, path):
  keys = [k for k in ['train/probe_top1'] + _keys(records, lambda k: k.startswith('eval/')
                                                   and k.endswith('top1'))
          if len(series(records, k)[0])]
  if not keys:
    return None, 'no train/probe_top1 or eval/*top1 in metrics.jsonl'
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for key in keys:
    steps, values = series(records, key)
    style = dict(marker='o', markersize=6, linestyle='--') if key.startswith('eval/') else {}
    ax.plot(steps, values, label=key, **style)
  ax.set(title='Top-1 accuracy: online probe (train batches), frozen evals (test)',
         xlabel='step', ylabel='top-1 accuracy', ylim=(0, 1))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path), None


def plot_diagnostics(records, path):
  diag = _keys(records, lambda k: k.startswith('diag/'))
  if not diag:
    return None, 'no diag/* keys in metrics.jsonl'
  groups = [('rankme', 'effective rank (RankMe)', ('rankme', 'rankme_centred')),
            ('sigreg', 'sliced Epps-Pulley (SIGReg) statistic', ('sigreg', 'sigreg_std')),
            ('var', 'per-dimension variance', ('var_mean', 'var_min', 'var_max')),
            ('norm', 'mean L2 norm of embeddings', ('mean_norm',))]
  used = set()
  panels = []
  for _, title, stats in groups:
    keys = [f'diag/{p}_{s}' for p in ('emb', 'proj') for s in stats if f'diag/{p}_{s}' in diag]
    if keys:
      panels.append((title, keys))
      used.update(keys)
  rest = [k for k in diag if k not in used]
  if rest:
    panels.append(('other diagnostics', rest))
  plt = _pyplot()
  cols = min(len(panels), 2)
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.6 * rows), squeeze=False)
  for ax, (title, keys) in zip(axes.flat, panels):
    for key in keys:
      steps, values = series(records, key)
      if len(steps):
        _line(ax, steps, values, key[len('diag/'):],
              linestyle='-' if key.startswith('diag/emb') else '--')
    ax.set(title=title, xlabel='step')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  fig.suptitle('Embedding diagnostics on a fixed eval batch (emb: backbone CLS, solid; '
               'proj: projector output, dashed)', fontsize=10)
  fig.tight_layout()
  return _save(fig, path), None


def plot_spectrum(arrays, path):
  names = [n for n in ('emb_spectrum', 'proj_spectrum') if n in arrays]
  if not names or 'steps' not in arrays:
    return None, f'no spectra in {ARRAYS_FILE}'
  plt = _pyplot()
  steps = arrays['steps']
  cmap = plt.get_cmap('viridis')
  norm = plt.Normalize(steps.min(), max(steps.max(), steps.min() + 1))
  fig, axes = plt.subplots(1, len(names), figsize=(5.6 * len(names), 4.4), squeeze=False,
                           layout='constrained')
  for ax, name in zip(axes[0], names):
    spectra = np.asarray(arrays[name], np.float64)
    # float32 rounding leaves eigenvalues ~1e-7 x the largest (e.g. the direction a
    # LayerNorm removes): show down to 1e-9 x the largest, no further.
    floor = max(spectra.max(), 1e-30) * 1e-9
    for step, spectrum in zip(steps, spectra):
      rank = np.arange(1, len(spectrum) + 1)
      shown = spectrum > floor
      ax.loglog(rank[shown], spectrum[shown], color=cmap(norm(step)), lw=1.3)
    what = 'backbone CLS embedding' if name.startswith('emb') else 'projector output'
    ax.set_title(f'covariance eigenvalues: {what}\n(min(N, D) = {spectra.shape[-1]})', fontsize=10)
    ax.set(xlabel='rank (index, descending)', ylabel='eigenvalue')
    ax.grid(alpha=0.3, which='both')
  mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
  fig.colorbar(mappable, ax=axes[0].tolist(), label='training step')
  return _save(fig, path), None


def qq_points(values, *, standardise: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(N(0, 1) quantiles at (i - 1/2) / n, sorted sample), the sample standardised to zero
  mean and unit variance if asked."""
  from scipy import stats
  values = np.sort(np.asarray(values, np.float64))
  if standardise:
    values = (values - values.mean()) / max(values.std(), 1e-12)
  n = len(values)
  return stats.norm.ppf((np.arange(1, n + 1) - 0.5) / n), values


def plot_qq(arrays, path):
  names = [n for n in ('emb_slices', 'proj_slices') if n in arrays]
  if not names or 'steps' not in arrays:
    return None, f'no slices in {ARRAYS_FILE}'
  plt = _pyplot()
  step = int(arrays['steps'][-1])
  fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.6), squeeze=False)
  for ax, name in zip(axes[0], names):
    slices = np.asarray(arrays[name][-1], np.float64)       # (slices, N)
    standardise = name.startswith('emb')
    lim = 0.0
    for i, values in enumerate(slices):
      theory, values = qq_points(values, standardise=standardise)
      ax.plot(theory, values, '.', markersize=2.5, label=f'slice {i}')
      lim = max(lim, np.abs(theory).max(), np.percentile(np.abs(values), 99.5))
    lim = min(lim * 1.05, 10.0)
    ax.plot([-lim, lim], [-lim, lim], 'k-', lw=1, label='y = x (N(0, 1))')
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect='equal',
           xlabel='N(0, 1) quantile',
           ylabel='standardised projection quantile' if standardise else 'projection quantile')
    ax.set_title('backbone CLS on random directions\n(standardised: shape only)' if standardise
                 else 'projector output on random directions\n(raw: what SIGReg tests)',
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, markerscale=3)
  fig.suptitle(f'Q-Q plots against N(0, 1) at step {step}')
  fig.tight_layout()
  return _save(fig, path), None


def write_plots(workdir) -> list[str]:
  """Writes DIR/plots/*.png from DIR/metrics.jsonl and DIR/diagnostics.npz; returns the paths.

  Missing data skips that plot (logged), never raises.
  """
  workdir = epath.Path(workdir)
  out = workdir / workdir_lib.PLOTS_DIR
  out.mkdir(parents=True, exist_ok=True)
  records = read_metrics(workdir)
  try:
    arrays = load_arrays(workdir)
  except (OSError, ValueError) as e:    # a corrupt file: plot the rest
    logging.warning('cannot read %s: %s', workdir / ARRAYS_FILE, e)
    arrays = {}
  jobs = (('losses', plot_losses, records), ('accuracy', plot_accuracy, records),
          ('diagnostics', plot_diagnostics, records), ('spectrum', plot_spectrum, arrays),
          ('qq', plot_qq, arrays))
  written = []
  for name, plot, data in jobs:
    path, reason = plot(data, out / f'{name}.png')
    if path:
      written.append(path)
    else:
      logging.info('skipped %s.png: %s', name, reason)
  return written


def define_flags() -> None:
  # Called when run, not at import: lejepa_jax.main and scripts importing this module have
  # their own --workdir.
  flags.DEFINE_string('workdir', None, 'Run directory holding metrics.jsonl.')
  flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  for path in write_plots(flags.FLAGS.workdir):
    print(path)


if __name__ == '__main__':
  define_flags()
  app.run(main)
