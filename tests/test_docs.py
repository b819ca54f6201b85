"""The README and docs/ stay true to the code: links resolve, named files exist, and every
`python -m lejepa_jax.X` command they show passes only flags (and config keys) that exist."""
import functools
import os
import re
import subprocess
import sys

import pytest

from lejepa_jax import config_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md', 'configs/RECIPES.md'] + sorted(
    os.path.join('docs', f) for f in os.listdir(os.path.join(ROOT, 'docs')) if f.endswith('.md'))


def _text(doc):
  return open(os.path.join(ROOT, doc)).read()


def _anchors(doc) -> set:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
  out = set()
  for line in _text(doc).splitlines():
    if line.startswith('#'):
      title = line.lstrip('#').strip().lower()
      out.add(re.sub(r'\s', '-', re.sub(r'[^\w\- ]', '', title)))
  return out


@pytest.mark.parametrize('doc', DOCS)
def test_links_and_named_files_resolve(doc):
  text = _text(doc)
  base = os.path.dirname(os.path.join(ROOT, doc))
  for target in re.findall(r'\]\(([^)\s]+)\)', text):
    if target.startswith(('http://', 'https://')):
      continue
    path, _, anchor = target.partition('#')
    file = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, doc)
    assert os.path.exists(file), f'{doc}: link {target} -> {file} does not exist'
    if anchor:
      assert anchor in _anchors(os.path.relpath(file, ROOT)), f'{doc}: no heading #{anchor}'
  # Files named in backticks: configs, tests, benchmarks, launch scripts, package modules.
  for name in re.findall(r'`((?:configs|tests|benchmarks|launch|lejepa_jax)/[\w/.]+\.(?:py|sh|md))',
                         text):
    if re.search(r'(^|/)[A-Z_]+\.', name):   # a placeholder such as configs/NAME.py
      continue
    assert os.path.exists(os.path.join(ROOT, name)), f'{doc}: {name} does not exist'


@functools.lru_cache(maxsize=None)
def _flags_of(module: str) -> frozenset:
  """The absl flags `python -m MODULE` accepts (imported in a fresh process: the commands
  define flags of the same name; plan defines its own when run)."""
  code = ('import importlib, sys; from absl import flags; m = importlib.import_module(sys.argv[1]); '
          'getattr(m, "define_flags", lambda: None)(); print("\\n".join(flags.FLAGS))')
  out = subprocess.run([sys.executable, '-c', code, module], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr[-2000:]
  return frozenset(out.stdout.split())


def _commands():
  for doc in DOCS:
    for line in _text(doc).splitlines():
      for match in re.finditer(r'python -m (lejepa_jax\.\w+)([^`|\n]*)', line):
        yield doc, match.group(1), match.group(2)


def test_every_documented_command_passes_known_flags_and_config_keys():
  commands = list(_commands())
  assert len({m for _, m, _ in commands}) >= 5, commands   # main, plan, evaluate, export, select
  for doc, module, rest in commands:
    assert os.path.exists(os.path.join(ROOT, *module.split('.')) + '.py') or os.path.isdir(
        os.path.join(ROOT, *module.split('.'))), f'{doc}: no module {module}'
    for flag in re.findall(r'(?<![\w-])--([\w.]+)', rest):
      if flag.startswith('config.'):
        key = flag[len('config.'):]
        known = key in config_schema.KEYS or any(
            key.startswith(free + '.') for free in config_schema.FREE_FORM)
        assert known, f'{doc}: `python -m {module} ... --{flag}`: no config key {key}'
      else:
        assert flag in _flags_of(module), f'{doc}: `python -m {module}` has no flag --{flag}'
