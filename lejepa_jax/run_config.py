"""A run's config stored beside its checkpoints: WORKDIR/config.json.

`train` writes it when a run starts, so `evaluate`, `export` and `select` can work on
a workdir without the config file (or the command-line overrides) that made it.
"""
from __future__ import annotations

import json

from etils import epath
import ml_collections

FILE = 'config.json'


def save(workdir, config) -> None:
  """Writes WORKDIR/config.json (the resolved config, overrides included), atomically on a
  local disk; call from process 0 only."""
  path = epath.Path(workdir) / FILE
  text = config.to_json_best_effort(indent=2, sort_keys=True) + '\n'
  if '://' in str(path):
    path.write_text(text)
    return
  tmp = path.parent / (FILE + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)


def _tuples(value):
  """JSON has no tuples; configs use them (and --config.KEY overrides only accept tuples)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load(workdir) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was started with."""
  path = epath.Path(workdir) / FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: not a lejepa_jax workdir, or one made '
                            'before configs were stored; pass --config=configs/NAME.py with '
                            'the overrides the run used')
  return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
