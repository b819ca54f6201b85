"""Frozen linear-probe accuracy after equal wall time: our CPU default against the authors'
PyTorch minimal LeJEPA recipe (and/or our ResNet-18 config), trained on the same machine,
probed by the same code.

  python benchmarks/accuracy_per_minute.py [--minutes=10,20] [--torch_python=/opt/tvenv/bin/python]
      [--config=configs/fmnist.py] [--config.KEY=VALUE ...] [--max_probe_examples=0]
      [--calibration_steps=25] [--torch_workers=2] [--torch_bf16] [--workdir=DIR]
      [--sides=ours,torch,resnet] [--resnet_config=configs/fmnist_resnet.py] [--quick]
  # our side alone at 20 minutes (no second Python needed): what the CPU default reaches
  python benchmarks/accuracy_per_minute.py --minutes=20 --sides=ours
  # the ViT default beside configs/fmnist_resnet.py (ResNet-18) at equal wall time
  python benchmarks/accuracy_per_minute.py --minutes=20 --sides=ours,resnet
  # smoke run: a minute per side, short calibration, probe on 5,000 images of each split
  python benchmarks/accuracy_per_minute.py --minutes=1 --max_probe_examples=5000 \
      --calibration_steps=10

The PyTorch side needs a Python with torch and torchvision (--torch_python, e.g. a venv made with
`pip install torch==2.14.1 torchvision==0.29.1`): the PyTorch side runs there, in a child
process that imports neither jax nor this repository (configuration goes to it as JSON).
A run takes about 2 minutes of calibration, 2 x the sum of --minutes of training, then a few
minutes of feature extraction and probes; run it on a quiet machine.

The two sides.
- ours: `configs/fmnist.py` (with any --config.KEY=VALUE) trained by
  `lejepa_jax.train.train_and_evaluate`, the trainer of `python -m lejepa_jax.main`, in a child
  process and a fresh workdir. Changed for the budget: total_steps (the rule below);
  optim.warmup_steps and checkpoint_every scaled with it by the config's own fractions
  (150/1500 and 500/1500 of the run); periodic diagnostics, plots and every evaluator off
  (the k-NN curve during training, the final linear probe/k-NN/few-shot): monitoring is not
  training, and the PyTorch side does none. Asynchronous checkpointing stays on: it is part of
  our trainer. After training, the child restores the final checkpoint and extracts the probe
  features (eval.features='probe': CLS tokens of the last two blocks, concatenated) of the
  train and test splits with the evaluators' own extraction (`suite.Runner.features`: the
  whole 28 px image, normalised).
- resnet: the same as ours with `--resnet_config` (configs/fmnist_resnet.py: ResNet-18 with
  the 'cifar' stem, weight decay 5e-4; the probe reads its pooled 512-d features), its own
  calibration and step count, the same rule and the same probe.
- torch: the recipe of MINIMAL.md in github.com/rbalestr-lab/lejepa (its code and command
  line: V = 4 views of one size, lambda 0.02, loss (1 - lambda) * inv + lambda * SIGReg with inv
  the squared distance of every view's projection to the mean over views, SIGReg the
  Epps-Pulley test on 256 fresh random slices per step (17 knots on [0, 3], trapezoid doubled,
  times N), a BatchNorm MLP projector 512-2048-2048-16 (torchvision.ops.MLP), lr 2e-3 with
  weight decay 5e-2 and an online probe (LayerNorm + linear on the detached embeddings of all
  views, lr 1e-3, weight decay 1e-7) in one AdamW, LinearLR warm-up from 0.01 x lr then
  CosineAnnealingLR to eta_min 1e-3, batch 256, torchvision v2 augmentations in a DataLoader,
  torch.manual_seed(0)), written here (nothing of it is imported or copied), with these
  adaptations to Fashion-MNIST 28 px on a CPU:
  * backbone: our CPU default's ViT (config.model: width 384, depth 2, patch 7, 6 heads,
    MLP 1536) in place of timm's vit_small_patch8_224 at 128 px, written in timm's form, which
    the recipe instantiates: position embeddings over CLS and patches, pre-norm blocks with a
    qkv bias, exact GELU, LayerNorm eps 1e-6, final LayerNorm, a linear head to the 512-d
    embedding (the recipe's num_classes=512), stochastic depth rising linearly to 0.1 over
    the blocks (drop_path_rate=0.1), timm's initialisation (truncated normal 0.02 for linear
    layers and position embeddings, CLS 1e-6). The last block is computed whole, as in timm
    (ours computes its CLS tokens only: a speed-up of our implementation, same result);
  * images: one grayscale channel, as ours (the recipe converts to RGB; ColorJitter's
    saturation and hue and RandomGrayscale then do nothing, as in ours); views of 28 px
    (the recipe: 128 px crops of 160 px images) with its crop scale 0.08-1; every other
    augmentation with its parameters unchanged, in pixels (blur: kernel 7, sigma 0.1-2,
    p 0.5; solarize: threshold 128 in RandomApply(p=0.2) around RandomSolarize's own p=0.5,
    0.1 overall, as the recipe's code does); normalised with Fashion-MNIST's mean and std
    (config data.mean, data.std) instead of ImageNet's. Evaluation: the whole 28 px image,
    normalised (the recipe's Resize + CenterCrop to 128 px are identities at 28 px);
  * precision float32, as our CPU default (the recipe: bf16 autocast and a GradScaler on
    CUDA); --torch_bf16 runs the step under CPU bf16 autocast instead;
  * online probe: 10 outputs (the recipe's code has 100 for Imagenette's 10 classes);
  * schedule: total steps from the rule below instead of 800 epochs; warm-up the same fraction
    of the run as ours (config optim.warmup_steps / total_steps, 10%) instead of one epoch
    (the whole budget here is one or two epochs); LinearLR's start factor 0.01 and the
    cosine's absolute eta_min 1e-3 kept (so the network's lr ends at half its peak and the
    probe's stays 1e-3, as in the recipe's code);
  * no per-epoch test evaluation of the online probe and no wandb (monitoring); the
    DataLoader has --torch_workers workers (the recipe: 8; this machine has 2 cores),
    persistent across epochs; torch uses every core (torch.set_num_threads).

Equal wall time. Both sides use a schedule whose length must be known in advance, so both
get it by the same rule. Calibration (once per side, before the timed runs, in the same kind
of child process): 5 warm-up steps, then --calibration_steps steps; s/step = the median of
the per-step time over 5-step intervals after the warm-up (ours: the trainer's logged
train/step_seconds at log_every=5; torch: timestamps every 5 steps); startup = the
calibration's wall time (process launch to the end of its last step) - its steps x s/step.
For a budget of M minutes: total_steps = floor(0.97 x (60 M - startup) / (s/step)). The
timed run's wall time is measured from launching the child to the end of its last training
step (imports, data, compilation, DataLoader workers and our checkpoints included; feature
extraction and the probe excluded) and printed; one over M minutes is flagged. Budgets run
one after the other, the order of the sides alternating (ours first for the first budget).

The probe: the config's `evals.linear_probe` (lejepa_jax.evaluators.linear_probe: LayerNorm +
linear, AdamW, its lr chosen on 10% of the training split held out, then retrained on all of
it) on both feature sets, loaded from the children's .npz files the same way
(`features.from_numpy`), with the same seed. --max_probe_examples caps both splits (the first
N images of each) for smoke runs.

Printed: the machine (CPU model, cores, vector extensions), the calibration, one line per
timed run and its probe, then a table: budget, side, steps, images seen, wall minutes,
images/s (images, not views, over the whole wall time, startup included), the probe's lr and
its test top-1.
"""
import gzip
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import machine as machine_lib   # benchmarks/machine.py, beside this script

