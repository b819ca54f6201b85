"""Multi-crop augmentations in NumPy and Pillow, in two stages (run inside Grain threads).

1. Per record (`crop_views`): one rng call draws every choice of every view (a row of
   uniforms per view), and the crops are made in uint8: RandomResizedCrop's box resized with
   Pillow's bilinear filter (antialiased when it shrinks: torchvision's PIL path), by Pillow
   itself on large images and by cached matrices that reproduce its filter on small ones
   (where Pillow's per-call overhead dominates), then the horizontal flip.
2. Per batch (`finish_views`): the photometric steps on all views of the batch at once in
   float32: colour jitter (its four ops in a random order per view), grayscale, Gaussian
   blur, solarize, normalisation. Vectorised over the batch, the per-call overhead of NumPy
   is paid once per batch, not once per view.

The order of the steps is torchvision's: crop, flip, jitter, grayscale, blur, solarize,
normalise. Evaluation views are one deterministic centre crop resized the same way
(`eval_view`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from PIL import Image
from scipy import ndimage

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_CROP_TRIES = 10          # torchvision's RandomResizedCrop tries ten boxes before its fallback


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  size: int
  scale: tuple[float, float]
  ratio: tuple[float, float] = (3 / 4, 4 / 3)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """Photometric settings shared by all views (defaults: the authors' README recipe, configs/RECIPES.md)."""
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


# ---------------------------------------------------------------- stage 1: per record

# Columns of the uniforms drawn for one view.
_SCALE = slice(0, _CROP_TRIES)
_RATIO = slice(_CROP_TRIES, 2 * _CROP_TRIES)
_TOP, _LEFT, _FLIP, _JITTER = (2 * _CROP_TRIES + i for i in range(4))
_FACTORS = slice(2 * _CROP_TRIES + 4, 2 * _CROP_TRIES + 8)
_ORDER = slice(2 * _CROP_TRIES + 8, 2 * _CROP_TRIES + 12)
_GRAY, _BLUR, _SIGMA, _SOLARIZE = (2 * _CROP_TRIES + 12 + i for i in range(4))
NUM_UNIFORMS = 2 * _CROP_TRIES + 16


def crop_box(u: list, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """(top, left, h, w) from one view's uniforms u (a list of NUM_UNIFORMS floats).

  torchvision's RandomResizedCrop sampling: the first of ten tries with area fraction in
  `scale` and aspect in `ratio` that fits, else the largest centred box with aspect ratio
  clamped to `ratio`. Plain Python: faster than NumPy on a handful of numbers.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for try_scale, try_ratio in zip(u[_SCALE], u[_RATIO]):
    target = area * (scale[0] + try_scale * (scale[1] - scale[0]))
    aspect = math.exp(log_lo + try_ratio * (log_hi - log_lo))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(u[_TOP] * (height - h + 1)), int(u[_LEFT] * (width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def photometric_draws(u: np.ndarray, spec: AugmentSpec) -> dict:
  """The per-view photometric choices, from the same rows of uniforms as the crop boxes.

  jitter factors: brightness, contrast, saturation in [1 - a, 1 + a], hue shift in [-h, h];
  order: a random permutation of the four ops; blur_sigma: 0 where no blur is applied.
  """
  low = np.array([1 - spec.brightness, 1 - spec.contrast, 1 - spec.saturation, -spec.hue])
  high = np.array([1 + spec.brightness, 1 + spec.contrast, 1 + spec.saturation, spec.hue])
  sigma = spec.blur_sigma[0] + u[:, _SIGMA] * (spec.blur_sigma[1] - spec.blur_sigma[0])
  return {
      'jitter': u[:, _JITTER] < spec.jitter_prob,
      'factors': (low + u[:, _FACTORS] * (high - low)).astype(np.float32),
      'order': np.argsort(u[:, _ORDER], axis=1).astype(np.int32),
      'gray': u[:, _GRAY] < spec.grayscale_prob,
      'blur_sigma': np.where(u[:, _BLUR] < spec.blur_prob, sigma, 0.0).astype(np.float32),
      'solarize': u[:, _SOLARIZE] < spec.solarize_prob,
  }


def _checked(image: np.ndarray) -> np.ndarray:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'augmentations take uint8 (H, W, 1 or 3) images, got {image.dtype} '
                     f'{image.shape}')
  return image


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


@functools.lru_cache(maxsize=1 << 16)
def resample_matrix(start: int, length: int, in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of Pillow's bilinear resize of [start, start+length).

  Pillow's filter exactly: a triangle widened by the shrink factor when shrinking
  (antialiasing), weights normalised over the pixels inside the image. Cached: small
  images have few distinct (start, length) pairs.
  """
  step = length / out_size
  widen = max(step, 1.0)
  centres = start + (np.arange(out_size) + 0.5) * step
  first = np.maximum((centres - widen + 0.5).astype(np.int64), 0)    # Pillow's int() truncation
  last = np.minimum((centres + widen + 0.5).astype(np.int64), in_size)
  pixels = np.arange(in_size)
  weights = np.maximum(0.0, 1.0 - np.abs((pixels - centres[:, None] + 0.5) / widen))
  weights *= (pixels >= first[:, None]) & (pixels < last[:, None])
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


# Images up to this many pixels are resized by cached matrices (the per-call overhead of
# Pillow dominates there); bigger ones by Pillow, whose filter the matrices reproduce.
_MATRIX_MAX_PIXELS = 64 * 64


def _resize_crops(image: np.ndarray, boxes: list, size: int) -> np.ndarray:
  """uint8 (V, size, size, C) bilinear resizes of the boxes (top, left, h, w) of image."""
  height, width, channels = image.shape
  if not boxes:
    return np.zeros((0, size, size, channels), np.uint8)
  if height * width <= _MATRIX_MAX_PIXELS:
    rows = np.stack([resample_matrix(t, h, height, size) for t, _, h, _ in boxes])
    cols = np.stack([resample_matrix(l, w, width, size) for _, l, _, w in boxes])
    x = np.moveaxis(image, -1, 0).astype(np.float32)                      # (C, H, W)
    y = np.matmul(np.matmul(rows[:, None], x[None]), cols[:, None].swapaxes(-1, -2))
    return np.moveaxis(np.clip(np.rint(y), 0, 255).astype(np.uint8), 1, -1)
  pil = _to_pil(image)
  # Pasted side by side into one canvas: one array conversion per view size, not per view.
  canvas = Image.new(pil.mode, (size * len(boxes), size))
  for i, (top, left, h, w) in enumerate(boxes):
    canvas.paste(pil.resize((size, size), Image.Resampling.BILINEAR,
                            box=(left, top, left + w, top + h)), (i * size, 0))
  return np.asarray(canvas).reshape(size, len(boxes), size, channels).swapaxes(0, 1)


def crop_views(rng: np.random.Generator, image: np.ndarray,
               views: list[tuple[ViewSpec, int]], spec: AugmentSpec) -> list[tuple[np.ndarray, dict]]:
  """Crops of one uint8 (H, W, C) image: for each (view, count) in `views`, uint8
  (count, size, size, C) and their draws (`photometric_draws`, for `finish_views`).

  One rng call for all views of the record.
  """
  height, width, _ = _checked(image).shape
  u = rng.random((sum(count for _, count in views), NUM_UNIFORMS))
  draws = photometric_draws(u, spec)
  rows = u.tolist()
  out, start = [], 0
  for view, count in views:
    boxes = [crop_box(r, height, width, view.scale, view.ratio) for r in rows[start:start + count]]
    crops = _resize_crops(image, boxes, view.size)
    flip = (u[start:start + count, _FLIP] < spec.flip_prob)[:, None, None, None]
    out.append((np.ascontiguousarray(np.where(flip, crops[:, :, ::-1], crops)),
                {k: v[start:start + count] for k, v in draws.items()}))
    start += count
  return out


# ---------------------------------------------------------------- stage 2: per batch

def _grayscale(x: np.ndarray) -> np.ndarray:
  if x.shape[-1] == 1:
    return x
  # three scaled adds: much faster than a matmul with an inner dimension of 3
  return (x[..., 0:1] * _LUMA[0] + x[..., 1:2] * _LUMA[1]) + x[..., 2:3] * _LUMA[2]


def _adjust_hue(x: np.ndarray, shift) -> np.ndarray:
  """Rotates hue by `shift` turns (HSV hue shift, as torchvision's adjust_hue).

  `shift` is a number or broadcasts against x's leading axes, e.g. (N, 1, 1) for (N, H, W, 3).
  Back from HSV without a six-way select: channel c is V - (V - min) * clip(min(k, 4 - k), 0, 1)
  with k = (n_c + 6 h) mod 6, n = (5, 3, 1) for (R, G, B). Channels-first and np.floor
  instead of np.mod: several times faster on large views.
  """
  r, g, b = np.ascontiguousarray(np.moveaxis(x, -1, 0))
  maxc = np.maximum(np.maximum(r, g), b)
  delta = maxc - np.minimum(np.minimum(r, g), b)
  inv = np.float32(1.0) / np.maximum(delta, np.float32(1e-12))
  # hue in sixths of a turn
  h = np.where(maxc == r, (g - b) * inv,
               np.where(maxc == g, (b - r) * inv + np.float32(2.0), (r - g) * inv + np.float32(4.0)))
  h += np.float32(6.0) * np.asarray(shift, np.float32)
  out = np.empty((3,) + h.shape, np.float32)
  for channel, n in enumerate((5.0, 3.0, 1.0)):
    k = h + np.float32(n)
    k -= np.float32(6.0) * np.floor(k * np.float32(1.0 / 6.0))
    ramp = np.minimum(k, np.float32(4.0) - k)
    np.clip(ramp, 0.0, 1.0, out=ramp)
    np.subtract(maxc, ramp * delta, out=out[channel])
  return np.moveaxis(out, 0, -1)


def _per_view(f: np.ndarray) -> np.ndarray:
  return f[:, None, None, None]


def _brightness(x, f):
  return x * _per_view(f)


def _contrast(x, f):          # around each view's mean luma
  mean = _per_view(_grayscale(x).mean(axis=(1, 2, 3)))
  return (x - mean) * _per_view(f) + mean


def _saturation(x, f):        # around each pixel's luma
  gray = _grayscale(x)
  return (x - gray) * _per_view(f) + gray


def _hue(x, f):
  return _adjust_hue(x, f[:, None, None])


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def color_jitter(x: np.ndarray, apply: np.ndarray, factors: np.ndarray,
                 order: np.ndarray) -> np.ndarray:
  """Brightness, contrast, saturation, hue in each view's own order, on views where `apply`.

  x: (N, H, W, C) in [0, 1], modified in place; factors (N, 4); order (N, 4) permutations.
  Every op clips to [0, 1], as torchvision's. On single-channel views only brightness and
  contrast apply.
  """
  rgb = x.shape[-1] == 3
  for position in range(4):
    for op, fn in enumerate(_JITTER_OPS):
      if op >= 2 and not rgb:
        continue
      views = np.flatnonzero(apply & (order[:, position] == op))
      if views.size:
        x[views] = np.clip(fn(x[views], factors[views, op]), 0.0, 1.0)
  return x


def gaussian_kernels(sigmas: np.ndarray, radius: int) -> np.ndarray:
  """(N, 2 radius + 1) normalised Gaussian kernels, each cut at ceil(3 sigma)."""
  offsets = np.arange(-radius, radius + 1)
  own_radius = np.maximum(1, np.ceil(3.0 * sigmas))[:, None]
  kernels = np.where(np.abs(offsets) <= own_radius, np.exp(-0.5 * (offsets / sigmas[:, None]) ** 2), 0.0)
  return (kernels / kernels.sum(axis=1, keepdims=True)).astype(np.float32)


def _reflect_index(size: int, radius: int) -> np.ndarray:
  """Indices of a 'reflect' padding (d c b|a b c d), folded as often as the radius needs."""
  index = np.arange(-radius, size + radius)
  if size == 1:
    return np.zeros_like(index)
  period = 2 * (size - 1)
  index = np.mod(index, period)
  return np.where(index >= size, period - index, index)


def _blur_small(x: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
  """All views at once, one multiply-add per kernel tap and axis (small views)."""
  radius = int(max(1, math.ceil(3.0 * sigmas.max())))
  kernels = gaussian_kernels(sigmas, radius)
  for axis in (1, 2):
    size = x.shape[axis]
    padded = np.take(x, _reflect_index(size, radius), axis=axis)
    out = np.zeros_like(x)
    for j in range(2 * radius + 1):
      window = padded[:, j:j + size] if axis == 1 else padded[:, :, j:j + size]
      out += _per_view(kernels[:, j]) * window
    x = out
  return x


# Views of at least this many values are blurred one scipy call each (its C loop wins there);
# smaller ones all at once in NumPy (the per-call overhead wins there).
_SCIPY_BLUR_MIN_VALUES = 48 * 48


def gaussian_blur(x: np.ndarray, sigmas) -> np.ndarray:
  """Separable Gaussian blur of each view of x (N, H, W, C) with its sigma (N,) in pixels.

  Kernel radius ceil(3 sigma), 'reflect' borders (d c b|a b c d; scipy's 'mirror').
  """
  sigmas = np.asarray(sigmas, np.float64)
  if x[0].size < _SCIPY_BLUR_MIN_VALUES:
    return _blur_small(x, sigmas)
  out = np.empty_like(x)
  for i, sigma in enumerate(sigmas):
    radius = max(1, math.ceil(3.0 * sigma))
    ndimage.gaussian_filter(x[i], (sigma, sigma, 0), mode='mirror', truncate=radius / sigma,
                            output=out[i])
  return out


def finish_views(views: np.ndarray, draws: dict, spec: AugmentSpec) -> np.ndarray:
  """uint8 crops (..., S, S, C) + their draws -> augmented, normalised float32 views.

  Leading axes (e.g. batch, view) are flattened for the work and restored at the end.
  """
  lead, (size, _, channels) = views.shape[:-3], views.shape[-3:]
  x = views.reshape(-1, size, size, channels).astype(np.float32) * np.float32(1.0 / 255.0)
  d = {k: np.asarray(v).reshape(x.shape[0], *np.shape(v)[len(lead):]) for k, v in draws.items()}
  x = color_jitter(x, d['jitter'], d['factors'], d['order'])
  if channels == 3:
    gray = np.flatnonzero(d['gray'])
    x[gray] = _grayscale(x[gray])
  blurred = np.flatnonzero(d['blur_sigma'] > 0)
  if blurred.size:
    x[blurred] = gaussian_blur(x[blurred], d['blur_sigma'][blurred])
  solarized = np.flatnonzero(d['solarize'])
  if solarized.size:
    s = x[solarized]
    x[solarized] = np.where(s >= spec.solarize_threshold, 1.0 - s, s)
  return normalize(x, spec).reshape(*lead, size, size, channels)


# ---------------------------------------------------------------- evaluation

def normalize(x: np.ndarray, spec: AugmentSpec) -> np.ndarray:
  channels = x.shape[-1]
  mean = np.asarray(spec.mean[:channels], np.float32)
  inv_std = 1.0 / np.asarray(spec.std[:channels], np.float32)
  return ((x - mean) * inv_std).astype(np.float32, copy=False)


def eval_view(image: np.ndarray, size: int, spec: AugmentSpec, crop_fraction: float = 1.0) -> np.ndarray:
  """Deterministic evaluation view: centre square of `crop_fraction` of the shorter side,
  resized to `size` with the training crops' filter, normalised (float32 (size, size, C))."""
  height, width, _ = image.shape
  side = int(round(min(height, width) * crop_fraction))
  box = ((height - side) // 2, (width - side) // 2, side, side)
  crop = _resize_crops(_checked(image), [box], size)[0]
  return normalize(crop.astype(np.float32) * np.float32(1.0 / 255.0), spec)
