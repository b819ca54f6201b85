"""Images per second of the CPU default's train step against the same step in plain PyTorch.

  python benchmarks/train_step.py [--config=configs/fmnist.py] [--rounds=10] [--steps=5]
      [--warmup=3] [--torch_adamw=default|foreach|fused] [--notorch_cls_only] [--breakdown]
      [--quick]

Needs `pip install -e .[bench]` (torch==2.13.0, CPU build).

Our side is `steps.build(config, mesh)`'s jitted `train_step` (forward on all views,
projector, LeJEPA loss, backward, AdamW, online probe, the finite checks and grad norm),
exactly what `python -m lejepa_jax.main` runs, fed one fixed global batch. The PyTorch side
is a plain-PyTorch port written here of the same computation: ViT with patch-embedding
convolution, CLS token, learned position embeddings bilinearly resized for the local crops,
pre-LN blocks, fused qkv, `F.scaled_dot_product_attention`, tanh GELU; the BatchNorm MLP
projector over all views; the loss (1 - lamb) * inv + lamb * SIGReg with the Epps-Pulley
statistic as the reference algorithm computes it ((N, M, T) cos and sin, trapezoid weights);
the online probe (LayerNorm + linear on the stop-gradient CLS tokens of the last two blocks);
AdamW with weight decay on kernels only and the same warmup-cosine schedule, probe in its own
group. Both sides use every core (torch.set_num_threads).

Our ViT computes only the CLS tokens in its last block (nothing reads its other tokens;
`models.vit`), which cuts this 2-block model's FLOPs by about 40%. So that the ratio is not read as
XLA against PyTorch alone, a third side (default on; --notorch_cls_only drops it) times the
port with the same pruning of its last block.

Before timing, the port is checked to be the same computation: parameter counts; with the
JAX parameters copied into it and the same SIGReg slices, the loss terms and gradient norm
of one batch (also for the pruned port); and the parameter updates of three steps.

Timing: after warm-up, `--rounds` rounds alternate the sides (ours, PyTorch, pruned PyTorch,
then 2048^3 matmuls in float32 and bfloat16 in jnp and torch); a round times `--steps` steps.
Printed: median seconds per step, images per second (images, not views) of every side,
ratios (median of per-round ratios), FLOPs per image (model: 3 x the forward matmul FLOPs of
the whole ViT, attention included, what the plain port runs; executed: XLA's count of our
compiled step), achieved FLOP/s against the matmul peaks measured in the same run, and our
lower and compile times. `--breakdown` also times pieces of our step.
Absolute numbers move with the machine's load (other processes slow the OpenMP-threaded
PyTorch side far more than ours); compare ratios within one run, on a quiet machine.
"""
import os
import statistics
import time

import machine as machine_lib   # benchmarks/machine.py, beside this script

from absl import app
from absl import flags
from ml_collections import config_flags

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lejepa_jax import losses
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import sigreg as sigreg_lib
from lejepa_jax import steps

try:
  import torch
  import torch.nn.functional as F
except ImportError:
  torch = None

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fmnist.py', 'Config file.')
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Alternating timed rounds.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Train steps per side per round.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps per side first.')
_TORCH_ADAMW = flags.DEFINE_enum('torch_adamw', 'default', ['default', 'foreach', 'fused'],
                                 "torch.optim.AdamW's implementation.")
_BREAKDOWN = flags.DEFINE_bool('breakdown', False, 'Also time pieces of our step.')
_TORCH_PRUNED = flags.DEFINE_bool(
    'torch_cls_only', True, 'Also time the PyTorch port with the same pruning of the last '
    'block as ours (its CLS tokens only, keys and values folded into the query).')
_QUICK = flags.DEFINE_bool('quick', False, 'An answer in under 3 minutes: 3 rounds of 3 steps, '
                           'no breakdown.')
_MATMUL = 2048
_PROBE_SIZE = 256


# ----------------------------------------------------------------------------- machine

