"""Exports a run's encoder: python -m lejepa_jax.export --workdir=DIR --out=PATH [--step=S].

Reads DIR/config.json (the run's resolved config) and checkpoint S (default: the newest)
of DIR/checkpoints read-only, and writes the directory PATH:
  - model.safetensors: the ViT encoder's weights only, float32, one tensor per name
    ('encoder/patch_embed/kernel', 'encoder/block_0/attn/qkv_kernel', ...; scanned runs
    are unstacked into block_0 ... block_{depth-1});
  - config.json: the ViT's shape, what the outputs are, the preprocessing (input size,
    channels, mean, std, eval crop fraction), the step, the source workdir, versions.
Load it with `lejepa_jax.load_encoder(PATH)` (lejepa_jax/encoder.py), which needs neither
the workdir nor the config files.

--format=timm writes the same encoder for PyTorch instead (lejepa_jax/timm_format.py):
model.safetensors with timm's VisionTransformer names and layouts, timm.json with the
arguments of `timm.create_model`, and config.json as above ("format": "timm"). In PyTorch:
    import json, timm, safetensors.torch
    model = timm.create_model(**json.load(open('PATH/timm.json')))
    model.load_state_dict(safetensors.torch.load_file('PATH/model.safetensors'))
model(images) is then the final-LayerNorm CLS token (or the head's output with
model.embedding_dim > 0), on NCHW images normalised with config.json's mean and std.

Missing config.json or checkpoint, an unreadable checkpoint, or a PATH that exists and is
not empty (without --overwrite) fail with one line `[lejepa_jax] error: ...` on stderr,
exit status 2, before anything is written. --overwrite replaces model.safetensors and
config.json in PATH (each written to a temporary file first) and leaves other files alone.
"""
from __future__ import annotations

import json

from absl import app
from absl import flags
from absl import logging
from etils import epath

from lejepa_jax import cli
from lejepa_jax import config_schema

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a run (config.json, checkpoints/).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (created).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Write into a non-empty --out.')
_FORMAT = flags.DEFINE_enum('format', 'lejepa_jax', ['lejepa_jax', 'timm'],
                            'lejepa_jax: for lejepa_jax.load_encoder; timm: a timm '
                            'VisionTransformer state dict and its create_model arguments.')
TIMM_ARGS_FILE = 'timm.json'
flags.mark_flags_as_required(['workdir', 'out'])


class ExportError(Exception):
  """Bad input: the message names the path or flag and what to do."""



def export_config(config, step: int, workdir: str) -> dict:
  """config.json of an export: everything `load_encoder` needs, and provenance."""
  import jax
  import lejepa_jax
  from lejepa_jax import encoder as encoder_lib
  from lejepa_jax import models
  config = config_schema.resolve(config)
  enc = models.build_model(config).encoder
  d = config.data
  channels = int(d.channels)
  return {
      'format': encoder_lib.FORMAT,
      'format_version': encoder_lib.FORMAT_VERSION,
      'model': {
          'variant': config.model.variant, 'width': enc.width, 'depth': enc.depth,
          'mlp_dim': enc.mlp_dim, 'num_heads': enc.num_heads, 'patch_size': enc.patch_size,
          'image_size': enc.image_size, 'num_registers': enc.num_registers,
          'dtype': str(jax.numpy.dtype(enc.dtype)), 'scan': enc.scan,
          'attention': enc.attention, 'gelu': enc.gelu, 'head_dim': enc.head_dim,
      },
      'outputs': {
          'features': {'dim': 2 * enc.width, 'definition': encoder_lib.FEATURES_DEFINITION},
          'embedding': {'dim': enc.width, 'definition': encoder_lib.EMBEDDING_DEFINITION},
          **({'head': {'dim': enc.head_dim, 'definition': encoder_lib.HEAD_DEFINITION}}
             if enc.head_dim else {}),
      },
      'embedding_dim': enc.width,
      'features_dim': 2 * enc.width,
      'input_size': int(d.global_size),
      'channels': channels,
      'mean': [float(x) for x in tuple(d.mean)[:channels]],
      'std': [float(x) for x in tuple(d.std)[:channels]],
      'eval_crop_fraction': float(d.eval_crop_fraction),
      'preprocessing': (
          'images (B, input_size, input_size, channels); uint8 scaled by 1/255 (float taken '
          'in [0, 1]), then (x - mean) / std per channel. From an image of any size, the '
          'evaluation view: centre square crop of eval_crop_fraction of the shorter side, '
          "Pillow's bilinear resize (antialiased when shrinking, as torchvision's) to input_size "
          '(uint8, then scaled) '
          '(lejepa_jax.data.augment.eval_view; Encoder.preprocess)'),
      'step': int(step),
      'workdir': workdir,
      'data': {'name': d.name, 'num_classes': int(d.num_classes)},
      'lejepa_jax_version': lejepa_jax.__version__,
      'jax_version': jax.__version__,
  }


def _check_out(out, overwrite: bool):
  path = epath.Path(out)
  if path.exists():
    if not path.is_dir():
      raise ExportError(f'--out={out} is a file: pass a directory to create')
    if any(path.iterdir()) and not overwrite:
      raise ExportError(f'--out={out} exists and is not empty: pass a new directory, or '
                        '--overwrite to replace its model.safetensors and config.json')
  return path