import numpy as np

# MINIMAL.md's settings (its command line `+lamb=0.02 +V=4 +proj_dim=16 +lr=2e-3 +bs=256` and
# the constants in its code); the adaptations are in the docstring.
RECIPE = dict(views=4, lamb=0.02, proj_dim=16, lr=2e-3, batch_size=256, num_slices=256,
              knots=17, t_max=3.0, weight_decay=5e-2, embed_dim=512, proj_hidden=(2048, 2048),
              drop_path=0.1, crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_prob=0.8,
              grayscale_prob=0.2, blur_kernel=7, blur_sigma=(0.1, 2.0), blur_prob=0.5,
              solarize_threshold=128, solarize_prob=0.2, probe_lr=1e-3, probe_weight_decay=1e-7,
              warmup_start_factor=0.01, eta_min=1e-3, seed=0)
SAFETY = 0.97           # of the budget left after startup: room for run-to-run noise
MARK_EVERY = 5          # steps per timing interval in the calibration
CAL_WARMUP = 5          # calibration steps not timed (compilation, first batches)
_ROOT = pathlib.Path(__file__).resolve().parents[1]
_FMNIST_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                 'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}

# This file is also the PyTorch child (`--torch_child SPEC.json`, run by --torch_python): that
# venv has torch and torchvision but neither absl nor jax, so the imports split here.
_TORCH_CHILD = __name__ == '__main__' and sys.argv[1:2] == ['--torch_child']
if _TORCH_CHILD:
  import torch
  import torch.nn.functional as F
  import torchvision
  from PIL import Image
  from torchvision.ops import MLP
  from torchvision.transforms import v2
