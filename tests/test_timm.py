"""Our ViT is timm's VisionTransformer, the library the authors build their encoders with.

Random parameters (every array perturbed, biases, CLS and position embeddings included) are
converted with `timm_format` and loaded into `timm.create_model(**timm_arguments(...))` with
strict key matching; the final-LayerNorm CLS token, the head's output and the CLS tokens of
the last two blocks (our probe features) must agree within rel 1e-4 in float32. The export
CLI's --format=timm is tested end to end in tests/test_export.py.

torch and timm come from the `reference` extra (README command 2 installs it). CI fails
rather than skips when they are missing.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lejepa_jax import encoder as encoder_lib
from lejepa_jax import timm_format
from lejepa_jax.models import vit


def import_timm():
  """(torch, timm), or a skip outside CI when the reference extra is not installed."""
  try:
    import timm
    import torch
  except ImportError as e:
    if os.environ.get('CI'):
      raise
    pytest.skip(f'needs the reference extra (torch, timm): {e}')
  return torch, timm


def timm_features(model, images_nhwc: np.ndarray) -> dict:
  """timm's outputs named as ours: 'cls' (final-norm CLS), 'head' (model(x)) and
  'probe_features' (the last two blocks' CLS tokens, read with forward hooks)."""
  torch, _ = import_timm()
  seen = []
  hooks = [block.register_forward_hook(lambda mod, inp, out: seen.append(out[:, 0]))
           for block in model.blocks[-2:]]
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    tokens = model.forward_features(x)
    head = model.forward_head(tokens)
  for h in hooks:
    h.remove()
  return {'cls': tokens[:, 0].numpy(), 'head': head.numpy(),
          'probe_features': torch.cat(seen, dim=-1).numpy()}


def _perturbed(params, key):
  """Every parameter plus N(0, 0.02), the scale of the initialisation: zero-initialised biases,
  CLS and heads take part too, and activations stay as in a trained network."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


CASES = {
    # MINIMAL.md's backbone: vit_small_patch8_224 at 128 px (here 32 px), exact GELU.
    'S8_exact': dict(variant='S', patch=8, size=32, channels=3, gelu='exact', registers=0,
                     head=0, scan=True, sizes={}),
    # Registers, a 512-style head (here 48), the tanh GELU, an unrolled encoder.
    'B16_registers_head': dict(variant='B', patch=16, size=48, channels=3, gelu='tanh',
                               registers=4, head=48, scan=False, sizes={}),
    # No registered timm name: explicit sizes, another patch size, one channel.
    'custom_gray': dict(variant='mu', patch=7, size=28, channels=1, gelu='exact', registers=2,
                        head=0, scan=True, sizes=dict(width=64, depth=3, mlp_dim=160,
                                                      num_heads=4)),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_timm_loads_our_vit_strictly_and_computes_the_same_features(name):
  torch, timm = import_timm()
  case = CASES[name]
  cfg = vit.vit_config(case['variant'], patch_size=case['patch'], image_size=case['size'],
                       num_registers=case['registers'], gelu=case['gelu'],
                       head_dim=case['head'], scan=case['scan'], cls_only_last=False,
                       **case['sizes'])
  module = vit.ViT(cfg)
  images = np.asarray(jax.random.normal(jax.random.key(1),
                                        (3, case['size'], case['size'], case['channels'])))
  params = module.init(jax.random.key(0), jnp.asarray(images))['params']
  params = _perturbed(vit.unboxed(params), jax.random.key(2))
  ours = jax.jit(module.apply)({'params': params}, jnp.asarray(images))

  model = {'width': cfg.width, 'depth': cfg.depth, 'mlp_dim': cfg.mlp_dim,
           'num_heads': cfg.num_heads, 'patch_size': cfg.patch_size,
           'num_registers': cfg.num_registers, 'gelu': cfg.gelu, 'head_dim': cfg.head_dim}
  args = timm_format.timm_arguments(model, input_size=case['size'], channels=case['channels'])
  if name == 'S8_exact':   # the authors' name, with nothing but the image size changed
    assert args == {'model_name': 'vit_small_patch8_224', 'pretrained': False,
                    'num_classes': 0, 'img_size': 32}
  state = timm_format.timm_state_dict(encoder_lib.flat_params(params, cfg.depth), model)
  net = timm.create_model(**args).eval()
  result = net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                              strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  theirs = timm_features(net, images)

  assert _rel(np.asarray(ours['cls']), theirs['cls']) < 1e-4
  assert _rel(np.asarray(ours['probe_features']), theirs['probe_features']) < 1e-4
  if case['head']:
    assert theirs['head'].shape == (3, case['head'])
    assert _rel(np.asarray(ours['head']), theirs['head']) < 1e-4
  else:
    np.testing.assert_array_equal(theirs['head'], theirs['cls'])   # timm's pooled CLS


def test_the_gelu_choice_matters_to_timm():
  """A tanh-GELU encoder loaded as timm's default (exact) GELU differs: the argument is needed."""
  torch, timm = import_timm()
  cfg = vit.vit_config('S', patch_size=8, image_size=16, gelu='tanh', depth=2)
  module = vit.ViT(cfg)
  images = np.asarray(jax.random.normal(jax.random.key(1), (2, 16, 16, 3)))
  params = _perturbed(vit.unboxed(module.init(jax.random.key(0), images)['params']),
                      jax.random.key(3))
  ours = np.asarray(module.apply({'params': params}, images)['cls'])
  model = {'width': cfg.width, 'depth': 2, 'mlp_dim': cfg.mlp_dim, 'num_heads': cfg.num_heads,
           'patch_size': 8, 'num_registers': 0, 'gelu': 'tanh', 'head_dim': 0}
  args = timm_format.timm_arguments(model, input_size=16, channels=3)
  assert args['act_layer'] == 'gelu_tanh'
  state = {k: torch.from_numpy(v) for k, v in timm_format.timm_state_dict(
      encoder_lib.flat_params(params, 2), model).items()}
  exact = timm.create_model(**{k: v for k, v in args.items() if k != 'act_layer'}).eval()
  exact.load_state_dict(state, strict=True)
  assert _rel(ours, timm_features(exact, images)['cls']) > 1e-4