def export(workdir: str, out: str, *, step: int | None = None, overwrite: bool = False,
           fmt: str = 'lejepa_jax') -> dict:
  """Writes the encoder of `workdir`'s checkpoint `step` to `out` in format `fmt`
  ('lejepa_jax' or 'timm'); returns its config.json.

  Raises ExportError (bad input: message names the path and what to do).
  """
  import jax
  from jax.experimental import multihost_utils
  import safetensors.numpy
  from lejepa_jax import checkpoint as ckpt_lib
  from lejepa_jax import encoder as encoder_lib
  from lejepa_jax import run_config
  from lejepa_jax import sharding as sharding_lib
  from lejepa_jax import steps

  path = _check_out(out, overwrite)
  if not epath.Path(workdir).is_dir():
    raise ExportError(f'--workdir={workdir} does not exist: pass the --workdir of a training run')
  try:
    config = run_config.load(workdir)
  except FileNotFoundError:
    raise ExportError(
        f'{epath.Path(workdir) / run_config.FILE} does not exist: --workdir must be a training '
        'workdir (config.json, checkpoints/). A workdir made before configs were stored needs '
        'the config written there first: python -c "from configs import NAME; from lejepa_jax '
        'import run_config; run_config.save(\'DIR\', NAME.get_config(\'ARG\'))" with the run\'s '
        'overrides set') from None
  except ValueError as e:   # json.JSONDecodeError
    raise ExportError(f'{workdir}/config.json cannot be read ({cli.describe_error(e)}): restore it or '
                      'train into a new workdir') from None
  try:
    mesh = sharding_lib.make_mesh(config.mesh)
  except ValueError:        # the run's mesh does not fit this machine: data parallel only
    mesh = sharding_lib.make_mesh({'data': -1})
  try:
    programs = steps.build(config, mesh, total_steps=max(1, int(config.total_steps)))
  except (ValueError, KeyError, AttributeError) as e:
    raise ExportError(f'{workdir}/config.json does not describe a model this version of '
                      f'lejepa_jax builds ({cli.describe_error(e)})') from None
  if not hasattr(programs.model.encoder, 'patch_size'):
    raise ExportError(f'{workdir} trained a {config.model.variant}: export writes ViT encoders '
                      'only so far; evaluate the run in place (python -m lejepa_jax.evaluate '
                      '--workdir=...) or read its checkpoint with lejepa_jax.checkpoint')
  try:
    state, step = ckpt_lib.restore_state(workdir, programs.abstract_state, step)
  except FileNotFoundError as e:
    raise ExportError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises many types)
    raise ExportError(f'checkpoint {step if step is not None else "(newest)"} in '
                      f'{ckpt_lib.directory(workdir)} cannot be read ({cli.describe_error(e)}): pass '
                      'another --step, or check that the workdir is intact') from None

  # To host: sharded parameters of a multi-process run are gathered onto every process.
  encoder_params = jax.tree.map(
      lambda x: x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True),
      state.params['encoder'])
  tensors = encoder_lib.flat_params(jax.device_get(encoder_params), programs.model.encoder.depth)
  meta = export_config(config, step, str(ckpt_lib.directory(workdir).parent))
  meta['num_params'] = int(sum(v.size for v in tensors.values()))
  files = {}
  if fmt == 'timm':
    from lejepa_jax import timm_format
    try:
      timm_args = timm_format.timm_arguments(meta['model'], input_size=meta['input_size'],
                                             channels=meta['channels'])
    except ValueError as e:
      raise ExportError(f'this encoder has no timm equivalent: {e}') from None
    tensors = timm_format.timm_state_dict(tensors, meta['model'])
    meta['format'], meta['timm'] = 'timm', timm_args
    files[TIMM_ARGS_FILE] = (json.dumps(timm_args, indent=2) + '\n').encode()
  if jax.process_index() != 0:
    return meta

  path.mkdir(parents=True, exist_ok=True)
  files.update({encoder_lib.WEIGHTS_FILE: safetensors.numpy.save(
                    tensors, metadata={'format': meta['format'], 'step': str(step)}),
                encoder_lib.CONFIG_FILE: (json.dumps(meta, indent=2) + '\n').encode()})
  for name, data in files.items():
    tmp = path / (name + '.tmp')
    tmp.write_bytes(data)
    tmp.replace(path / name)
  logging.info('exported %s step %d to %s', workdir, step, path)
  return meta


def main(argv):
  cli.setup()
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}: use --workdir=DIR --out=PATH [--step=S]')
  try:
    meta = export(_WORKDIR.value, _OUT.value, step=_STEP.value, overwrite=_OVERWRITE.value,
                  fmt=_FORMAT.value)
  except ExportError as e:
    cli.fail(str(e))
  how = (f'lejepa_jax.load_encoder({_OUT.value!r})' if _FORMAT.value == 'lejepa_jax' else
         f'timm.create_model(**json.load(open({_OUT.value + "/" + TIMM_ARGS_FILE!r}))) and '
         f'load_state_dict(safetensors.torch.load_file('
         f'{_OUT.value + "/model.safetensors"!r}))')
  print(f'[lejepa_jax] exported step {meta["step"]} of {_WORKDIR.value}: encoder '
        f'({meta["model"]["variant"]}, width {meta["model"]["width"]}, depth '
        f'{meta["model"]["depth"]}) with {meta["num_params"]:,} parameters to {_OUT.value} '
        f'({", ".join(["model.safetensors", "config.json"] + (["timm.json"] if _FORMAT.value == "timm" else []))}); '
        f'features dim {meta["features_dim"]}. Load with {how}')


if __name__ == '__main__':
  app.run(main)