else:
  sys.path.insert(0, str(_ROOT))    # the checkout's package, installed or not
  from absl import app
  from absl import flags
  import jax
  from ml_collections import config_flags

  from lejepa_jax import checkpoint as ckpt_lib
  from lejepa_jax import config_schema
  from lejepa_jax import run_config
  from lejepa_jax import sharding as sharding_lib
  from lejepa_jax import steps
  from lejepa_jax import train as train_lib
  from lejepa_jax.data import sources
  from lejepa_jax.evaluators import features as features_lib
  from lejepa_jax.evaluators import suite

  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/fmnist.py', 'Our side\'s config.')
  _RESNET_CONFIG = config_flags.DEFINE_config_file('resnet_config', 'configs/fmnist_resnet.py',
                                                   "The resnet side's config.")
  _MINUTES = flags.DEFINE_list('minutes', ['10', '20'], 'Training budgets in minutes, per side.')
  _TORCH_PYTHON = flags.DEFINE_string('torch_python', '/opt/tvenv/bin/python',
                                      'A Python with torch and torchvision (the PyTorch side).')
  _MAX_PROBE = flags.DEFINE_integer('max_probe_examples', 0,
                                    'Probe on the first N images of each split (0: all).')
  _CAL_STEPS = flags.DEFINE_integer('calibration_steps', 25,
                                    'Timed calibration steps per side (rounded up to a multiple '
                                    f'of {MARK_EVERY}), after {CAL_WARMUP} warm-up steps.')
  _TORCH_WORKERS = flags.DEFINE_integer('torch_workers', 2, 'DataLoader workers (PyTorch side).')
  _TORCH_BF16 = flags.DEFINE_bool('torch_bf16', False, 'PyTorch side under CPU bf16 autocast.')
  _SIDES = flags.DEFINE_list('sides', ['ours', 'torch'], "Sides to run: any of 'ours', 'torch', "
                             "'resnet' (one side alone: its figure at the budget, no comparison).")
  _WORKDIR = flags.DEFINE_string('workdir', '', 'Directory for the runs (default: a new /tmp '
                                 'directory); must not hold runs of the same budgets already.')
  _QUICK = flags.DEFINE_bool('quick', False, 'A smoke answer (1 minute per side, 10 calibration '
                             'steps, probes on 2,000 images; under 3 minutes with --sides=ours)')
  QUICK = {'minutes': ['1'], 'calibration_steps': 10, 'max_probe_examples': 2000}
  _OURS_CHILD = flags.DEFINE_string('ours_child', None, 'Internal: train our side in this '
                                    'prepared workdir (config.json, spec.json) and exit.')


def read_idx(directory, split):
  """Fashion-MNIST IDX files ([.gz]) -> images (N, H, W) uint8, labels (N,) int64."""
  out = []
  for stem in _FMNIST_FILES[split]:
    candidates = (pathlib.Path(directory) / (stem + '.gz'), pathlib.Path(directory) / stem)
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
      raise FileNotFoundError(f'{stem}[.gz] not found in {directory}')
    with (gzip.open if path.suffix == '.gz' else open)(path, 'rb') as f:
      data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    out.append(np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy())
  return out[0], out[1].astype(np.int64)


