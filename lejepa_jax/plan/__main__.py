"""`python -m lejepa_jax.plan`: the command (lejepa_jax/plan/report.py; usage in __init__.py)."""
from absl import app

from lejepa_jax.plan import report

if __name__ == '__main__':
  report.define_flags()
  app.run(report.main)
