"""The programs a run compiles: state init, the LeJEPA train step, frozen features.

`build(config, mesh, total_steps)` is the one place that turns a config into a
model, an optimizer, the train state's shardings and the jitted functions with
their in/out shardings. `train`, `evaluate` and `plan` all go through it, so what
`plan` compiles ahead of time for a TPU slice is exactly what a run executes.

Everything here can be built from abstract shapes: `Programs.abstract_state` holds
`jax.ShapeDtypeStruct`s with their shardings and nothing is allocated until a
function is called, which is what lets `plan` compile for devices it does not have.
Trace (call or `.lower`) the functions inside `sharding.activate(mesh)`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lejepa_jax import config_schema
from lejepa_jax import losses
from lejepa_jax import models
from lejepa_jax import optim
from lejepa_jax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState
  rng: jax.Array          # base key; per-step keys are fold_in(rng, step)
  skipped_steps: jax.Array = None     # int32: updates dropped as non-finite (nonfinite='skip')
  nonfinite_streak: jax.Array = None  # int32: of those, how many in a row up to this step


def regulariser_options(sigreg_config) -> dict:
  """Keyword arguments of `losses.lejepa_loss` that choose and configure the statistic.

  sigreg.statistic (default 'epps_pulley'); Epps-Pulley reads sigreg.t_max,
  sigreg.num_points and sigreg.quadrature; sigreg.options (a dict) goes to any statistic.
  """
  sigreg_config = config_schema.resolve(sigreg_config, 'sigreg')
  statistic = sigreg_config.statistic
  options = dict(sigreg_config.options)
  if statistic == 'epps_pulley':
    options.update(t_max=sigreg_config.t_max, num_points=sigreg_config.num_points,
                   quadrature_rule=sigreg_config.quadrature)
  return dict(statistic=statistic, num_slices=sigreg_config.num_slices, **options)


def abstract_batch(config, mesh, batch_size: int | None = None) -> dict:
  """Shapes, dtypes and shardings of one global multi-crop training batch."""
  d = config.data
  b = batch_size or config.batch_size
  sharding = sharding_lib.batch_sharding(mesh)

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return {'global': sds((b, d.num_global_views, d.global_size, d.global_size, d.channels),
                        jnp.float32),
          'local': sds((b, d.num_local_views, d.local_size, d.local_size, d.channels),
                       jnp.float32),
          'label': sds((b,), jnp.int32)}


def abstract_images(config, mesh, batch_size: int) -> jax.ShapeDtypeStruct:
  """One global batch of evaluation images (B, H, W, C)."""
  d = config.data
  return jax.ShapeDtypeStruct((batch_size, d.global_size, d.global_size, d.channels),
                              jnp.float32, sharding=sharding_lib.batch_sharding(mesh))


NONFINITE_POLICIES = ('stop', 'skip')


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state: TrainState, batch: dict, *, model, tx, config):
  """One LeJEPA update on a global multi-crop batch; returns (state, metrics).

  Non-finite values are found on device, with no host synchronisation: the metrics carry
  'train/finite' (loss terms and all gradients finite) and 'train/grads_finite' for the
  loop to read when it logs. With config.nonfinite == 'skip' a non-finite step leaves
  params, optimizer state and BatchNorm statistics as they were (the step counter and
  the data still advance) and counts it in state.skipped_steps / nonfinite_streak, which
  the metrics report as 'train/skipped_steps' and 'train/nonfinite_streak'.
  """
  key = jax.random.fold_in(state.rng, state.step)
  num_global = config.data.num_global_views

  # Stochastic depth's masks: a stream of its own (the SIGReg slices keep `key` itself).
  rngs = ({'drop_path': jax.random.fold_in(key, 1)}
          if getattr(model.encoder, 'drop_path_rate', 0) > 0 else None)

  def loss_fn(params):
    out, mutated = model.apply({'params': params, 'batch_stats': state.batch_stats},
                               batch['global'], batch['local'], train=True,
                               mutable=['batch_stats'], rngs=rngs)
    proj = out['proj']
    loss, terms = losses.lejepa_loss(
        proj[:num_global], proj, key, lamb=config.lamb, convention=config.loss_convention,
        batch_axes=sharding_lib.BATCH_AXES, **regulariser_options(config.sigreg))
    logits = out['probe_logits']
    labels = jnp.broadcast_to(batch['label'], logits.shape[:-1])
    # Unlabelled images (label -1, sources.UNLABELLED) train the encoder, not the probe.
    known = labels >= 0
    count = jnp.maximum(jnp.sum(known), 1).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    probe_loss = jnp.sum(jnp.where(known, ce, 0.0)) / count
    probe_top1 = jnp.sum(known & (jnp.argmax(logits, -1) == labels)) / count
    # The probe sees stop-gradient features, so adding its loss trains only the probe.
    aux = {'loss': loss, **terms, 'probe_loss': probe_loss, 'probe_top1': probe_top1}
    return loss + probe_loss, (aux, mutated['batch_stats'])

  grads, (aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  aux['grad_norm'] = optax.tree.norm({k: v for k, v in grads.items() if k != 'probe'})
  grads_finite = _all_finite(grads)
  finite = grads_finite & jnp.isfinite(aux['loss']) & jnp.isfinite(aux['probe_loss'])
  aux['finite'], aux['grads_finite'] = finite, grads_finite
  skipped, streak = state.skipped_steps, state.nonfinite_streak
  if config.nonfinite == 'skip':
    def keep_if_bad(new, old):
      return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep_if_bad(params, state.params)
    opt_state = keep_if_bad(opt_state, state.opt_state)
    batch_stats = keep_if_bad(batch_stats, state.batch_stats)
    bad = (~finite).astype(jnp.int32)
    skipped, streak = skipped + bad, (streak + 1) * bad
    aux['skipped_steps'], aux['nonfinite_streak'] = skipped, streak
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, skipped_steps=skipped, nonfinite_streak=streak)
  return new_state, {f'train/{k}': v for k, v in aux.items()}


def variables(state: TrainState) -> dict:
  """{'params', 'batch_stats'} of a state (arrays, ShapeDtypeStructs or shardings): the
  first argument of `Programs.features`."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


