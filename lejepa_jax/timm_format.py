"""Our ViT encoder as a timm VisionTransformer: model arguments and state dict.

The authors build their ViTs with timm (rbalestr-lab/lejepa, MINIMAL.md:
`timm.create_model("vit_small_patch8_224", num_classes=512, drop_path_rate=0.1,
img_size=128)`), and `models/vit.py` computes the same function: pre-norm blocks, LayerNorm
eps 1e-6, qkv with bias, a learned CLS token, learned position embeddings on the patch grid,
the final LayerNorm's CLS token as the output (timm's global_pool='token'). Two details map:
- timm adds a position embedding to the CLS token too (`no_embed_class=False`); ours has
  none, so that slot is written as zeros. With registers we use timm's `no_embed_class=True`
  (position embeddings on patches only, as DINOv2-with-registers and ours).
- model.gelu='tanh' is timm's act_layer='gelu_tanh'; 'exact' is its default nn.GELU.
- model.embedding_dim (a linear head on the final CLS) is timm's classifier head
  (`num_classes`), as in the authors' runs.

`timm_arguments(model)` gives `timm.create_model`'s keyword arguments (a registered name such
as 'vit_small_patch8_224' plus only what differs from it); `timm_state_dict(flat, model)`
renames and transposes the flat float32 arrays of `encoder.flat_params` to timm's names
(`load_state_dict(..., strict=True)` loads them). numpy only: nothing here imports torch.
"""
from __future__ import annotations

import numpy as np

# timm's registered ViTs: name -> (width, depth, mlp_dim, num_heads, patch_size), the
# model_args of timm/models/vision_transformer.py (ours 'g' is timm's "gigantic", ViT-G/14
# of Zhai et al. 2022, the paper's 1.8B ViT; timm's 'giant' is a narrower 1B model).
TIMM_VITS = {
    'vit_tiny_patch16_224': (192, 12, 768, 3, 16),
    'vit_small_patch8_224': (384, 12, 1536, 6, 8),
    'vit_small_patch16_224': (384, 12, 1536, 6, 16),
    'vit_small_patch32_224': (384, 12, 1536, 6, 32),
    'vit_base_patch8_224': (768, 12, 3072, 12, 8),
    'vit_base_patch16_224': (768, 12, 3072, 12, 16),
    'vit_base_patch32_224': (768, 12, 3072, 12, 32),
    'vit_large_patch14_224': (1024, 24, 4096, 16, 14),
    'vit_large_patch16_224': (1024, 24, 4096, 16, 16),
    'vit_large_patch32_224': (1024, 24, 4096, 16, 32),
    'vit_huge_patch14_224': (1280, 32, 5120, 16, 14),
    'vit_gigantic_patch14_224': (1664, 48, 8192, 16, 14),
}
# The name used (with explicit sizes) when no registered ViT has our width and depth.
FALLBACK = 'vit_base_patch16_224'


def _timm_name(shape: tuple) -> str:
  """The registered name with our exact (width, depth, mlp, heads, patch); else the one with
  our (width, depth, mlp, heads) and another patch size; else FALLBACK."""
  for name, sizes in TIMM_VITS.items():
    if sizes == shape:
      return name
  for name, sizes in TIMM_VITS.items():
    if sizes[:4] == shape[:4]:
      return name
  return FALLBACK


