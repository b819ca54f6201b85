"""docs/api.md's 'LeJEPA in your own training loop' example runs, and its loss is ours."""
import contextlib
import io
import os
import re

import jax
import numpy as np

from lejepa_jax import losses

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                      'api.md')
MARKER = '<!-- tested by tests/test_readme_example.py -->'


def _example() -> str:
  text = open(README).read()
  assert MARKER in text, 'docs/api.md lost its tested example'
  block = re.search(r'```python\n(.*?)```', text[text.index(MARKER):], re.S)
  return block.group(1)


def test_readme_own_loop_example_trains_and_matches_the_library_loss():
  namespace = {}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(_example(), 'README example', 'exec'), namespace)  # pylint: disable=exec-used
  printed = [line for line in out.getvalue().splitlines() if line.startswith('step ')]
  sig = [float(re.search(r'sigreg ([\d.]+)', line).group(1)) for line in printed]
  assert len(sig) >= 3 and sig[-1] < sig[0] / 10          # the embeddings become Gaussian
  # The example's objective is the library's (the same convention, views and slices).
  rng = np.random.default_rng(0)
  proj = rng.normal(size=(6, 64, 16)).astype(np.float32) * rng.uniform(0.5, 2, size=16)
  key = jax.random.key(3)
  mine, (inv, sig) = namespace['lejepa_loss'](proj, key, num_global=2, lamb=0.05, num_slices=64)
  ref, terms = losses.lejepa_loss(proj[:2], proj, key, lamb=0.05, num_slices=64)
  np.testing.assert_allclose([mine, inv, sig], [ref, terms['inv'], terms['sigreg']], rtol=1e-6)
