"""A pretrained encoder exported by `python -m lejepa_jax.export`, loaded without the run.

    encoder = lejepa_jax.load_encoder('/path/to/export')
    features = encoder(images)     # (B, S, S, C) uint8 [0, 255] or float [0, 1] -> (B, F)

An export is a directory: `model.safetensors` (the ViT encoder's float32 weights, one
tensor per block: `encoder/block_0/attn/qkv_kernel`, ...) and `config.json` (the ViT's
shape, the feature definition and the preprocessing: input size, channels, mean, std,
eval crop fraction). Loading needs only that directory, safetensors and
`lejepa_jax.models.vit`: no config files, workdir, checkpoints or Orbax.

Inputs are images already at config['input_size'] (square; other multiples of the patch
size run, with resized position embeddings). uint8 images are scaled by 1/255, float images
are taken to be in [0, 1]; both are then normalised with the stored mean and std, exactly
as the evaluation pipeline does. Pass normalized=True to give images already normalised.
`Encoder.preprocess` makes that input from an image of any size the way evaluation did
(centre crop of eval_crop_fraction of the shorter side, bilinear resize, normalisation).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

import numpy as np

FORMAT = 'lejepa_jax.encoder'
FORMAT_VERSION = 1
# The model keys added to config.json after version 1 first shipped, with what exports made
# before them ran (read_config fills them in).
EARLIER_MODEL_KEYS = {'gelu': 'tanh', 'head_dim': 0}
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
PREFIX = 'encoder/'
OUTPUTS = {
    # output name -> key of ViT.__call__'s dict
    'features': 'probe_features',
    'embedding': 'cls',
    'head': 'head',           # only with a linear head (model.embedding_dim > 0)
}
FEATURES_DEFINITION = (
    'concatenation of the CLS tokens output by the last two transformer blocks (before the '
    'final LayerNorm; the last block twice when depth is 1), dimension 2 * width: the '
    'frozen-evaluation features of LeJEPA (linear probe, k-NN); LeJEPAModel.features')
EMBEDDING_DEFINITION = ('CLS token after the final LayerNorm, dimension width: the input of '
                        'the projector (of the head, if any) during pretraining')
HEAD_DEFINITION = ("linear head on the embedding (timm's num_classes head), dimension "
                   'head_dim: the input of the projector during pretraining')


def _join(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _flatten(encoder_params, depth: int, index) -> dict:
  import jax
  from lejepa_jax.models import vit
  tree = dict(vit.unboxed(encoder_params))
  if 'blocks' in tree:      # nn.scan: every leaf has a leading (depth,) axis
    stacked = tree.pop('blocks')
    for i in range(depth):
      tree[f'block_{i}'] = jax.tree.map(lambda x, i=i: index(x, i), stacked)
  return {PREFIX + _join(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_params(encoder_params, depth: int) -> dict[str, np.ndarray]:
  """{'encoder/NAME/...': float32 array} of the ViT's params, scanned blocks unstacked to
  block_0 ... block_{depth-1} (the layout of an unscanned ViT, whatever the run used)."""
  flat = _flatten(encoder_params, depth, lambda x, i: x[i])
  return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}


def flat_shapes(encoder_params, depth: int) -> dict[str, tuple]:
  """The names and shapes flat_params gives, from arrays or ShapeDtypeStructs."""
  import jax
  flat = _flatten(encoder_params, depth, lambda x, i: jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
  return {k: tuple(v.shape) for k, v in flat.items()}


def unflatten(flat: dict, depth: int, scan: bool) -> dict:
  """The inverse of flat_params: the nested params of a ViT (blocks stacked when `scan`)."""
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name[len(PREFIX):].split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  if scan:
    import jax
    blocks = [tree.pop(f'block_{i}') for i in range(depth)]
    tree['blocks'] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  return tree


def vit_config(config: dict, *, dtype=None, attention=None, scan=None):
  """The models.vit.ViTConfig of an export's config.json (inference: no remat)."""
  import jax.numpy as jnp
  from lejepa_jax.models import vit
  m = config['model']
  return vit.ViTConfig(
      width=m['width'], depth=m['depth'], mlp_dim=m['mlp_dim'], num_heads=m['num_heads'],
      patch_size=m['patch_size'], image_size=m['image_size'], num_registers=m['num_registers'],
      dtype=jnp.dtype(dtype or m['dtype']), remat='none',
      scan=m['scan'] if scan is None else scan, attention=attention,
      gelu=m['gelu'], head_dim=m['head_dim'])


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
  """A loaded encoder: call it on images (B, H, W, C); see the module docstring.

  config: the export's config.json (a dict); params: the ViT's parameters (jax arrays);
  output: 'features' or 'embedding'; normalized: whether inputs come normalised.
  """
  config: dict
  params: Any = dataclasses.field(repr=False)
  output: str = 'features'
  normalized: bool = False
  module: Any = dataclasses.field(repr=False, default=None)   # models.vit.ViT
  _apply: Callable = dataclasses.field(repr=False, default=None)

  @property
  def dim(self) -> int:
    return self.config['outputs'][self.output]['dim']

  def __call__(self, images):
    shape = getattr(images, 'shape', None)
    channels = self.config['channels']
    if shape is None or len(shape) != 4 or shape[-1] != channels:
      raise ValueError(f'images must be (B, H, W, {channels}), got shape {shape}')
    dtype = np.dtype(images.dtype)
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
      raise TypeError(f'images must be uint8 in [0, 255] or float in [0, 1], got {dtype}')
    if self.normalized and dtype == np.uint8:
      raise TypeError('normalized=True expects float images already normalised, got uint8')
    return self._apply(self.params, images)

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """One uint8 (H, W, C) or (H, W) image of any size -> the normalised float32 (S, S, C) view the
    evaluation pipeline makes (centre crop, bilinear resize, mean/std); feed a stack of them
    to an encoder loaded with normalized=True."""
    from lejepa_jax.data import augment
    c = self.config
    image = np.asarray(image)
    image = image[..., None] if image.ndim == 2 else image
    spec = augment.AugmentSpec(mean=tuple(c['mean']), std=tuple(c['std']))
    return augment.eval_view(image, c['input_size'], spec, c['eval_crop_fraction'])


