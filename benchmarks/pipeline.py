"""Images per second per CPU core of our host multi-crop pipeline against torchvision's.

  python benchmarks/pipeline.py [--config=configs/vitg.py] [--rounds=5] [--images=512]
      [--batch_size=32] [--files=300] [--data_dir=DIR] [--core=K]
      [--torchvision_python=/opt/tvenv/bin/python] [--tv_api=v2|v1] [--tv_blur_kernel=7]
      [--plan_json=PATH | --step_seconds=S --hosts=N] [--chips_per_host=N] [--quick]

torchvision does not import beside the torch of `.[bench]` (2.13.0); give it a venv of its own:
  python -m venv /opt/tvenv && /opt/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
and pass --torchvision_python=/opt/tvenv/bin/python (default: this interpreter, if it can import
torchvision). That side never imports jax or lejepa_jax: the parent reads the config and hands
the child its values as JSON.

Workload: the multi-crop of the config's `data` (configs/vitg.py: 2 x 224 px views, scale
0.3-1, + 6 x 98 px, scale 0.05-0.3; flip, colour jitter, grayscale, Gaussian blur, solarize,
normalisation, with the config's probabilities and ranges) on `--files` JPEGs (quality 90) the
benchmark writes first: ImageNet-like sizes (mostly 500 x 375 / 375 x 500 / 500 x 333 / 500 x
500, one in eight up to 1000 px on its long side) and natural-image statistics (1/f-like smooth
noise, flat-coloured shapes with hard edges, sensor grain), so that the files are ~90 KB and
decode in ~1.5 ms like ImageNet's, not the few KB of a flat image. They are read from the page
cache: disk and network reads are not measured.

Our side is what a pod host runs: `sources.get_source` (data.name='folder': `FolderSource`, PIL
decode in `__getitem__`) and `pipeline.train_dataset` with one Grain thread (data.num_threads=1,
data.num_workers=0: no worker processes), batches of `--batch_size`. The torchvision side is what
the LeJEPA authors' reference does (MINIMAL.md of rbalestr-lab/lejepa): `ImageFolder` (PIL
decode), a transform applying RandomResizedCrop(size, scale), RandomHorizontalFlip,
RandomApply(ColorJitter, p), RandomGrayscale, RandomApply(GaussianBlur(kernel, sigma)),
RandomSolarize(128, p), ToImage + ToDtype(float32, scale) (v1: ToTensor), Normalize to the
image 2 + 6 times, in a DataLoader with num_workers=1 (the worker does all the work), shuffled,
the same batch size, the default collate stacking both view groups. Blur: the reference's kernel
of 7 px (--tv_blur_kernel); ours truncates at 3 sigma (3 to 13 taps), so by default torchvision
blurs with less work than ours.

Per core: each side runs in a subprocess of its own pinned to the same single core
(os.sched_setaffinity, inherited by Grain's thread and the DataLoader's worker;
torch.set_num_threads(1); OMP/OpenBLAS/MKL limited to one thread), so images/s are per core.
A subprocess builds its pipeline, pulls one untimed batch (thread or worker start-up, first
reads), then times `--images` images (whole batches). The consumer only pulls, so no prefetched
batch is waiting when the clock starts: the time is that of producing the batches. A warm-up
round first (both sides, not counted), then `--rounds` rounds alternating which side goes first.
Printed: per round and the medians of images/s (images, not views) of each side, and ours /
torchvision as the median of the per-round ratios; the machine.

What a pod slice needs from each host: with --plan_json=PATH (a file holding the last line that
`python -m lejepa_jax.plan --config=configs/vitg.py --topology=v5p-128` prints: `chips`, `chip`,
`batch_size`, `total_steps`, `estimated_hours` {at_peak, at_50pct}) the step time is
estimated_hours x 3600 / total_steps at the chip's bf16 peak and at 50% of it; a host must feed
batch_size / step time / hosts images per second (hosts = chips / --chips_per_host, default by
chip: 4 for v4, v5p, v5e and v6e VMs of multi-host slices, 8 for GPU nodes), which at the
measured rates takes that many cores of ours or of torchvision's. Without a plan:
--step_seconds=S --hosts=N (the global batch is then the config's batch_size).
Absolute rates move with the machine's load; compare the ratio, measured in one run on a quiet
machine.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import machine as machine_lib   # benchmarks/machine.py, beside this script

try:  # absent from the torchvision venv, where only the child side runs
  from absl import app
  from absl import flags
  from ml_collections import config_flags
except ImportError:
  app = flags = config_flags = None

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_VENV_HINT = ('make a venv for it: python -m venv /opt/tvenv && /opt/tvenv/bin/pip install '
              'torch==2.14.1 torchvision==0.29.1, then pass '
              '--torchvision_python=/opt/tvenv/bin/python')
# Chips per host VM of multi-host slices (and per GPU node), for plan's `chip`.
_CHIPS_PER_HOST = {'v4': 4, 'v5p': 4, 'v5e': 4, 'v6e': 4, 'a100': 8, 'h100': 8}
_ONE_THREAD = {'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
_SIDES = ('ours', 'torchvision')


# ----------------------------------------------------------------------------- the JPEGs

# (width, height, weight): the common ImageNet shapes; the rest is drawn in _image_size.
_SHAPES = ((500, 375, 40), (375, 500, 12), (500, 333, 14), (333, 500, 4), (500, 500, 8),
           (500, 400, 4), (400, 500, 2), (500, 281, 3))


def _image_size(rng) -> tuple[int, int]:
  if rng.random() < 0.125:      # larger photos, as ImageNet has
    long = int(rng.integers(600, 1001))
    short = int(long / rng.choice([4 / 3, 3 / 2, 1.0, 16 / 9]))
    return (long, short) if rng.random() < 0.75 else (short, long)
  weights = [s[2] for s in _SHAPES]
  w, h, _ = _SHAPES[rng.choice(len(_SHAPES), p=[x / sum(weights) for x in weights])]
  return w, h


def _upsample(noise, width: int, height: int):
  import numpy as np
  from PIL import Image
  image = Image.fromarray(noise.astype(np.float32), 'F')
  return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))


def natural_image(rng, width: int, height: int):
  """uint8 (height, width, 3) with a photo's spectrum, so that its JPEG has a photo's size.

  Smooth noise over 8 octaves (amplitude 0.9^octave: most energy low, detail at every
  scale), colour in the coarse octaves, 6-15 flat-coloured ellipses and polygons (hard
  edges, as objects have) and per-pixel grain (sigma 16, a high-ISO sensor's).
  """
  import numpy as np
  from PIL import Image, ImageDraw
  long = max(width, height)
  luma = np.zeros((height, width), np.float32)
  colour = np.zeros((height, width, 3), np.float32)
  for octave in range(1, 9):
    cells = 2 ** octave
    grid = (max(2, math.ceil(cells * height / long)), max(2, math.ceil(cells * width / long)))
    amplitude = 0.9 ** octave
    luma += amplitude * _upsample(rng.standard_normal(grid), width, height)
    if octave <= 3:
      for c in range(3):
        colour[..., c] += 0.5 * amplitude * _upsample(rng.standard_normal(grid), width, height)
  texture = luma[..., None] + colour
  texture = 128 + 60 * (texture - texture.mean()) / (texture.std() + 1e-6)
  shapes = Image.new('RGB', (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
  draw = ImageDraw.Draw(shapes)
  for _ in range(int(rng.integers(6, 16))):
    cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.4) * long
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
      draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r], fill=fill)
    else:
      angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(3, 7))))
      draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles], fill=fill)
  x = 0.5 * np.asarray(shapes, np.float32) + 0.5 * texture + rng.normal(0, 16, texture.shape)
  return np.clip(x, 0, 255).astype(np.uint8)


def write_jpegs(split_dir: pathlib.Path, count: int, *, classes: int = 10, quality: int = 90,
                seed: int = 0) -> None:
  """split_dir/class_k/img_i.jpg, the ImageFolder / FolderSource layout."""
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(seed)
  for i in range(count):
    folder = split_dir / f'class_{i % classes:02d}'
    folder.mkdir(parents=True, exist_ok=True)
    width, height = _image_size(rng)
    Image.fromarray(natural_image(rng, width, height)).save(
        folder / f'img_{i:05d}.jpg', 'JPEG', quality=quality)


def describe_jpegs(split_dir: pathlib.Path) -> str:
  from PIL import Image
  files = sorted(split_dir.glob('*/*.jpg'))
  if not files:
    return 'no JPEGs'
  sizes = []
  for f in files:
    with Image.open(f) as img:
      sizes.append(img.size)
  pixels = [w * h for w, h in sizes]
  kb = [f.stat().st_size / 1e3 for f in files]
  w, h = sorted(sizes, key=lambda s: s[0] * s[1])[len(sizes) // 2]
  return (f'{len(files)} JPEGs in {split_dir}: median {w}x{h} (from {min(pixels) / 1e3:.0f}k to '
          f'{max(pixels) / 1e3:.0f}k pixels), {statistics.mean(kb):.0f} KB on average '
          f'(median {statistics.median(kb):.0f})')


# ----------------------------------------------------------------------------- the sides
# Each runs in a subprocess pinned to one core (main() starts them), prints one JSON line.

def _pin(core: int) -> None:
  os.sched_setaffinity(0, {core})
  if os.sched_getaffinity(0) != {core}:
    raise RuntimeError(f'could not pin to core {core}: affinity {os.sched_getaffinity(0)}')


def _time_batches(batches, spec: dict, to_numpy) -> dict:
  """Pulls spec['warmup_batches'] untimed batches, then times spec['images'] // batch_size."""
  start = time.perf_counter()
  for _ in range(spec['warmup_batches']):
    next(batches)
  t0 = time.perf_counter()
  n = spec['images'] // spec['batch_size']
  for _ in range(n):
    batch = next(batches)
  seconds = time.perf_counter() - t0
  views = {k: to_numpy(batch[k]) for k in ('global', 'local')}
  return {'images': n * spec['batch_size'], 'seconds': seconds,
          'images_per_sec': n * spec['batch_size'] / seconds, 'warmup_seconds': t0 - start,
          # A check that both sides make the same kind of output: shapes, normalised values.
          'shapes': {k: list(v.shape) for k, v in views.items()},
          'dtype': str(views['global'].dtype),
          'mean_std': {k: [float(v.mean()), float(v.std())] for k, v in views.items()}}


def run_ours(spec: dict) -> dict:
  import ml_collections
  import numpy as np
  import grain
  from lejepa_jax.data import pipeline, sources
  d = ml_collections.ConfigDict(spec['data'])
  d.name, d.dir = 'folder', spec['data_dir']
  d.num_threads, d.num_workers = 1, 0      # one Grain thread, no worker processes: one core
  source = sources.get_source(d, d.train_split)
  ds = pipeline.train_dataset(source, d, seed=spec['seed'], local_batch_size=spec['batch_size'])
  out = _time_batches(iter(ds), spec, np.asarray)
  out['versions'] = f'numpy {np.__version__}, grain {getattr(grain, "__version__", "?")}'
  return out


def torchvision_transform(spec: dict, size: int, scale):
  """One view's transform, as the LeJEPA reference writes it, with the config's values."""
  import torch
  if spec['tv_api'] == 'v2':
    from torchvision.transforms import v2 as T
    to_float = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
  else:
    import torchvision.transforms as T
    to_float = [T.ToTensor()]
  d = spec['data']
  a = d['augment']
  return T.Compose([
      T.RandomResizedCrop(size, scale=tuple(scale)),
      T.RandomHorizontalFlip(a['flip_prob']),
      T.RandomApply([T.ColorJitter(a['brightness'], a['contrast'], a['saturation'], a['hue'])],
                    p=a['jitter_prob']),
      T.RandomGrayscale(a['grayscale_prob']),
      T.RandomApply([T.GaussianBlur(spec['tv_blur_kernel'], sigma=tuple(a['blur_sigma']))],
                    p=a['blur_prob']),
      T.RandomSolarize(threshold=128, p=a['solarize_prob']),
      *to_float,
      T.Normalize(mean=list(d['mean']), std=list(d['std'])),
  ])


class MultiCropTransform:
  """PIL image -> (global views (Vg, C, S, S), local views (Vl, C, s, s))."""

  def __init__(self, spec: dict):
    d = spec['data']
    self.global_t = torchvision_transform(spec, d['global_size'], d['global_scale'])
    self.local_t = torchvision_transform(spec, d['local_size'], d['local_scale'])
    self.num_global, self.num_local = d['num_global_views'], d['num_local_views']

  def __call__(self, image):
    import torch
    return (torch.stack([self.global_t(image) for _ in range(self.num_global)]),
            torch.stack([self.local_t(image) for _ in range(self.num_local)]))


def _worker_init(core: int, worker_id: int) -> None:
  import torch
  _pin(core)                  # inherited from the parent already; checked here
  torch.set_num_threads(1)


def run_torchvision(spec: dict) -> dict:
  import torch
  import torchvision
  torch.set_num_threads(1)
  torch.manual_seed(spec['seed'])
  dataset = torchvision.datasets.ImageFolder(
      os.path.join(spec['data_dir'], spec['data']['train_split']),
      transform=MultiCropTransform(spec))
  total = (spec['warmup_batches'] + spec['images'] // spec['batch_size']) * spec['batch_size']
  # num_samples past len(dataset) without replacement: successive permutations, as epochs.
  sampler = torch.utils.data.RandomSampler(dataset, num_samples=total)
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=spec['batch_size'], sampler=sampler, num_workers=1, drop_last=True,
      worker_init_fn=functools.partial(_worker_init, spec['core']))
  batches = ({'global': g, 'local': l, 'label': y} for (g, l), y in loader)
  out = _time_batches(batches, spec, lambda t: t.numpy())
  out['versions'] = f'torch {torch.__version__}, torchvision {torchvision.__version__} ({spec["tv_api"]})'
  return out


def child_main(argv) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--side', choices=_SIDES, required=True)
  parser.add_argument('--spec', required=True, help='JSON from the parent')
  args = parser.parse_args(argv)
  spec = json.loads(args.spec)
  _pin(spec['core'])
  from PIL import __version__ as pil_version
  out = (run_ours if args.side == 'ours' else run_torchvision)(spec)
  out.update(side=args.side, pillow=pil_version, affinity=sorted(os.sched_getaffinity(0)))
  print(json.dumps(out), flush=True)
  return 0


# ----------------------------------------------------------------------------- the parent

F: dict = {}


def define_flags() -> None:
  F['config'] = config_flags.DEFINE_config_file('config', 'configs/vitg.py',
                                                'Config file; its `data` is the workload.')
  F['rounds'] = flags.DEFINE_integer('rounds', 5, 'Alternating timed rounds after the warm-up round.')
  F['images'] = flags.DEFINE_integer('images', 512, 'Images timed per side per round '
                                     '(rounded up to whole batches).')
  F['batch_size'] = flags.DEFINE_integer('batch_size', 32, 'Batch size of both sides.')
  F['warmup_batches'] = flags.DEFINE_integer('warmup_batches', 1,
                                             'Untimed batches per side before the clock starts.')
  F['files'] = flags.DEFINE_integer('files', 300, 'JPEGs to write (when --data_dir has none).')
  F['data_dir'] = flags.DEFINE_string(
      'data_dir', '', 'Folder for the JPEGs (DIR/<data.train_split>/CLASS/*.jpg): reused if it '
      'holds some, else written and kept. Default: a temporary folder, deleted at the end.')
  F['core'] = flags.DEFINE_integer('core', -1, 'CPU both sides are pinned to (-1: the last one '
                                   'this process may use).')
  F['torchvision_python'] = flags.DEFINE_string(
      'torchvision_python', '', 'Python that runs the torchvision side (default: this one).')
  F['tv_api'] = flags.DEFINE_enum('tv_api', 'v2', ['v2', 'v1'], 'torchvision.transforms API.')
  F['tv_blur_kernel'] = flags.DEFINE_integer(
      'tv_blur_kernel', 7, "GaussianBlur's kernel size (the LeJEPA reference's 7; 13 is the "
      'support of ours at the largest sigma).')
  F['plan_json'] = flags.DEFINE_string('plan_json', '', "File with lejepa_jax.plan's JSON line.")
  F['step_seconds'] = flags.DEFINE_float('step_seconds', 0.0, 'Train step time (without --plan_json).')
  F['hosts'] = flags.DEFINE_integer('hosts', 0, 'Hosts of the slice (without --plan_json).')
  F['quick'] = flags.DEFINE_bool('quick', False, 'An answer in under 3 minutes (2 rounds of 128 '
                                 'images, 60 JPEGs)')
  F['chips_per_host'] = flags.DEFINE_integer('chips_per_host', 0,
                                             "0: by plan's chip (4 for TPU VMs, 8 for GPU nodes).")


def machine() -> str:
  return (f'{machine_lib.cpu()} (this process may use {len(os.sched_getaffinity(0))}); '
          f'Python {platform.python_version()}')


def check_torchvision(python: str) -> str:
  probe = 'import torch, torchvision; print(torch.__version__, torchvision.__version__)'
  try:
    done = subprocess.run([python, '-c', probe], capture_output=True, text=True, timeout=300)
  except OSError as e:
    raise SystemExit(f'--torchvision_python={python} cannot run ({e}): {_VENV_HINT}')
  if done.returncode:
    last = (done.stderr.strip().splitlines() or ['?'])[-1]
    raise SystemExit(f'{python} cannot import torchvision ({last}): {_VENV_HINT}')
  return done.stdout.strip()


def run_side(side: str, python: str, spec: dict) -> dict:
  env = {**os.environ, **_ONE_THREAD,
         'PYTHONPATH': os.pathsep.join(filter(None, [str(_ROOT), os.environ.get('PYTHONPATH')]))}
  if side == 'ours':
    env.setdefault('JAX_PLATFORMS', 'cpu')   # lejepa_jax must not probe for a TPU here
  core = spec['core']
  done = subprocess.run(
      [python, str(pathlib.Path(__file__).resolve()), f'--side={side}', '--spec=' + json.dumps(spec)],
      capture_output=True, text=True, cwd=_ROOT, env=env,
      # Pinned before exec, so every thread and worker the side starts inherits the core.
      preexec_fn=lambda: os.sched_setaffinity(0, {core}))
  lines = [l for l in done.stdout.splitlines() if l.startswith('{')]
  if done.returncode or not lines:
    raise RuntimeError(f'the {side} side failed (exit {done.returncode}):\n'
                       f'{done.stdout[-2000:]}\n{done.stderr[-4000:]}')
  return json.loads(lines[-1])


def host_needs(plan: dict | None, batch_size: int, rates: dict) -> list[str]:
  """Lines: images/s a host must feed at the plan's step time, and cores of each side for it."""
  if plan is not None:
    per_host = F['chips_per_host'].value or _CHIPS_PER_HOST.get(plan.get('chip'), 4)
    hosts = max(1, math.ceil(plan['chips'] / per_host))
    batch_size = plan['batch_size']
    hours = plan['estimated_hours']
    steps = [('bf16 peak', hours['at_peak'] * 3600 / plan['total_steps']),
             ('50% of peak', hours['at_50pct'] * 3600 / plan['total_steps'])]
    head = (f'{plan.get("topology", "?")}: {plan["chips"]} chips, {hosts} hosts of {per_host}, '
            f'global batch {batch_size}, {plan["total_steps"]} steps in '
            f'{hours["at_peak"]:.1f} h at peak ({plan.get("hours_from", "?")})')
  elif F['step_seconds'].value > 0 and F['hosts'].value > 0:
    hosts = F['hosts'].value
    steps = [('given', F['step_seconds'].value)]
    head = f'{hosts} hosts, global batch {batch_size} (the config\'s)'
  else:
    return ['(pass --plan_json=PATH, or --step_seconds and --hosts, for what a pod host needs)']
  lines = [head]
  for label, step in steps:
    need = batch_size / step / hosts
    lines.append(f'  step {step:.3f} s ({label}): {need:.0f} images/s per host = '
                 f'{need / rates["ours"]:.1f} cores of ours, '
                 f'{need / rates["torchvision"]:.1f} cores of torchvision\'s')
  return lines


QUICK = {'rounds': 2, 'images': 128, 'files': 60}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if F['quick'].value:
    print('--quick:', machine_lib.apply_quick(flags.FLAGS, QUICK), flush=True)
  if F['rounds'].value < 1 or F['images'].value < 1 or F['batch_size'].value < 1:
    raise app.UsageError('--rounds, --images and --batch_size must be >= 1')
  config = F['config'].value
  data = config.data.to_dict()
  batch = F['batch_size'].value
  images = -(-F['images'].value // batch) * batch
  core = F['core'].value if F['core'].value >= 0 else max(os.sched_getaffinity(0))
  tv_python = F['torchvision_python'].value or sys.executable
  plan = None
  if F['plan_json'].value:
    # The whole output of plan or only its last line: the JSON object is the last line.
    lines = pathlib.Path(F['plan_json'].value).read_text().splitlines()
    objects = [line for line in lines if line.startswith('{')]
    if not objects:
      raise app.UsageError(f'{F["plan_json"].value} holds no JSON line of lejepa_jax.plan')
    plan = json.loads(objects[-1])
  print('machine:', machine())
  print(f'pinned to core {core}; torchvision side: {tv_python} ({check_torchvision(tv_python)})')

  tmp = None if F['data_dir'].value else tempfile.mkdtemp(prefix='pipeline_bench_')
  root = pathlib.Path(F['data_dir'].value or tmp)
  split_dir = root / data['train_split']
  try:
    if not any(split_dir.glob('*/*.jpg')):
      start = time.perf_counter()
      write_jpegs(split_dir, F['files'].value)
      print(f'wrote {F["files"].value} JPEGs in {time.perf_counter() - start:.1f} s')
    print('data:', describe_jpegs(split_dir))
    a = data['augment']
    print(f'views: {data["num_global_views"]} x {data["global_size"]} px (scale '
          f'{data["global_scale"]}) + {data["num_local_views"]} x {data["local_size"]} px (scale '
          f'{data["local_scale"]}); flip {a["flip_prob"]}, jitter {a["jitter_prob"]} '
          f'({a["brightness"]}, {a["contrast"]}, {a["saturation"]}, {a["hue"]}), grayscale '
          f'{a["grayscale_prob"]}, blur {a["blur_prob"]} sigma {a["blur_sigma"]} (torchvision '
          f'kernel {F["tv_blur_kernel"].value}), solarize {a["solarize_prob"]}, normalise; '
          f'batch {batch}, {images} images per side per round')
    spec = dict(data=data, data_dir=str(root), batch_size=batch, images=images, core=core,
                warmup_batches=F['warmup_batches'].value, tv_api=F['tv_api'].value,
                tv_blur_kernel=F['tv_blur_kernel'].value)
    pythons = {'ours': sys.executable, 'torchvision': tv_python}
    rates = {side: [] for side in _SIDES}
    ratios = []
    print(f'{"round":>7s} {"ours img/s":>11s} {"torchvision img/s":>18s} {"ratio":>6s}')
    for r in range(F['rounds'].value + 1):
      order = _SIDES if r % 2 == 0 else _SIDES[::-1]
      out = {side: run_side(side, pythons[side], {**spec, 'seed': r}) for side in order}
      ours, tv = out['ours']['images_per_sec'], out['torchvision']['images_per_sec']
      print(f'{r if r else "warm-up":>7} {ours:11.1f} {tv:18.1f} {ours / tv:6.2f}', flush=True)
      if r == 0:
        first = out
        continue
      rates['ours'].append(ours)
      rates['torchvision'].append(tv)
      ratios.append(ours / tv)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)

  for side in _SIDES:
    o = first[side]
    print(f'{side}: {o["versions"]}, Pillow {o["pillow"]}; cores {o["affinity"]}; output '
          f'{o["shapes"]} {o["dtype"]}, mean/std ' +
          ', '.join(f'{k} {m:.2f}/{s:.2f}' for k, (m, s) in o['mean_std'].items()))
  median = {side: statistics.median(v) for side, v in rates.items()}
  print(f'median of {F["rounds"].value} rounds, images/s per core: ours {median["ours"]:.1f}, '
        f'torchvision {median["torchvision"]:.1f}; ours / torchvision '
        f'{statistics.median(ratios):.2f} (median of per-round ratios; range '
        f'{min(ratios):.2f}-{max(ratios):.2f})')
  for line in host_needs(plan, config.batch_size, median):
    print(line)


if __name__ == '__main__':
  if any(arg.startswith('--side=') for arg in sys.argv[1:]):
    sys.exit(child_main(sys.argv[1:]))
  # configs/vitg.py imports `configs.fmnist`: the repository root must be importable (python -m
  # puts the working directory on the path, a script's run does not).
  sys.path.insert(0, str(_ROOT))
  define_flags()
  app.run(main)