def timm_arguments(model: dict, *, input_size: int, channels: int) -> dict:
  """`timm.create_model(**timm_arguments(...))` builds our encoder's architecture.

  model: the 'model' entry of an export's config.json (width, depth, mlp_dim, num_heads,
  patch_size, num_registers, gelu). The result is JSON-serialisable.
  """
  shape = (model['width'], model['depth'], model['mlp_dim'], model['num_heads'],
           model['patch_size'])
  name = _timm_name(shape)
  # num_classes: timm's head, our model.embedding_dim (0: none, the pooled CLS is the output).
  args = {'model_name': name, 'pretrained': False, 'num_classes': model['head_dim'],
          'img_size': input_size}
  width, depth, mlp_dim, num_heads, patch = TIMM_VITS[name]
  if (width, depth, num_heads) != shape[:2] + shape[3:4]:
    args.update(embed_dim=shape[0], depth=shape[1], num_heads=shape[3])
  if mlp_dim * shape[0] != shape[2] * width or width != shape[0]:
    ratio = shape[2] / shape[0]
    if int(shape[0] * ratio) != shape[2]:      # timm builds int(width * mlp_ratio) hidden units
      raise ValueError(f'timm cannot express mlp_dim {shape[2]} at width {shape[0]}')
    args['mlp_ratio'] = ratio
  if patch != shape[4]:
    args['patch_size'] = shape[4]
  if channels != 3:
    args['in_chans'] = channels
  if model.get('num_registers'):
    args.update(reg_tokens=model['num_registers'], no_embed_class=True)
  if model['gelu'] == 'tanh':
    args['act_layer'] = 'gelu_tanh'
  return args


