"""Start a run from pretrained weights: `config.init_from` is either
- an export of `python -m lejepa_jax.export` (a directory holding model.safetensors and
  config.json), or
- a timm VisionTransformer's state dict (a .safetensors file, or a .pth/.bin file saved with
  torch.save, which needs torch): `timm_format.from_timm_state_dict` renames it; timm's
  position embedding of the CLS token is folded into the CLS token. The config must describe
  the same architecture (width, depth, heads, mlp, patch, registers, GELU: timm's default is
  model.gelu='exact'), or
- for a ResNet config (model.variant resnet18/34/50), a timm or torchvision ResNet state dict
  file: its weights and BatchNorm running statistics (`timm_format.resnet_from_timm_state_dict`);
  a 1000-class classifier ('fc') is skipped unless the config has a head of that shape, or
- a lejepa_jax training workdir (config.json and checkpoints/): the encoder of its newest
  checkpoint (scanned or unrolled blocks either way; a ResNet's running statistics too).

The encoder's weights are taken from it (the projector and the online probe start as usual);
a checkpoint in the workdir, when there is one, wins (a resumed run continues from its own
state). The names and shapes are checked against the run's encoder when the run starts,
before anything is written: every missing, unexpected or differently shaped weight is listed
in one `ConfigError`.
"""
from __future__ import annotations

import numpy as np

from lejepa_jax import encoder as encoder_lib
from lejepa_jax import timm_format
from lejepa_jax.config import ConfigError


def mismatches(found: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
  """Missing, unexpected and differently shaped weights, one phrase each."""
  out = [f'missing {name} {shape}' for name, shape in expected.items() if name not in found]
  out += [f'unexpected {name} {shape}' for name, shape in found.items() if name not in expected]
  out += [f'{name}: {found[name]} in the file, {shape} in the run' for name, shape in
          expected.items() if name in found and tuple(found[name]) != tuple(shape)]
  return out


TIMM_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin')


def _is_timm_file(path) -> bool:
  from etils import epath
  p = epath.Path(path)
  return p.suffix in TIMM_SUFFIXES and not p.is_dir()


def _state_dict(path) -> dict[str, np.ndarray]:
  """A state dict file (.safetensors, or a torch file) as float32 numpy arrays."""
  from etils import epath
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'{p} does not exist')
  if p.suffix == '.safetensors':
    import safetensors.numpy
    state = safetensors.numpy.load(p.read_bytes())
  else:
    try:
      import torch
    except ImportError:
      raise ValueError(f'{p} is a torch file: reading it needs torch (pip install torch), or '
                       'save the state dict with safetensors') from None
    with p.open('rb') as f:
      state = torch.load(f, map_location='cpu', weights_only=True)
    state = state.get('state_dict', state.get('model', state))
    state = {k: v.float().numpy() for k, v in state.items() if hasattr(v, 'numpy')}
  return state


