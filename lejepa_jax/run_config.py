"""WORKDIR/config.json: the names `train`, `evaluate`, `export` and `select` used first
(lejepa_jax/workdir.py holds the run directory's files)."""
from lejepa_jax.workdir import CONFIG_FILE as FILE
from lejepa_jax.workdir import load_config as load
from lejepa_jax.workdir import save_config as save

__all__ = ['FILE', 'load', 'save']
