"""Label-free model selection: does the training loss rank the runs of a sweep?

    python -m lejepa_jax.select DIR... [--metric=eval/linear_probe_top1] [--loss=train/loss]
        [--last_n=3] [--alphas=0:2:0.05] [--pick_alpha=0.4] [--plot=PATH]
    python -m lejepa_jax.select /tmp/sweep/*          # e.g. after launch/sweep.sh

LeJEPA's paper reports that the final training loss predicts the frozen linear-probe
accuracy across hyper-parameters (Spearman 94.5%), and better still (about 99%) once the loss
is divided by lambda^alpha with alpha about 0.4, so a sweep can be ranked without labels.
This command checks that claim on finished runs and says which run the label-free score picks.

Per workdir DIR (positional arguments; a shell glob such as OUTDIR/* is fine: plain files
it matches are ignored; DIR may also be a gs:// URL, read through etils.epath like the
workdirs themselves):
  lambda     `lamb` of DIR/config.json (the resolved config the run stored); lr: `optim.lr`.
  accuracy   the `--metric` value of DIR/metrics.jsonl (the last step that has it; when a
             step is logged twice, the later line wins, key by key).
  final loss the mean of the last `--last_n` logged `--loss` values at steps <= the metric's
             step (the loss of the weights that were evaluated; the mean smooths the
             minibatch noise of one logged step). --last_n=1: the last logged value.
  score      loss / lambda^alpha (`scaled_loss`). Runs with lamb = 0 cannot be scaled: they
             are left out of the alpha search (and of the pick when alpha > 0), still listed.
Runs without the metric (unfinished), without config.json or without finite loss values
are listed as skipped with the reason. Fewer than 3 usable runs: a one-line error, exit 2.

Sign convention: rho is Spearman(score, accuracy). Lower loss should mean higher accuracy,
so a predictive score has rho near -1; the paper's "94.5%" and "99%" are -rho here.
`best_alpha` is the alpha of the grid `--alphas` with the most negative rho. rho is a step
function of alpha (it changes only where two runs swap order), so the minimum is usually a
plateau of grid points: best_alpha is the middle of the first such plateau, whose ends are
reported as best_alpha_range.

The pick: the run with the lowest score at `--pick_alpha`. The default, 0.4, is the paper's
value and uses no labels; --pick_alpha=best uses the fitted best_alpha, which has seen the
accuracies of these very runs (an optimistic, in-sample check, not a label-free choice).

Output: a table of the usable runs ranked by the pick score, the skipped runs, rho at
alpha = 0 and at best_alpha, the pick and its accuracy against the best run's, the plot's
path, and as the LAST line one JSON object:
  runs, spearman_alpha0, best_alpha, best_alpha_range, spearman_best, pick_alpha,
  spearman_pick, picked, picked_accuracy, best_accuracy, best_run, skipped, plot
(null where undefined, e.g. best_alpha with fewer than 3 runs with lamb > 0).

Plot (PNG, `--plot`; default: select.png in the deepest directory holding all the runs,
e.g. OUTDIR/select.png for OUTDIR/*; --plot=none: no plot): accuracy vs final loss,
accuracy vs loss / lambda^best_alpha, and rho vs alpha.
"""
from __future__ import annotations

import io
import json
import math
import sys
from typing import Sequence

from absl import app
from absl import flags
from etils import epath
import numpy as np

# The library (re-exported: the names this module had first).
from lejepa_jax.selection import (MIN_RUNS, AlphaFit, Run, Selection, Skip, alpha_grid,
                                  best_alpha, final_value, load_run, load_runs, ranks,
                                  read_metrics, scaled_loss, select, spearman)

__all__ = ['MIN_RUNS', 'AlphaFit', 'Run', 'Selection', 'Skip', 'alpha_grid', 'best_alpha',
           'final_value', 'load_run', 'load_runs', 'ranks', 'read_metrics', 'scaled_loss',
           'select', 'spearman', 'default_plot_path', 'table', 'plot', 'summary', 'main']

_METRIC = flags.DEFINE_string('metric', 'eval/linear_probe_top1',
                              'metrics.jsonl key of the accuracy to predict (higher is better).')
_LOSS = flags.DEFINE_string('loss', 'train/loss', 'metrics.jsonl key of the training loss.')
_LAST_N = flags.DEFINE_integer('last_n', 3, 'Final loss = mean of the last N logged loss values '
                               '(at steps <= the metric\'s step).', lower_bound=1)
_ALPHAS = flags.DEFINE_string('alphas', '0:2:0.05', 'Alpha grid: START:STOP:STEP (STOP '
                              'included) or a comma-separated list.')
_PICK_ALPHA = flags.DEFINE_string('pick_alpha', '0.4', "Alpha of the label-free score used to "
                                  "pick a run (the paper's 0.4), or 'best' (fitted on the "
                                  'accuracies: not label-free).')