def _timm_weights(path, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
  if _is_resnet(expected):
    flat = timm_format.resnet_from_timm_state_dict(_state_dict(path))
    return {k: v for k, v in flat.items()            # an ImageNet classifier we do not have
            if k in expected or not k.startswith('params/encoder/fc/')}
  return timm_format.from_timm_state_dict(_state_dict(path), expected)


def _is_resnet(expected: dict) -> bool:
  return any(k.startswith('params/') for k in expected)


def expected_shapes(config, abstract_encoder_params) -> dict[str, tuple]:
  """The names and shapes init_from must fill. ViTs: 'encoder/...' (encoder.flat_shapes).
  ResNets: 'params/encoder/...' and their BatchNorms' 'batch_stats/encoder/.../mean|var'
  (the shape of the BatchNorm's scale)."""
  from lejepa_jax.models import resnet
  flat = encoder_lib.flat_shapes(abstract_encoder_params, config.model.depth)
  if not resnet.is_resnet(config.model.variant):
    return flat
  out = {'params/' + k: v for k, v in flat.items()}
  for k, v in flat.items():
    if k.endswith('/scale'):
      stats = 'batch_stats/' + k[:-len('scale')]
      out[stats + 'mean'] = out[stats + 'var'] = v
  return out


def _is_workdir(path) -> bool:
  """A training workdir: its config and a checkpoints directory (an export has neither)."""
  from etils import epath
  from lejepa_jax import checkpoint as ckpt_lib
  from lejepa_jax import run_config
  return ((epath.Path(path) / run_config.FILE).exists()
          and ckpt_lib.directory(path).exists())


def _run_programs(path, mesh):
  """(the run's config, its programs built on `mesh`) for a training workdir."""
  from lejepa_jax import config_schema
  from lejepa_jax import run_config
  from lejepa_jax import sharding as sharding_lib
  from lejepa_jax import steps
  config = config_schema.resolve(run_config.load(path))
  with config.unlocked():
    config.mesh = dict(zip(sharding_lib.MESH_AXES, mesh.devices.shape))
  return config, steps.build(config, mesh, max(1, int(config.total_steps)))


def _workdir_weights(path, mesh=None) -> dict:
  """The encoder of the newest checkpoint of a training workdir, flat: ViTs 'encoder/...',
  ResNets 'params/encoder/...' and 'batch_stats/encoder/...' (numpy arrays on every host);
  with mesh None, only their shapes (from the run's config; nothing is read)."""
  import jax
  from jax.experimental import multihost_utils
  from lejepa_jax import checkpoint as ckpt_lib
  from lejepa_jax import sharding as sharding_lib
  from lejepa_jax.models import resnet
  abstract = mesh is None
  if abstract:
    mesh = sharding_lib.make_mesh({'data': 1}, devices=jax.devices()[:1])
  config, programs = _run_programs(path, mesh)
  state = programs.abstract_state
  if not abstract:
    state, _ = ckpt_lib.restore_state(path, state)
  parts = {'params/': state.params['encoder']}
  if resnet.is_resnet(config.model.variant):
    parts['batch_stats/'] = state.batch_stats['encoder']
  else:
    parts = {'': parts['params/']}
  depth = getattr(programs.model.encoder, 'depth', 0)
  out = {}
  for prefix, tree in parts.items():
    if abstract:
      flat = encoder_lib.flat_shapes(tree, depth)
    else:
      tree = jax.tree.map(lambda x: x if x.is_fully_addressable
                          else multihost_utils.process_allgather(x, tiled=True), tree)
      flat = encoder_lib.flat_params(jax.device_get(tree), depth)
    out.update({prefix + k: v for k, v in flat.items()})
  return out


def weight_shapes(path, expected: dict[str, tuple]) -> dict[str, tuple]:
  """{'encoder/...': shape} of what `path` holds (an export: from its safetensors header)."""
  from etils import epath
  import safetensors
  if _is_timm_file(path):
    return {k: tuple(v.shape) for k, v in _timm_weights(path, expected).items()}
  if _is_workdir(path):
    return {k: tuple(v) for k, v in _workdir_weights(path).items()}
  encoder_lib.read_config(path)        # says what is wrong when it is not an export
  file = epath.Path(path) / encoder_lib.WEIGHTS_FILE
  if not file.exists():
    raise FileNotFoundError(f'{file} does not exist: the export is incomplete, export again')
  if '://' in str(file):
    return {k: tuple(v.shape) for k, v in encoder_lib.read_weights(path).items()}
  with safetensors.safe_open(str(file), framework='numpy') as f:
    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check(config, abstract_encoder_params) -> None:
  """Raises ConfigError (unreadable file or mismatching weights) before the run writes."""
  path = config.init_from
  expected = expected_shapes(config, abstract_encoder_params)
  if _is_resnet(expected) and not (_is_timm_file(path) or _is_workdir(path)):
    raise ConfigError(f'init_from={path!r}: a ResNet starts from a timm or torchvision ResNet '
                      f'state dict file ({", ".join(TIMM_SUFFIXES)}) or a lejepa_jax training '
                      'workdir; exports hold ViTs')
  try:
    found = weight_shapes(path, expected)
  except (FileNotFoundError, ValueError, OSError) as e:
    raise ConfigError(f'init_from={path!r}: {e}') from None
  problems = mismatches(found, expected)
  if problems:
    shown = '; '.join(problems[:12]) + (f'; and {len(problems) - 12} more' if len(problems) > 12
                                         else '')
    raise ConfigError(f'init_from={path!r} does not fit this config\'s encoder ({len(problems)} '
                      f'weight(s)): {shown}. Start from a model of the same shape (model.width, '
                      'depth, num_heads, mlp_dim, patch_size, image size, registers, head)')


def apply(state, path, depth: int, scan: bool):
  """`state` with the encoder weights at `path` (on the state's shardings)."""
  import jax
  if _is_workdir(path):
    flat = _workdir_weights(path, jax.tree.leaves(state.params)[0].sharding.mesh)
  elif 'bn1' in state.batch_stats.get('encoder', {}):          # a ResNet's state dict file
    flat = timm_format.resnet_from_timm_state_dict(_state_dict(path))
  elif _is_timm_file(path):
    flat = _timm_weights(path, encoder_lib.flat_shapes(state.params['encoder'], depth))
  else:
    flat = encoder_lib.read_weights(path)
  if 'bn1' in state.batch_stats.get('encoder', {}):
    return _apply_resnet(state, flat)
  loaded = encoder_lib.unflatten(flat, depth, scan)

  def put(key_path, like):
    value = loaded
    for key in key_path:
      value = value[str(getattr(key, 'key', key))]
    value = np.asarray(value, like.dtype)
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])
  params = dict(state.params)
  params['encoder'] = jax.tree_util.tree_map_with_path(put, state.params['encoder'])
  return state.replace(params=params)


def _apply_resnet(state, flat: dict):
  """`state` with a ResNet's weights and running statistics ('params/encoder/...',
  'batch_stats/encoder/...')."""
  import jax

  def put(prefix):
    def one(key_path, like):
      value = np.asarray(flat[prefix + '/'.join(str(getattr(k, 'key', k)) for k in key_path)],
                         like.dtype)
      return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])
    return one
  params, batch_stats = dict(state.params), dict(state.batch_stats)
  params['encoder'] = jax.tree_util.tree_map_with_path(put('params/encoder/'), params['encoder'])
  batch_stats['encoder'] = jax.tree_util.tree_map_with_path(put('batch_stats/encoder/'),
                                                            batch_stats['encoder'])
  return state.replace(params=params, batch_stats=batch_stats)
