"""The scale-out sources on small data made here: TFDS data_source (array_record) and folders."""
import ml_collections
import numpy as np
import pytest

from lejepa_jax.data import pipeline, sources

tfds = pytest.importorskip('tensorflow_datasets')


class LejepaTinyImages(tfds.core.GeneratorBasedBuilder):
  """10 train / 4 test random 12x12 RGB images, stored as array_record."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        # A raw uint8 tensor: encoding tfds.features.Image would need TensorFlow.
        'image': tfds.features.Tensor(shape=(12, 12, 3), dtype=np.uint8),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(10), 'test': self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': _image(n, i), 'label': i % 3}


def _image(n, i):
  return np.random.default_rng(1000 * n + i).integers(0, 256, (12, 12, 3), dtype=np.uint8)


def _config(name, data_dir):
  return ml_collections.ConfigDict(dict(
      name=name, dir=data_dir, num_global_views=2, num_local_views=1, global_size=8,
      local_size=4, global_scale=(0.3, 1.0), local_scale=(0.1, 0.3), channels=3,
      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_threads=1, prefetch=1,
      augment=dict(flip_prob=0.5, jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                   hue=0.1, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 1.0),
                   solarize_prob=0.2)))


def test_tfds_data_source_feeds_the_pipeline(tmp_path):
  LejepaTinyImages(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  cfg = _config('tfds:lejepa_tiny_images', str(tmp_path))
  train = sources.get_source(cfg, 'train')
  assert len(train) == 10 and len(sources.get_source(cfg, 'test')) == 4
  by_label = {}
  for i in range(10):
    record = train[i]
    by_label.setdefault(record['label'], []).append(record['image'])
  expected = {i % 3: [] for i in range(10)}
  for i in range(10):
    expected[i % 3].append(_image(10, i))
  for label, images in expected.items():  # same images, whatever order TFDS shuffled them into
    assert sorted(x.tobytes() for x in images) == sorted(x.tobytes() for x in by_label[label])
  batch = next(iter(pipeline.train_dataset(train, cfg, seed=0, local_batch_size=4)))
  assert batch['global'].shape == (4, 2, 8, 8, 3) and batch['local'].shape == (4, 1, 4, 4, 3)
  with pytest.raises(FileNotFoundError, match='tfds build'):
    sources.get_source(_config('tfds:lejepa_tiny_images', str(tmp_path / 'nowhere')), 'train')


def test_image_folder_source(tmp_path):
  from PIL import Image
  for c, cls in enumerate(['cat', 'dog']):
    (tmp_path / 'train' / cls).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(_image(c, i)).save(tmp_path / 'train' / cls / f'{i}.png')
  src = sources.get_source(_config('folder', str(tmp_path)), 'train')
  assert len(src) == 6
  np.testing.assert_array_equal(src[4]['image'], _image(1, 1))
  assert src[4]['label'] == 1
  with pytest.raises(ValueError, match='data.name'):
    sources.get_source(_config('imagenet', ''), 'train')