# ----------------------------------------------------------------------------- PyTorch side

if _TORCH_CHILD:
  class Block(torch.nn.Module):
    """timm's pre-norm ViT block: attention, then a GELU MLP, each behind stochastic depth."""

    def __init__(self, width, mlp_dim, num_heads, drop_path):
      super().__init__()
      self.num_heads, self.drop_path = num_heads, drop_path
      self.norm1 = torch.nn.LayerNorm(width, eps=1e-6)
      self.qkv = torch.nn.Linear(width, 3 * width)
      self.proj = torch.nn.Linear(width, width)
      self.norm2 = torch.nn.LayerNorm(width, eps=1e-6)
      self.fc1 = torch.nn.Linear(width, mlp_dim)
      self.fc2 = torch.nn.Linear(mlp_dim, width)

    def _drop(self, y):
      """Stochastic depth: a whole residual branch dropped per sample, the rest rescaled."""
      if not self.training or not self.drop_path:
        return y
      keep = 1.0 - self.drop_path
      return y * y.new_empty((y.shape[0], 1, 1)).bernoulli_(keep) / keep

    def forward(self, x):
      b, s, w = x.shape
      qkv = self.qkv(self.norm1(x)).reshape(b, s, 3, self.num_heads, w // self.num_heads)
      q, k, v = qkv.permute(2, 0, 3, 1, 4)                      # (B, heads, S, head_dim)
      y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, w)
      x = x + self._drop(self.proj(y))
      return x + self._drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))

  class Encoder(torch.nn.Module):
    """The recipe's encoder (backbone with a 512-d head, then the BatchNorm MLP projector)
    with our CPU default's ViT as the backbone."""

    def __init__(self, m, r):
      super().__init__()
      width, p = m['width'], m['patch_size']
      grid = m['image_size'] // p
      self.patch_embed = torch.nn.Conv2d(m['channels'], width, p, stride=p)
      self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, width))
      self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + grid * grid, width))
      rates = torch.linspace(0, r['drop_path'], m['depth']).tolist()
      self.blocks = torch.nn.ModuleList(
          [Block(width, m['mlp_dim'], m['num_heads'], rate) for rate in rates])
      self.norm = torch.nn.LayerNorm(width, eps=1e-6)
      self.head = torch.nn.Linear(width, r['embed_dim'])
      self.proj = MLP(r['embed_dim'], [*r['proj_hidden'], r['proj_dim']],
                      norm_layer=torch.nn.BatchNorm1d)
      # timm's initialisation of the backbone; the projector keeps torchvision's.
      torch.nn.init.trunc_normal_(self.pos_embed, std=0.02)
      torch.nn.init.normal_(self.cls_token, std=1e-6)
      for module in [*self.blocks.modules(), self.head]:
        if isinstance(module, torch.nn.Linear):
          torch.nn.init.trunc_normal_(module.weight, std=0.02)
          torch.nn.init.zeros_(module.bias)

    def backbone(self, images):
      """(B, C, H, W) -> embedding (B, 512), probe features (B, 2 width): the CLS tokens of the
      last two blocks, concatenated, as ours (eval.features='probe')."""
      x = self.patch_embed(images).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
      cls = []
      for block in self.blocks:
        x = block(x)
        cls.append(x[:, 0])
      return self.head(self.norm(x)[:, 0]), torch.cat((cls * 2)[-2:], dim=-1)

    def forward(self, views):
      """(N, V, C, H, W) -> embeddings (N V, 512), projections (V, N, proj_dim)."""
      n, v = views.shape[:2]
      emb, _ = self.backbone(views.flatten(0, 1))
      return emb, self.proj(emb).reshape(n, v, -1).transpose(0, 1)

  class Views(torch.utils.data.Dataset):
    """V augmented views of each image, (V, C, H, W), and its label."""

    def __init__(self, images, labels, transform, num_views):
      self.images, self.labels = images, labels
      self.transform, self.num_views = transform, num_views

    def __len__(self):
      return len(self.labels)

    def __getitem__(self, i):
      image = Image.fromarray(self.images[i])                  # 'L': one channel
      return (torch.stack([self.transform(image) for _ in range(self.num_views)]),
              int(self.labels[i]))