def _dummy_views(config):
  d = config.data
  g = jnp.zeros((2, d.num_global_views, d.global_size, d.global_size, d.channels))
  l = jnp.zeros((2, d.num_local_views, d.local_size, d.local_size, d.channels))
  return g, l


@dataclasses.dataclass(frozen=True)
class Programs:
  """A run's model, optimizer, state layout and jitted functions (see `build`)."""
  model: models.LeJEPAModel
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  abstract_state: TrainState         # ShapeDtypeStruct leaves with their shardings
  state_shardings: TrainState        # NamedSharding leaves
  init: Callable[[Any], TrainState]  # seed (int32 scalar) -> sharded state
  train_step: Callable               # (state, batch) -> (state, metrics); donates state
  features: Callable                 # (variables, images (B, H, W, C)) -> (B, F)
  # kinds (a tuple of FEATURE_KINDS) -> jitted (variables, images) -> (B, sum of their widths),
  # the kinds concatenated in order from one encoder pass (what the evaluators extract).
  features_of: Callable = None


def build(config, mesh, total_steps: int) -> Programs:
  """The model, optimizer, state shardings and jitted functions of `config` on `mesh`."""
  config = config_schema.resolve(config)
  model = models.build_model(config)
  tx = optim.make_optimizer(config, total_steps)

  def boxed_init(seed):
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init(init_rng, *_dummy_views(config), train=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                      batch_stats=variables['batch_stats'],
                      opt_state=tx.init(variables['params']), rng=state_rng,
                      skipped_steps=jnp.zeros((), jnp.int32),
                      nonfinite_streak=jnp.zeros((), jnp.int32))

  with nn.logical_axis_rules(sharding_lib.DEFAULT_RULES):
    boxed = jax.eval_shape(boxed_init, jax.ShapeDtypeStruct((), jnp.int32))
    state_shardings = sharding_lib.logical_to_sharding(boxed, mesh)
  # The shardings tree is a prefix of the state (optax's empty MaskedNodes get one too).
  abstract_state = jax.tree.map(
      lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
      if isinstance(x, jax.ShapeDtypeStruct) else x, state_shardings, models.vit.unboxed(boxed))

  batch = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  init = jax.jit(lambda seed: models.vit.unboxed(boxed_init(seed)), out_shardings=state_shardings)
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config),
                 in_shardings=(state_shardings, batch),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)

  @functools.lru_cache(maxsize=None)
  def features_of(kinds: tuple):
    unknown = [k for k in kinds if k not in models.feature_dims(model)]
    if unknown:
      raise ValueError(f'features {unknown}: this model has {sorted(models.feature_dims(model))} '
                       "('head' needs model.embedding_dim > 0)")
    return jax.jit(lambda variables, images: model.apply(variables, images, tuple(kinds),
                                                         method=models.LeJEPAModel.features),
                   in_shardings=(variables(state_shardings), batch), out_shardings=batch)

  features = features_of((config.eval.features or 'probe',))
  return Programs(model=model, tx=tx, mesh=mesh, abstract_state=abstract_state,
                  state_shardings=state_shardings, init=init, train_step=step,
                  features=features, features_of=features_of)
