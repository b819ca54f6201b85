"""The LeJEPA model: encoder (ViT or ResNet) + projector + online probe, and every output read
from it.

The model owns its outputs: the projector's input (`embedding`), the projections the loss
sees, and the frozen-evaluation features of each kind (FEATURE_KINDS) with their widths
(`feature_dims`). Training, evaluators, diagnostics, export and plan ask it for them.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lejepa_jax import config_schema
from lejepa_jax.models import resnet
from lejepa_jax.models.heads import LinearProbe, Projector
from lejepa_jax.models.resnet import ResNet, ResNetConfig
from lejepa_jax.models.vit import ViT, ViTConfig, vit_config

# Feature kinds the frozen evaluators can read (eval.features, or an evaluator's `features`).
FEATURE_KINDS = {
    'probe': 'CLS tokens of the last two blocks, concatenated, before the final LayerNorm (the '
             "paper's linear-probe features); ResNets: the pooled features",
    'embedding': "the final-LayerNorm CLS token (DINO's k-NN features; timm's pooled output); "
                 'ResNets: the pooled features',
    'head': 'the linear head on the final CLS (model.embedding_dim > 0; the projector input)',
    'projection': 'the projector output (BatchNorm with its running statistics)',
}


# model.online_probe_input -> the encoder output the online probe reads (stop-gradient).
ONLINE_PROBE_INPUTS = {
    'probe': 'probe_features',  # CLS tokens of the last two blocks (the paper's probe features)
    'embedding': 'embedding',   # what the projector reads: the head's output, or the final CLS
                                # (MINIMAL.md: LayerNorm + Linear on the 512-d timm head output)
}


def embedding(encoder_out: dict) -> jax.Array:
  """The projector's input: the linear head's output when the encoder has one, else the
  final-LayerNorm CLS token."""
  return encoder_out['head'] if 'head' in encoder_out else encoder_out['cls']


class LeJEPAModel(nn.Module):
  """Encoder + projector + online linear probe (on stop-gradient features)."""
  encoder: ViTConfig | ResNetConfig
  projector_hidden: tuple[int, ...]
  projector_out: int
  num_classes: int
  online_probe_input: str = 'probe'
  projector_activation: str = 'gelu'

  def setup(self):
    module = ResNet if isinstance(self.encoder, ResNetConfig) else ViT
    self.net = module(self.encoder, name='encoder')
    self.projector = Projector(self.projector_hidden, self.projector_out,
                               activation=self.projector_activation, name='projector')
    self.probe = LinearProbe(self.num_classes, name='probe')

  def __call__(self, global_views: jax.Array, local_views: jax.Array | None, *, train: bool):
    """global_views (B, Vg, H, W, C), local_views (B, Vl, h, w, C) or None.

    Returns projections (V, B, K) with the global views first, the online
    probe logits for the global views (Vg, B, classes) and the online probe's
    input features of the global views (Vg, B, F).
    """
    b, vg = global_views.shape[:2]
    # All views of an image run as one packed token sequence (see ViT).
    views = [global_views]
    if local_views is not None and local_views.shape[1]:
      views.append(local_views)
    # ViT: stochastic depth in training only; ResNet: BatchNorm on this batch's statistics.
    enc = self.net(views, train=train)
    emb = embedding(enc)                                            # (B, V, D), global first
    probe_input = emb if self.online_probe_input == 'embedding' else enc['probe_features']
    features = jax.lax.stop_gradient(probe_input[:, :vg]).reshape(b * vg, -1)
    v = emb.shape[1]
    proj = self.projector(emb.reshape(b * v, -1), train=train).reshape(b, v, -1)
    logits = self.probe(features).reshape(b, vg, -1)
    return {'proj': jnp.swapaxes(proj, 0, 1),
            'probe_logits': jnp.swapaxes(logits, 0, 1),
            'probe_features': jnp.swapaxes(features.reshape(b, vg, -1), 0, 1)}

  def features(self, images: jax.Array, kinds: tuple = ('probe',)) -> jax.Array:
    """Frozen-evaluation features of images (B, H, W, C): the FEATURE_KINDS `kinds`,
    concatenated in that order, from one encoder pass (deterministic: no drop path)."""
    enc = self.net(images)
    parts = {'probe': lambda: enc['probe_features'], 'embedding': lambda: enc['cls'],
             'head': lambda: enc['head'],
             'projection': lambda: self.projector(embedding(enc), train=False)}
    out = [parts[k]() for k in kinds]
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)

  def embed_and_project(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(projector input (B, D), projector output (B, K)) with train-mode BatchNorm (the
    statistics of this batch, as in the loss); apply with mutable=['batch_stats']."""
    emb = embedding(self.net(images))
    return emb, self.projector(emb, train=True)


def feature_dims(model: LeJEPAModel) -> dict[str, int]:
  """Width of each feature kind of `model`."""
  enc = model.encoder
  if isinstance(enc, ResNetConfig):
    dims = {'probe': enc.features, 'embedding': enc.features, 'projection': model.projector_out}
  else:
    dims = {'probe': 2 * enc.width, 'embedding': enc.width, 'projection': model.projector_out}
  if enc.head_dim:
    dims['head'] = enc.head_dim
  return dims


def build_model(config) -> LeJEPAModel:
  config = config_schema.resolve(config)
  m = config.model
  if resnet.is_resnet(m.variant):
    enc = resnet.resnet_config(m.variant, width=m.width, stem=m.stem, dtype=jnp.dtype(m.dtype),
                               head_dim=int(m.embedding_dim),
                               conv=m.conv)
  else:
    enc = _vit(config)
  probe_input = m.online_probe_input
  if probe_input not in ONLINE_PROBE_INPUTS:
    raise ValueError(f'model.online_probe_input must be one of {sorted(ONLINE_PROBE_INPUTS)}, '
                     f'got {probe_input!r}')
  activation = m.projector_activation
  if activation not in Projector.ACTIVATIONS:
    raise ValueError(f'model.projector_activation must be one of '
                     f'{sorted(Projector.ACTIVATIONS)}, got {activation!r}')
  return LeJEPAModel(encoder=enc, projector_hidden=tuple(m.projector_hidden),
                     projector_out=m.projector_out, num_classes=config.data.num_classes,
                     online_probe_input=probe_input, projector_activation=activation)


def _vit(config) -> ViTConfig:
  m = config.model
  # width/depth/mlp_dim/num_heads override the variant table when set (> 0).
  sizes = {k: m[k] or None for k in ('width', 'depth', 'mlp_dim', 'num_heads')}
  return vit_config(m.variant, patch_size=m.patch_size, image_size=config.data.global_size,
                    **sizes, num_registers=m.num_registers, remat=m.remat, scan=m.scan,
                    attention=m.attention or None, cls_only_last=m.cls_only_last,
                    drop_path_rate=float(m.drop_path_rate), gelu=m.gelu,
                    head_dim=int(m.embedding_dim), dtype=jnp.dtype(m.dtype))
