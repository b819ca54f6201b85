"""Embedding diagnostics: effective rank, spectrum, Gaussianity and collapse warnings.

`embedding_stats(x, key)` summarises a matrix of embeddings x (N, D) as pure jnp:
  scalars: 'rankme'     RankMe (Garrido et al. 2023) of the UN-centred x, as in the paper:
                        p_i = s_i / sum(s) + eps over the singular values s of x,
                        rank = exp(-sum_i p_i log p_i), in [1, min(N, D)];
           'rankme_centred' the same formula on the singular values of the centred x
                        (blind to a shared offset; NOT a collapse signal on its own: a
                        constant x has all-zero centred singular values and its p_i is
                        rounding noise, so read it with 'var_max');
           'sigreg'     the sliced Epps-Pulley statistic (`sigreg.sigreg`) of x as it is,
                        i.e. distance to N(0, I). For the projector output this is the term
                        the loss minimises; for backbone embeddings it mixes scale and shape;
           'sigreg_std' the same on x standardised per dimension (zero mean, unit variance):
                        Gaussianity of the shape regardless of scale, the informative one
                        for backbone embeddings (a LayerNorm'd CLS token has no reason to
                        have unit variance);
           'mean_norm'  mean L2 norm of the rows;
           'var_mean', 'var_min', 'var_max' of the per-dimension variances (ddof=0).
  arrays:  'spectrum'   descending eigenvalues of the centred covariance (ddof=1), from the
                        singular values of the centred x: shape (min(N, D),);
           'slices'     (num_qq_slices, N) RAW projections of x on random unit directions
                        (not standardised: for the projector they are what SIGReg compares
                        with N(0, 1); `plots` standardises the backbone's before its Q-Q plot).

`make_fn(model, mesh)` jits the stats of the backbone CLS embedding (prefix 'emb_') and
of the projector output (prefix 'proj_') of a fixed batch of eval images, and
`collapse_warning` turns the scalars into a one-line warning.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from lejepa_jax import config_schema
from lejepa_jax import models
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import sigreg as sigreg_lib
from lejepa_jax.data import sources

RANKME_EPS = 1e-7          # the paper's epsilon

# Thresholds of `collapse_warning`, measured with benchmarks/diagnostics_thresholds.py
# (configs/fmnist.py, first 300 steps, 512 test images; lamb=0 collapses, lamb=0.1 does not):
#   backbone RankMe / min(N, D): lamb=0 0.065 at step 50, 0.036 at 300; lamb=0.1 >= 0.198
#     (init 0.31);
#   projector RankMe / min(N, K): >= 0.39 in both runs (no signal): the invariance-only
#     projector collapses in SCALE, not in rank; hence the
#   projector per-dimension variance (mean; SIGReg's target is 1): lamb=0 0.069 at step 50,
#     0.0026 at 300; lamb=0.1 >= 0.64 (init 0.32).
# RankMe below this x min(N, D): dimensional collapse
MIN_RANK_FRACTION = config_schema.KEYS['diagnostics.min_rank_fraction'].default
# projector var_mean below this (target 1): collapse towards a point
MIN_PROJ_VAR = config_schema.KEYS['diagnostics.min_proj_var'].default
MIN_VAR_RATIO = 1e-6       # var_max / mean_norm^2 below this: rows ~ one point (any scale)

ARRAY_KEYS = ('emb_spectrum', 'proj_spectrum', 'emb_slices', 'proj_slices')


def rankme(singular_values: jax.Array, eps: float = RANKME_EPS) -> jax.Array:
  """exp(entropy) of p_i = s_i / sum(s) + eps (Garrido et al. 2023, eq. 1)."""
  s = singular_values.astype(jnp.float32)
  total = jnp.sum(s)
  p = s / jnp.where(total > 0, total, 1.0) + eps
  return jnp.exp(-jnp.sum(p * jnp.log(p)))


def embedding_stats(x: jax.Array, key: jax.Array, *, num_slices: int = 256, t_max: float = 3.0,
                    num_points: int = 17, num_qq_slices: int = 4) -> tuple[dict, dict]:
  """(scalars, arrays) of embeddings x (N, D); see the module docstring for each key.

  Float32 throughout. Under jit on a batch-sharded x the SVDs gather x (N x D is small).
  """
  if x.ndim != 2:
    raise ValueError(f'embedding_stats expects (N, D), got shape {x.shape}')
  x = x.astype(jnp.float32)
  n = x.shape[0]
  sigreg_key, qq_key = jax.random.split(key)
  s = jnp.linalg.svd(x, compute_uv=False)
  mean = jnp.mean(x, axis=0)
  centred = x - mean
  s_centred = jnp.linalg.svd(centred, compute_uv=False)
  var = jnp.mean(centred ** 2, axis=0)
  standardised = centred / jnp.sqrt(jnp.maximum(var, 1e-12))
  sig = dict(num_slices=num_slices, t_max=t_max, num_points=num_points)
  scalars = {
      'rankme': rankme(s),
      'rankme_centred': rankme(s_centred),
      'sigreg': sigreg_lib.sigreg(x, sigreg_key, **sig),
      'sigreg_std': sigreg_lib.sigreg(standardised, sigreg_key, **sig),
      'mean_norm': jnp.mean(jnp.linalg.norm(x, axis=-1)),
      'var_mean': jnp.mean(var),
      'var_min': jnp.min(var),
      'var_max': jnp.max(var),
  }
  directions = sigreg_lib.random_slices(qq_key, x.shape[1], num_qq_slices)
  arrays = {
      'spectrum': s_centred ** 2 / max(n - 1, 1),     # svd: already descending
      'slices': (x @ directions).T,
  }
  return scalars, arrays


def make_fn(model, mesh, *, num_slices: int = 256, t_max: float = 3.0, num_points: int = 17,
            num_qq_slices: int = 4):
  """Jitted fn(variables, images, key) -> (scalars, arrays) on `mesh`.

  variables: {'params', 'batch_stats'} (`steps.variables(state)`); images: (B, H, W, C),
  batch-sharded (`sharding.batch_sharding(mesh)`); key: a PRNG key (pass the same one
  every time to compare steps on the same slices). Keys: 'emb_*' for the projector's input
  (the linear head's output, or the final CLS token), 'proj_*' for the projector output (what SIGReg sees),
  see `embedding_stats`. The projector runs with train-mode BatchNorm (statistics of this
  batch, as in the loss); the batch-statistics update is discarded, so nothing changes.
  Outputs are replicated. Call (trace) it inside `sharding.activate(mesh)`.
  """
  kwargs = dict(num_slices=num_slices, t_max=t_max, num_points=num_points,
                num_qq_slices=num_qq_slices)

  def fn(variables, images, key):
    (emb, proj), _ = model.apply(variables, images, method=type(model).embed_and_project,
                                 mutable=['batch_stats'])   # the update is dropped
    emb_key, proj_key = jax.random.split(key)
    scalars, arrays = {}, {}
    for prefix, x, k in (('emb', emb, emb_key), ('proj', proj, proj_key)):
      s, a = embedding_stats(x, k, **kwargs)
      scalars.update({f'{prefix}_{name}': v for name, v in s.items()})
      arrays.update({f'{prefix}_{name}': v for name, v in a.items()})
    return scalars, arrays

  replicated = sharding_lib.replicated(mesh)
  return jax.jit(fn, out_shardings=(replicated, replicated))


def max_ranks(model, num_images: int) -> dict:
  """{'emb': min(N, D), 'proj': min(N, K)}: the largest RankMe each can reach (the `dims`
  of `collapse_warning`)."""
  dims = models.feature_dims(model)
  return {'emb': min(num_images, dims.get('head', dims['embedding'])),   # the projector's input
          'proj': min(num_images, model.projector_out)}


def collapse_warning(scalars: dict, dims: dict, *, min_rank_fraction: float = MIN_RANK_FRACTION,
                     min_proj_var: float = MIN_PROJ_VAR,
                     min_var_ratio: float = MIN_VAR_RATIO) -> str | None:
  """One line naming what collapsed and what to do, or None when nothing did.

  scalars: the output of `make_fn`'s fn (host or device values; keys 'emb_rankme', ...,
  optionally prefixed 'diag/'); dims: {'emb': max rank, 'proj': max rank} (`max_ranks`);
  a prefix missing from dims is not checked. Fires when
    RankMe < min_rank_fraction x max rank (dimensional collapse), or
    the projector's mean per-dimension variance < min_proj_var (SIGReg wants 1), or
    var_max < min_var_ratio x mean_norm^2 (all rows ~ one point, at any scale).
  Defaults: see the measurements above `MIN_RANK_FRACTION`.
  """
  def get(name):
    for key in (name, f'diag/{name}'):
      if key in scalars:
        return float(scalars[key])
    return None

  problems = []
  for prefix, label in (('emb', 'backbone'), ('proj', 'projector')):
    if prefix not in dims:
      continue
    rank = get(f'{prefix}_rankme')
    if rank is not None and rank < min_rank_fraction * dims[prefix]:
      problems.append(f'{label} RankMe {rank:.2f} < {min_rank_fraction:g} x max rank '
                      f'{dims[prefix]}')
    var_mean = get(f'{prefix}_var_mean')
    if prefix == 'proj' and var_mean is not None and var_mean < min_proj_var:
      problems.append(f'{label} mean per-dimension variance {var_mean:.3g} < {min_proj_var:g} '
                      '(SIGReg targets 1)')
    var_max, norm = get(f'{prefix}_var_max'), get(f'{prefix}_mean_norm')
    if var_max is not None and norm is not None and var_max <= min_var_ratio * norm ** 2:
      problems.append(f'{label} per-dimension variance <= {var_max:.3g} (rows of norm '
                      f'{norm:.3g} are ~ one point)')
  if not problems:
    return None
  return ('representation collapse: ' + '; '.join(problems) +
          '. Raise lamb (the SIGReg weight), check sigreg.* and the loss convention, or lower '
          'optim.lr / lengthen optim.warmup_steps.')


class Monitor:
  """The run's diagnostics: every `diagnostics.every` steps, the stats of a fixed batch of
  `diagnostics.num_images` test images, with the same slices every time. The images are
  drawn with config.seed (`sources.sample`: stratified by class where the source knows its
  labels, so a test split stored in class order gives every class), the same on every
  process and in a resumed run.

  `__call__(step, variables)` returns ({'diag/...': host scalar}, host arrays, warning or
  None); the loop logs the scalars, keeps the arrays for the plots and logs the warning.
  """

  def __init__(self, config, programs, source):
    from lejepa_jax.data import pipeline      # the data stack only where a run uses it
    d = config_schema.resolve(config).diagnostics
    self.every = int(d.every)
    self.min_rank_fraction = float(d.min_rank_fraction)
    self.min_proj_var = float(d.min_proj_var)
    if not self.every:
      return
    n = min(int(d.num_images), len(source))
    dp = sharding_lib.data_parallel_size(programs.mesh)
    feed = sharding_lib.batch_feed(programs.mesh)   # its block count divides dp
    n -= n % dp       # a global batch must split evenly (the same n on any process count)
    if n < 2:
      raise ValueError(f'diagnostics.num_images={d.get("num_images")}: need at least '
                       f'{dp} images (the data-parallel devices)')
    images = sources.sample(source, n, seed=config.seed)   # every class of a class-ordered split
    batch = next(iter(pipeline.eval_batches(
        images, config.data, local_batch_size=n // feed.count,
        process_index=feed.index, process_count=feed.count)))
    self.images = sharding_lib.to_global_batch(batch, programs.mesh)['image']
    self.key = jax.random.key(config.seed)
    self.dims = max_ranks(programs.model, n)
    s = config.sigreg
    self.fn = make_fn(programs.model, programs.mesh, num_slices=s.num_slices, t_max=s.t_max,
                      num_points=s.num_points)

  def due(self, step: int) -> bool:
    return bool(self.every) and (step % self.every == 0 or step == 1)

  def __call__(self, step: int, variables):
    scalars, arrays = jax.device_get(self.fn(variables, self.images, self.key))
    scalars = {f'diag/{k}': float(v) for k, v in scalars.items()}
    warning = collapse_warning(scalars, self.dims, min_rank_fraction=self.min_rank_fraction,
                               min_proj_var=self.min_proj_var)
    return scalars, arrays, (f'step {step}: {warning}' if warning else None)
