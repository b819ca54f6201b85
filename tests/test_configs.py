"""Every config has the fixed keys; the paper configs follow configs/RECIPES.md, value by value;
the pod config builds the 1.8B ViT-g."""
import ast
import functools
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist, fmnist_resnet, imagenette_resnet18, imagenette_vits8, vith14, vitl14, vitg
from lejepa_jax import config_schema, models, train

REQUIRED = ('seed', 'batch_size', 'lamb', 'sigreg.num_slices', 'sigreg.t_max',
            'sigreg.num_points', 'sigreg.statistic', 'sigreg.quadrature', 'data.name', 'data.dir',
            'model.variant', 'checkpoint_every')


@pytest.mark.parametrize('module,arg', [
    (fmnist, None), (fmnist, 'runlocal'), (vitg, None), (vitg, 'runlocal'), (vitg, 'epochs=300'),
    (vith14, None), (vith14, 'runlocal'), (vitl14, None), (vitl14, 'runlocal'),
    (imagenette_vits8, None), (imagenette_vits8, 'runlocal'), (fmnist_resnet, None),
    (fmnist_resnet, 'runlocal'), (imagenette_resnet18, None), (imagenette_resnet18, 'runlocal')])
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


RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'configs', 'RECIPES.md')
PAPER_CONFIGS = {'vitl14': vitl14, 'vith14': vith14, 'vitg': vitg,
                 'imagenette_vits8': imagenette_vits8, 'imagenette_resnet18': imagenette_resnet18}
_ROW = re.compile(r'^\| `([^`]+)` \| `([^`]*)` \| (.+) \|$')


def recipe_table() -> dict:
  """{config name: {key: (value, source)}} from configs/RECIPES.md: rows of the tables under
  each `<!-- applies: NAMES -->` marker hold for those configs."""
  tables = {name: {} for name in PAPER_CONFIGS}
  applies = ()
  for line in open(RECIPES).read().splitlines():
    marker = re.match(r'<!-- applies: (.+) -->', line.strip())
    if marker:
      applies = marker.group(1).split()
      assert set(applies) <= set(PAPER_CONFIGS), applies
      continue
    if line.startswith('#'):
      applies = ()
    row = _ROW.match(line.strip())
    if row and applies:
      key, value, source = row.groups()
      for name in applies:
        assert key not in tables[name], f'{key} twice for {name}'
        tables[name][key] = (ast.literal_eval(value), source.strip())
  return tables


def config_values(config) -> dict:
  """{dotted key: value} of a config, evaluators flattened to evals.NAME.OPTION."""
  out = {}
  for key in config_schema.flatten(config):
    node = config
    for part in key.split('.'):
      node = node[part]
    if key == 'evals':
      for name, entry in node.items():
        for option, value in entry.items():
          out[f'evals.{name}.{option}'] = value
    else:
      out[key] = dict(node) if key in config_schema.FREE_FORM else node
  return out


def _same(a, b) -> bool:
  if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  if isinstance(a, float) or isinstance(b, float):
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
        math.isclose(a, b, rel_tol=1e-12)
  return a == b and type(a) is type(b)


@pytest.mark.parametrize('name', sorted(PAPER_CONFIGS))
def test_paper_configs_follow_the_recipe_table(name):
  """Every key of the paper configs is in configs/RECIPES.md with a source, and the config
  holds the table's value (the table is written from the authors' sources)."""
  table = recipe_table()[name]
  values = config_values(PAPER_CONFIGS[name].get_config())
  missing = sorted(set(values) - set(table))
  assert not missing, f'configs/{name}.py keys without a row in RECIPES.md: {missing}'
  extra = sorted(set(table) - set(values))
  assert not extra, f'RECIPES.md rows for {name} that the config lacks: {extra}'
  wrong = {k: (values[k], table[k][0]) for k in table if not _same(values[k], table[k][0])}
  assert not wrong, f'configs/{name}.py differs from RECIPES.md (config, table): {wrong}'
  for key, (_, source) in table.items():
    assert len(source) > 5, f'{key}: no source'


def test_recipe_values_reach_the_programs():
  """What the table fixes is what the run builds: the pipeline's augmentations, the schedule
  (MINIMAL.md's LinearLR + CosineAnnealingLR, in torch's closed form), the decay mask, the
  timm-shaped encoder with its 512-d head, the online probe on that head."""
  from lejepa_jax import optim
  from lejepa_jax.data import pipeline
  c = imagenette_vits8.get_config()
  spec = pipeline.augment_spec(c.data)
  assert (spec.brightness, spec.contrast, spec.saturation, spec.hue) == (0.8, 0.8, 0.8, 0.2)
  assert (spec.solarize_prob, spec.solarize_threshold, spec.blur_prob) == (0.1, 0.5, 0.5)
  total, warmup = c.total_steps, c.optim.warmup_steps
  lr = optim.schedule(c.optim.lr, total, warmup, end_lr=c.optim.end_lr,
                      warmup_start_factor=c.optim.warmup_start_factor)
  probe = optim.schedule(c.optim.probe_lr, total, warmup, end_lr=c.optim.end_lr,
                         warmup_start_factor=c.optim.warmup_start_factor)

  def torch_lr(base, step):   # SequentialLR(LinearLR(0.01, warmup), CosineAnnealingLR(eta_min))
    if step < warmup:
      return base * (0.01 + 0.99 * step / warmup)
    t = (step - warmup) / (total - warmup)
    return 1e-3 + (base - 1e-3) * (1 + math.cos(math.pi * t)) / 2
  for step in (0, 1, 17, 35, 36, 100, 14400, total - 1, total):
    assert math.isclose(float(lr(step)), torch_lr(2e-3, step), rel_tol=1e-5), step
    assert math.isclose(float(probe(step)), torch_lr(1e-3, step), rel_tol=1e-5), step
  model = models.build_model(c)
  assert model.encoder.head_dim == 512 and model.online_probe_input == 'embedding'
  g = jnp.zeros((1, 4, 128, 128, 3))
  params = nn.unbox(jax.eval_shape(functools.partial(model.init, train=False),
                                   jax.random.key(0), g, None)['params'])
  assert params['encoder']['head']['kernel'].shape == (384, 512)
  assert params['projector']['dense_0']['kernel'].shape == (512, 2048)
  assert params['probe']['norm']['scale'].shape == (512,)
  # Weight decay on every parameter (torch's AdamW on net.parameters()), or kernels only.
  tx = optim.adamw(1.0, 10, 0, 0.5, weight_decay_on='all')
  ones = {'norm': {'scale': jnp.ones(3)}, 'dense': {'kernel': jnp.ones(3)}}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, ones), tx.init(ones), ones)
  assert all(float(u[0]) < 0 for u in jax.tree.leaves(updates))
  tx = optim.adamw(1.0, 10, 0, 0.5, weight_decay_on='kernels')
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, ones), tx.init(ones), ones)
  assert float(updates['norm']['scale'][0]) == 0 and float(updates['dense']['kernel'][0]) < 0


@pytest.mark.parametrize('module', [vitg, vith14, vitl14])
def test_runlocal_keeps_the_pod_code_path(module):
  c = module.get_config('runlocal')
  assert c.model.scan and c.model.remat != 'none' and c.mesh['fsdp'] == -1
