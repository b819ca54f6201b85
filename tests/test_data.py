"""Augmentations against references, crop scales, and the Grain pipelines: determinism,
resumption, and batches that do not depend on the number of processes reading them."""
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
  """Random images; labels are the record ids, so tests can follow records through a pipeline."""
  rng = np.random.default_rng(seed)
  return sources.ArraySource(rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
                             np.arange(n))


@pytest.mark.parametrize('scale', [(0.3, 1.0), (0.05, 0.3)])
def test_crop_boxes_respect_scale_and_ratio(scale):
  rng = np.random.default_rng(0)
  height, width = 224, 300
  areas, ratios = [], []
  for _ in range(2000):
    u = rng.random(augment.NUM_UNIFORMS).tolist()
    top, left, h, w = augment.crop_box(u, height, width, scale, (3 / 4, 4 / 3))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    areas.append(h * w / (height * width))
    ratios.append(w / h)
  areas = np.array(areas)
  # rounding to whole pixels moves the area by at most a pixel row/column
  assert areas.min() >= scale[0] * 0.97 and areas.max() <= scale[1] * 1.03
  assert areas.max() - areas.min() > 0.5 * (scale[1] - scale[0])  # the range is used
  assert min(ratios) > 0.7 and max(ratios) < 1.4


def test_crop_box_falls_back_to_the_centred_box_of_clamped_ratio():
  # a 10 x 100 strip: no box of ratio 3/4..4/3 with 90% of the area fits, so the fallback
  u = [0.99] * augment.NUM_UNIFORMS
  assert augment.crop_box(u, 10, 100, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 43, 10, 13)
  assert augment.crop_box(u, 100, 10, (0.9, 1.0), (3 / 4, 4 / 3)) == (43, 0, 13, 10)


def test_eval_view_is_pillows_centre_crop_and_resize():
  from PIL import Image
  image = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
  spec = augment.AugmentSpec()
  out = augment.eval_view(image, 224, spec, crop_fraction=0.875)
  side = round(300 * 0.875)                       # 262 px square at the centre
  top, left = (300 - side) // 2, (400 - side) // 2
  ref = np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BILINEAR,
                                                  box=(left, top, left + side, top + side)))
  np.testing.assert_allclose(out, augment.normalize(ref / np.float32(255), spec), atol=1e-5)
  small = image[:28, :28, :1]                     # whole image at its own size: unchanged
  np.testing.assert_allclose(augment.eval_view(small, 28, spec),
                             augment.normalize(small / np.float32(255), spec), atol=1e-6)


@pytest.mark.parametrize('box,size', [((0, 0, 28, 31), 28), ((3, 5, 11, 17), 14),
                                      ((2, 1, 25, 20), 14), ((0, 0, 28, 31), 40),
                                      ((5, 7, 9, 9), 28), ((1, 2, 20, 6), 3)])
def test_resample_matrix_is_pillows_bilinear_resize(box, size):
  from PIL import Image
  image = np.random.default_rng(2).random((28, 31)).astype(np.float32)
  top, left, h, w = box
  # Pillow on a float ('F') image: the same filter with no rounding to uint8
  ref = np.asarray(Image.fromarray(image, mode='F').resize(
      (size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)))
  rows, cols = augment.resample_matrix(top, h, 28, size), augment.resample_matrix(left, w, 31, size)
  np.testing.assert_allclose(rows @ image @ cols.T, ref, atol=1e-5)


@pytest.mark.parametrize('channels', [1, 3])
def test_small_and_large_images_are_cropped_alike(channels, monkeypatch):
  # Private helper and threshold: both resize paths on the same crops, chosen by that threshold.
  image = np.random.default_rng(3).integers(0, 256, (40, 50, channels), dtype=np.uint8)
  boxes = [(0, 0, 40, 50), (3, 5, 11, 17), (10, 2, 30, 33)]
  monkeypatch.setattr(augment, '_MATRIX_MAX_PIXELS', 10**9)
  matrices = augment._resize_crops(image, boxes, 24).astype(int)
  monkeypatch.setattr(augment, '_MATRIX_MAX_PIXELS', 0)
  pillow = augment._resize_crops(image, boxes, 24).astype(int)
  assert matrices.shape == pillow.shape == (3, 24, 24, channels)
  # Pillow rounds to uint8 between its two passes: one level apart at most
  assert np.abs(matrices - pillow).max() <= 1