def augmentation(r, size, mean, std):
  """The recipe's torchvision v2 pipeline for views of `size` px."""
  return v2.Compose([
      v2.RandomResizedCrop(size, scale=tuple(r['crop_scale'])),
      v2.RandomApply([v2.ColorJitter(*r['jitter'])], p=r['jitter_prob']),
      v2.RandomGrayscale(p=r['grayscale_prob']),
      v2.RandomApply([v2.GaussianBlur(kernel_size=r['blur_kernel'],
                                      sigma=tuple(r['blur_sigma']))], p=r['blur_prob']),
      v2.RandomApply([v2.RandomSolarize(threshold=r['solarize_threshold'])],
                     p=r['solarize_prob']),
      v2.RandomHorizontalFlip(),
      v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
      v2.Normalize(mean=list(mean), std=list(std))])


def sigreg_constants(r):
  """Knots t on [0, t_max], the target exp(-t^2/2), trapezoid weights (doubled inside) x target."""
  t = torch.linspace(0, r['t_max'], r['knots'])
  dt = r['t_max'] / (r['knots'] - 1)
  trapezoid = torch.full((r['knots'],), 2 * dt)
  trapezoid[0] = trapezoid[-1] = dt
  phi = torch.exp(-0.5 * t ** 2)
  return t, phi, trapezoid * phi


def sigreg(proj, num_slices, t, phi, weights):
  """SIGReg of (V, N, K) projections: per view and slice, N x the weighted squared distance of
  the empirical characteristic function from phi; mean over views and slices."""
  slices = torch.randn(proj.shape[-1], num_slices)             # fresh every step
  slices = slices / slices.norm(dim=0)
  xt = (proj @ slices).unsqueeze(-1) * t                        # (V, N, M, T)
  err = (xt.cos().mean(-3) - phi) ** 2 + xt.sin().mean(-3) ** 2
  return ((err @ weights) * proj.shape[-2]).mean()


def torch_train(spec, images, labels):
  """The recipe's training loop for spec['total_steps'] steps; returns (net, marks, last terms).

  marks: (step, time.time()) every MARK_EVERY steps, for the calibration."""
  r, m = spec['recipe'], spec['model']
  loader = torch.utils.data.DataLoader(
      Views(images, labels, augmentation(r, m['image_size'], spec['mean'], spec['std']),
            r['views']),
      batch_size=r['batch_size'], shuffle=True, drop_last=True,
      num_workers=spec['workers'], persistent_workers=spec['workers'] > 0)
  net = Encoder(m, r)
  probe = torch.nn.Sequential(torch.nn.LayerNorm(r['embed_dim']),
                              torch.nn.Linear(r['embed_dim'], spec['num_classes']))
  opt = torch.optim.AdamW([
      {'params': net.parameters(), 'lr': r['lr'], 'weight_decay': r['weight_decay']},
      {'params': probe.parameters(), 'lr': r['probe_lr'],
       'weight_decay': r['probe_weight_decay']}])
  total, warmup = spec['total_steps'], spec['warmup_steps']
  schedule = torch.optim.lr_scheduler.SequentialLR(opt, [
      torch.optim.lr_scheduler.LinearLR(opt, start_factor=r['warmup_start_factor'],
                                        total_iters=warmup),
      torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=r['eta_min'])],
      milestones=[warmup])
  t, phi, weights = sigreg_constants(r)
  lamb, views = r['lamb'], r['views']
  marks, step, terms = [], 0, {}
  net.train(), probe.train()
  while step < total:
    for x, y in loader:
      with torch.autocast('cpu', dtype=torch.bfloat16, enabled=spec['bf16']):
        emb, proj = net(x)
        inv = (proj.mean(0) - proj).square().mean()
        sig = sigreg(proj, r['num_slices'], t, phi, weights)
        lejepa = (1 - lamb) * inv + lamb * sig
        probe_loss = F.cross_entropy(probe(emb.detach()), y.repeat_interleave(views))
      opt.zero_grad()
      (lejepa + probe_loss).backward()
      opt.step()
      schedule.step()
      step += 1
      if step % MARK_EVERY == 0 or step == total:
        marks.append((step, time.time()))
      if step % 50 == 0 or step == total:
        terms = {'loss': lejepa.item(), 'inv': inv.item(), 'sigreg': sig.item(),
                 'probe_loss': probe_loss.item()}
        print(f'step {step}/{total} ' + ' '.join(f'{k}={v:.4f}' for k, v in terms.items()),
              flush=True)
      if step == total:
        break
  return net, marks, terms