_PLOT = flags.DEFINE_string('plot', None, "PNG path; default select.png in the deepest "
                            "directory holding all runs; 'none' or '': no plot.")


# ------------------------------------------------------------------------------- output

def _num(x, digits=4):
  return None if x is None or not math.isfinite(x) else round(float(x), digits)


def _fmt(x, spec='.4f'):
  return '-' if x is None or not math.isfinite(x) else format(x, spec)


def default_plot_path(workdirs: Sequence[str]) -> str:
  """select.png in the deepest directory that holds all the runs (OUTDIR for OUTDIR/*)."""
  paths = [epath.Path(d) for d in workdirs]
  parents = [(p if p.is_absolute() else p.absolute()).parent for p in paths]
  common = parents[0]
  while not all(p == common or common in p.parents for p in parents):
    common = common.parent
  return str(common / 'select.png')


def table(sel: Selection) -> str:
  a_best, a_pick = sel.fit.alpha, sel.pick_alpha
  show_best = math.isfinite(a_best) and a_best != a_pick
  names = [r.dir for r in sel.runs]
  w = max(len('run'), *(len(n) for n in names))
  head = (f"{'#':>2}  {'run':<{w}}  {'lamb':>8}  {'lr':>8}  {'step':>6}  {'loss':>8}  "
          f"{f'/lamb^{a_pick:g}':>11}  " + (f"{f'/lamb^{a_best:g}':>11}  " if show_best else '')
          + f"{'accuracy':>8}")
  lines = [head, '-' * len(head)]
  for i, (r, s) in enumerate(zip(sel.runs, sel.scores)):
    extra = ''
    if show_best:
      extra = f'{_fmt(r.loss / r.lamb ** a_best if r.lamb > 0 else math.nan):>11}  '
    tags = [t for t, on in (('picked', r is sel.picked), ('best accuracy', r is sel.best)) if on]
    mark = f"  <- {', '.join(tags)}" if tags else ''
    lines.append(f'{i + 1:>2}  {r.dir:<{w}}  {r.lamb:>8.4g}  {r.lr:>8.3g}  {r.step:>6d}  '
                 f'{r.loss:>8.4f}  {_fmt(s):>11}  {extra}{r.accuracy:>8.4f}{mark}')
  return '\n'.join(lines)


def plot(sel: Selection, path: str, metric: str, loss_key: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  runs = sel.runs
  loss = np.array([r.loss for r in runs])
  lamb = np.array([r.lamb for r in runs])
  acc = np.array([r.accuracy for r in runs])
  pos = lamb > 0
  picked = np.array([r is sel.picked for r in runs])
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  colour = np.log10(np.where(pos, lamb, np.nan))
  vmin = np.nanmin(colour) if pos.any() else 0
  vmax = np.nanmax(colour) if pos.any() else 1
  kw = dict(c=colour[pos], cmap='viridis', vmin=vmin, vmax=vmax, s=40, zorder=3)

  ax = axes[0]
  sc = ax.scatter(loss[pos], acc[pos], **kw)
  if (~pos).any():
    ax.scatter(loss[~pos], acc[~pos], marker='x', color='red', label='lamb = 0', zorder=3)
  ax.scatter(loss[picked], acc[picked], s=160, facecolors='none', edgecolors='black', zorder=4,
             label=f'picked (lamb^{sel.pick_alpha:g})')
  ax.legend(loc='best', fontsize=8)
  ax.set(xlabel=f'final {loss_key}', ylabel=metric,
         title=f'alpha = 0: Spearman rho = {_fmt(sel.rho_alpha0, ".3f")}')
  fig.colorbar(sc, ax=ax, label='log10 lamb')

  ax = axes[1]
  if math.isfinite(sel.fit.alpha):
    a = sel.fit.alpha
    ax.scatter(loss[pos] / lamb[pos] ** a, acc[pos], **kw)
    mine = picked & pos
    ax.scatter(loss[mine] / lamb[mine] ** a, acc[mine], s=160, facecolors='none',
               edgecolors='black', zorder=4, label='picked')
    ax.legend(loc='best', fontsize=8)
    ax.set(xlabel=f'{loss_key} / lamb^{a:g}', ylabel=metric,
           title=f'best alpha = {a:g}: rho = {sel.fit.rho:.3f}')
  else:
    ax.set_title('fewer than 3 runs with lamb > 0: no alpha search')
  ax = axes[2]
  ax.plot(sel.fit.alphas, sel.fit.rhos, '.-')
  if math.isfinite(sel.fit.alpha):
    ax.axvline(sel.fit.alpha, color='grey', ls='--', label=f'best {sel.fit.alpha:g}')
  ax.axvline(sel.pick_alpha, color='black', ls=':', label=f'pick {sel.pick_alpha:g}')
  ax.legend(loc='best', fontsize=8)
  ax.set(xlabel='alpha', ylabel='Spearman rho (score, accuracy)', ylim=(-1.05, 1.05),
         title='rho vs alpha (-1: lower score = higher accuracy)')
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=100)
  plt.close(fig)
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)   # nothing to make on an object store
  out.write_bytes(png.getvalue())