def machine() -> str:
  return (f'{machine_lib.cpu()}; jax {jax.__version__}, '
          f'torch {torch.__version__ if torch else "absent"}; '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')


# ----------------------------------------------------------------------------- FLOPs

def model_flops_per_image(config) -> float:
  """3 x forward matmul FLOPs of one image (all views): the 6 N T convention + attention."""
  m, d = config.model, config.data
  width, mlp, depth, p = m.width, m.mlp_dim, m.depth, m.patch_size
  fwd = 0.0
  views = [d.global_size] * d.num_global_views + [d.local_size] * d.num_local_views
  for size in views:
    patches = (size // p) ** 2
    s = patches + 1 + m.get('num_registers', 0)
    fwd += 2 * patches * p * p * d.channels * width                       # patch embedding
    fwd += depth * (2 * s * width * (3 * width + width + 2 * mlp)        # qkv, out, MLP
                    + 2 * 2 * s * s * width)                              # q k^T, a v
    dims = [width, *m.projector_hidden, m.projector_out]
    fwd += sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))            # projector
  fwd += d.num_global_views * 2 * 2 * width * d.num_classes               # probe
  return 3 * fwd


# ----------------------------------------------------------------------------- PyTorch port

def _np(x):
  if torch is not None and isinstance(x, torch.Tensor):
    x = x.detach()
  return np.asarray(jax.device_get(x), np.float32)


def _t(x):
  return torch.from_numpy(np.ascontiguousarray(_np(x)))