def _blur_reference(x, sigma):
  """Explicit float64 Gaussian blur of a 2-D array: radius ceil(3 sigma), reflect (d c b|a b c d)."""
  radius = max(1, int(np.ceil(3 * sigma)))
  offsets = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
  kernel /= kernel.sum()

  def reflect(i, n):
    while not 0 <= i < n:
      i = -i if i < 0 else 2 * (n - 1) - i
    return i

  def along_rows(a):
    n = a.shape[0]
    return np.stack([sum(k * a[reflect(i + o, n)] for k, o in zip(kernel, offsets))
                     for i in range(n)])
  return along_rows(along_rows(x.astype(np.float64)).T).T


@pytest.mark.parametrize('scipy_from', [0, 10**9])   # per-view scipy calls / all views in NumPy
def test_gaussian_blur_matches_an_explicit_reflect_filter(scipy_from, monkeypatch):
  monkeypatch.setattr(augment, '_SCIPY_BLUR_MIN_VALUES', scipy_from)
  x = np.random.default_rng(2).random((3, 16, 16, 2)).astype(np.float32)
  sigmas = np.array([0.3, 1.0, 2.5])
  out = augment.gaussian_blur(x, sigmas)
  for i, sigma in enumerate(sigmas):
    for c in range(2):
      np.testing.assert_allclose(out[i, ..., c], _blur_reference(x[i, ..., c], sigma), atol=1e-5)
  # a 3-pixel view with a 7-pixel radius folds the reflection several times
  tiny = np.random.default_rng(3).random((1, 3, 3, 1)).astype(np.float32)
  np.testing.assert_allclose(augment.gaussian_blur(tiny, [2.2])[0, ..., 0],
                             _blur_reference(tiny[0, ..., 0], 2.2), atol=1e-5)


def test_hue_shift_matches_colorsys():
  # Private helper: the hue step alone against colorsys (jitter draws it among other steps).
  import colorsys
  rgb = np.random.default_rng(3).random((5, 3)).astype(np.float32)
  out = augment._adjust_hue(rgb, 0.25)
  for i in range(5):
    h, s, v = colorsys.rgb_to_hsv(*rgb[i])
    np.testing.assert_allclose(out[i], colorsys.hsv_to_rgb((h + 0.25) % 1.0, s, v), atol=1e-5)


def test_multicrop_shapes_and_ranges():
  cfg = _data_config()
  out = pipeline.augment_record(_source()[0], np.random.default_rng(0), cfg)
  assert out['global'].shape == (2, 16, 16, 1) and out['local'].shape == (3, 8, 8, 1)
  lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
  for views in (out['global'], out['local']):
    assert views.dtype == np.float32 and views.min() >= lo - 1e-5 and views.max() <= hi + 1e-5


def _jitter_reference(x, factors, order):
  """One view's colour jitter, op by op in float64, with colorsys for the hue."""
  import colorsys
  luma = np.array([0.299, 0.587, 0.114])
  x = x.astype(np.float64)
  for op in order:
    f = factors[op]
    if op == 0:
      x = x * f
    elif op == 1:
      m = (x @ luma).mean()
      x = (x - m) * f + m
    elif op == 2:
      g = (x @ luma)[..., None]
      x = (x - g) * f + g
    else:
      hsv = [colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)]
      x = np.array([colorsys.hsv_to_rgb((h + f) % 1.0, s, v) for h, s, v in hsv]).reshape(x.shape)
    x = np.clip(x, 0, 1)
  return x


def test_color_jitter_applies_each_views_ops_in_its_own_order():
  rng = np.random.default_rng(4)
  x = rng.random((6, 5, 5, 3)).astype(np.float32)
  factors = np.concatenate([rng.uniform(0.6, 1.4, (6, 3)), rng.uniform(-0.1, 0.1, (6, 1))], 1)
  order = np.stack([rng.permutation(4) for _ in range(6)])
  apply = np.array([True, True, True, True, False, True])
  out = augment.color_jitter(x.copy(), apply, factors.astype(np.float32), order)
  for i in range(6):
    ref = _jitter_reference(x[i], factors[i], order[i]) if apply[i] else x[i]
    np.testing.assert_allclose(out[i], ref, atol=2e-5, err_msg=f'view {i}, order {order[i]}')
  # the order matters (clipping and hue do not commute with the rest)
  flipped = augment.color_jitter(x.copy(), apply, factors.astype(np.float32), order[:, ::-1])
  assert np.abs(flipped - out).max() > 1e-3


