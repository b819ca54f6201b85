"""Heads on top of the encoder: the BatchNorm MLP projector and a linear probe."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Projector(nn.Module):
  """MLP with BatchNorm and an activation between layers: hidden_dims..., then out_dim.

  activation 'relu' is torchvision.ops.MLP's default, the authors' projector (MINIMAL.md:
  MLP(512, [2048, 2048, proj_dim], norm_layer=BatchNorm1d)); 'gelu' (tanh approximation)
  is what this project used first.

  BatchNorm statistics are taken over the global batch (all views, all
  devices): under jit with sharded arrays XLA reduces across devices.
  """
  hidden_dims: Sequence[int]
  out_dim: int
  activation: str = 'gelu'
  ACTIVATIONS = {'gelu': nn.gelu, 'relu': nn.relu}

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i, dim in enumerate(self.hidden_dims):
      x = nn.Dense(dim, name=f'dense_{i}',
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('embed', 'mlp')),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f'bn_{i}',
                       scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('mlp',)),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)))(x)
      x = self.ACTIVATIONS[self.activation](x)
    return nn.Dense(self.out_dim, name='out',
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('mlp', None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x)


class LinearProbe(nn.Module):
  """LayerNorm then a linear classifier (the paper's probe head)."""
  num_classes: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    x = nn.LayerNorm(epsilon=1e-6, name='norm')(features.astype(jnp.float32))
    return nn.Dense(self.num_classes, name='head', kernel_init=nn.initializers.zeros)(x)