def _forward(params, images, *, module, key, mean, inv_std, normalized):
  import jax.numpy as jnp
  x = images
  if not normalized:
    if x.dtype == jnp.uint8:
      x = x.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
    x = (x.astype(jnp.float32) - mean) * inv_std
  return module.apply({'params': params}, x)[key]


def read_config(path) -> dict:
  from etils import epath
  file = epath.Path(path) / CONFIG_FILE
  if not file.exists():
    raise FileNotFoundError(f'{file} does not exist: not a lejepa_jax export (make one with '
                            'python -m lejepa_jax.export --workdir=DIR --out=PATH)')
  config = json.loads(file.read_text())
  if config.get('format') == 'timm':
    raise ValueError(f'{file} is an export for timm (PyTorch): load it with timm.create_model('
                     "**json.load(open('timm.json'))) and load_state_dict, or export again "
                     'without --format=timm for lejepa_jax.load_encoder')
  version = config.get('format_version') or 0
  if config.get('format') != FORMAT or version > FORMAT_VERSION:
    raise ValueError(f'{file} is not a {FORMAT} export of version <= {FORMAT_VERSION} '
                     f'(format={config.get("format")!r}, format_version={version!r})')
  config['model'] = {**EARLIER_MODEL_KEYS, **config['model']}
  return config


def read_weights(path) -> dict[str, np.ndarray]:
  from etils import epath
  import safetensors.numpy
  file = epath.Path(path) / WEIGHTS_FILE
  if not file.exists():
    raise FileNotFoundError(f'{file} does not exist: the export is incomplete, export again')
  if '://' in str(file):
    return safetensors.numpy.load(file.read_bytes())
  return safetensors.numpy.load_file(str(file))


def load_encoder(path, *, output: str = 'features', normalized: bool = False, dtype=None,
                 attention: str | None = None) -> Encoder:
  """The encoder exported to `path` as a jitted callable images -> (B, dim) float32.

  output: 'features' (frozen-evaluation features, 2 * width) or 'embedding' (final CLS,
  width). normalized: images are already normalised with config['mean'] / ['std'].
  dtype: activation dtype (default: the run's model.dtype). attention: the
  jax.nn.dot_product_attention implementation (default: JAX picks; 'cudnn' on GPUs).
  """
  import jax
  import jax.numpy as jnp
  from lejepa_jax.models import vit
  config = read_config(path)
  if output not in config['outputs']:
    raise ValueError(f'output must be one of {sorted(config["outputs"])} for this export, '
                     f'got {output!r}')
  cfg = vit_config(config, dtype=dtype, attention=attention)
  module = vit.ViT(cfg)
  flat = read_weights(path)
  # Check names and shapes against the model before building anything from them.
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, config['channels']),
                                jnp.float32)
  expected = jax.eval_shape(module.init, jax.random.key(0), images)['params']
  expected = flat_shapes(expected, cfg.depth)
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if got != expected:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    raise ValueError(f'{path}/{WEIGHTS_FILE} does not match its {CONFIG_FILE}: missing '
                     f'{missing[:5]}, unexpected {extra[:5]}, wrong shapes '
                     f'{[(k, got[k], expected[k]) for k in wrong[:5]]}')
  params = jax.tree.map(jnp.asarray, unflatten(flat, cfg.depth, cfg.scan))
  c = config['channels']
  mean = np.asarray(config['mean'][:c], np.float32)
  inv_std = (1.0 / np.asarray(config['std'][:c], np.float32)).astype(np.float32)
  apply = jax.jit(functools.partial(_forward, module=module, key=OUTPUTS[output], mean=mean,
                                    inv_std=inv_std, normalized=normalized))
  return Encoder(config=config, params=params, output=output, normalized=normalized,
                 module=module, _apply=apply)