def timm_state_dict(flat: dict[str, np.ndarray], model: dict) -> dict[str, np.ndarray]:
  """encoder.flat_params names ('encoder/block_0/attn/qkv_kernel', ...) -> timm's state dict
  ('blocks.0.attn.qkv.weight', ...), float32, torch layouts (Linear: (out, in); Conv2d:
  (out, in, kh, kw))."""
  width = model['width']

  def get(name):
    return np.asarray(flat['encoder/' + name], np.float32)

  pos = get('pos_embedding')
  if not model.get('num_registers'):   # timm's CLS position slot; ours has no such embedding
    pos = np.concatenate([np.zeros((1, 1, width), np.float32), pos], axis=1)
  out = {
      'cls_token': get('cls'),
      'pos_embed': pos,
      'patch_embed.proj.weight': get('patch_embed/kernel').transpose(3, 2, 0, 1),
      'patch_embed.proj.bias': get('patch_embed/bias'),
      'norm.weight': get('final_norm/scale'),
      'norm.bias': get('final_norm/bias'),
  }
  if model.get('num_registers'):
    out['reg_token'] = get('registers')
  if model.get('head_dim'):
    out['head.weight'] = get('head/kernel').T
    out['head.bias'] = get('head/bias')
  for i in range(model['depth']):
    b, t = f'block_{i}/', f'blocks.{i}.'
    out.update({
        t + 'norm1.weight': get(b + 'norm1/scale'),
        t + 'norm1.bias': get(b + 'norm1/bias'),
        # (width, 3, heads, head_dim): timm's qkv output is laid out (3, heads, head_dim) too.
        t + 'attn.qkv.weight': get(b + 'attn/qkv_kernel').reshape(width, 3 * width).T,
        t + 'attn.qkv.bias': get(b + 'attn/qkv_bias').reshape(3 * width),
        t + 'attn.proj.weight': get(b + 'attn/out_kernel').reshape(width, width).T,
        t + 'attn.proj.bias': get(b + 'attn/out_bias'),
        t + 'norm2.weight': get(b + 'norm2/scale'),
        t + 'norm2.bias': get(b + 'norm2/bias'),
        t + 'mlp.fc1.weight': get(b + 'mlp_in/kernel').T,
        t + 'mlp.fc1.bias': get(b + 'mlp_in/bias'),
        t + 'mlp.fc2.weight': get(b + 'mlp_out/kernel').T,
        t + 'mlp.fc2.bias': get(b + 'mlp_out/bias'),
    })
  expected = len(flat)
  if len(out) != expected:
    raise ValueError(f'{expected} encoder arrays but {len(out)} timm tensors: the ViT layout '
                     'changed without timm_format.py')
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_timm_state_dict(state: dict, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
  """The inverse of timm_state_dict, onto our encoder's names and shapes (`expected`:
  encoder.flat_shapes of the run's encoder): float32 arrays named 'encoder/...'.

  timm adds a position embedding to the CLS token; ours has none, so that slot is folded
  into the CLS token (the same input to the first block). Keys that do not fit, and names of
  ours that no key fills, are left to the caller (init_from lists them as mismatches);
  timm's parameter-free and classifier-only keys are ignored.
  """
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  out = {}

  def put(name, value):
    shape = expected.get('encoder/' + name)
    if shape is not None and value.size == int(np.prod(shape)):
      value = value.reshape(shape)
    out['encoder/' + name] = value

  direct = {'cls_token': 'cls', 'reg_token': 'registers', 'patch_embed.proj.bias': 'patch_embed/bias',
            'norm.weight': 'final_norm/scale', 'norm.bias': 'final_norm/bias', 'head.bias': 'head/bias'}
  for key, name in direct.items():
    if key in state:
      put(name, state[key])
  if 'patch_embed.proj.weight' in state:
    put('patch_embed/kernel', state['patch_embed.proj.weight'].transpose(2, 3, 1, 0))
  if 'head.weight' in state:
    put('head/kernel', state['head.weight'].T)
  if 'pos_embed' in state:
    pos = state['pos_embed']
    ours = expected.get('encoder/pos_embedding')
    if ours is not None and pos.shape[1] == ours[1] + 1 and 'cls_token' in state:
      put('cls', state['cls_token'] + pos[:, :1])    # timm's CLS position slot, folded in
      pos = pos[:, 1:]
    put('pos_embedding', pos)
  per_block = {'norm1.weight': 'norm1/scale', 'norm1.bias': 'norm1/bias',
               'attn.qkv.bias': 'attn/qkv_bias', 'attn.proj.bias': 'attn/out_bias',
               'norm2.weight': 'norm2/scale', 'norm2.bias': 'norm2/bias',
               'mlp.fc1.bias': 'mlp_in/bias', 'mlp.fc2.bias': 'mlp_out/bias'}
  transposed = {'attn.qkv.weight': 'attn/qkv_kernel', 'attn.proj.weight': 'attn/out_kernel',
                'mlp.fc1.weight': 'mlp_in/kernel', 'mlp.fc2.weight': 'mlp_out/kernel'}
  for key, value in state.items():
    if not key.startswith('blocks.'):
      continue
    _, index, rest = key.split('.', 2)
    if rest in per_block:
      put(f'block_{index}/{per_block[rest]}', value)
    elif rest in transposed:
      put(f'block_{index}/{transposed[rest]}', value.T)
    else:
      out[f'timm:{key}'] = value              # not ours: reported as unexpected
  return out


# ----------------------------------------------------------------------------- ResNets
# timm's / torchvision's ResNet state dict -> ours (models/resnet.py): the same module names,
# 'layer2.0.downsample.1' written 'layer2_0/downsample_1'; BatchNorm running statistics are
# variables of flax's 'batch_stats' collection, not parameters.
_RESNET_LEAVES = {'weight': ('params', 'kernel'), 'bias': ('params', 'bias'),
                  'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def resnet_from_timm_state_dict(state: dict) -> dict[str, np.ndarray]:
  """{'params/encoder/conv1/kernel': HWIO array, 'batch_stats/encoder/bn1/mean': ..., ...}
  from a timm or torchvision ResNet state dict (float32; conv kernels OIHW -> HWIO, the
  classifier 'fc' (O, I) -> (I, O); BatchNorm 'weight' -> 'scale'). num_batches_tracked is
  dropped (flax keeps no counter)."""
  out = {}
  for key, value in state.items():
    value = np.asarray(value, np.float32)
    *path, leaf = key.split('.')
    if leaf == 'num_batches_tracked':
      continue
    names = []
    for part in path:
      if part.isdigit() and names:
        names[-1] += f'_{part}'         # layer2.0 -> layer2_0, downsample.1 -> downsample_1
      else:
        names.append(part)
    collection, name = _RESNET_LEAVES.get(leaf, ('params', leaf))
    if leaf == 'weight' and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif leaf == 'weight' and value.ndim == 2:
      value = value.T
    elif leaf == 'weight':
      name = 'scale'                    # BatchNorm's weight
    out['/'.join([collection, 'encoder', *names, name])] = np.ascontiguousarray(value)
  return out
