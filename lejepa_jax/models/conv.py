"""A convolution written as one matmul per kernel tap, for XLA:CPU.

XLA:CPU's convolutions are slow where a ResNet spends its time on small images: a 14 px
ResNet-18 forward pass on 256 images took 5.9 s, 4.9 s of it more than the same network at
28 px on 128 images (the same multiply-adds x 0.5), and the kernel gradient of every layer is
slow at any size. Written as y = sum over taps (i, j) of X_shifted(i, j) @ K[i, j] (each a
strided slice of the padded input times one (C_in, C_out) matrix), the forward pass and both
gradients (autodiff: matmuls and pads) are plain matmuls, which XLA:CPU runs fast. Measured
on a 2-core AVX2 EPYC VM, ResNet-18 ('cifar' stem), forward / gradient in seconds:
14 px x 256 images 5.93 / 13.1 with XLA's convolution, 0.57 / 1.67 with this one;
28 px x 128 images 1.08 / 7.90 and 1.09 / 3.20. The function is the same convolution
(tests/test_resnet.py: value and gradients against `lax.conv_general_dilated`).
`model.conv='matmul'` picks it (the CPU configs); accelerators keep XLA's ('xla').
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def conv_general_dilated_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                rhs_dilation=None, dimension_numbers=None,
                                feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for flax's nn.Conv(conv_general_dilated=...): NHWC inputs,
  HWIO kernels, explicit padding, no dilation or feature groups."""
  if any(d not in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())):
    raise ValueError('conv_general_dilated_matmul: dilation is not supported')
  if feature_group_count != 1 or isinstance(padding, str):
    raise ValueError('conv_general_dilated_matmul: explicit padding and one group only')
  if dimension_numbers is not None and tuple(dimension_numbers.lhs_spec) != (0, 3, 1, 2):
    raise ValueError(f'conv_general_dilated_matmul: NHWC only, got {dimension_numbers}')
  kh, kw, cin, cout = rhs.shape
  n, h, w, _ = lhs.shape
  (top, bottom), (left, right) = padding
  sh, sw = window_strides
  padded = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
  ho, wo = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(padded, (0, i, j, 0),
                         (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin), (1, sh, sw, 1))
      y = jnp.dot(window.reshape(-1, cin), rhs[i, j], precision=precision)
      out = y if out is None else out + y
  return out.reshape(n, ho, wo, cout)
