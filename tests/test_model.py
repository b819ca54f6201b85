"""ViT shapes for global and local crops, the variant table, and the projector."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lejepa_jax import models
from lejepa_jax.models import vit


def _small(**kw):
  return vit.vit_config('mu', patch_size=4, image_size=32, width=32, depth=3, mlp_dim=64,
                        num_heads=2, **kw)


@pytest.mark.parametrize('scan', [True, False])
@pytest.mark.parametrize('registers', [0, 2])
def test_vit_shapes_for_global_and_local_crops(scan, registers):
  model = vit.ViT(_small(scan=scan, num_registers=registers))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
  apply = jax.jit(model.apply)     # compiled: 3x faster than op by op on 8 CPU devices
  for size in (32, 16, 8):
    out = apply(params, jnp.ones((5, size, size, 3)))
    chex.assert_shape(out['cls'], (5, 32))
    chex.assert_shape(out['probe_features'], (5, 64))
    chex.assert_tree_all_finite(out)


def test_scan_and_loop_compute_the_same_function():
  images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  scanned = vit.ViT(_small(scan=True))
  params = jax.jit(scanned.init)(jax.random.key(0), images)['params']
  # Unstack the scanned block parameters into block_i for the loop version.
  blocks = params['blocks']
  loop_params = {k: v for k, v in params.items() if k != 'blocks'}
  for i in range(3):
    loop_params[f'block_{i}'] = jax.tree.map(lambda p: p[i], blocks)
  out_scan = jax.jit(scanned.apply)({'params': params}, images)
  out_loop = jax.jit(vit.ViT(_small(scan=False)).apply)({'params': loop_params}, images)
  chex.assert_trees_all_close(out_scan, out_loop, rtol=1e-5, atol=1e-5)


def test_probe_features_are_the_last_two_block_cls_tokens():
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  model = vit.ViT(_small(scan=False))
  params = model.init(jax.random.key(0), images)
  out, inter = model.apply(params, images, capture_intermediates=True)
  last = inter['intermediates']['block_2']['__call__'][0][0][:, 0]
  second_last = inter['intermediates']['block_1']['__call__'][0][0][:, 0]
  np.testing.assert_allclose(out['probe_features'], np.concatenate([second_last, last], -1),
                             rtol=1e-6)


def test_position_embeddings_resize_for_local_grids():
  # Private helper: the resize alone against a hand-computed bilinear ramp (no public seam).
  pos = jnp.arange(16.0).reshape(1, 16, 1)
  same = vit._resize_grid(pos, 4, 4)
  np.testing.assert_array_equal(same, pos)
  small = vit._resize_grid(pos, 4, 2)
  chex.assert_shape(small, (1, 4, 1))
  # bilinear 4 -> 2 with half-pixel centres averages 2x2 blocks of a linear ramp
  np.testing.assert_allclose(small[0, :, 0], [2.5, 4.5, 10.5, 12.5])


def _closed_form_count(width, depth, mlp, patch, size, channels=3):
  block = 4 * width * width + 4 * width + 2 * width * mlp + mlp + width + 4 * width
  embed = patch * patch * channels * width + width + (size // patch) ** 2 * width + width
  return embed + depth * block + 2 * width


@pytest.mark.parametrize('variant,published_m', [('Ti', 5.5), ('S', 21.7), ('B', 85.8),
                                                 ('L', 303.3), ('H', 630.8), ('g', 1843)])
def test_variant_parameter_counts(variant, published_m):
  patch = 14 if variant in ('H', 'g') else 16
  cfg = vit.vit_config(variant, patch_size=patch, image_size=224)
  shapes = jax.eval_shape(vit.ViT(cfg).init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert count == _closed_form_count(cfg.width, cfg.depth, cfg.mlp_dim, patch, 224)
  # published backbone sizes (no classifier head); 'g' is the paper's 1.8B model
  assert abs(count / 1e6 - published_m) / published_m < 0.01, (variant, count)


def test_projector_matches_numpy_with_batch_statistics():
  import flax.linen as nn
  proj = models.Projector((16,), 4)
  x = np.asarray(jax.random.normal(jax.random.key(0), (64, 8)) * 5 + 3, np.float64)
  variables = nn.unbox(proj.init(jax.random.key(1), jnp.asarray(x, jnp.float32), train=False))
  y, _ = proj.apply(variables, jnp.asarray(x, jnp.float32), train=True, mutable=['batch_stats'])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  h = x @ p['dense_0']['kernel'] + p['dense_0']['bias']
  h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p['bn_0']['scale'] + p['bn_0']['bias']
  h = np.asarray(jax.nn.gelu(jnp.asarray(h)), np.float64)
  ref = h @ p['out']['kernel'] + p['out']['bias']
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_bad_config_raises():
  with pytest.raises(ValueError, match='variant'):
    vit.vit_config('XXL', patch_size=16, image_size=224)
  with pytest.raises(ValueError, match='multiple'):
    vit.vit_config('S', patch_size=16, image_size=100)


def _attention_float64(x, p, num_heads):
  """Multi-head self-attention written out in float64 numpy (the reference)."""
  x = np.asarray(x, np.float64)
  qkv = np.einsum('bsd,dthk->tbshk', x, np.asarray(p['qkv_kernel'], np.float64))
  qkv = qkv + np.asarray(p['qkv_bias'], np.float64)[:, None, None]
  q, k, v = qkv
  logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = np.einsum('bhqs,bshk->bqhk', weights, v)
  return np.einsum('bqhk,hkd->bqd', y, np.asarray(p['out_kernel'], np.float64)) + \
      np.asarray(p['out_bias'], np.float64)


def test_attention_equals_the_written_out_formula_in_value_and_gradient():
  cfg = _small()
  layer = vit.Attention(cfg)
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  params = nn.unbox(layer.init(jax.random.key(4), x)['params'])
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(5), p.shape), params)
  np.testing.assert_allclose(layer.apply({'params': params}, x),
                             _attention_float64(x, params, cfg.num_heads), rtol=2e-5, atol=2e-5)
  # Gradient of a random projection of the output, by central differences in float64.
  w = np.asarray(jax.random.normal(jax.random.key(6), (2, 9, 32)), np.float64)
  grad = jax.grad(lambda x: jnp.sum(layer.apply({'params': params}, x) * w))(x)
  rng = np.random.default_rng(0)
  for _ in range(6):
    idx = tuple(rng.integers(0, s) for s in x.shape)
    e = np.zeros(x.shape)
    e[idx] = 1e-4
    plus = np.sum(_attention_float64(np.asarray(x, np.float64) + e, params, 2) * w)
    minus = np.sum(_attention_float64(np.asarray(x, np.float64) - e, params, 2) * w)
    np.testing.assert_allclose(grad[idx], (plus - minus) / 2e-4, rtol=1e-3, atol=1e-4)


def test_attention_in_bfloat16_stays_close_to_float32():
  x = jax.random.normal(jax.random.key(7), (2, 9, 32))
  layer32, layer16 = vit.Attention(_small()), vit.Attention(_small(dtype=jnp.bfloat16))
  params = nn.unbox(layer32.init(jax.random.key(8), x)['params'])
  out32 = layer32.apply({'params': params}, x)
  out16 = layer16.apply({'params': params}, x.astype(jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.05)
  with pytest.raises(ValueError, match='model.attention'):
    _small(attention='flash')


@pytest.mark.parametrize('scan', [True, False])
def test_packed_views_equal_separate_calls(scan):
  """All views of an image in one packed sequence give each view's own encoding."""
  model = vit.ViT(_small(scan=scan, num_registers=1))
  g = jax.random.normal(jax.random.key(9), (3, 2, 32, 32, 3))
  l = jax.random.normal(jax.random.key(10), (3, 4, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.key(0), g[:, 0])
  apply = jax.jit(model.apply)
  packed = apply(params, [g, l])
  for start, views in ((0, g), (2, l)):
    alone = apply(params, views.reshape((-1,) + views.shape[2:]))
    for key in ('cls', 'probe_features'):
      np.testing.assert_allclose(
          packed[key][:, start:start + views.shape[1]].reshape(alone[key].shape), alone[key],
          rtol=1e-5, atol=1e-5)


def _grad_flops_and_value(cfg, images):
  model = vit.ViT(cfg)
  params = model.init(jax.random.key(0), images)['params']
  loss = lambda p: jnp.sum(model.apply({'params': p}, images)['cls'] ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']), jax.jit(jax.grad(loss))(params)


def test_remat_policies_that_save_dots_recompute_no_matmul():
  # A policy saving dots must not re-run the MLP's matmuls in the backward pass: the gradient
  # then costs what it costs without remat (plus a little element-wise recomputation), and
  # 'full' recomputes the forward pass. Unrolled blocks: XLA counts a scanned body once.
  images = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
  flops, grads = {}, {}
  for remat in ('none', 'dots', 'dots_no_batch', 'full'):
    flops[remat], grads[remat] = _grad_flops_and_value(
        _small(scan=False, cls_only_last=False, remat=remat), images)
  assert flops['dots'] < 1.05 * flops['none']
  # dots_no_batch re-runs only the attention's batched matmuls (scores and weighted values)
  assert flops['dots'] < flops['dots_no_batch'] < flops['full']
  assert flops['full'] > 1.2 * flops['none']
  # the custom backward of the no-remat MLP and plain autodiff: the same gradients
  for remat in ('dots', 'dots_no_batch', 'full'):
    chex.assert_trees_all_close(grads[remat], grads['none'], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- stochastic depth

def test_drop_path_schedule_is_timms_linear_one():
  np.testing.assert_allclose(vit.drop_path_rates(0.1, 5), [0.0, 0.025, 0.05, 0.075, 0.1],
                             rtol=1e-6)   # torch.linspace(0, 0.1, 5), as timm's VisionTransformer


def test_keep_scale_drops_whole_views_at_the_rate_and_scales_the_rest():
  # Private helper: its statistics need thousands of rows no forward pass would give cheaply.
  rate, batch, views = 0.3, 4000, ((2, 5), (3, 2))     # 2 views of 5 tokens, 3 of 2
  scale = np.asarray(vit._keep_scale(jax.random.key(0), rate, batch, views, True, jnp.float32))
  assert scale.shape == (batch, 2 * 5 + 3 * 2, 1)
  per_view = [scale[:, 0:5], scale[:, 5:10]] + [scale[:, 10 + 2 * i:12 + 2 * i] for i in range(3)]
  for v in per_view:                      # every token of a view shares its view's multiplier
    np.testing.assert_array_equal(v, np.repeat(v[:, :1], v.shape[1], axis=1))
  values = np.concatenate([v[:, 0, 0] for v in per_view])
  assert set(np.unique(values)) <= {0.0, np.float32(1 / (1 - rate))}
  kept, n = np.mean(values > 0), values.size
  assert abs(kept - (1 - rate)) < 3 * np.sqrt(rate * (1 - rate) / n), kept


def test_a_block_skips_both_branches_of_a_view_with_probability_rate_squared():
  cfg = _small(drop_path_rate=0.5)
  views = ((2, 5), (1, 3))
  x = jax.random.normal(jax.random.key(3), (64, 13, 32))
  block = vit.Block(cfg, views)
  params = jax.jit(block.init)(jax.random.key(0), x)
  apply = jax.jit(block.apply)
  rate, skipped, n = 0.4, 0, 0
  for seed in range(40):
    y, _ = apply(params, x, (jnp.float32(rate), jax.random.key(seed)))
    same = np.all(np.asarray(y) == np.asarray(x), axis=-1)            # (B, tokens)
    per_view = [same[:, 0:5], same[:, 5:10], same[:, 10:13]]
    skipped += sum(int(v.all(axis=1).sum()) for v in per_view)
    n += 3 * x.shape[0]
    for v in per_view:                     # a view is skipped as a whole or not at all
      assert np.all(v.all(axis=1) | ~v.any(axis=1))
  p = rate ** 2                            # attention and MLP both dropped
  assert abs(skipped / n - p) < 3 * np.sqrt(p * (1 - p) / n), skipped / n


def test_drop_path_is_off_in_evaluation_and_at_rate_0_changes_nothing():
  images = [jax.random.normal(jax.random.key(1), (3, 2, 32, 32, 3)),
            jax.random.normal(jax.random.key(2), (3, 2, 16, 16, 3))]
  def apply(rate, train, rngs=None):
    model = vit.ViT(_small(drop_path_rate=rate))
    return jax.jit(functools.partial(model.apply, train=train))(params, images, rngs=rngs)

  params = jax.jit(vit.ViT(_small()).init)(jax.random.key(0), images)
  reference = apply(0.0, False)
  rngs = {'drop_path': jax.random.key(5)}
  same = [apply(0.0, True, rngs), apply(0.3, False), apply(0.3, False, rngs)]  # rate 0, evaluation
  for out in same:
    chex.assert_trees_all_equal(out, reference)
  dropped = apply(0.3, True, rngs)
  other = apply(0.3, True, {'drop_path': jax.random.key(6)})
  assert not np.allclose(dropped['cls'], reference['cls'])
  assert not np.allclose(dropped['cls'], other['cls'])


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scan_and_loop_draw_the_same_drop_path_masks(remat):
  images = [jax.random.normal(jax.random.key(1), (3, 2, 32, 32, 3)),
            jax.random.normal(jax.random.key(2), (3, 2, 16, 16, 3))]
  scanned = vit.ViT(_small(scan=True, drop_path_rate=0.5, remat=remat))
  params = jax.jit(scanned.init)(jax.random.key(0), images)['params']
  loop_params = {k: v for k, v in params.items() if k != 'blocks'}
  for i in range(3):
    loop_params[f'block_{i}'] = jax.tree.map(lambda p: p[i], params['blocks'])
  rngs = {'drop_path': jax.random.key(7)}
  train = lambda model: jax.jit(functools.partial(model.apply, train=True))
  out_scan = train(scanned)({'params': params}, images, rngs=rngs)
  # The unrolled encoder's last block computes CLS tokens only (cls_only_last): same masks.
  out_loop = train(vit.ViT(_small(scan=False, drop_path_rate=0.5, remat=remat)))(
      {'params': loop_params}, images, rngs=rngs)
  chex.assert_trees_all_close(out_scan, out_loop, rtol=1e-5, atol=1e-5)
  plain = jax.jit(scanned.apply)({'params': params}, images)
  assert not np.allclose(out_scan['cls'], plain['cls'])      # something was dropped


def test_train_step_with_drop_path_is_seeded_and_drops():
  """The train step passes the 'drop_path' stream: the same seed gives the same loss, and the
  loss differs from the same step without stochastic depth."""
  from configs import fmnist
  from lejepa_jax import sharding, steps
  rng = np.random.default_rng(0)
  losses = {}
  for rate in (0.5, 0.0):
    c = fmnist.get_config('runlocal')
    c.model.drop_path_rate = rate
    d = c.data
    mesh = sharding.make_mesh({'data': -1})
    programs = steps.build(c, mesh, 10)
    shapes = {'global': (32, d.num_global_views, d.global_size, d.global_size, 1),
              'local': (32, d.num_local_views, d.local_size, d.local_size, 1)}
    if not losses:
      host = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
      host['label'] = rng.integers(0, 10, 32).astype(np.int32)
    with sharding.activate(mesh):
      batch = sharding.to_global_batch(host, mesh)
      losses[rate] = [float(programs.train_step(programs.init(np.int32(0)), batch)[1]['train/loss'])
                      for _ in range(2 if rate else 1)]
  assert losses[0.5][0] == losses[0.5][1] and np.isfinite(losses[0.5][0])
  assert losses[0.5][0] != losses[0.0][0]