def test_finish_views_on_grayscale_applies_only_brightness_contrast_blur_solarize():
  rng = np.random.default_rng(5)
  views = rng.integers(0, 256, (2, 3, 8, 8, 1), dtype=np.uint8)
  draws = augment.photometric_draws(rng.random((6, augment.NUM_UNIFORMS)), augment.AugmentSpec(
      jitter_prob=1.0, blur_prob=1.0, solarize_prob=1.0, mean=(0.5,), std=(0.25,)))
  draws = {k: v.reshape(2, 3, *v.shape[1:]) for k, v in draws.items()}
  spec = augment.AugmentSpec(mean=(0.5,), std=(0.25,))
  out = augment.finish_views(views, draws, spec)
  assert out.shape == views.shape and out.dtype == np.float32
  x = views.reshape(6, 8, 8, 1) / 255.0
  f, order, sigma = (draws[k].reshape(6, *draws[k].shape[2:]) for k in ('factors', 'order', 'blur_sigma'))
  scipy_ndimage = pytest.importorskip('scipy.ndimage')
  for i in range(6):
    y = x[i]
    for op in order[i]:
      if op == 0:
        y = np.clip(y * f[i, 0], 0, 1)
      elif op == 1:
        y = np.clip((y - y.mean()) * f[i, 1] + y.mean(), 0, 1)
    y = scipy_ndimage.gaussian_filter(y, (sigma[i], sigma[i], 0), mode='mirror',
                                      truncate=np.ceil(3 * sigma[i]) / sigma[i])
    y = np.where(y >= 0.5, 1 - y, y)
    np.testing.assert_allclose(out.reshape(6, 8, 8, 1)[i], (y - 0.5) / 0.25, atol=1e-4)


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _concat(per_process):
  """Step-wise concatenation over processes of their local batches."""
  return [{k: np.concatenate([b[k] for b in step]) for k in step[0]} for step in zip(*per_process)]


@pytest.mark.parametrize('process_count', [1, 2])
def test_pipeline_is_deterministic_for_a_seed_and_resumable(process_count):
  src, cfg = _source(), _data_config()
  kw = dict(local_batch_size=8 // process_count, process_index=process_count - 1,
            process_count=process_count)
  a = _take(pipeline.train_dataset(src, cfg, seed=3, **kw), 10)
  b = _take(pipeline.train_dataset(src, cfg, seed=3, **kw), 10)
  c = _take(pipeline.train_dataset(src, cfg, seed=4, **kw), 10)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]['global'], c[0]['global'])
  it = iter(pipeline.train_dataset(src, cfg, seed=3, **kw))
  for _ in range(4):
    next(it)
  state = it.get_state()
  it2 = iter(pipeline.train_dataset(src, cfg, seed=3, **kw))
  it2.set_state(state)
  _assert_batches_equal([next(it2) for _ in range(6)], a[4:])


def test_epochs_are_reshuffled_and_cover_every_record():
  src, cfg = _source(n=24), _data_config(num_global_views=1, num_local_views=0)
  labels = np.concatenate([b['label'] for b in
                           _take(pipeline.train_dataset(src, cfg, seed=0, local_batch_size=8), 9)])
  epochs = labels.reshape(3, 24)
  for e in epochs:                       # each epoch is a permutation of the records
    np.testing.assert_array_equal(np.sort(e), np.arange(24))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(24))   # shuffled at all


