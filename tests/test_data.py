"""Augmentations against references, crop scales, and the Grain pipeline's determinism."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lejepa_jax.data import augment, pipeline, sources


def _data_config(**kw):
  c = ml_collections.ConfigDict(dict(
      name='fashion_mnist', dir='', num_global_views=2, num_local_views=3, global_size=16,
      local_size=8, global_scale=(0.3, 1.0), local_scale=(0.05, 0.3), channels=1,
      mean=(0.5,), std=(0.25,), num_threads=1, prefetch=2, num_workers=0,
      augment=dict(flip_prob=0.5, jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                   hue=0.1, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 1.0),
                   solarize_prob=0.2)))
  c.update(kw)
  return c


def _source(n=64, size=20, channels=1, seed=0):
  rng = np.random.default_rng(seed)
  return sources.ArraySource(rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
                             np.arange(n) % 10)


@pytest.mark.parametrize('scale', [(0.3, 1.0), (0.05, 0.3)])
def test_crop_boxes_respect_scale_and_ratio(scale):
  rng = np.random.default_rng(0)
  height, width = 224, 300
  areas, ratios = [], []
  for _ in range(2000):
    top, left, h, w = augment.random_resized_crop_box(rng, height, width, scale, (3 / 4, 4 / 3))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    areas.append(h * w / (height * width))
    ratios.append(w / h)
  areas = np.array(areas)
  # rounding to whole pixels moves the area by at most a pixel row/column
  assert areas.min() >= scale[0] * 0.97 and areas.max() <= scale[1] * 1.03
  assert areas.max() - areas.min() > 0.5 * (scale[1] - scale[0])  # the range is used
  assert min(ratios) > 0.7 and max(ratios) < 1.4


def test_resize_matrix_matches_jax_image_resize():
  image = np.random.default_rng(1).random((12, 12)).astype(np.float32)
  m = augment.resize_matrix(0, 12, 12, 7)
  ref = jax.image.resize(jnp.asarray(image), (7, 7), 'bilinear', antialias=False)
  np.testing.assert_allclose(m @ image @ m.T, ref, atol=1e-5)
  np.testing.assert_allclose(augment.resize_matrix(0, 12, 12, 12), np.eye(12), atol=1e-6)
  crop = augment.resize_matrix(3, 6, 12, 6)   # a 6-pixel crop at its own size is a selection
  np.testing.assert_allclose(crop @ image, image[3:9], atol=1e-6)


def test_blur_matrix_matches_scipy_reflect_filter():
  scipy_ndimage = pytest.importorskip('scipy.ndimage')
  x = np.random.default_rng(2).random(16)
  for sigma in (0.3, 1.0, 2.5):
    ref = scipy_ndimage.gaussian_filter1d(x, sigma, mode='mirror', truncate=np.ceil(3 * sigma) / sigma)
    np.testing.assert_allclose(augment.blur_matrix(16, sigma) @ x, ref, rtol=1e-5, atol=1e-6)


def test_hue_shift_matches_colorsys():
  import colorsys
  rgb = np.random.default_rng(3).random((5, 3)).astype(np.float32)
  out = augment._adjust_hue(rgb, 0.25)
  for i in range(5):
    h, s, v = colorsys.rgb_to_hsv(*rgb[i])
    np.testing.assert_allclose(out[i], colorsys.hsv_to_rgb((h + 0.25) % 1.0, s, v), atol=1e-5)


def test_multicrop_shapes_and_ranges():
  crop = pipeline.multi_crop(_data_config())
  record = _source()[0]
  out = crop(record, np.random.default_rng(0))
  assert out['global'].shape == (2, 16, 16, 1) and out['local'].shape == (3, 8, 8, 1)
  lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
  for views in (out['global'], out['local']):
    assert views.dtype == np.float32 and views.min() >= lo - 1e-5 and views.max() <= hi + 1e-5


def test_color_jitter_matches_closed_forms():
  x = np.random.default_rng(4).random((6, 6, 3)).astype(np.float32)
  luma = x @ np.array([0.299, 0.587, 0.114], np.float32)
  # Only one op active at a time (the others draw factor 1 or hue 0), recomputed in NumPy
  # from the same draw: brightness x*f, contrast around the mean luma, saturation around luma.
  for name, ref in [('brightness', lambda f: x * f),
                    ('contrast', lambda f: (x - luma.mean()) * f + luma.mean()),
                    ('saturation', lambda f: (x - luma[..., None]) * f + luma[..., None])]:
    spec = augment.AugmentSpec(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    spec = augment.AugmentSpec(**{**spec.__dict__, name: 0.4})
    f = np.random.default_rng(7).uniform([1 - spec.brightness, 1 - spec.contrast,
                                          1 - spec.saturation, 0], [1 + spec.brightness,
                                          1 + spec.contrast, 1 + spec.saturation, 0])
    f = f[['brightness', 'contrast', 'saturation'].index(name)]
    out = augment.color_jitter(np.random.default_rng(7), x.copy(), spec)
    np.testing.assert_allclose(out, np.clip(ref(f), 0, 1), atol=1e-5, err_msg=name)


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_pipeline_is_deterministic_for_a_seed_and_resumable():
  src, cfg = _source(), _data_config()
  a = _take(pipeline.train_dataset(src, cfg, seed=3, local_batch_size=8), 10)
  b = _take(pipeline.train_dataset(src, cfg, seed=3, local_batch_size=8), 10)
  c = _take(pipeline.train_dataset(src, cfg, seed=4, local_batch_size=8), 10)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]['global'], c[0]['global'])
  # epochs (8 batches of 64 records) are reshuffled: labels of epoch 2 differ in order
  first = np.concatenate([x['label'] for x in a[:8]])
  assert sorted(first) == sorted(np.arange(64) % 10)
  it = iter(pipeline.train_dataset(src, cfg, seed=3, local_batch_size=8))
  for _ in range(4):
    next(it)
  state = it.get_state()
  it2 = iter(pipeline.train_dataset(src, cfg, seed=3, local_batch_size=8))
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)['global'], a[4]['global'])


def test_pipeline_shards_by_process():
  images = np.zeros((64, 20, 20, 1), np.uint8)
  src, cfg = sources.ArraySource(images, np.arange(64)), _data_config()
  per_process = []
  for p in range(2):
    ds = pipeline.train_dataset(src, cfg, seed=0, local_batch_size=8, process_index=p, process_count=2)
    per_process.append(np.concatenate([b['label'] for b in _take(ds, 4)]))  # one epoch of 32
  # process p holds records p, p + 2, ...; together one epoch covers every record once
  assert set(per_process[0] % 2) == {0} and set(per_process[1] % 2) == {1}
  assert sorted(np.concatenate(per_process)) == list(range(64))


def test_eval_batches_cover_every_record_once_with_padding():
  src, cfg = _source(n=37), _data_config()
  seen = []
  for p in range(2):
    batches = list(pipeline.eval_batches(src, cfg, local_batch_size=8, process_index=p, process_count=2))
    assert len(batches) == 3
    for b in batches:
      assert b['image'].shape == (8, 16, 16, 1)
      seen.extend(b['label'][b['mask'] > 0].tolist())
  assert sorted(seen) == sorted(src.labels.tolist())


def test_fashion_mnist_source_reads_idx_files(tmp_path):
  import gzip
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  labels = np.array([3, 1, 4, 1, 5], np.uint8)
  with gzip.open(tmp_path / 't10k-images-idx3-ubyte.gz', 'wb') as f:
    f.write(bytes([0, 0, 8, 3]) + b''.join(int(d).to_bytes(4, 'big') for d in images.shape) + images.tobytes())
  with gzip.open(tmp_path / 't10k-labels-idx1-ubyte.gz', 'wb') as f:
    f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, 'big') + labels.tobytes())
  src = sources.fashion_mnist(str(tmp_path), 'test')
  assert len(src) == 5
  np.testing.assert_array_equal(src[2]['image'][..., 0], images[2])
  assert src[4]['label'] == 5
  with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
    sources.fashion_mnist(str(tmp_path), 'train')
