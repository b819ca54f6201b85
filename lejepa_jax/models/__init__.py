"""Models: the ViT and ResNet encoders, projector and probe heads, and the LeJEPA wrapper."""
from lejepa_jax.models.heads import LinearProbe, Projector
from lejepa_jax.models.lejepa import (FEATURE_KINDS, ONLINE_PROBE_INPUTS, LeJEPAModel,
                                      build_model, embedding, feature_dims)
from lejepa_jax.models.resnet import ResNet, ResNetConfig, resnet_config
from lejepa_jax.models.vit import VARIANTS, ViT, ViTConfig, vit_config

__all__ = ['FEATURE_KINDS', 'LeJEPAModel', 'LinearProbe', 'ONLINE_PROBE_INPUTS', 'Projector',
           'ResNet', 'ResNetConfig', 'VARIANTS', 'ViT', 'ViTConfig', 'build_model', 'embedding', 'feature_dims',
           'resnet_config', 'vit_config']