@pytest.mark.parametrize('process_count', [2, 4])
def test_global_batch_does_not_depend_on_process_count(process_count):
  # 20 records, global batch 8: 6 steps are 2.4 epochs, and steps 2 and 4 straddle an epoch end.
  src, cfg, steps, global_batch = _source(n=20), _data_config(), 6, 8
  single = _take(pipeline.train_dataset(src, cfg, seed=5, local_batch_size=global_batch), steps)
  per_process = [
      _take(pipeline.train_dataset(src, cfg, seed=5, local_batch_size=global_batch // process_count,
                                   process_index=p, process_count=process_count), steps)
      for p in range(process_count)]
  for batches in per_process:
    assert batches[0]['global'].shape == (global_batch // process_count, 2, 16, 16, 1)
  # Bitwise: same records in the same places, and the same augmentation of each.
  _assert_batches_equal(_concat(per_process), single)
  labels = np.concatenate([b['label'] for b in single])
  np.testing.assert_array_equal(np.sort(labels[:20]), np.arange(20))
  np.testing.assert_array_equal(np.sort(labels[20:40]), np.arange(20))


def test_copies_of_one_image_get_different_augmentations_in_every_process():
  image = np.random.default_rng(0).integers(0, 256, (20, 20, 1), dtype=np.uint8)
  src = sources.ArraySource(np.repeat(image[None], 16, axis=0), np.zeros(16))
  cfg = _data_config()
  per_process = [next(iter(pipeline.train_dataset(src, cfg, seed=0, local_batch_size=4,
                                                  process_index=p, process_count=2)))
                 for p in range(2)]
  assert not np.array_equal(per_process[0]['global'], per_process[1]['global'])
  # All 8 rows of the global batch differ from one another, within and across processes,
  # in both the global and the local views.
  for key in ('global', 'local'):
    rows = np.concatenate([b[key] for b in per_process]).reshape(8, -1)
    assert len(np.unique(rows, axis=0)) == 8, key


def test_workers_and_threads_give_the_same_batches_and_resume():
  from absl import flags
  flags.FLAGS.mark_as_parsed()   # Grain's worker processes read its absl flags (main parses them)
  src = _source(n=40)
  kw = dict(seed=1, local_batch_size=4, process_index=1, process_count=2)
  ref = _take(pipeline.train_dataset(src, _data_config(num_threads=1), **kw), 8)
  threads = _take(pipeline.train_dataset(src, _data_config(num_threads=4, prefetch=8), **kw), 8)
  _assert_batches_equal(threads, ref)
  cfg = _data_config(num_workers=2)
  it = iter(pipeline.train_dataset(src, cfg, **kw))
  _assert_batches_equal([next(it) for _ in range(5)], ref[:5])
  state = it.get_state()
  it2 = iter(pipeline.train_dataset(src, cfg, **kw))
  it2.set_state(state)
  _assert_batches_equal([next(it2) for _ in range(3)], ref[5:])


@pytest.mark.parametrize('saved_on,resumed_on', [(2, 1), (1, 2), (2, 2)])
def test_a_stream_started_at_a_global_batch_continues_any_process_count(saved_on, resumed_on):
  """What a resumed run reads (start_batch = the checkpoint's next_batch) is what the
  uninterrupted run read after that many batches, on any process count, workers included."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  src, global_batch, start = _source(n=20), 8, 4      # batch 4 straddles an epoch end

  def stream(count, first, cfg=_data_config()):
    per_process = [_take(pipeline.train_dataset(
        src, cfg, seed=3, local_batch_size=global_batch // count, process_index=p,
        process_count=count, start_batch=first), 6 - first) for p in range(count)]
    return _concat(per_process)

  uninterrupted = stream(saved_on, 0)
  _assert_batches_equal(stream(resumed_on, start), uninterrupted[start:])
  if (saved_on, resumed_on) == (2, 1):     # Grain worker processes too (slow to start: once)
    _assert_batches_equal(stream(resumed_on, start, _data_config(num_workers=2)),
                          uninterrupted[start:])


def test_train_dataset_rejects_a_source_smaller_than_one_global_batch():
  with pytest.raises(ValueError, match=r'10 records is smaller than one global batch of 12 '
                                       r'\(2 processes x 6\)'):
    pipeline.train_dataset(_source(n=10), _data_config(), seed=0, local_batch_size=6,
                           process_index=0, process_count=2)


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_global_batch_does_not_depend_on_process_count(process_count):
  src, cfg, local = _source(n=37), _data_config(), 4
  global_batch = process_count * local
  num_batches = -(-37 // global_batch)
  single = list(pipeline.eval_batches(src, cfg, local_batch_size=global_batch))
  per_process = [list(pipeline.eval_batches(src, cfg, local_batch_size=local, process_index=p,
                                            process_count=process_count))
                 for p in range(process_count)]
  for batches in per_process:
    assert len(batches) == num_batches
    for b in batches:
      assert b['image'].shape == (local, 16, 16, 1) and b['label'].shape == b['mask'].shape == (local,)
      assert (b['image'].dtype, b['label'].dtype, b['mask'].dtype) == (np.float32, np.int32, np.float32)
  _assert_batches_equal(_concat(per_process), single)
  # The single-process stream: records 0..36 in order, preprocessed, then zero padding.
  images, labels, mask = (np.concatenate([b[k] for b in single]) for k in ('image', 'label', 'mask'))
  np.testing.assert_array_equal(mask, np.arange(num_batches * global_batch) < 37)
  np.testing.assert_array_equal(labels[:37], np.arange(37))
  assert not labels[37:].any() and not images[37:].any()
  spec = pipeline.augment_spec(cfg)
  for i in (0, 17, 36):
    np.testing.assert_array_equal(images[i], augment.eval_view(src[i]['image'], 16, spec))


def test_eval_batches_read_only_this_process_records():
  src, reads = _source(n=37), []

  class Counting:
    def __len__(self):
      return len(src)

    def __getitem__(self, i):
      reads.append(i)
      return src[i]

  list(pipeline.eval_batches(Counting(), _data_config(), local_batch_size=4, process_index=1,
                             process_count=3))
  # global batches of 12: process 1 holds rows 4..7 of each
  assert sorted(reads) == [4, 5, 6, 7, 16, 17, 18, 19, 28, 29, 30, 31]


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
