"""Weight decay by parameter name on the real ViT/LeJEPA parameter trees."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist
from lejepa_jax import models, optim


def _params(scan: bool):
  c = fmnist.get_config('runlocal')
  c.model.scan = scan
  c.model.depth = 3
  c.model.num_registers = 2
  model = models.build_model(c)
  d = c.data
  g = jnp.zeros((1, 2, d.global_size, d.global_size, 1))
  l = jnp.zeros((1, 2, d.local_size, d.local_size, 1))
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), g, l)
  return nn.unbox(shapes['params'])


def _flat(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('scan', [True, False])
def test_decay_mask_decays_exactly_the_kernels(scan):
  params = _params(scan)
  mask = _flat(optim.decay_mask(params))
  decayed = {k for k, v in mask.items() if v}
  kept = set(mask) - decayed
  # Every kernel is decayed (dense, attention, patch embedding, projector, probe) ...
  assert decayed == {k for k in mask if k.endswith("kernel']")}
  assert any('qkv_kernel' in k for k in decayed) and any('patch_embed' in k for k in decayed)
  assert any('projector' in k for k in decayed)
  # ... and nothing else, although under scan the LayerNorm scales are 2-D and the
  # position embedding, CLS token and registers are 3-D everywhere.
  for name in ("['pos_embedding']", "['cls']", "['registers']", "['scale']", "['bias']",
               "['qkv_bias']", "['out_bias']"):
    assert any(k.endswith(name) for k in kept), name
    assert not any(k.endswith(name) for k in decayed), name
  shapes = _flat(params)
  if scan:   # the case the old ndim >= 2 rule got wrong
    assert any(k.endswith("['scale']") and shapes[k].ndim == 2 for k in kept)


def test_adamw_applies_the_mask_to_a_scanned_tree():
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), _params(scan=True))
  tx = optim.adamw(1.0, 10, 0, weight_decay=0.5)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates = _flat(tx.update(zero, tx.init(params), params)[0])
  # lr(0) = 1 with no warmup and zero gradients: only decoupled decay moves parameters.
  for k, u in updates.items():
    expected = -0.5 if k.endswith("kernel']") else 0.0
    np.testing.assert_allclose(np.asarray(u), expected, err_msg=k)