def summary(sel: Selection, skipped, plot_path) -> dict:
  fit = sel.fit
  return {
      'runs': len(sel.runs),
      'spearman_alpha0': _num(sel.rho_alpha0),
      'best_alpha': _num(fit.alpha),
      'best_alpha_range': None if not math.isfinite(fit.alpha) else
                          [_num(fit.alpha_range[0]), _num(fit.alpha_range[1])],
      'spearman_best': _num(fit.rho),
      'pick_alpha': _num(sel.pick_alpha),
      'spearman_pick': _num(sel.rho_pick),
      'picked': sel.picked.dir,
      'picked_accuracy': _num(sel.picked.accuracy),
      'best_accuracy': _num(sel.best.accuracy),
      'best_run': sel.best.dir,
      'skipped': len(skipped),
      'plot': plot_path,
  }


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    print('select: no workdirs given: python -m lejepa_jax.select DIR... (e.g. OUTDIR/*)',
          file=sys.stderr)
    sys.exit(2)
  try:
    alphas = alpha_grid(_ALPHAS.value)
    pick = _PICK_ALPHA.value.strip()
    if pick != 'best':
      pick = float(pick)
  except ValueError as e:
    print(f'select: {e}' if 'alphas' in str(e) else
          f"select: --pick_alpha={_PICK_ALPHA.value!r}: expected a number or 'best'",
          file=sys.stderr)
    sys.exit(2)

  runs, skipped, files = load_runs(workdirs, _METRIC.value, _LOSS.value, _LAST_N.value)
  if files:
    print(f'ignored {len(files)} plain file(s): {", ".join(epath.Path(f).name for f in files)}')
  for d, reason in skipped:
    print(f'skipped {d}: {reason}')
  if len(runs) < MIN_RUNS:
    sys.stdout.flush()
    print(f'select: {len(runs)} usable run(s) with {_METRIC.value}, need at least {MIN_RUNS} '
          f'({len(skipped)} skipped, reasons above)', file=sys.stderr)
    sys.exit(2)
  conventions = sorted({r.convention for r in runs})
  if len(conventions) > 1:
    print(f'warning: the runs mix loss conventions {conventions}: their losses are not on '
          'one scale')
  sel = select(runs, alphas, pick)

  print(f'\n{len(runs)} runs ranked by the label-free score {_LOSS.value} / lamb^'
        f'{sel.pick_alpha:g} (final loss = mean of the last {_LAST_N.value} logged values); '
        f'accuracy = {_METRIC.value}\n')
  print(table(sel))
  n_zero = sum(r.lamb <= 0 for r in runs)
  print('\nSpearman rho(score, accuracy); -1 = lower score always means higher accuracy '
        '(the paper quotes -rho: 94.5% / 99%).')
  print(f'  alpha = 0 (the loss itself), {len(runs)} runs: rho = {_fmt(sel.rho_alpha0, ".3f")}')
  if n_zero:
    print(f'  {n_zero} run(s) with lamb = 0 cannot be divided by lamb^alpha: left out of the '
          f'alpha search{" and the pick" if sel.pick_alpha else ""}; alpha = 0 on the other '
          f'{len(runs) - n_zero}: rho = {_fmt(sel.rho_alpha0_scalable, ".3f")}')
  if math.isfinite(sel.fit.alpha):
    lo, hi = sel.fit.alpha_range
    print(f'  best alpha in [{alphas[0]:g}, {alphas[-1]:g}]: {sel.fit.alpha:g} (rho = '
          f'{sel.fit.rho:.3f}, the same for alpha in [{lo:g}, {hi:g}])')
  else:
    print('  best alpha: none (fewer than 3 runs with lamb > 0, or no ranking to correlate)')
  print(f'  pick alpha {sel.pick_alpha:g}: rho = {_fmt(sel.rho_pick, ".3f")}')
  gap = sel.best.accuracy - sel.picked.accuracy
  print(f'\nPicked (lowest score): {sel.picked.dir}  accuracy {sel.picked.accuracy:.4f}; best '
        f'run: {sel.best.dir}  accuracy {sel.best.accuracy:.4f} (gap {gap:.4f})')

  plot_path = _PLOT.value
  if plot_path is None:
    plot_path = default_plot_path([r.dir for r in runs])
  if plot_path.lower() in ('', 'none'):
    plot_path = None
  else:
    plot(sel, plot_path, _METRIC.value, _LOSS.value)
    print(f'plot: {plot_path}')
  print(json.dumps(summary(sel, skipped, plot_path)))


if __name__ == '__main__':
  app.run(main)
