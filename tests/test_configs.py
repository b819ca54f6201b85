"""Every config has the keys DESIGN.md fixes; the pod config builds the 1.8B ViT-g."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist, vitg
from lejepa_jax import models, train

REQUIRED = ('seed', 'batch_size', 'lamb', 'sigreg.num_slices', 'sigreg.t_max',
            'sigreg.num_points', 'sigreg.statistic', 'sigreg.quadrature', 'data.name', 'data.dir',
            'model.variant', 'checkpoint_every')


@pytest.mark.parametrize('module,arg', [(fmnist, None), (fmnist, 'runlocal'), (vitg, None),
                                        (vitg, 'runlocal'), (vitg, 'epochs=300')])
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