if torch is not None:
  class TorchBlock(torch.nn.Module):
    def __init__(self, width, mlp_dim, num_heads):
      super().__init__()
      self.num_heads = num_heads
      self.norm1 = torch.nn.LayerNorm(width, eps=1e-6)
      self.qkv = torch.nn.Linear(width, 3 * width)
      self.out = torch.nn.Linear(width, width)
      self.norm2 = torch.nn.LayerNorm(width, eps=1e-6)
      self.mlp_in = torch.nn.Linear(width, mlp_dim)
      self.mlp_out = torch.nn.Linear(mlp_dim, width)

    def forward(self, x, cls_only=False):
      b, s, w = x.shape
      if cls_only:   # only the CLS token's output (ours: attention._attention_cls_queries)
        return self.forward_cls(x)
      qkv = self.qkv(self.norm1(x)).reshape(b, s, 3, self.num_heads, w // self.num_heads)
      q, k, v = qkv.permute(2, 0, 3, 1, 4)                    # (B, heads, S, head_dim) each
      y = F.scaled_dot_product_attention(q, k, v)
      x = x + self.out(y.transpose(1, 2).reshape(b, s, w))
      return x + self.mlp_out(F.gelu(self.mlp_in(self.norm2(x)), approximate='tanh'))

    def forward_cls(self, x):
      """The same block for the CLS token only, keys and values folded into the query."""
      b, s, w = x.shape
      h, hd = self.num_heads, w // self.num_heads
      xn = self.norm1(x)
      wq, wk, wv = self.qkv.weight.reshape(3, h, hd, w)
      bq, _, bv = self.qkv.bias.reshape(3, h, hd)
      q = torch.einsum('bd,hkd->bhk', xn[:, 0], wq) + bq
      logits = torch.einsum('bhk,hkd,bsd->bhs', q, wk, xn) * hd ** -0.5
      context = torch.einsum('bhs,bsd->bhd', logits.softmax(-1), xn)
      y = torch.einsum('bhd,hkd->bhk', context, wv) + bv
      x = x[:, :1] + self.out(y.reshape(b, 1, w))
      return x + self.mlp_out(F.gelu(self.mlp_in(self.norm2(x)), approximate='tanh'))

  class TorchViT(torch.nn.Module):
    def __init__(self, m, d, cls_only_last=False):
      super().__init__()
      self.cls_only_last = cls_only_last
      self.p, self.base_grid = m.patch_size, d.global_size // m.patch_size
      self.patch_embed = torch.nn.Conv2d(d.channels, m.width, m.patch_size, stride=m.patch_size)
      self.pos_embedding = torch.nn.Parameter(torch.zeros(1, self.base_grid ** 2, m.width))
      self.cls = torch.nn.Parameter(torch.zeros(1, 1, m.width))
      self.blocks = torch.nn.ModuleList(
          [TorchBlock(m.width, m.mlp_dim, m.num_heads) for _ in range(m.depth)])
      self.final_norm = torch.nn.LayerNorm(m.width, eps=1e-6)

    def forward(self, images):                                  # (B, C, H, W)
      x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, grid^2, width)
      grid, w = images.shape[-1] // self.p, x.shape[-1]
      pos = self.pos_embedding
      if grid != self.base_grid:
        pos = pos.reshape(1, self.base_grid, self.base_grid, w).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(grid, grid), mode='bilinear', align_corners=False,
                            antialias=False).permute(0, 2, 3, 1).reshape(1, grid * grid, w)
      x = torch.cat([self.cls.expand(x.shape[0], 1, w), x + pos], dim=1)
      cls = []
      for i, block in enumerate(self.blocks):
        x = block(x, cls_only=self.cls_only_last and i == len(self.blocks) - 1)
        cls.append(x[:, 0])
      last_two = cls[-2:] if len(cls) > 1 else cls * 2
      return self.final_norm(x)[:, 0], torch.cat(last_two, dim=-1)

  class TorchLeJEPA(torch.nn.Module):
    def __init__(self, config, cls_only_last=False):
      super().__init__()
      m, d = config.model, config.data
      self.vit = TorchViT(m, d, cls_only_last)
      dims, layers = [m.width, *m.projector_hidden], []
      for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.BatchNorm1d(b, eps=1e-5, momentum=0.1),
                   torch.nn.GELU(approximate='tanh')]
      self.projector = torch.nn.Sequential(*layers, torch.nn.Linear(dims[-1], m.projector_out))
      self.probe_norm = torch.nn.LayerNorm(2 * m.width, eps=1e-6)
      self.probe_head = torch.nn.Linear(2 * m.width, d.num_classes)

    def forward(self, global_views, local_views):
      """(B, Vg, C, H, W), (B, Vl, C, h, w) -> proj (V, B, K), probe logits (Vg, B, classes)."""
      b, vg = global_views.shape[:2]
      cls_g, feats = self.vit(global_views.flatten(0, 1))
      emb = [cls_g.reshape(b, vg, -1)]
      if local_views.shape[1]:
        cls_l, _ = self.vit(local_views.flatten(0, 1))
        emb.append(cls_l.reshape(b, local_views.shape[1], -1))
      emb = torch.cat(emb, dim=1)
      proj = self.projector(emb.flatten(0, 1)).reshape(b, emb.shape[1], -1).transpose(0, 1)
      logits = self.probe_head(self.probe_norm(feats.detach())).reshape(b, vg, -1)
      return proj, logits.transpose(0, 1)

  def torch_epps_pulley_sigreg(proj, slices, t_max, num_points):
    """The reference algorithm: (V, N, M, T) cos and sin, trapezoid on [0, t_max] doubled."""
    t = torch.linspace(0, t_max, num_points)
    phi = torch.exp(-0.5 * t ** 2)
    dt = t_max / (num_points - 1)
    weights = torch.full((num_points,), 2 * dt)
    weights[[0, -1]] = dt
    weights = weights * phi
    xt = (proj @ slices).unsqueeze(-1) * t                     # (V, N, M, T)
    err = (xt.cos().mean(-3) - phi) ** 2 + xt.sin().mean(-3) ** 2
    return ((err @ weights) * proj.shape[-2]).mean()

  def torch_loss(model, config, g, l, labels, slices):
    proj, logits = model(g, l)
    vg = config.data.num_global_views
    inv = (proj[:vg].mean(0, keepdim=True) - proj).square().mean()
    sig = torch_epps_pulley_sigreg(proj, slices, config.sigreg.t_max, config.sigreg.num_points)
    lamb = config.lamb
    loss = (1 - lamb) * inv + lamb * sig if config.loss_convention == 'convex' else inv + lamb * sig
    probe_loss = F.cross_entropy(logits.flatten(0, 1), labels.expand(vg, -1).flatten())
    return loss + probe_loss, {'loss': loss, 'inv': inv, 'sigreg': sig, 'probe_loss': probe_loss}

  def load_jax_params(model, params, batch_stats):
    """Copies the JAX variables into the port (works for scanned and unrolled blocks)."""
    enc, sd = params['encoder'], {}
    sd['vit.patch_embed.weight'] = _t(enc['patch_embed']['kernel']).permute(3, 2, 0, 1)
    sd['vit.patch_embed.bias'] = _t(enc['patch_embed']['bias'])
    sd['vit.pos_embedding'], sd['vit.cls'] = _t(enc['pos_embedding']), _t(enc['cls'])
    for i in range(len(model.vit.blocks)):
      blk = (jax.tree.map(lambda x: x[i], enc['blocks']) if 'blocks' in enc
             else enc[f'block_{i}'])
      pre = f'vit.blocks.{i}.'
      width = blk['attn']['qkv_kernel'].shape[0]
      for n in ('norm1', 'norm2'):
        sd[pre + n + '.weight'], sd[pre + n + '.bias'] = _t(blk[n]['scale']), _t(blk[n]['bias'])
      sd[pre + 'qkv.weight'] = _t(blk['attn']['qkv_kernel']).reshape(width, -1).T
      sd[pre + 'qkv.bias'] = _t(blk['attn']['qkv_bias']).reshape(-1)
      sd[pre + 'out.weight'] = _t(blk['attn']['out_kernel']).reshape(-1, width).T
      sd[pre + 'out.bias'] = _t(blk['attn']['out_bias'])
      for n in ('mlp_in', 'mlp_out'):
        sd[pre + n + '.weight'], sd[pre + n + '.bias'] = _t(blk[n]['kernel']).T, _t(blk[n]['bias'])
    sd['vit.final_norm.weight'] = _t(enc['final_norm']['scale'])
    sd['vit.final_norm.bias'] = _t(enc['final_norm']['bias'])
    proj, stats = params['projector'], batch_stats['projector']
    hidden = sum(1 for k in proj if k.startswith('dense_'))
    for i in range(hidden):
      sd[f'projector.{3 * i}.weight'] = _t(proj[f'dense_{i}']['kernel']).T
      sd[f'projector.{3 * i}.bias'] = _t(proj[f'dense_{i}']['bias'])
      sd[f'projector.{3 * i + 1}.weight'] = _t(proj[f'bn_{i}']['scale'])
      sd[f'projector.{3 * i + 1}.bias'] = _t(proj[f'bn_{i}']['bias'])
      sd[f'projector.{3 * i + 1}.running_mean'] = _t(stats[f'bn_{i}']['mean'])
      sd[f'projector.{3 * i + 1}.running_var'] = _t(stats[f'bn_{i}']['var'])
      sd[f'projector.{3 * i + 1}.num_batches_tracked'] = torch.tensor(0)
    sd[f'projector.{3 * hidden}.weight'] = _t(proj['out']['kernel']).T
    sd[f'projector.{3 * hidden}.bias'] = _t(proj['out']['bias'])
    probe = params['probe']
    sd['probe_norm.weight'] = _t(probe['norm']['scale'])
    sd['probe_norm.bias'] = _t(probe['norm']['bias'])
    sd['probe_head.weight'] = _t(probe['head']['kernel']).T
    sd['probe_head.bias'] = _t(probe['head']['bias'])
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True)

  def torch_optimizer(model, config, total_steps, implementation):
    """AdamW like optim.make_optimizer: decay on kernels only; the probe in its own groups."""
    o = config.optim
    modules = dict(model.named_modules())
    groups = {}
    for name, p in model.named_parameters():
      probe = name.startswith('probe')
      owner = modules[name.rsplit('.', 1)[0]]
      decay = name.endswith('weight') and not isinstance(
          owner, (torch.nn.LayerNorm, torch.nn.BatchNorm1d))   # the JAX side's '*kernel'
      wd = (o.probe_weight_decay if probe else o.weight_decay) if decay else 0.0
      groups.setdefault((probe, wd), {'params': [], 'weight_decay': wd, 'probe': probe})[
          'params'].append(p)
    kw = {'default': {}, 'foreach': {'foreach': True}, 'fused': {'fused': True}}[implementation]
    opt = torch.optim.AdamW(list(groups.values()), lr=0.0, betas=(o.b1, o.b2), eps=1e-8, **kw)
    model_sched = optim_schedule(o.lr, total_steps, o.warmup_steps)
    probe_sched = optim_schedule(o.probe_lr, total_steps, o.warmup_steps)
    return opt, lambda step: [probe_sched(step) if g['probe'] else model_sched(step)
                              for g in opt.param_groups]

  def optim_schedule(peak, total_steps, warmup_steps):
    """Warmup from 0 then cosine to peak / 1000 (as lejepa_jax.optim.schedule), in Python."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps, warmup_steps + 1)
    end = peak / 1000

    def lr(step):
      if step < warmup_steps:
        return peak * step / warmup_steps
      frac = min((step - warmup_steps) / (decay_steps - warmup_steps), 1.0)
      return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * frac))
    return lr

  class TorchTrainer:
    """The PyTorch train step: forward, loss, backward, AdamW with the schedule."""

    def __init__(self, config, total_steps, implementation, cls_only_last=False):
      self.config = config
      self.model = TorchLeJEPA(config, cls_only_last).train()
      self.opt, self.lrs = torch_optimizer(self.model, config, total_steps, implementation)
      self.step_count = 0
      self.gen = torch.Generator().manual_seed(config.seed)

    def slices(self):
      dim = self.config.model.projector_out
      a = torch.randn(dim, self.config.sigreg.num_slices, generator=self.gen)
      return a / a.norm(dim=0, keepdim=True)

    def step(self, g, l, labels, slices=None):
      for group, lr in zip(self.opt.param_groups, self.lrs(self.step_count)):
        group['lr'] = lr
      self.opt.zero_grad(set_to_none=True)
      total, terms = torch_loss(self.model, self.config, g, l, labels,
                                self.slices() if slices is None else slices)
      total.backward()
      self.opt.step()
      self.step_count += 1
      return terms


def torch_views(batch):
  """NHWC views (B, V, H, W, C) -> torch (B, V, C, H, W)."""
  return (torch.from_numpy(np.ascontiguousarray(batch['global'].transpose(0, 1, 4, 2, 3))),
          torch.from_numpy(np.ascontiguousarray(batch['local'].transpose(0, 1, 4, 2, 3))),
          torch.from_numpy(batch['label'].astype(np.int64)))


def check_port(config, programs, state, batch, global_batch):
  """Same computation: parameter counts, loss terms, grad norm, params after 3 updates."""
  n_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  trainer = TorchTrainer(config, config.total_steps, _TORCH_ADAMW.value)
  n_torch = sum(p.numel() for p in trainer.model.parameters())
  print(f'parameters: jax {n_jax:,}  torch {n_torch:,}  '
        f'{"equal" if n_jax == n_torch else "DIFFER"}')
  initial_params, initial_stats = jax.device_get((state.params, state.batch_stats))
  load_jax_params(trainer.model, initial_params, initial_stats)
  pruned = TorchLeJEPA(config, cls_only_last=True).train()
  load_jax_params(pruned, initial_params, initial_stats)
  g, l, labels = torch_views(batch)
  k = config.model.projector_out
  worst = {}
  for i in range(3):
    key = jax.random.fold_in(state.rng, state.step)
    slices = torch.from_numpy(_np(sigreg_lib.random_slices(key, k, config.sigreg.num_slices)))
    if i == 0:
      _, pruned_terms = torch_loss(pruned, config, g, l, labels, slices)
    state, metrics = programs.train_step(state, global_batch)
    terms = trainer.step(g, l, labels, slices)
    if i == 0:
      terms['grad_norm'] = torch.sqrt(sum(
          (p.grad ** 2).sum() for n, p in trainer.model.named_parameters()
          if not n.startswith('probe')))
    metrics = jax.device_get(metrics)
    for name, value in terms.items():
      ours, value = float(metrics[f'train/{name}']), float(value)
      diff = abs(ours - value) / max(1.0, abs(ours))
      worst[name] = max(worst.get(name, 0.0), diff)
      if i == 0:
        extra = (f'  torch CLS-only last block {float(pruned_terms[name]):.6f}'
                 if name in pruned_terms else '')
        print(f'  step 0 {name:11s} jax {ours:.6f}  torch {value:.6f}  |diff| {diff:.1e}{extra}')
  ref = TorchLeJEPA(config)
  load_jax_params(ref, state.params, state.batch_stats)
  ours_p = dict(ref.named_parameters())
  # Adam's first updates are about lr * sign(gradient) per element, so compare the change
  # of each tensor as a whole: |torch change - jax change| / |jax change| (Frobenius norms).
  start = TorchLeJEPA(config)
  load_jax_params(start, initial_params, initial_stats)
  start_p = dict(start.named_parameters())
  # Some parameters have zero gradient in exact arithmetic, so Adam turns rounding noise into
  # their updates: biases that feed a BatchNorm, and the final LayerNorm's bias (a constant
  # shift of the projector's input, which its first BatchNorm cancels). (So does the key bias
  # of the last block, which ours folds away; it is a third of blocks.<last>.qkv.bias.)
  noise = [n for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]
  noise = {f'projector.{int(n.split(".")[1]) - 1}.bias' for n in noise} | {'vit.final_norm.bias'}
  rel = {}
  for n, p in trainer.model.named_parameters():
    ours_change = ours_p[n] - start_p[n]
    if float(ours_change.norm()) > 0 and n not in noise:
      rel[n] = float((p.detach() - ours_p[n]).norm() / ours_change.norm())
  top = sorted(rel, key=rel.get, reverse=True)[:3]
  print(f'  3 steps: max |loss terms diff| {max(worst.values()):.1e} (relative to max(1, |x|)); '
        f'parameter updates differ by a median {statistics.median(rel.values()):.1e} of their '
        f'norm over {len(rel)} tensors; largest: '
        + ', '.join(f'{n} {rel[n]:.1e}' for n in top) + f' (not compared: {sorted(noise)})')
  return state


# ----------------------------------------------------------------------------- timing

def _timed(fn, n):
  """Runs fn n times; returns (wall seconds, process CPU seconds) per call."""
  time.sleep(0.05)   # let the other side's spinning worker threads go idle
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(n):
    fn()
  return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def main(argv):
  del argv
  config = _CONFIG.value
  if torch is None:
    raise SystemExit('needs torch: pip install -e .[bench]')
  torch.set_num_threads(os.cpu_count())
  print('machine:', machine())
  print(f'torch threads {torch.get_num_threads()}, jax devices {jax.device_count()}')
  mesh = sharding_lib.make_mesh(config.get('mesh'))
  programs = steps.build(config, mesh, config.total_steps)
  d, b = config.data, config.batch_size
  rng = np.random.default_rng(0)
  batch = {'global': rng.normal(size=(b, d.num_global_views, d.global_size, d.global_size,
                                      d.channels)).astype(np.float32),
           'local': rng.normal(size=(b, d.num_local_views, d.local_size, d.local_size,
                                     d.channels)).astype(np.float32),
           'label': rng.integers(0, d.num_classes, b).astype(np.int32)}

  with sharding_lib.activate(mesh):
    state = programs.init(np.int32(config.seed))
    global_batch = sharding_lib.to_global_batch(batch, mesh)
    start = time.perf_counter()
    lowered = programs.train_step.lower(state, global_batch)
    t_lower = time.perf_counter() - start
    compiled = lowered.compile()
    t_compile = time.perf_counter() - start - t_lower
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
    state = check_port(config, programs, state, batch, global_batch)

    tg, tl, tlabels = torch_views(batch)
    trainers = {'torch': TorchTrainer(config, config.total_steps, _TORCH_ADAMW.value)}
    if _TORCH_PRUNED.value:
      trainers['torch-cls'] = TorchTrainer(config, config.total_steps, _TORCH_ADAMW.value,
                                           cls_only_last=True)
    for trainer in trainers.values():
      load_jax_params(trainer.model, state.params, state.batch_stats)

    def ours():
      nonlocal state
      state, metrics = compiled(state, global_batch)
      return metrics

    sides = {'ours': lambda n: jax.block_until_ready([ours() for _ in range(n)])}
    for name, trainer in trainers.items():
      sides[name] = lambda n, t=trainer: [t.step(tg, tl, tlabels) for _ in range(n)]

    def matmuls(size):
      out = {}
      for name, dt in (('f32', jnp.float32), ('bf16', jnp.bfloat16)):
        x = jnp.asarray(rng.normal(size=(size, size)), dt)
        f = jax.jit(lambda a: a @ a)
        out['jnp ' + name] = lambda f=f, x=x: f(x).block_until_ready()
      for name, dt in (('f32', torch.float32), ('bf16', torch.bfloat16)):
        x = torch.from_numpy(rng.normal(size=(size, size)).astype(np.float32)).to(dt)
        out['torch ' + name] = lambda x=x: x @ x
      return out

    # A dtype without a fast kernel here (PyTorch bf16 on AVX2-only CPUs: minutes per
    # 2048^3 call) is found by a short probe and left out of the timed rounds.
    slow = machine_lib.slow_dtypes(machine_lib.probe_matmuls(matmuls(_PROBE_SIZE)),
                                   {'jnp bf16': 'jnp f32', 'torch bf16': 'torch f32'})
    for reason in slow.values():
      print(reason)
    mm = {n: f for n, f in matmuls(_MATMUL).items() if n not in slow}
    for fn in mm.values():
      fn()

    for run in sides.values():
      run(_WARMUP.value)
    times = {n: [] for n in sides}
    cpu = {n: [] for n in sides}
    mm_times = {n: [] for n in mm}
    rounds, steps_per_round = (3, 3) if _QUICK.value else (_ROUNDS.value, _STEPS.value)
    for _ in range(rounds):
      for name, run in sides.items():
        wall, c = _timed(lambda: run(steps_per_round), 1)
        times[name].append(wall / steps_per_round)
        cpu[name].append(c / steps_per_round)
      for name, fn in mm.items():
        mm_times[name].append(_timed(fn, 3)[0])

    if _BREAKDOWN.value and not _QUICK.value:
      breakdown(config, programs, state, global_batch)

  med = {n: statistics.median(t) for n, t in times.items()}
  ours_t = med['ours']
  flops_img = model_flops_per_image(config)
  peak = {n: 2 * _MATMUL ** 3 / statistics.median(t) for n, t in mm_times.items()}
  print(f'\nbatch {b} images ({d.num_global_views} x {d.global_size} px + '
        f'{d.num_local_views} x {d.local_size} px views), {len(times["ours"])} rounds x '
        f'{3 if _QUICK.value else _STEPS.value} steps, sides alternating; medians')
  labels = {'ours': f'ours (jax {jax.__version__})',
            'torch': f'torch {torch.__version__}',
            'torch-cls': 'torch, last block CLS-only'}
  for name in sides:
    print(f'{labels[name]:28s} {med[name]:.4f} s/step {b / med[name]:8.1f} images/s   '
          f'(process CPU {statistics.median(cpu[name]):.3f} s/step)')
  for name in trainers:
    ratio = statistics.median(t / o for o, t in zip(times['ours'], times[name]))
    print(f'ratio ours / {labels[name]} images/s: {ratio:.2f}x (median of per-round ratios; '
          f'{med[name] / ours_t:.2f}x from the medians)')
  executed = xla_flops / b
  print(f'FLOPs per image: model {flops_img / 1e9:.3f} G (3 x forward matmuls of the whole '
        f'ViT, what the PyTorch port runs); executed {executed / 1e9:.3f} G (XLA\'s count of '
        f'our compiled step: the last block computes its CLS tokens only)')
  print('matmul peaks (2048^3, same run): ' + ', '.join(
      f'{n} {v / 1e9:.0f} GFLOP/s' for n, v in peak.items()))
  for what, per_image in (('executed', executed), ('model', flops_img)):
    achieved = per_image * b / ours_t
    print(f'ours, {what} FLOPs: {achieved / 1e9:.0f} GFLOP/s = ' + ', '.join(
        f'{achieved / v:.0%} of {n}' for n, v in peak.items()) + ' (matmul peaks)')
  torch_achieved = flops_img * b / med['torch']
  print(f'torch, model FLOPs: {torch_achieved / 1e9:.0f} GFLOP/s = '
        f'{torch_achieved / peak["torch f32"]:.0%} of the torch f32 peak')
  # Other processes on a shared machine slow some rounds (the OpenMP-threaded PyTorch side far
  # more than ours): the fastest round of each side is the least disturbed one.
  best = {n: min(t) for n, t in times.items()}
  best_peak = {n: 2 * _MATMUL ** 3 / min(t) for n, t in mm_times.items()}
  print('best rounds: ' + ', '.join(f'{n} {best[n]:.4f} s/step ({b / best[n]:.1f} images/s)'
                                     for n in sides) + '; ' + ', '.join(
      f'ours / {n} {best[n] / best["ours"]:.2f}x' for n in trainers))
  print(f'best rounds: ours executes {executed * b / best["ours"] / 1e9:.0f} GFLOP/s = '
        f'{executed * b / best["ours"] / best_peak["jnp f32"]:.0%} of the best jnp f32 peak '
        f'({best_peak["jnp f32"] / 1e9:.0f} GFLOP/s); model FLOPs '
        f'{flops_img * b / best["ours"] / best_peak["jnp f32"]:.0%} of it; torch '
        f'{flops_img * b / best["torch"] / best_peak["torch f32"]:.0%} of the best torch f32 '
        f'peak ({best_peak["torch f32"] / 1e9:.0f} GFLOP/s)')
  print(f'compile (ours): lower {t_lower:.2f} s + compile {t_compile:.2f} s')
  for name in sides:
    print(f'per-round s/step {name:10s} ' + ' '.join(f'{t:.3f}' for t in times[name]))


def breakdown(config, programs, state, global_batch):
  """Median wall and CPU times of pieces of our step, alternating (a profile by subtraction)."""
  model, num_global = programs.model, config.data.num_global_views
  opts = steps.regulariser_options(config.sigreg)
  key = jax.random.PRNGKey(0)
  stats = state.batch_stats
  views = [global_batch['global'], global_batch['local']]

  def encoder(params):
    out = model.apply({'params': params, 'batch_stats': stats}, views,
                      method=lambda m, v: m.net(v))
    return jnp.sum(out['cls']) + jnp.sum(out['probe_features'])

  def loss_from(proj):
    return losses.lejepa_loss(proj[:num_global], proj, key, lamb=config.lamb,
                              convention=config.loss_convention, **opts)[0]

  def full_loss(params):
    out, _ = model.apply({'params': params, 'batch_stats': stats}, global_batch['global'],
                         global_batch['local'], train=True, mutable=['batch_stats'])
    return loss_from(out['proj'])

  def head_loss(params, emb):
    b, v = emb.shape[:2]
    proj, _ = model.apply({'params': params, 'batch_stats': stats}, emb.reshape(b * v, -1),
                          train=True, mutable=['batch_stats'],
                          method=lambda m, e, train: m.projector(e, train=train))
    return loss_from(jnp.swapaxes(proj.reshape(b, v, -1), 0, 1))

  emb = jax.jit(lambda p: model.apply({'params': p, 'batch_stats': stats}, views,
                                      method=lambda m, v: m.net(v))['cls'])(state.params)
  proj = jax.jit(lambda p: model.apply(
      {'params': p, 'batch_stats': stats}, global_batch['global'], global_batch['local'],
      train=True, mutable=['batch_stats'])[0]['proj'])(state.params)
  grads = jax.jit(jax.grad(full_loss))(state.params)
  tx = programs.tx
  pieces = {
      'encoder forward': (jax.jit(encoder), (state.params,)),
      'encoder forward+backward': (jax.jit(jax.grad(encoder)), (state.params,)),
      'model+loss forward+backward': (jax.jit(jax.grad(full_loss)), (state.params,)),
      'projector+loss fwd+bwd': (jax.jit(jax.grad(head_loss, argnums=(0, 1))),
                                 (state.params, emb)),
      'loss (inv+SIGReg) fwd+bwd': (jax.jit(jax.grad(loss_from)), (proj,)),
      'AdamW update': (jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0])),
                       (grads, state.opt_state, state.params)),
  }
  for fn, args in pieces.values():
    jax.block_until_ready(fn(*args))
  times = {n: [] for n in pieces}
  for _ in range(7):
    for n, (fn, args) in pieces.items():
      times[n].append(_timed(lambda: jax.block_until_ready(fn(*args)), 3))
  print('\nbreakdown of our step (medians of 7 alternating rounds):')
  for n, t in times.items():
    print(f'  {n:30s} {statistics.median(w for w, _ in t):.4f} s wall  '
          f'{statistics.median(c for _, c in t):.4f} s CPU')


if __name__ == '__main__':
  app.run(main)