def torch_features(net, images, spec):
  """Probe features of images (N, H, W) uint8: the whole image, normalised, 1000 at a time."""
  net.eval()
  mean, std = float(spec['mean'][0]), float(spec['std'][0])
  out = []
  with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=spec['bf16']):
    for i in range(0, len(images), 1000):
      x = torch.from_numpy(images[i:i + 1000]).float().div(255).sub(mean).div(std).unsqueeze(1)
      out.append(net.backbone(x)[1].float().numpy())
  return np.concatenate(out)


def torch_child(spec_path):
  """Trains the PyTorch side as spec.json says; writes result.json (and features.npz)."""
  spec = json.loads(pathlib.Path(spec_path).read_text())
  out = pathlib.Path(spec['out'])
  torch.set_num_threads(spec['threads'])
  torch.manual_seed(spec['recipe']['seed'])
  images, labels = read_idx(spec['data_dir'], 'train')
  net, marks, terms = torch_train(spec, images, labels)
  result = {'train_end': time.time(), 'steps': spec['total_steps'],
            'batch_size': spec['recipe']['batch_size'], 'marks': marks, 'terms': terms,
            'versions': f'torch {torch.__version__}, torchvision {torchvision.__version__}'}
  if spec['features']:
    cap = spec['max_probe_examples'] or None
    test_images, test_labels = read_idx(spec['data_dir'], 'test')
    np.savez(out / 'features.npz',
             x_train=torch_features(net, images[:cap], spec), y_train=labels[:cap],
             x_test=torch_features(net, test_images[:cap], spec), y_test=test_labels[:cap])
  (out / 'result.json').write_text(json.dumps(result))


if _TORCH_CHILD:
  torch_child(sys.argv[2])
  sys.exit(0)


# ----------------------------------------------------------------------------- our side

def ours_child(workdir):
  """Trains our side in a prepared workdir; writes result.json (and features.npz)."""
  workdir = pathlib.Path(workdir)
  spec = json.loads((workdir / 'spec.json').read_text())
  config = run_config.load(workdir)
  train_lib.train_and_evaluate(config, str(workdir))
  result = {'train_end': time.time(), 'steps': int(config.total_steps),
            'batch_size': int(config.batch_size), 'versions': f'jax {jax.__version__}'}
  if spec['features']:
    mesh = sharding_lib.make_mesh(config.get('mesh'))
    programs = steps.build(config, mesh, int(config.total_steps))
    state, _ = ckpt_lib.restore_state(str(workdir), programs.abstract_state)
    with sharding_lib.activate(mesh):
      train, test = suite.Runner(config, programs).features(steps.variables(state),
                                                            spec['max_probe_examples'])
    np.savez(workdir / 'features.npz', **_host(train, 'train'), **_host(test, 'test'))
  (workdir / 'result.json').write_text(json.dumps(result))


def _host(f, split):
  """Features -> {'x_SPLIT': (N, F), 'y_SPLIT': (N,)} in record order, padding dropped."""
  x = np.asarray(f.x).reshape(-1, f.x.shape[-1])
  y = np.asarray(f.y).reshape(-1)
  return {f'x_{split}': x[y >= 0], f'y_{split}': y[y >= 0]}


def warmup_steps(config, total):
  """Warm-up steps of a `total`-step run on either side: the config's fraction (150/1500)."""
  return max(1, min(round(total * config.optim.warmup_steps / config.total_steps), total - 1))


def ours_config(config, total, *, calibration):
  """Our config for a run of `total` steps: schedule and checkpoints scaled, monitoring off."""
  c = config_schema.resolve(config.copy_and_resolve_references())   # every key present
  c.total_steps = total
  c.optim.warmup_steps = warmup_steps(config, total)
  c.checkpoint_every = total if calibration else max(
      1, round(total * config.checkpoint_every / config.total_steps))
  if calibration:
    c.log_every = MARK_EVERY        # the trainer's step_seconds over 5-step intervals
  c.diagnostics.every = 0
  c.diagnostics.plots = False
  c.evals = {}                      # no k-NN curve, no final evaluators: features afterwards
  c.eval.features = 'probe'
  return c


