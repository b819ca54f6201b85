"""Your own images: a folder of mixed formats, modes and sizes, converted to data.channels,
pretrained on with the CLI, exported and loaded.

The folder holds class-dependent patterns (stripes, checkerboard, disk) saved as grayscale,
RGB JPEG, RGBA, palette (with and without transparency), gray+alpha and 16-bit grayscale
PNGs, at several sizes and aspect ratios.
"""
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from configs import fmnist
from lejepa_jax import checkpoint as ckpt_lib
from lejepa_jax import run_config
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import steps
from lejepa_jax.data import augment
from lejepa_jax.data import pipeline
from lejepa_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ('checker', 'disk', 'h_stripes', 'v_stripes')
KINDS = ('L.png', 'RGB.jpg', 'RGBA.png', 'P.png', 'Pt.png', 'LA.png', 'I16.png')
SIZES = ((28, 28), (32, 40), (36, 30), (28, 56))


def _pattern(cls: int, h: int, w: int, rng) -> np.ndarray:
  """float (h, w) in [0, 1]: the class's pattern, randomly shifted, with noise."""
  y, x = np.mgrid[:h, :w]
  dy, dx = rng.integers(0, 8, 2)
  if cls == 0:
    p = ((y + dy) // 4 + (x + dx) // 4) % 2
  elif cls == 1:
    p = (y - h / 2 - dy / 4) ** 2 + (x - w / 2 - dx / 4) ** 2 < (min(h, w) / 3) ** 2
  elif cls == 2:
    p = (y + dy) // 3 % 2
  else:
    p = (x + dx) // 3 % 2
  return np.clip(0.15 + 0.7 * p + rng.normal(0, 0.05, (h, w)), 0, 1)


def _save(path, gray: np.ndarray, kind: str, rng) -> None:
  """Saves a [0, 1] pattern as `kind` (see KINDS), tinted by a random colour when RGB."""
  tint = rng.uniform(0.5, 1.0, 3)
  rgb = (gray[..., None] * tint * 255).astype(np.uint8)
  alpha = rng.integers(0, 256, gray.shape, dtype=np.uint8)
  path = f'{path}.{kind.split(".")[-1]}'
  if kind == 'L.png':
    Image.fromarray((gray * 255).astype(np.uint8)).save(path)
  elif kind == 'RGB.jpg':
    Image.fromarray(rgb).save(path, quality=95)
  elif kind == 'RGBA.png':
    Image.fromarray(np.dstack([rgb, alpha])).save(path)
  elif kind == 'P.png':
    Image.fromarray(rgb).quantize(32).save(path)
  elif kind == 'Pt.png':
    Image.fromarray(rgb).quantize(32).save(path, transparency=0)
  elif kind == 'LA.png':
    Image.fromarray(np.dstack([(gray * 255).astype(np.uint8), alpha]), 'LA').save(path)
  elif kind == 'I16.png':
    Image.fromarray((gray * 65535).astype(np.uint16)).save(path)   # mode I;16, 16-bit PNG


def make_folder(root, per_class: dict, seed: int = 0) -> str:
  """root/SPLIT/CLASS/NNN.EXT with per_class[split] images per class, kinds and sizes cycling."""
  rng = np.random.default_rng(seed)
  for split, n in per_class.items():
    for c, name in enumerate(CLASSES):
      os.makedirs(os.path.join(root, split, name))
      for i in range(n):
        h, w = SIZES[(i + c) % len(SIZES)]
        _save(os.path.join(root, split, name, f'{i:03d}'), _pattern(c, h, w, rng),
              KINDS[(i + c) % len(KINDS)], rng)
  return str(root)


def _reference(path, channels: int) -> np.ndarray:
  """PIL's own conversion; 16-bit grayscale (which PIL's convert clips) by its high byte."""
  with Image.open(path) as img:
    if img.mode.startswith('I;16'):
      gray = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
      return np.repeat(gray[..., None], channels, -1)
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')   # palette + transparency: PIL suggests RGBA first
      out = np.asarray(img.convert({1: 'L', 3: 'RGB'}[channels]))
  return out[..., None] if out.ndim == 2 else out


def _data_config(root, channels=1):
  c = fmnist.get_config('runlocal')
  c.data.name, c.data.dir, c.data.channels = 'folder', str(root), channels
  c.data.mean, c.data.std = (0.5,) * channels, (0.25,) * channels
  c.data.num_classes = len(CLASSES)
  return c


def test_every_mode_comes_out_as_the_configured_channels(tmp_path):
  root = make_folder(tmp_path, {'train': 7})
  modes = set()
  for channels in (1, 3):
    src = sources.get_source(_data_config(root, channels).data, 'train')
    assert len(src) == 28 and src.classes == list(CLASSES)
    for i, (path, label) in enumerate(src.files):
      record = src[i]
      with Image.open(path) as img:
        modes.add(img.mode)
        size = img.size
      image = record['image']
      assert image.dtype == np.uint8 and image.shape == (size[1], size[0], channels), path
      np.testing.assert_array_equal(image, _reference(path, channels), err_msg=str(path))
      assert record['label'] == label == CLASSES.index(path.parent.name)
  assert modes == {'L', 'RGB', 'RGBA', 'P', 'LA', 'I;16'}
  # 16-bit: the full range, not PIL's clipping at 255 (which would be all white).
  i16 = [i for i, (p, _) in enumerate(src.files) if p.name.endswith('.png') and
         Image.open(p).mode == 'I;16']
  assert i16 and all(src[i]['image'].min() < 100 for i in i16)


def test_resize_shorter_side(tmp_path):
  root = make_folder(tmp_path, {'train': 4})
  src = sources.FolderSource(root, 'train', channels=3, resize_shorter=14)
  for i, (path, _) in enumerate(src.files):
    with Image.open(path) as img:
      w, h = img.size
    image = src[i]['image']
    assert min(image.shape[:2]) == 14 and image.shape[2] == 3
    assert abs(image.shape[0] / image.shape[1] - h / w) < 0.1
    if path.suffix == '.png' and Image.open(path).mode in ('L', 'RGB', 'RGBA', 'P', 'LA'):
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = Image.open(path).convert('RGB').resize(image.shape[1::-1], Image.Resampling.BILINEAR)
      np.testing.assert_array_equal(image, np.asarray(ref))


def test_mixed_sizes_feed_the_training_and_evaluation_pipelines(tmp_path):
  root = make_folder(tmp_path, {'train': 4})
  c = _data_config(root, 1)
  src = sources.get_source(c.data, 'train')
  assert len({src[i]['image'].shape for i in range(len(src))}) == len(SIZES)
  batch = next(iter(pipeline.train_dataset(src, c.data, seed=0, local_batch_size=8)))
  assert batch['global'].shape == (8, 2, 28, 28, 1) and batch['local'].shape == (8, 2, 14, 14, 1)
  assert np.all(np.isfinite(batch['global']))
  evals = list(pipeline.eval_batches(src, c.data, local_batch_size=8))
  assert len(evals) == 2 and evals[0]['image'].shape == (8, 28, 28, 1)
  spec = pipeline.augment_spec(c.data)
  np.testing.assert_allclose(evals[1]['image'][3], augment.eval_view(src[11]['image'], 28, spec),
                             atol=0)
  # An evaluation cap (eval.max_examples) keeps the records lazy: no np.stack of mixed sizes.
  capped = sources.sample(src, 10, seed=0)
  last = int(capped.indices[9])
  assert len(capped) == 10 and capped[9]['image'].shape == src[last]['image'].shape
  with pytest.raises(IndexError):
    capped[10]
  evals = list(pipeline.eval_batches(capped, c.data, local_batch_size=8))
  assert len(evals) == 2 and evals[1]['mask'].tolist() == [1, 1] + [0] * 6


def test_channels_other_than_1_or_3_are_refused(tmp_path):
  root = make_folder(tmp_path, {'train': 1})
  c = _data_config(root, 3)
  c.data.channels, c.data.mean, c.data.std = 4, (0.5,) * 4, (0.25,) * 4
  with pytest.raises(sources.BadDataError, match=r'data.channels=4.*1 \(grayscale\) or 3 \(RGB\)'):
    sources.get_source(c.data, 'train')


# ------------------------------------------------------------------------- the command line

def _env(tmp):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return env


def _python(tmp, *args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(tmp), capture_output=True,
                        text=True, timeout=600)


def test_mean_and_std_of_the_wrong_length_exit_2_naming_the_keys(tmp_path):
  root = make_folder(tmp_path / 'images', {'train': 1, 'test': 1})
  workdir = tmp_path / 'run'
  result = _python(str(tmp_path), '-m', 'lejepa_jax.main', '--config=configs/fmnist.py:runlocal',
                   f'--workdir={workdir}', '--config.data.name=folder',
                   f'--config.data.dir={root}', '--config.data.channels=3')
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('[lejepa_jax] error:')]
  assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  for text in ('data.mean=(0.286,)', 'data.std=(0.353,)', 'data.channels=3',
               '--config.data.mean="(0.286, 0.286, 0.286)"'):
    assert text in errors[0], (text, errors[0])
  assert not workdir.exists()


