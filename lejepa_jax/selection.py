"""Label-free model selection, the library: Spearman, the lambda^alpha scaling, reading runs,
ranking them. The command and its output: lejepa_jax/select.py (whose docstring gives the
definitions)."""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

from etils import epath
import numpy as np
import scipy.stats

from lejepa_jax import run_config
from lejepa_jax import workdir as workdir_lib

MIN_RUNS = 3


# ----------------------------------------------------------------------------- the math

def ranks(x) -> np.ndarray:
  """1-based ranks of a 1-D array, ties given the average of the ranks they span."""
  return scipy.stats.rankdata(np.asarray(x, dtype=np.float64).ravel(), method='average')


def spearman(a, b) -> float:
  """Spearman rank correlation of two equal-length 1-D arrays (scipy's, ties averaged).

  nan when fewer than 2 values, a non-finite value, or either array constant (no ranking to
  correlate; scipy would warn and give nan too).
  """
  a = np.asarray(a, dtype=np.float64).ravel()
  b = np.asarray(b, dtype=np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f'spearman: lengths differ ({a.size} vs {b.size})')
  if a.size < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    return math.nan
  if np.ptp(a) == 0 or np.ptp(b) == 0:
    return math.nan
  return float(np.clip(scipy.stats.spearmanr(a, b).statistic, -1.0, 1.0))


def scaled_loss(loss, lamb, alpha):
  """loss / lamb^alpha, elementwise (the paper's label-free score). lamb must be > 0 unless
  alpha == 0 (then the loss itself)."""
  loss = np.asarray(loss, dtype=np.float64)
  lamb = np.asarray(lamb, dtype=np.float64)
  if alpha == 0:
    return loss * np.ones_like(lamb)
  if np.any(lamb <= 0):
    raise ValueError(f'scaled_loss: lamb must be > 0 to divide by lamb^{alpha} (got '
                     f'{lamb.min()}); leave lamb = 0 runs out of the alpha search')
  return loss / lamb ** alpha


def alpha_grid(spec: str) -> np.ndarray:
  """'START:STOP:STEP' (STOP included) or 'a,b,c' -> sorted array of alphas."""
  spec = spec.strip()
  try:
    if ':' in spec:
      start, stop, step = (float(v) for v in spec.split(':'))
      if step <= 0 or stop < start:
        raise ValueError
      n = int(math.floor((stop - start) / step + 1e-9)) + 1
      grid = start + step * np.arange(n)
    else:
      grid = np.array([float(v) for v in spec.split(',') if v.strip()])
  except ValueError:
    raise ValueError(f'--alphas={spec!r}: expected START:STOP:STEP with STEP > 0 and STOP >= '
                     'START, or a comma-separated list of numbers') from None
  if grid.size == 0:
    raise ValueError(f'--alphas={spec!r}: empty grid')
  return np.round(np.unique(grid), 10)


@dataclasses.dataclass(frozen=True)
class AlphaFit:
  alpha: float            # middle of the first plateau of the most negative rho (nan: none)
  rho: float              # rho there
  alpha_range: tuple      # (first, last) grid alpha of that plateau
  alphas: np.ndarray      # the grid
  rhos: np.ndarray        # rho at each grid alpha (nan where undefined)


def best_alpha(loss, lamb, accuracy, alphas=None) -> AlphaFit:
  """The alpha of `alphas` whose score loss / lamb^alpha is most predictive of accuracy
  (most negative Spearman rho: lower score, higher accuracy). All lamb must be > 0.

  Ties (rho is piecewise constant in alpha): the middle grid point of the first contiguous
  run of minimisers.
  """
  alphas = alpha_grid('0:2:0.05') if alphas is None else np.asarray(alphas, dtype=np.float64)
  rhos = np.array([spearman(scaled_loss(loss, lamb, a), accuracy) for a in alphas])
  if not np.any(np.isfinite(rhos)):
    return AlphaFit(math.nan, math.nan, (math.nan, math.nan), alphas, rhos)
  low = np.nanmin(rhos)
  at_min = np.isfinite(rhos) & (rhos <= low + 1e-12)
  i = int(np.argmax(at_min))
  j = i
  while j + 1 < len(alphas) and at_min[j + 1]:
    j += 1
  mid = (i + j) // 2
  return AlphaFit(float(alphas[mid]), float(rhos[mid]), (float(alphas[i]), float(alphas[j])),
                  alphas, rhos)


# ------------------------------------------------------------------------------- reading