# ----------------------------------------------------------------------------- runs

OUR_TRAINER = ('ours', 'resnet')    # sides trained by lejepa_jax (each with its own config)


def _launch(side, run_dir, config, total, *, calibration, features):
  """Runs one side's child for `total` steps in run_dir; returns its result with wall_s."""
  run_dir.mkdir(parents=True)
  spec = {'features': features, 'max_probe_examples': _MAX_PROBE.value}
  if side in OUR_TRAINER:
    run_config.save(run_dir, ours_config(config, total, calibration=calibration))
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), f'--ours_child={run_dir}']
  else:
    d, m = config.data, config.model
    spec.update(
        out=str(run_dir), total_steps=total, warmup_steps=warmup_steps(config, total),
        recipe=RECIPE, num_classes=d.num_classes, mean=list(d.mean), std=list(d.std),
        data_dir=d.get('dir') or sources.FASHION_MNIST_DIR, workers=_TORCH_WORKERS.value,
        threads=os.cpu_count(), bf16=_TORCH_BF16.value,
        model=dict(width=m.width, depth=m.depth, patch_size=m.patch_size, mlp_dim=m.mlp_dim,
                   num_heads=m.num_heads, channels=d.channels, image_size=d.global_size))
    cmd = [_TORCH_PYTHON.value, str(pathlib.Path(__file__).resolve()), '--torch_child',
           str(run_dir / 'spec.json')]
  (run_dir / 'spec.json').write_text(json.dumps(spec))
  with open(run_dir / 'log.txt', 'w') as log:
    launch = time.time()
    proc = subprocess.run(cmd, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
  if proc.returncode or not (run_dir / 'result.json').exists():
    tail = (run_dir / 'log.txt').read_text()[-3000:]
    raise RuntimeError(f'{side} child failed (status {proc.returncode}); '
                       f'{run_dir}/log.txt ends:\n{tail}')
  result = json.loads((run_dir / 'result.json').read_text())
  result['wall_s'] = result['train_end'] - launch
  return result


def _step_seconds(side, run_dir, result):
  """Per-step seconds of each MARK_EVERY-step interval that starts after the warm-up."""
  if side in OUR_TRAINER:
    lines = [json.loads(l) for l in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    return [l['train/step_seconds'] for l in lines
            if 'train/step_seconds' in l and l['step'] - MARK_EVERY >= CAL_WARMUP]
  marks = [(s, t) for s, t in result['marks'] if s % MARK_EVERY == 0]
  return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(marks, marks[1:])
          if s0 >= CAL_WARMUP]


def calibrate(side, root, config):
  """(s/step, startup s, versions) of a side, from a short run of the same kind of child."""
  n = CAL_WARMUP + MARK_EVERY * max(2, math.ceil(_CAL_STEPS.value / MARK_EVERY))
  run_dir = root / f'calibration_{side}'
  result = _launch(side, run_dir, config, n, calibration=True, features=False)
  sec = statistics.median(_step_seconds(side, run_dir, result))
  return sec, max(result['wall_s'] - n * sec, 0.0), result['versions']


def probe(path, config, mesh):
  """The config's linear_probe evaluator on a features.npz: (test top-1, chosen lr, train
  images, test images)."""
  data = np.load(path)
  spec = suite.specs(config, ['linear_probe'])[0]
  out = suite.TYPES[spec.type][0](
      features_lib.from_numpy(data['x_train'], data['y_train'], mesh),
      features_lib.from_numpy(data['x_test'], data['y_test'], mesh),
      config.data.num_classes, mesh=mesh, seed=config.seed, **spec.options)
  return out['linear_probe_top1'], out['linear_probe_lr'], len(data['y_train']), len(data['y_test'])


def main(argv):
  del argv
  if _OURS_CHILD.value:
    return ours_child(_OURS_CHILD.value)
  if _QUICK.value:
    print('--quick:', machine_lib.apply_quick(flags.FLAGS, QUICK), flush=True)
  config = _CONFIG.value
  if config.data.name != 'fashion_mnist':
    raise SystemExit(f'data.name={config.data.name!r}: the PyTorch side reads Fashion-MNIST only')
  sides = tuple(s for s in ('ours', 'torch', 'resnet') if s in _SIDES.value)
  if not sides or set(_SIDES.value) - {'ours', 'torch', 'resnet'}:
    raise SystemExit(f'--sides={",".join(_SIDES.value)}: any of ours, torch, resnet')
  configs = {'ours': config, 'torch': config, 'resnet': _RESNET_CONFIG.value}
  if 'torch' in sides and not pathlib.Path(_TORCH_PYTHON.value).exists():
    raise SystemExit(f'--torch_python={_TORCH_PYTHON.value} does not exist: make a venv with '
                     '`pip install torch torchvision` and pass its python')
  budgets = [float(m) for m in _MINUTES.value]
  if not budgets or min(budgets) <= 0:
    raise SystemExit(f'--minutes={",".join(_MINUTES.value)}: give budgets > 0, e.g. '
                     '--minutes=10,20')
  root = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix='accuracy_per_minute_'))
  root.mkdir(parents=True, exist_ok=True)
  names = [f'calibration_{side}' for side in sides] + [
      f'{m:g}min_{side}' for m in budgets for side in sides]
  taken = sorted({n for n in names if (root / n).exists() or names.count(n) > 1})
  if taken:     # a fresh directory per run: our trainer would resume from an old checkpoint
    raise SystemExit(f'--workdir={root} already holds (or --minutes repeats) {", ".join(taken)}: '
                     'pass a new --workdir and distinct budgets')
  print(f'machine: {machine_lib.cpu()}; runs in {root}', flush=True)

  cal = {side: calibrate(side, root, configs[side]) for side in sides}
  batch = {'ours': config.batch_size, 'torch': RECIPE['batch_size'],
           'resnet': configs['resnet'].batch_size}
  print(f'calibration ({CAL_WARMUP} warm-up steps, then s/step = median over {MARK_EVERY}-step '
        'intervals; startup = wall - steps x s/step):', flush=True)
  for side, (sec, startup, versions) in cal.items():
    print(f'  {side:5s} {sec:.3f} s/step x batch {batch[side]} = '
          f'{batch[side] / sec:.0f} images/s, startup {startup:.1f} s ({versions})', flush=True)

  mesh = sharding_lib.make_mesh(config.get('mesh'))
  rows = []
  for i, minutes in enumerate(budgets):
    for side in (sides if i % 2 == 0 else sides[::-1]):
      sec, startup, _ = cal[side]
      total = math.floor(SAFETY * (60 * minutes - startup) / sec)
      if total < 2:
        raise SystemExit(f'--minutes={minutes:g} leaves {side} {total} steps: raise the budget')
      run_dir = root / f'{minutes:g}min_{side}'
      result = _launch(side, run_dir, configs[side], total, calibration=False, features=True)
      over = '  OVER BUDGET' if result['wall_s'] > 60 * minutes else ''
      print(f'{minutes:g} min, {side}: {total} steps in {result["wall_s"] / 60:.2f} min{over} '
            f'({run_dir})', flush=True)
      # Probed at once (nothing trains meanwhile), so an interrupted run keeps its figures.
      top1, lr, n_train, n_test = probe(run_dir / 'features.npz', configs[side], mesh)
      images = result['steps'] * result['batch_size']
      rows.append(f'| {minutes:g} | {side} | {result["steps"]} | {images:,} | '
                  f'{result["wall_s"] / 60:.2f} | {images / result["wall_s"]:.0f} | {lr:g} | '
                  f'{top1:.4f} |')
      print(f'{minutes:g} min, {side}: linear-probe top-1 {top1:.4f} (lr {lr:g})', flush=True)

  print(f'\nmachine: {machine_lib.cpu()}; linear probe: config evals.linear_probe on {n_train:,} train / '
        f'{n_test:,} test images')
  print('| budget (min) | side | steps | images | wall (min) | images/s | probe lr | '
        'linear-probe top-1 |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  print('\n'.join(rows), flush=True)


if __name__ == '__main__':
  app.run(main)
