"""The training loop as a library function: `train_and_evaluate(config, workdir)`.

Reading order: `train_and_evaluate` builds the mesh, data, model and state,
then loops over `train_step` (the jitted, sharded update), logging and
checkpointing; `evaluate` runs the frozen linear probe and k-NN at the end.
"""
from __future__ import annotations

import functools
import os
import time

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lejepa_jax import checkpoint as ckpt_lib
from lejepa_jax import losses
from lejepa_jax import metrics as metrics_lib
from lejepa_jax import models
from lejepa_jax import optim
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import sigreg
from lejepa_jax import stats
from lejepa_jax.data import pipeline
from lejepa_jax.data import sources
from lejepa_jax.evaluators import features as features_lib
from lejepa_jax.evaluators import knn
from lejepa_jax.evaluators import linear_probe


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState
  rng: jax.Array          # base key; per-step keys are fold_in(rng, step)


def validate(config) -> None:
  """Fails early, naming the key, on values that would only fail (or mislead) later."""
  problems = []
  if config.loss_convention not in losses.CONVENTIONS:
    problems.append(f'loss_convention={config.loss_convention!r}: one of {losses.CONVENTIONS}')
  if config.loss_convention == 'convex' and not 0.0 <= config.lamb <= 1.0:
    problems.append(f'lamb={config.lamb}: must lie in [0, 1] with the convex convention')
  if config.sigreg.num_slices < 1 or config.sigreg.num_points < 2 or config.sigreg.t_max <= 0:
    problems.append('sigreg: num_slices >= 1, num_points >= 2 and t_max > 0 are required')
  statistic = regulariser_options(config.sigreg)['statistic']
  if statistic not in stats.STATISTICS:
    problems.append(f'sigreg.statistic={statistic!r}: one of {stats.STATISTICS}')
  if config.sigreg.get('quadrature', 'trapezoid') not in sigreg.QUADRATURES:
    problems.append(f'sigreg.quadrature={config.sigreg.quadrature!r}: one of {sigreg.QUADRATURES}')
  if config.data.num_global_views < 1:
    problems.append('data.num_global_views must be >= 1 (the invariance centre)')
  if config.checkpoint_every < 1 or config.log_every < 1:
    problems.append('checkpoint_every and log_every must be >= 1')
  if problems:
    raise ValueError('bad config: ' + '; '.join(problems))


def regulariser_options(sigreg_config) -> dict:
  """Keyword arguments of `losses.lejepa_loss` that choose and configure the statistic.

  sigreg.statistic (default 'epps_pulley'); Epps-Pulley reads sigreg.t_max,
  sigreg.num_points and sigreg.quadrature; sigreg.options (a dict) goes to any statistic.
  """
  statistic = sigreg_config.get('statistic', 'epps_pulley')
  options = dict(sigreg_config.get('options', None) or {})
  if statistic == 'epps_pulley':
    options.update(t_max=sigreg_config.t_max, num_points=sigreg_config.num_points,
                   quadrature_rule=sigreg_config.get('quadrature', 'trapezoid'))
  return dict(statistic=statistic, num_slices=sigreg_config.num_slices, **options)