def test_pretrain_export_and_load_on_your_own_images(tmp_path):
  """The new user's path: a folder of PNGs/JPEGs, the CPU config, the CLI; then export."""
  tmp = str(tmp_path)
  root = make_folder(tmp_path / 'images', {'train': 16, 'test': 8})
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'export')
  result = _python(tmp, '-m', 'lejepa_jax.main', '--config=configs/fmnist.py:runlocal',
                   f'--workdir={workdir}', '--config.data.name=folder',
                   f'--config.data.dir={root}', f'--config.data.num_classes={len(CLASSES)}',
                   '--config.total_steps=10')
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'final frozen evaluation on test' in result.stdout, result.stdout[-2000:]
  final = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))][-1]
  assert final['step'] == 10
  # Learnable patterns (measured: 0.94 and 1.0 after 10 steps); chance is 0.25.
  assert 0.5 <= final['eval/linear_probe_top1'] <= 1.0, final
  assert 0.5 <= final['eval/knn_top1'] <= 1.0, final

  result = _python(tmp, '-m', 'lejepa_jax.export', f'--workdir={workdir}', f'--out={out}')
  assert result.returncode == 0, result.stderr[-4000:]
  assert out in result.stdout and 'parameters' in result.stdout

  import lejepa_jax
  encoder = lejepa_jax.load_encoder(out)
  assert encoder.config['channels'] == 1 and encoder.config['input_size'] == 28
  assert encoder.config['data'] == {'name': 'folder', 'num_classes': len(CLASSES)}
  src = sources.get_source(run_config.load(workdir).data, 'test')
  images = np.stack([encoder.preprocess(src[i]['image']) for i in range(16)])
  normalized = lejepa_jax.load_encoder(out, normalized=True)
  features = np.asarray(normalized(images))
  assert features.shape == (16, encoder.dim) and np.all(np.isfinite(features))

  config = run_config.load(workdir)
  mesh = sharding_lib.make_mesh(config.get('mesh'))
  programs = steps.build(config, mesh, 1)
  state, step = ckpt_lib.restore_state(workdir, programs.abstract_state)
  assert step == 10
  with sharding_lib.activate(mesh):
    x = jax.device_put(images, sharding_lib.batch_sharding(mesh))
    want = np.asarray(programs.features(steps.variables(state), x))
  assert np.abs(features - want).max() <= 1e-6 * np.abs(want).max()
  # uint8 images at the input size, as they come from the folder: the same features.
  square = np.stack([src[i]['image'] for i in range(len(src))
                     if src[i]['image'].shape[:2] == (28, 28)])
  by_uint8 = np.asarray(encoder(square))
  by_float = np.asarray(normalized(np.stack([encoder.preprocess(x) for x in square])))
  assert np.abs(by_uint8 - by_float).max() <= 1e-6 * np.abs(by_float).max()

  # Re-evaluation of the workdir's checkpoint: the same figures as at the end of training.
  before = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  result = _python(tmp, '-m', 'lejepa_jax.evaluate', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'linear probe top-1' in result.stdout, result.stdout[-2000:]
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert len(lines) == len(before) + 1 and lines[-1]['step'] == 10
  for key in ('eval/linear_probe_top1', 'eval/knn_top1'):
    assert abs(lines[-1][key] - before[-1][key]) <= 0.005, key
