"""ResNet encoders: torchvision's sizes, timm's function, global-batch BatchNorm on any mesh,
the matmul convolution, and the ResNet configs' checks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_train

from configs import fmnist_resnet
from lejepa_jax import config as config_lib
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import steps
from lejepa_jax import timm_format
from lejepa_jax.models import conv, resnet, vit

# torchvision's published parameter counts (torchvision.models docs: "num_params") less the
# 1000-class classifier (features x 1000 + 1000).
TORCHVISION_PARAMS = {'resnet18': 11_689_512 - 513_000, 'resnet34': 21_797_672 - 513_000,
                      'resnet50': 25_557_032 - 2_049_000}


def _param_count(cfg, size=64):
  shapes = jax.eval_shape(resnet.ResNet(cfg).init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(vit.unboxed(shapes['params'])))


@pytest.mark.parametrize('variant', sorted(TORCHVISION_PARAMS))
def test_parameter_counts_are_torchvisions_without_the_classifier(variant):
  cfg = resnet.resnet_config(variant)
  assert _param_count(cfg) == TORCHVISION_PARAMS[variant]
  assert cfg.features == (2048 if variant == 'resnet50' else 512)


def test_forward_flops_are_the_published_multiply_adds():
  # torchvision's docs: GFLOPS (multiply-adds) 1.81 / 3.66 / 4.09 at 224 px
  for variant, gmacs in (('resnet18', 1.81), ('resnet34', 3.66), ('resnet50', 4.09)):
    macs = resnet.forward_flops(resnet.resnet_config(variant), 224, 3) / 2
    assert abs(macs / 1e9 - gmacs) < 0.01, (variant, macs)


def _timm_pair(variant, stem_size=64, seed=0):
  """A timm ResNet with random weights and running statistics, and ours with its weights."""
  timm = pytest.importorskip('timm')
  torch = pytest.importorskip('torch')
  torch.manual_seed(seed)
  net = timm.create_model(variant, pretrained=False, num_classes=0)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):   # non-trivial statistics and affine parameters
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
  flat = timm_format.resnet_from_timm_state_dict(
      {k: v.numpy() for k, v in net.state_dict().items()})
  variables = {}
  for key, value in flat.items():
    collection, _, *path = key.split('/')
    node = variables.setdefault(collection, {})
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(value)
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(4, stem_size, stem_size, 3)).astype(np.float32)
  return net, variables, images, torch


@pytest.mark.parametrize('variant', ['resnet18', 'resnet50'])
def test_features_equal_timms_resnet_with_the_same_weights(variant):
  """Evaluation mode (running statistics) and training mode (this batch's statistics, and
  the running averages they update with PyTorch's momentum 0.1)."""
  net, variables, images, torch = _timm_pair(variant)
  model = resnet.ResNet(resnet.resnet_config(variant))
  ours_shapes = vit.unboxed(jax.eval_shape(model.init, jax.random.key(0), images))
  assert jax.tree.map(lambda x: x.shape, ours_shapes) == jax.tree.map(lambda x: x.shape, variables)
  x_torch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  net.eval()
  with torch.no_grad():
    want = net(x_torch).numpy()
  got = np.asarray(model.apply(variables, images)['cls'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

  net.train()
  with torch.no_grad():
    want = net(x_torch).numpy()
  out, mutated = model.apply(variables, images, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(np.asarray(out['cls']), want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())
  stem = mutated['batch_stats']['bn1']
  np.testing.assert_allclose(np.asarray(stem['mean']), net.bn1.running_mean.numpy(),
                             rtol=1e-4, atol=1e-5)
  # PyTorch updates the running variance with the unbiased batch variance, flax with the
  # biased one: equal up to n / (n - 1) (n = 4 x 32 x 32 stem pixels here).
  n = images.shape[0] * (images.shape[1] // 2) ** 2
  torch_var = net.bn1.running_var.numpy()
  old = np.asarray(variables['batch_stats']['bn1']['var'])
  batch_var_torch = (torch_var - 0.9 * old) / 0.1
  np.testing.assert_allclose(np.asarray(stem['var']), 0.9 * old + 0.1 * batch_var_torch * (n - 1) / n,
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('stride,kernel', [(1, 3), (2, 3), (2, 1), (2, 7), (1, 1)])
def test_matmul_convolution_equals_xlas_in_value_and_gradients(stride, kernel):
  rng = np.random.default_rng(stride * 10 + kernel)
  x = jnp.asarray(rng.normal(size=(3, 13, 13, 5)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 7)).astype(np.float32))
  pad = ((kernel // 2,) * 2,) * 2
  xla = lambda x, k: jax.lax.conv_general_dilated(x, k, (stride,) * 2, pad,
                                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  taps = lambda x, k: conv.conv_general_dilated_matmul(x, k, (stride,) * 2, pad)
  target = jnp.asarray(rng.normal(size=xla(x, k).shape).astype(np.float32))
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)) * target)
  np.testing.assert_allclose(np.asarray(taps(x, k)), np.asarray(xla(x, k)), rtol=1e-5, atol=1e-4)
  want = jax.grad(loss(xla), argnums=(0, 1))(x, k)
  got = jax.grad(loss(taps), argnums=(0, 1))(x, k)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                               atol=1e-5 * float(np.abs(w).max()))


def _steps(c, mesh, batch, n):
  programs = steps.build(c, mesh, 100)
  tx = optax.sgd(0.1)   # plain SGD: parameters compare gradients (see tests/test_train.py)
  with sharding_lib.activate(mesh):
    state = programs.init(np.int32(c.seed))
    state = state.replace(opt_state=tx.init(state.params))
    step = jax.jit(functools.partial(steps.train_step, model=programs.model, tx=tx, config=c))
    global_batch = sharding_lib.to_global_batch(batch, mesh)
    for _ in range(n):
      state, metrics = step(state, global_batch)
  return jax.device_get(state), jax.device_get(metrics)


def test_batchnorm_statistics_are_the_global_batchs_on_1_and_8_devices():
  """BatchNorm normalises with the statistics of the whole global batch however the mesh
  splits it: running statistics, losses and parameters after two steps equal one device's."""
  c = fmnist_resnet.get_config('runlocal')
  c.model.conv = 'xla'    # compiles faster than 'matmul', the same function (test above)
  c.batch_size = 16
  c.data.num_local_views = 2
  batch = test_train._batch(c, seed=3)
  one = sharding_lib.make_mesh({'data': 1}, devices=jax.devices()[:1])
  eight = sharding_lib.make_mesh({'data': 4, 'fsdp': 2})
  s1, m1 = _steps(c, one, batch, 2)
  s8, m8 = _steps(c, eight, batch, 2)
  stats1, stats8 = s1.batch_stats['encoder'], s8.batch_stats['encoder']
  moved = np.abs(np.asarray(stats1['bn1']['var']) - 1.0).max()    # from the initial 1
  assert moved > 1e-2, 'the running statistics did not move'
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(stats1), jax.tree.leaves(stats8)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  for k in ('train/loss', 'train/inv', 'train/sigreg'):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_resnet_params_are_sharded_on_output_channels_under_fsdp():
  c = fmnist_resnet.get_config('runlocal')
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 8})
  state = steps.build(c, mesh, 10).abstract_state
  enc = state.params['encoder']
  assert tuple(enc['layer4_1']['conv2']['kernel'].sharding.spec) == (None, None, None, 'fsdp')
  assert tuple(enc['layer4_1']['bn2']['scale'].sharding.spec) == ('fsdp',)


def test_vit_keys_in_a_resnet_config_are_refused_naming_them():
  c = fmnist_resnet.get_config('runlocal')
  c.model.depth = 6
  c.model.patch_size = 7
  c.model.stem = 'tiny'
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert 'model.depth=6 applies to ViTs only' in msg and 'model.patch_size=7' in msg
  assert "model.stem='tiny'" in msg


def test_init_from_a_timm_resnet_state_dict_gives_timms_features(tmp_path):
  """A timm ResNet-18 (1 input channel, random weights and running statistics, its
  1000-class classifier included) saved with safetensors: the run's encoder built from it
  gives timm's pooled features in evaluation mode (rel 1e-4); a ResNet-34 file is refused
  with its mismatches listed."""
  timm = pytest.importorskip('timm')
  torch = pytest.importorskip('torch')
  import safetensors.torch
  from lejepa_jax import init_from
  torch.manual_seed(0)
  net = timm.create_model('resnet18', pretrained=False, in_chans=1).eval()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
  path = str(tmp_path / 'resnet18.safetensors')
  safetensors.torch.save_file(net.state_dict(), path)
  c = fmnist_resnet.get_config('runlocal')
  c.model.width, c.model.stem, c.init_from = 64, 'imagenet', path
  mesh = sharding_lib.make_mesh({'data': -1})
  programs = steps.build(c, mesh, 10)
  init_from.check(c, programs.abstract_state.params['encoder'])
  x = np.random.default_rng(1).standard_normal((8, 28, 28, 1)).astype(np.float32)
  with torch.no_grad():
    net.reset_classifier(0)
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  with sharding_lib.activate(mesh):
    state = init_from.apply(programs.init(np.int32(0)), path, 0, False)
    got = np.asarray(programs.features_of(('embedding',))(
        steps.variables(state), jax.device_put(x, sharding_lib.batch_sharding(mesh))))
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
  c.model.variant = 'resnet34'
  with pytest.raises(config_lib.ConfigError, match=r'missing params/encoder/layer1_2/conv1/kernel'):
    init_from.check(c, steps.build(c, mesh, 10).abstract_state.params['encoder'])
  c.init_from = str(tmp_path)        # a directory (an export) cannot hold a ResNet
  with pytest.raises(config_lib.ConfigError, match='ResNet state dict file'):
    init_from.check(c, steps.build(c, mesh, 10).abstract_state.params['encoder'])


def test_the_in_domain_resnet_config_runs_end_to_end_and_export_refuses_it(tmp_path):
  """configs/imagenette_resnet18.py:runlocal (the paper config's code path at toy size):
  trains, checkpoints, runs its evaluators on the pooled features, beats chance; `export`
  says ResNets are not exported (exit 2, one line)."""
  import json
  import test_folder
  workdir = tmp_path / 'run'
  result = test_folder._python(str(tmp_path), '-m', 'lejepa_jax.main',
                               '--config=configs/imagenette_resnet18.py:runlocal',
                               f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  final = {k: v for l in lines for k, v in l.items()}
  assert final['step'] == 20 and np.isfinite(final['train/loss'])
  assert final['eval/linear_probe_top1'] > 0.2 and final['eval/knn_top1'] > 0.2   # chance 0.1
  assert 'eval/online_probe_top1' in final
  result = test_folder._python(str(tmp_path), '-m', 'lejepa_jax.export', f'--workdir={workdir}',
                               f'--out={tmp_path / "export"}')
  assert result.returncode == 2 and 'export writes ViT encoders only' in result.stderr
  assert not (tmp_path / 'export').exists()