class Skip(Exception):
  """A workdir that cannot be used; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class Run:
  dir: str
  lamb: float
  lr: float
  loss: float            # final loss (mean of the last `last_n` logged values)
  accuracy: float
  step: int              # step of the metric
  loss_steps: tuple      # the steps averaged into `loss`
  convention: str


def read_metrics(path) -> dict:
  """metrics.jsonl -> {step: {key: value}}, merged line by line (a later line wins, key by
  key). Lines that do not parse (a line cut short by a kill) or have no integer step are
  ignored."""
  return workdir_lib.metrics_by_step(workdir_lib.read_metrics_file(path))


def final_value(records: dict, key: str, last_n: int, max_step=None):
  """(mean of the last `last_n` values of `key` at steps <= max_step, those steps)."""
  steps = sorted(s for s, r in records.items()
                 if key in r and r[key] is not None and (max_step is None or s <= max_step))
  steps = steps[-last_n:]
  if not steps:
    return math.nan, ()
  return float(np.mean([float(records[s][key]) for s in steps])), tuple(steps)


def load_run(workdir: str, metric: str, loss_key: str, last_n: int) -> Run:
  """Reads one workdir; raises Skip(reason) when it cannot be used."""
  path = epath.Path(workdir)   # a local directory or gs://... (whatever epath reads)
  if not path.exists():
    raise Skip('does not exist')
  if not path.is_dir():
    raise Skip('not a directory')
  metrics_path = path / workdir_lib.METRICS_FILE
  if not (path / run_config.FILE).exists():
    raise Skip(f'no {run_config.FILE} (not a lejepa_jax workdir, or made before configs '
               'were stored)')
  if not metrics_path.exists():
    raise Skip('no metrics.jsonl (not started)')
  config = run_config.load(workdir)
  records = read_metrics(metrics_path)
  with_metric = [s for s, r in records.items() if r.get(metric) is not None]
  if not with_metric:
    last = max(records) if records else 0
    total = config.get('total_steps') or '?'
    raise Skip(f'no {metric} (unfinished: last logged step {last} of {total})')
  step = max(with_metric)
  accuracy = float(records[step][metric])
  if not math.isfinite(accuracy):
    raise Skip(f'{metric} is {accuracy}')
  lamb = config.get('lamb')
  if lamb is None:
    raise Skip(f'{run_config.FILE} has no lamb')
  loss, loss_steps = final_value(records, loss_key, last_n, max_step=step)
  if not loss_steps:
    raise Skip(f'no {loss_key} logged at steps <= {step}')
  if not math.isfinite(loss):
    raise Skip(f'final {loss_key} is {loss} (steps {list(loss_steps)})')
  lr = config.optim.lr if 'optim' in config and 'lr' in config.optim else math.nan
  return Run(dir=workdir, lamb=float(lamb), lr=float(lr), loss=loss, accuracy=accuracy,
             step=step, loss_steps=loss_steps,
             convention=str(config.get('loss_convention') or '?'))


def load_runs(workdirs: Iterable[str], metric: str, loss_key: str, last_n: int):
  """(usable runs, [(dir, reason)] skipped, [files ignored]), in the order given (duplicates
  dropped). Plain files (what OUTDIR/* also matches: logs, select.png) are ignored."""
  runs, skipped, files, seen = [], [], [], set()
  for d in workdirs:
    d = str(epath.Path(d))   # a/./b/ -> a/b; gs://b/x/ -> gs://b/x (os.path would mangle gs://)
    if d in seen:
      continue
    seen.add(d)
    if epath.Path(d).is_file():
      files.append(d)
      continue
    try:
      runs.append(load_run(d, metric, loss_key, last_n))
    except Skip as e:
      skipped.append((d, str(e)))
  return runs, skipped, files


# ---------------------------------------------------------------------------- selection

@dataclasses.dataclass(frozen=True)
class Selection:
  runs: tuple             # usable runs, ranked by the pick score (unscorable ones last)
  rho_alpha0: float       # rho(loss, accuracy) over all usable runs
  fit: AlphaFit           # over the runs with lamb > 0
  rho_alpha0_scalable: float  # rho(loss, accuracy) over the runs with lamb > 0
  pick_alpha: float
  rho_pick: float         # rho(score at pick_alpha, accuracy) over the runs it can score
  scores: tuple           # score at pick_alpha per run of `runs` (nan: lamb = 0, alpha > 0)
  picked: Run
  best: Run


def select(runs: Sequence[Run], alphas, pick_alpha='0.4') -> Selection:
  """The label-free analysis of usable runs (pure: no I/O). pick_alpha: a number or 'best'."""
  if len(runs) < MIN_RUNS:
    raise ValueError(f'{len(runs)} usable runs, need at least {MIN_RUNS}')
  loss = np.array([r.loss for r in runs])
  lamb = np.array([r.lamb for r in runs])
  acc = np.array([r.accuracy for r in runs])
  pos = lamb > 0
  if pos.sum() >= MIN_RUNS:
    fit = best_alpha(loss[pos], lamb[pos], acc[pos], alphas)
    rho0_pos = spearman(loss[pos], acc[pos])
  else:
    nan_rhos = np.full(len(alphas), math.nan)
    fit = AlphaFit(math.nan, math.nan, (math.nan, math.nan), np.asarray(alphas), nan_rhos)
    rho0_pos = math.nan
  if str(pick_alpha) == 'best':
    a = fit.alpha if math.isfinite(fit.alpha) else 0.0
  else:
    a = float(pick_alpha)
  scorable = np.ones_like(pos) if a == 0 else pos
  scores = np.full(len(runs), math.nan)
  scores[scorable] = scaled_loss(loss[scorable], lamb[scorable], a)
  rho_pick = (spearman(scores[scorable], acc[scorable]) if scorable.sum() >= MIN_RUNS
              else math.nan)
  # Rank: lowest score first; unscorable (nan) last; ties keep the order given.
  order = sorted(range(len(runs)), key=lambda i: (not math.isfinite(scores[i]), scores[i]
                                                  if math.isfinite(scores[i]) else 0.0, i))
  ranked = tuple(runs[i] for i in order)
  best = max(runs, key=lambda r: r.accuracy)
  return Selection(runs=ranked, rho_alpha0=spearman(loss, acc), fit=fit,
                   rho_alpha0_scalable=rho0_pos, pick_alpha=a, rho_pick=rho_pick,
                   scores=tuple(float(scores[i]) for i in order), picked=ranked[0], best=best)
