"""`python -m lejepa_jax.selftest`: the command (lejepa_jax/selftest/command.py; usage in
__init__.py)."""
from absl import app

from lejepa_jax import cli
from lejepa_jax.selftest import command

if __name__ == '__main__':
  command.define_flags()
  app.run(command.main, flags_parser=cli.parse_flags)
