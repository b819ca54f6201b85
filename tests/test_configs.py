"""Every config has the keys DESIGN.md fixes; the pod config builds the 1.8B ViT-g."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist, imagenette_vits8, vith14, vitl14, vitg
from lejepa_jax import models, train

REQUIRED = ('seed', 'batch_size', 'lamb', 'sigreg.num_slices', 'sigreg.t_max',
            'sigreg.num_points', 'sigreg.statistic', 'sigreg.quadrature', 'data.name', 'data.dir',
            'model.variant', 'checkpoint_every')


@pytest.mark.parametrize('module,arg', [
    (fmnist, None), (fmnist, 'runlocal'), (vitg, None), (vitg, 'runlocal'), (vitg, 'epochs=300'),
    (vith14, None), (vith14, 'runlocal'), (vitl14, None), (vitl14, 'runlocal'),
    (imagenette_vits8, None), (imagenette_vits8, 'runlocal')])
def test_required_keys_and_validation(module, arg):
  c = module.get_config(arg)
  for key in REQUIRED:
    node = c
    for part in key.split('.'):
      node = node[part]
  assert c.get('total_steps') or c.get('epochs')
  train.validate(c)
  bad = c.copy_and_resolve_references()
  bad.sigreg.statistic = 'kolmogorov'
  with pytest.raises(ValueError, match='sigreg.statistic'):
    train.validate(bad)


def test_vitg_is_the_paper_scale_model_and_steps_follow_epochs():
  c = vitg.get_config()
  assert train.total_steps(c, 1281167) == 100 * 1281167 // 2048
  model = models.build_model(c)
  g = jnp.zeros((1, 2, 224, 224, 3))
  l = jnp.zeros((1, 6, 98, 98, 3))
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), g, l)
  encoder = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes['params']['encoder']))
  assert 1.8e9 < encoder < 1.9e9
  with pytest.raises(ValueError, match='unknown arguments'):
    vitg.get_config('runlokal')


@pytest.mark.parametrize('module,variant,patch', [(vitg, 'g', 14), (vith14, 'H', 14),
                                                   (vitl14, 'L', 14)])
def test_imagenet_configs_use_the_papers_recipe(module, variant, patch):
  """REFERENCE.md's settings, not the Fashion-MNIST ones the pod config once inherited."""
  c = module.get_config()
  assert (c.model.variant, c.model.patch_size, c.model.dtype) == (variant, patch, 'bfloat16')
  assert c.lamb == 0.05 and c.loss_convention == 'convex'
  assert (c.sigreg.num_slices, c.sigreg.num_points, c.sigreg.t_max) == (1024, 17, 3.0)
  d = c.data
  assert (d.num_global_views, d.global_size, tuple(d.global_scale)) == (2, 224, (0.3, 1.0))
  assert (d.num_local_views, d.local_size, tuple(d.local_scale)) == (6, 98, (0.05, 0.3))
  a = d.augment
  assert (a.flip_prob, a.jitter_prob, a.grayscale_prob, a.blur_prob, a.solarize_prob) == \
      (0.5, 0.8, 0.2, 0.5, 0.2)
  assert (a.brightness, a.contrast, a.saturation, a.hue) == (0.4, 0.4, 0.2, 0.1)
  assert tuple(d.mean) == (0.485, 0.456, 0.406) and tuple(d.std) == (0.229, 0.224, 0.225)
  o = c.optim
  assert o.lr == 5e-4 and o.weight_decay == 0.05 and not o.clip_norm   # no batch scaling
  assert c.model.projector_out == 64
  assert c.evals.linear_probe.weight_decay == 1e-6
  # The pipeline built from the config carries those values through.
  from lejepa_jax.data import pipeline
  spec = pipeline.augment_spec(c.data)
  assert (spec.blur_prob, spec.solarize_prob, spec.solarize_threshold) == (0.5, 0.2, 0.5)


def test_minimal_recipe_config():
  c = imagenette_vits8.get_config()
  assert (c.model.variant, c.model.patch_size, c.data.global_size) == ('S', 8, 128)
  assert (c.lamb, c.optim.lr, c.batch_size, c.sigreg.num_slices) == (0.02, 2e-3, 256, 256)
  assert c.data.num_global_views + c.data.num_local_views == 4 and c.model.projector_out == 16
  assert c.epochs == 800 and c.data.name == 'tfds:imagenette'


@pytest.mark.parametrize('module', [vitg, vith14, vitl14])
def test_runlocal_keeps_the_pod_code_path(module):
  c = module.get_config('runlocal')
  assert c.model.scan and c.model.remat != 'none' and c.mesh['fsdp'] == -1
