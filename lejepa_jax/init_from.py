"""Start a run from pretrained weights: `config.init_from` = an export of
`python -m lejepa_jax.export` (a directory holding model.safetensors and config.json).

The encoder's weights are taken from the export (the projector and the online probe start
as usual); a checkpoint in the workdir, when there is one, wins (a resumed run continues
from its own state). The names and shapes are checked against the run's encoder when the
run starts, before anything is written: every missing, unexpected or differently shaped
weight is listed in one `ConfigError`. Reading a lejepa_jax checkpoint or a timm state dict
is not supported yet: export the run first (`python -m lejepa_jax.export`).
"""
from __future__ import annotations

import numpy as np

from lejepa_jax import encoder as encoder_lib
from lejepa_jax.config import ConfigError


def mismatches(found: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
  """Missing, unexpected and differently shaped weights, one phrase each."""
  out = [f'missing {name} {shape}' for name, shape in expected.items() if name not in found]
  out += [f'unexpected {name} {shape}' for name, shape in found.items() if name not in expected]
  out += [f'{name}: {found[name]} in the file, {shape} in the run' for name, shape in
          expected.items() if name in found and tuple(found[name]) != tuple(shape)]
  return out


def weight_shapes(path) -> dict[str, tuple]:
  """{'encoder/...': shape} of an export, from its safetensors header (no tensor is read)."""
  from etils import epath
  import safetensors
  encoder_lib.read_config(path)        # says what is wrong when it is not an export
  file = epath.Path(path) / encoder_lib.WEIGHTS_FILE
  if not file.exists():
    raise FileNotFoundError(f'{file} does not exist: the export is incomplete, export again')
  if '://' in str(file):
    return {k: tuple(v.shape) for k, v in encoder_lib.read_weights(path).items()}
  with safetensors.safe_open(str(file), framework='numpy') as f:
    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check(config, abstract_encoder_params) -> None:
  """Raises ConfigError (unreadable export or mismatching weights) before the run writes."""
  path = config.init_from
  try:
    found = weight_shapes(path)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'init_from={path!r}: {e}') from None
  expected = encoder_lib.flat_shapes(abstract_encoder_params, config.model.depth)
  problems = mismatches(found, expected)
  if problems:
    shown = '; '.join(problems[:12]) + (f'; and {len(problems) - 12} more' if len(problems) > 12
                                         else '')
    raise ConfigError(f'init_from={path!r} does not fit this config\'s encoder ({len(problems)} '
                        f'weight(s)): {shown}. Export a model of the same shape (model.width, '
                        'depth, num_heads, mlp_dim, patch_size, image size, registers, head)')


def apply(state, path, depth: int, scan: bool):
  """`state` with the encoder weights of the export at `path` (on the state's shardings)."""
  import jax
  loaded = encoder_lib.unflatten(encoder_lib.read_weights(path), depth, scan)

  def put(key_path, like):
    value = loaded
    for key in key_path:
      value = value[str(getattr(key, 'key', key))]
    value = np.asarray(value, like.dtype)
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])
  params = dict(state.params)
  params['encoder'] = jax.tree_util.tree_map_with_path(put, state.params['encoder'])
  return state.replace(params=params)
