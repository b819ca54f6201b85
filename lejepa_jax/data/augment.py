"""Multi-crop augmentations on one image, in NumPy (run inside Grain workers).

Geometric steps are linear maps along each image axis, so a crop, its
bilinear resize, a horizontal flip and a Gaussian blur are each a small
(out, in) matrix: view = A @ image @ B^T per channel. That keeps every view
to a couple of matrix products whatever the image size.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  size: int
  scale: tuple[float, float]
  ratio: tuple[float, float] = (3 / 4, 4 / 3)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """Photometric settings shared by all views (REFERENCE.md defaults)."""
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: float = 0.5
  blur_sigma: tuple[float, float] = (0.1, 2.0)   # in pixels of the output crop
  solarize_prob: float = 0.2
  solarize_threshold: float = 0.5                # 128 / 255 on a [0, 1] scale
  mean: tuple[float, ...] = (0.485, 0.456, 0.406)
  std: tuple[float, ...] = (0.229, 0.224, 0.225)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float], ratio: tuple[float, float]):
  """(top, left, crop_h, crop_w) with area fraction in `scale` and aspect in `ratio`.

  Same sampling as torchvision's RandomResizedCrop: ten tries, then the
  largest centred crop with aspect ratio clamped to `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resize_matrix(start: int, length: int, in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) bilinear weights resampling [start, start+length) to out_size.

  Half-pixel centres (align_corners=False), edge-clamped, no antialiasing.
  """
  centres = start + (np.arange(out_size) + 0.5) * (length / out_size) - 0.5
  centres = np.clip(centres, 0, in_size - 1)
  lo = centres.astype(np.int64)              # floor: centres are >= 0
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (centres - lo).astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  m[rows, lo] = 1.0 - frac
  m[rows, hi] += frac                        # lo == hi only where frac == 0
  return m


def blur_matrix(size: int, sigma: float) -> np.ndarray:
  """(size, size) Gaussian blur, kernel radius ceil(3 sigma), 'reflect' borders (d c b|a b c d)."""
  radius = max(1, int(math.ceil(3.0 * sigma)))
  offsets = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
  kernel /= kernel.sum()
  cols = np.arange(size)[:, None] + offsets[None, :]
  if size > 1:
    period = 2 * (size - 1)
    cols = np.mod(cols, period)
    cols = np.where(cols >= size, period - cols, cols)
  else:
    cols = np.zeros_like(cols)
  rows = np.broadcast_to(np.arange(size)[:, None], cols.shape)
  flat = np.bincount((rows * size + cols).ravel(), np.broadcast_to(kernel, cols.shape).ravel(),
                     minlength=size * size)
  return flat.reshape(size, size).astype(np.float32)


def _apply(rows: np.ndarray, x: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """rows @ x @ cols^T on each channel of x (H, W, C) -> (out_h, out_w, C)."""
  y = np.matmul(rows, np.moveaxis(x, -1, 0))          # (C, out_h, W)
  return np.moveaxis(np.matmul(y, cols.T), 0, -1)


def _grayscale(x: np.ndarray) -> np.ndarray:
  if x.shape[-1] == 1:
    return x
  return (x @ _LUMA)[..., None]


def _adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
  """Rotates hue by `shift` turns (HSV hue shift, as torchvision's adjust_hue)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc, minc = x.max(-1), x.min(-1)
  v = maxc
  delta = maxc - minc
  s = np.where(maxc > 0, delta / np.maximum(maxc, 1e-12), 0.0)
  safe = np.maximum(delta, 1e-12)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = np.where(maxc == r, bc - gc, np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  h = (h + shift) % 1.0
  i = np.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = i.astype(np.int64) % 6
  choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
  out = np.zeros_like(x)
  for k, (cr, cg, cb) in enumerate(choices):
    mask = i == k
    out[..., 0] = np.where(mask, cr, out[..., 0])
    out[..., 1] = np.where(mask, cg, out[..., 1])
    out[..., 2] = np.where(mask, cb, out[..., 2])
  return out


def color_jitter(rng: np.random.Generator, x: np.ndarray, spec: AugmentSpec) -> np.ndarray:
  """Brightness, contrast, saturation, hue in random order on x in [0, 1].

  On single-channel images only brightness and contrast apply; the rng draws
  are the same either way so that determinism does not depend on channels.
  """
  low = np.array([1 - spec.brightness, 1 - spec.contrast, 1 - spec.saturation, -spec.hue])
  high = np.array([1 + spec.brightness, 1 + spec.contrast, 1 + spec.saturation, spec.hue])
  factors = rng.uniform(low, high)
  rgb = x.shape[-1] == 3
  for op in rng.permutation(4):
    f = factors[op]
    if op == 0:                                   # brightness
      x = x * f
    elif op == 1:                                 # contrast, around the mean luma
      mean = _grayscale(x).mean()
      x = (x - mean) * f + mean
    elif op == 2 and rgb:                         # saturation
      gray = _grayscale(x)
      x = (x - gray) * f + gray
    elif op == 3 and rgb:                         # hue
      x = _adjust_hue(x, f)
    else:
      continue
    np.clip(x, 0.0, 1.0, out=x)
  return x


def augment_view(rng: np.random.Generator, image: np.ndarray, view: ViewSpec,
                 spec: AugmentSpec) -> np.ndarray:
  """One augmented, normalised view (size, size, C) float32 of a uint8 (H, W, C) image."""
  height, width, channels = image.shape
  top, left, h, w = random_resized_crop_box(rng, height, width, view.scale, view.ratio)
  rows = resize_matrix(top, h, height, view.size)
  cols = resize_matrix(left, w, width, view.size)
  if rng.random() < spec.flip_prob:
    cols = cols[::-1]
  x = _apply(rows, image.astype(np.float32) * np.float32(1.0 / 255.0), cols)
  if rng.random() < spec.jitter_prob:
    x = color_jitter(rng, x, spec)
  if rng.random() < spec.grayscale_prob and channels == 3:
    x = np.repeat(_grayscale(x), 3, axis=-1)
  if rng.random() < spec.blur_prob:
    sigma = rng.uniform(*spec.blur_sigma)
    k = blur_matrix(view.size, sigma)
    x = _apply(k, x, k)
  if rng.random() < spec.solarize_prob:
    x = np.where(x >= spec.solarize_threshold, 1.0 - x, x)
  return normalize(x, spec)


def normalize(x: np.ndarray, spec: AugmentSpec) -> np.ndarray:
  channels = x.shape[-1]
  mean = np.asarray(spec.mean[:channels], np.float32)
  inv_std = 1.0 / np.asarray(spec.std[:channels], np.float32)
  return ((x - mean) * inv_std).astype(np.float32, copy=False)


def eval_view(image: np.ndarray, size: int, spec: AugmentSpec, crop_fraction: float = 1.0) -> np.ndarray:
  """Deterministic evaluation view: centre crop of `crop_fraction`, resized, normalised."""
  height, width, _ = image.shape
  side = int(round(min(height, width) * crop_fraction))
  rows = resize_matrix((height - side) // 2, side, height, size)
  cols = resize_matrix((width - side) // 2, side, width, size)
  x = _apply(rows, image.astype(np.float32) * np.float32(1.0 / 255.0), cols)
  return normalize(x, spec)
