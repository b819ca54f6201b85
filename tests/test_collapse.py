"""The embedding diagnostics flag a collapsing run (lamb = 0) early, and not the default one."""
import json
import logging
import os

import jax
import pytest

from configs import fmnist
from lejepa_jax import train

pytestmark = pytest.mark.skipif(
    not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'),
    reason='needs the dataset-fashion-mnist Debian package')

STEPS = 50


def _run(tmp_path, lamb, caplog):
  """The CPU default (its model, batch, views and schedule) for its first STEPS steps."""
  c = fmnist.get_config()
  c.lamb = lamb
  c.total_steps = STEPS
  c.optim.warmup_steps = 150          # the default's warmup: these are its first 50 steps
  c.diagnostics.every = 25
  c.diagnostics.plots = False
  c.evals = {}                        # no evaluation: only the diagnostics matter here
  c.checkpoint_every = STEPS
  workdir = str(tmp_path / f'lamb{lamb}')
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, workdir, devices=jax.devices()[:2])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    diag = [json.loads(l) for l in f if '"diag/emb_rankme"' in l]
  warnings = [r.getMessage() for r in caplog.records if 'representation collapse' in r.getMessage()]
  caplog.clear()
  return diag, warnings


def test_collapse_is_flagged_without_sigreg_and_not_with_the_default_lambda(tmp_path, caplog):
  diag, warnings = _run(tmp_path, 0.0, caplog)
  assert [d["step"] for d in diag] == [1, 25, 50]
  assert warnings, 'lamb=0 collapsed without a warning'
  assert any(w.startswith('step 50:') for w in warnings)     # within the first 50 steps
  last = diag[-1]
  # what the warning is about: the backbone's effective rank and the projector's variance
  assert last['diag/emb_rankme'] < 0.1 * 384 and last['diag/proj_var_mean'] < 0.1

  diag, warnings = _run(tmp_path, 0.1, caplog)
  assert warnings == []
  assert all(d['diag/emb_rankme'] > 0.15 * 384 and d['diag/proj_var_mean'] > 0.3 for d in diag)
