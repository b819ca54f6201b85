"""Models: the ViT encoder, projector and probe heads, and the LeJEPA wrapper."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lejepa_jax.models.heads import LinearProbe, Projector
from lejepa_jax.models.vit import VARIANTS, ViT, ViTConfig, vit_config


class LeJEPAModel(nn.Module):
  """Encoder + projector + online linear probe (on stop-gradient features)."""
  encoder: ViTConfig
  projector_hidden: tuple[int, ...]
  projector_out: int
  num_classes: int

  def setup(self):
    self.vit = ViT(self.encoder, name='encoder')
    self.projector = Projector(self.projector_hidden, self.projector_out, name='projector')
    self.probe = LinearProbe(self.num_classes, name='probe')

  def __call__(self, global_views: jax.Array, local_views: jax.Array | None, *, train: bool):
    """global_views (B, Vg, H, W, C), local_views (B, Vl, h, w, C) or None.

    Returns projections (V, B, K) with the global views first, the online
    probe logits for the global views (Vg, B, classes) and the encoder's
    probe features of the global views (Vg, B, F).
    """
    b, vg = global_views.shape[:2]
    # All views of an image run as one packed token sequence (see ViT).
    views = [global_views]
    if local_views is not None and local_views.shape[1]:
      views.append(local_views)
    enc = self.vit(views, train=train)      # stochastic depth in training only
    emb = enc['cls']                                                # (B, V, D), global first
    features = jax.lax.stop_gradient(enc['probe_features'][:, :vg]).reshape(b * vg, -1)
    v = emb.shape[1]
    proj = self.projector(emb.reshape(b * v, -1), train=train).reshape(b, v, -1)
    logits = self.probe(features).reshape(b, vg, -1)
    return {'proj': jnp.swapaxes(proj, 0, 1),
            'probe_logits': jnp.swapaxes(logits, 0, 1),
            'probe_features': jnp.swapaxes(features.reshape(b, vg, -1), 0, 1)}

  def features(self, images: jax.Array) -> jax.Array:
    """Frozen-evaluation features of images (B, H, W, C)."""
    return self.vit(images)['probe_features']


def build_model(config) -> LeJEPAModel:
  m = config.model
  # width/depth/mlp_dim/num_heads override the variant table when set (> 0).
  sizes = {k: m.get(k) or None for k in ('width', 'depth', 'mlp_dim', 'num_heads')}
  enc = vit_config(m.variant, patch_size=m.patch_size, image_size=config.data.global_size,
                   **sizes, num_registers=m.get('num_registers', 0),
                   remat=m.get('remat', 'none'), scan=m.get('scan', True),
                   attention=m.get('attention') or None,
                   cls_only_last=m.get('cls_only_last', True),
                   drop_path_rate=float(m.get('drop_path_rate', 0.0)),
                   dtype=jnp.dtype(m.get('dtype', 'float32')))
  return LeJEPAModel(encoder=enc, projector_hidden=tuple(m.projector_hidden),
                     projector_out=m.projector_out, num_classes=config.data.num_classes)


__all__ = ['LeJEPAModel', 'LinearProbe', 'Projector', 'VARIANTS', 'ViT', 'ViTConfig',
           'build_model', 'vit_config']