def total_steps(config, train_size: int) -> int:
  if config.get('total_steps'):
    return int(config.total_steps)
  if config.get('epochs'):
    return max(1, int(config.epochs * train_size // config.batch_size))
  raise ValueError('config needs total_steps or epochs')


def _dummy_views(config, batch: int = 2):
  d = config.data
  g = jnp.zeros((batch, d.num_global_views, d.global_size, d.global_size, d.channels))
  l = jnp.zeros((batch, d.num_local_views, d.local_size, d.local_size, d.channels))
  return g, l


def create_train_state(config, model, tx, mesh):
  """Initialises the state directly in its sharded layout; returns (state, shardings)."""

  def boxed_init(rng):
    init_rng, state_rng = jax.random.split(rng)
    g, l = _dummy_views(config)
    variables = model.init(init_rng, g, l, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params), rng=state_rng)

  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(boxed_init, rng)
  shardings = sharding_lib.logical_to_sharding(abstract, mesh)
  state = jax.jit(lambda r: nn.unbox(boxed_init(r)), out_shardings=shardings)(rng)
  return state, shardings


def train_step(state: TrainState, batch: dict, *, model, tx, config):
  """One LeJEPA update on a global multi-crop batch; returns (state, metrics)."""
  key = jax.random.fold_in(state.rng, state.step)
  num_global = config.data.num_global_views

  def loss_fn(params):
    out, mutated = model.apply({'params': params, 'batch_stats': state.batch_stats},
                               batch['global'], batch['local'], train=True,
                               mutable=['batch_stats'])
    proj = out['proj']
    loss, terms = losses.lejepa_loss(
        proj[:num_global], proj, key, lamb=config.lamb, convention=config.loss_convention,
        **regulariser_options(config.sigreg))
    logits = out['probe_logits']
    labels = jnp.broadcast_to(batch['label'], logits.shape[:-1])
    probe_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    probe_top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
    # The probe sees stop-gradient features, so adding its loss trains only the probe.
    aux = {'loss': loss, **terms, 'probe_loss': probe_loss, 'probe_top1': probe_top1}
    return loss + probe_loss, (aux, mutated['batch_stats'])

  grads, (aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  model_grads = {k: v for k, v in grads.items() if k != 'probe'}
  aux["grad_norm"] = optax.tree.norm(model_grads)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, {f'train/{k}': v for k, v in aux.items()}


def extract_features(config, model, state, mesh):
  """Frozen features and labels of the train and test splits: ((x, y), (x, y))."""
  e = config.eval
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  feature_fn = jax.jit(lambda images: model.apply(variables, images, method=models.LeJEPAModel.features),
                       in_shardings=sharding_lib.batch_sharding(mesh))
  out = []
  for split in (config.data.train_split, config.data.test_split):
    source = sources.get_source(config.data, split)
    if e.get('max_examples'):
      source = sources.ArraySource(*_head(source, e.max_examples))
    logging.info('extracting features: %s (%d images)', split, len(source))
    batches = pipeline.eval_batches(source, config.data,
                                    local_batch_size=e.batch_size // jax.process_count(),
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    out.append(features_lib.extract(feature_fn, batches, mesh,
                                    num_batches=-(-len(source) // e.batch_size)))
  return tuple(out)


def evaluate(config, model, state, mesh) -> dict:
  """Frozen evaluation on the full test split: linear probe and k-NN top-1."""
  e = config.eval
  (train_x, train_y), (test_x, test_y) = extract_features(config, model, state, mesh)
  n_cls = config.data.num_classes
  results = {}
  t = time.perf_counter()
  results.update(linear_probe.evaluate(
      train_x, train_y, test_x, test_y, n_cls, lrs=tuple(e.probe_lrs), epochs=e.probe_epochs,
      batch_size=e.probe_batch_size, weight_decay=e.probe_weight_decay, seed=config.seed))
  logging.info('linear probe done in %.0fs', time.perf_counter() - t)
  results.update(knn.evaluate(train_x, train_y, test_x, test_y, n_cls, k=e.knn_k,
                              temperature=e.knn_temperature))
  return results


def _head(source, n):
  n = min(n, len(source))
  records = [source[i] for i in range(n)]
  return np.stack([r['image'] for r in records]), np.array([r['label'] for r in records])


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains (resuming from workdir's latest checkpoint), then evaluates. Returns eval metrics."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding_lib.make_mesh(config.get('mesh'))
  dp = sharding_lib.data_parallel_size(mesh)
  if config.batch_size % dp or config.batch_size % jax.process_count():
    raise ValueError(f'batch_size {config.batch_size} must divide by the data-parallel size {dp} '
                     f'and the process count {jax.process_count()}')
  logging.info('mesh %s over %d devices, %d processes', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  train_source = sources.get_source(config.data, config.data.train_split)
  steps = total_steps(config, len(train_source))
  dataset = pipeline.train_dataset(
      train_source, config.data, seed=config.seed,
      local_batch_size=config.batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = iter(dataset)

  model = models.build_model(config)
  tx = optim.make_optimizer(config, steps)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  mngr = ckpt_lib.manager(workdir)

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.DEFAULT_RULES):
    state, state_shardings = create_train_state(config, model, tx, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(state.params['encoder']))
    logging.info('encoder parameters: %.2fM; %d steps of %d images', n_params / 1e6, steps,
                 config.batch_size)
    restored, start = ckpt_lib.restore_latest(
        mngr, ckpt_lib.abstract_like(state), data_iter)
    if restored is not None:
      state = restored
    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config),
                      in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                      out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                      donate_argnums=0)
    progress = metrics_lib.Progress(steps, config.batch_size, start)
    schedule = optim.schedule(config.optim.lr, steps, config.optim.warmup_steps)
    for step in range(start + 1, steps + 1):
      batch = sharding_lib.to_global_batch(next(data_iter), mesh)
      state, step_metrics = step_fn(state, batch)
      if step % config.log_every == 0 or step == steps:
        speed = progress.update(step)
        scalars = {**jax.device_get(step_metrics), 'train/lr': float(schedule(step - 1)),
                   'train/images_per_sec': speed['images_per_sec']}
        if not np.isfinite(scalars['train/loss']):
          raise FloatingPointError(f'loss is {scalars["train/loss"]} at step {step}; '
                                   'lower optim.lr or raise optim.warmup_steps')
        writer.write(step, scalars)
        metrics_lib.log_line(step, steps, {k: scalars[k] for k in (
            'train/loss', 'train/inv', 'train/sigreg', 'train/probe_top1',
            'train/images_per_sec')}, speed['eta_sec'])
      if step % config.checkpoint_every == 0 or step == steps:
        ckpt_lib.save(mngr, step, state, data_iter)
    if start >= steps:
      logging.info('training already finished at step %d; evaluating only', start)

    results = evaluate(config, model, state, mesh)
  writer.write(steps, {f'eval/{k}': v for k, v in results.items()})
  writer.close()
  mngr.close()
  for k, v in results.items():
    logging.info('eval/%s = %.4f', k, v)
  print(f'[lejepa_jax] final frozen evaluation on {config.data.test_split}: '
        f"linear probe top-1 {results['linear_probe_top1']:.4f}, k-NN top-1 {results['knn_top1']:.4f}",
        flush=True)
  return results
