"""The run directory (WORKDIR): what a run writes where, and the readers and writers of each file.

    WORKDIR/config.json              the run's resolved config (save_config, load_config)
    WORKDIR/metrics.jsonl            one JSON object per logged step; metrics.MetricWriter
                                     appends, read_metrics / metrics_by_step read
    WORKDIR/diagnostics.npz          the embedding diagnostics' arrays of up to 10 steps
                                     (save_arrays, load_arrays)
    WORKDIR/plots/*.png              plots.write_plots
    WORKDIR/checkpoints/STEP/        Orbax checkpoints (checkpoint.py)
    WORKDIR/events.out.tfevents.*    TensorBoard (metrics.MetricWriter)

WORKDIR may be any etils.epath path (a local directory, gs://...).
"""
from __future__ import annotations

import io
import json

from etils import epath
import ml_collections
import numpy as np

from lejepa_jax import config_schema

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
PLOTS_DIR = 'plots'
CHECKPOINTS_DIR = 'checkpoints'


# ---------------------------------------------------------------- config.json
def save_config(workdir, config) -> None:
  """Writes WORKDIR/config.json (the resolved config, overrides included), atomically on a
  local disk; call from process 0 only."""
  path = epath.Path(workdir) / CONFIG_FILE
  text = config.to_json_best_effort(indent=2, sort_keys=True) + '\n'
  if '://' in str(path):
    path.write_text(text)
    return
  tmp = path.parent / (CONFIG_FILE + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)


def _tuples(value):
  """JSON has no tuples; configs use them (and --config.KEY overrides only accept tuples)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _evaluators_as_stored(config: dict) -> dict:
  """A config stored before evaluators read their protocol's features (2026-12-02; such
  configs have no model.gelu) ran every evaluator on eval.features, 'probe' by default, under
  the metric names eval/NAME_KEY: it is read so that re-evaluating it gives the same figures
  under the same names (each evaluator's `features` set to 'probe')."""
  model, evaluation = config.get('model') or {}, config.get('eval') or {}
  if 'gelu' in model or (evaluation.get('features') or 'probe') != 'probe':
    return config
  # What those versions ran without `evals`, and the evaluator types they had (history, fixed).
  earlier_default = {'linear_probe': {'type': 'linear_probe'}, 'knn': {'type': 'knn'}}
  evals = config.get('evals')
  evals = {k: dict(v) for k, v in (earlier_default if evals is None else evals).items()}
  for entry in evals.values():
    if entry.get('type') in ('linear_probe', 'knn', 'fewshot'):
      entry.setdefault('features', 'probe')
  return dict(config, evals=evals, eval=dict(evaluation, features=''))


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was started with, every key present (the defaults of
  config_schema where a config stored by an earlier version lacks one; see also
  _evaluators_as_stored)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: not a lejepa_jax workdir, or one made '
                            'before configs were stored; pass --config=configs/NAME.py with '
                            'the overrides the run used')
  stored = _evaluators_as_stored(json.loads(path.read_text()))
  return config_schema.resolve(ml_collections.ConfigDict(_tuples(stored)))


# ---------------------------------------------------------------- metrics.jsonl
def read_metrics_file(path) -> list[dict]:
  """The records of a metrics.jsonl file in order ([] when absent). Lines that do not parse
  (one cut short by a kill) or have no numeric step are skipped."""
  path = epath.Path(path)
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get('step'), (int, float)):
      records.append(record)
  return records


def read_metrics(workdir) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl, see read_metrics_file."""
  return read_metrics_file(epath.Path(workdir) / METRICS_FILE)


def metrics_by_step(records: list[dict]) -> dict:
  """{step: {key: value}}: the records of each integer step merged in order (a later line
  wins, key by key: a re-evaluation overrides, a resumed run's lines replace)."""
  out: dict = {}
  for record in records:
    if isinstance(record['step'], int):
      out.setdefault(record['step'], {}).update(record)
  return out


# ---------------------------------------------------------------- diagnostics.npz
ARRAYS_FILE = 'diagnostics.npz'
MAX_ARRAY_STEPS = 10


def load_arrays(workdir) -> dict:
  """{'steps': (S,), NAME: (S, ...)} from DIR/diagnostics.npz, or {} when there is none."""
  path = epath.Path(workdir) / ARRAYS_FILE
  if not path.exists():
    return {}
  with np.load(io.BytesIO(path.read_bytes())) as f:
    return {k: f[k] for k in f.files}


def _thin(steps: np.ndarray, max_steps: int) -> np.ndarray:
  """Indices to keep: the first and newest always; drop interior entries whose neighbours
  are closest (the one whose removal leaves the smallest gap) until max_steps remain."""
  keep = list(range(len(steps)))
  while len(keep) > max(max_steps, 2):
    gaps = [steps[keep[i + 1]] - steps[keep[i - 1]] for i in range(1, len(keep) - 1)]
    del keep[1 + int(np.argmin(gaps))]
  return np.asarray(keep[:max_steps], np.int64)


def save_arrays(workdir, step: int, arrays: dict, *, max_steps: int = MAX_ARRAY_STEPS) -> str:
  """Adds the `ARRAY_KEYS`-style arrays of `step` to DIR/diagnostics.npz; returns its path.

  Keeps at most max_steps steps, evenly thinned (first and newest always kept). Entries
  of steps >= `step` are replaced (a resumed run saves them again), and so are all the
  old ones if an array's shape changed. Written atomically (temporary file + rename).
  Call it on process 0 only, with host values (`jax.device_get`).
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  new = {k: np.asarray(v) for k, v in arrays.items()}
  old = load_arrays(workdir)
  steps = old['steps'] if 'steps' in old else np.zeros((0,), np.int64)
  keep = steps < step
  if set(old) - {'steps'} != set(new) or any(old[k].shape[1:] != new[k].shape for k in new):
    keep[:] = False
  steps = np.append(steps[keep], step).astype(np.int64)
  stacked = {k: np.concatenate([old[k][keep], new[k][None]]) if keep.any() else new[k][None]
             for k in new}
  idx = _thin(steps, max_steps)
  out = {'steps': steps[idx], **{k: v[idx] for k, v in stacked.items()}}
  buf = io.BytesIO()
  np.savez(buf, **out)
  path = workdir / ARRAYS_FILE
  tmp = workdir / (ARRAYS_FILE + '.tmp')
  tmp.write_bytes(buf.getvalue())
  tmp.replace(path)
  return str(path)
