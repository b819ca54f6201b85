"""The training loop as a library function: `train_and_evaluate(config, workdir)`.

Reading order: `train_and_evaluate` builds the mesh and the data, gets the
model, state layout and jitted functions from `steps.build` (the same ones
`plan` compiles), then `_train` restores the newest readable checkpoint and loops
over `steps.train_step` (the sharded update), logging, checking for non-finite
values (`_FiniteGuard`, on the flags the step computes on device) and saving
asynchronously, until the end or a preemption notice (`preemption.Watcher`);
the evaluators of `config.evals` (`evaluators/suite.py`: linear probe, k-NN, few-shot
on sharded frozen features) run every `every` steps and at the end.
"""
from __future__ import annotations

import time

from absl import logging
from etils import epath
import jax
import numpy as np

from lejepa_jax import checkpoint as ckpt_lib
from lejepa_jax import config_schema
from lejepa_jax import diagnostics
from lejepa_jax import losses
from lejepa_jax import metrics as metrics_lib
from lejepa_jax import models
from lejepa_jax import optim
from lejepa_jax import plots
from lejepa_jax import preemption
from lejepa_jax import run_config
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import sigreg
from lejepa_jax import stats
from lejepa_jax import steps
from lejepa_jax.data import host_resources
from lejepa_jax.data import pipeline
from lejepa_jax.data import sources
from lejepa_jax.evaluators import suite


class ConfigError(ValueError):
  """A config value the run cannot use; the message names the key and what to set instead.

  Raised before anything compiles or touches the workdir (`python -m lejepa_jax.main` prints
  it as one line and exits with status 2)."""


def _crop_problems(config) -> list[str]:
  d, patch = config.data, config.model.patch_size
  out = []
  if patch < 1:
    return [f'model.patch_size={patch!r} must be a positive integer']
  views = [('data.global_size', d.global_size)]
  if d.num_local_views > 0:
    views.append(('data.local_size', d.local_size))
  for key, size in views:
    if size % patch:
      lower, upper = size // patch * patch, (size // patch + 1) * patch
      choices = f'{lower} or {upper}' if lower else f'{upper}'
      out.append(f'{key}={size} is not a multiple of model.patch_size={patch} (the patches must '
                 f'tile the crop): set --config.{key}={choices}, or change model.patch_size')
  return out


def validate(config) -> None:
  """Fails early with ONE ConfigError naming every bad key and what to set instead.

  Checks the config alone (no devices, no data, no files): unknown and missing keys
  against `config_schema.KEYS`, then values that would only fail (or mislead) later.
  `train_and_evaluate` adds the checks that need the devices and the data, all before
  the workdir is touched.
  """
  problems = config_schema.problems(config)
  problems += suite.problems(config)
  if problems:   # values of misspelt or missing keys cannot be checked meaningfully
    raise ConfigError('bad config: ' + '; '.join(problems))
  if config.loss_convention not in losses.CONVENTIONS:
    problems.append(f'loss_convention={config.loss_convention!r}: one of {losses.CONVENTIONS}')
  if config.loss_convention == 'convex' and not 0.0 <= config.lamb <= 1.0:
    problems.append(f'lamb={config.lamb}: must lie in [0, 1] with the convex convention '
                    '((1 - lamb) * inv + lamb * sigreg): set --config.lamb in [0, 1] (the paper '
                    'uses 0.05), or --config.loss_convention=additive for inv + lamb * sigreg')
  if config.sigreg.num_slices < 1 or config.sigreg.num_points < 2 or config.sigreg.t_max <= 0:
    problems.append('sigreg: num_slices >= 1, num_points >= 2 and t_max > 0 are required')
  statistic = steps.regulariser_options(config.sigreg)['statistic']
  if statistic not in stats.STATISTICS:
    problems.append(f'sigreg.statistic={statistic!r}: one of {stats.STATISTICS}')
  if config.sigreg.get('quadrature', 'trapezoid') not in sigreg.QUADRATURES:
    problems.append(f'sigreg.quadrature={config.sigreg.quadrature!r}: one of {sigreg.QUADRATURES}')
  if not config.get('total_steps') and not config.get('epochs'):
    problems.append('total_steps and epochs are both 0: set --config.total_steps=N or '
                    '--config.epochs=N')
  if config.batch_size < 1 or config.eval.batch_size < 1:
    problems.append('batch_size and eval.batch_size must be >= 1')
  d = config.data
  if d.name not in ('fashion_mnist', 'folder') and not str(d.name).startswith('tfds:'):
    problems.append(f"data.name={d.name!r}: one of 'fashion_mnist', 'tfds:NAME' or 'folder'")
  if d.num_global_views < 1:
    problems.append('data.num_global_views must be >= 1 (the invariance centre)')
  if d.num_local_views < 0:
    problems.append('data.num_local_views must be >= 0')
  problems.extend(_crop_problems(config))
  for key in ('mean', 'std'):
    values = tuple(d[key]) if isinstance(d[key], (tuple, list)) else (d[key],)
    if len(values) != d.channels:
      problems.append(f'data.{key}={values} has {len(values)} values but data.channels='
                      f'{d.channels}: give one value per channel, e.g. '
                      f'--config.data.{key}="{(values * d.channels)[:d.channels]}"')
    elif key == 'std' and min(values) <= 0:
      problems.append(f'data.std={values}: every value must be > 0')
  if config.checkpoint_every < 1 or config.log_every < 1:
    problems.append('checkpoint_every and log_every must be >= 1')
  if config.get('checkpoint_max_to_keep', 2) < 1 or config.get('checkpoint_keep_every', 0) < 0:
    problems.append('checkpoint_max_to_keep must be >= 1 and checkpoint_keep_every >= 0 (0: none)')
  if (config.eval.get('features') or 'probe') not in models.FEATURE_KINDS:
    problems.append(f'eval.features={config.eval.features!r}: one of '
                    f'{sorted(models.FEATURE_KINDS)}')
  elif not config.model.get('embedding_dim', 0) and (
      config.eval.get('features') == 'head' or any(
          dict(e).get('features') == 'head' for e in (config.get('evals') or {}).values()
          if hasattr(e, 'get'))):
    problems.append("features 'head' need a head: set model.embedding_dim > 0")
  if config.optim.get('weight_decay_on', 'kernels') not in optim.WEIGHT_DECAY_ON:
    problems.append(f'optim.weight_decay_on={config.optim.weight_decay_on!r}: one of '
                    f'{optim.WEIGHT_DECAY_ON}')
  if config.get('nonfinite', 'stop') not in steps.NONFINITE_POLICIES:
    problems.append(f'nonfinite={config.nonfinite!r}: one of {steps.NONFINITE_POLICIES}')
  if config.get('nonfinite_max_skips', 10) < 1:
    problems.append('nonfinite_max_skips must be >= 1')
  if d.get('verify_images', 'auto') not in sources.VERIFY_MODES:
    problems.append(f'data.verify_images={d.verify_images!r}: one of {sources.VERIFY_MODES}')
  problems.extend(host_resources.problems(d))
  if problems:
    raise ConfigError('bad config: ' + '; '.join(problems))


def total_steps(config, train_size: int) -> int:
  if config.get('total_steps'):
    return int(config.total_steps)
  if config.get('epochs'):
    return max(1, int(config.epochs * train_size // config.batch_size))
  raise ConfigError('config needs total_steps or epochs: set --config.total_steps=N')


class _FiniteGuard:
  """Reads the per-step non-finite flags of the train step when the loop syncs anyway.

  nonfinite='stop': the first non-finite step ends the run, naming the step, the terms
  and the last good checkpoint (the check runs before every save, so no non-finite state
  is ever written). nonfinite='skip': the step already dropped the update in-graph; this
  logs it and ends the run once nonfinite_max_skips steps in a row were dropped.
  """
  TERMS = ('inv', 'sigreg', 'loss', 'probe_loss')

  def __init__(self, config, mngr):
    self.policy = config.get('nonfinite', 'stop')
    self.max_skips = int(config.get('nonfinite_max_skips', 10))
    self.mngr = mngr

  def _terms(self, m) -> str:
    bad = [f'{t}={m[f"train/{t}"]}' for t in self.TERMS if not np.isfinite(m[f'train/{t}'])]
    if not m['train/grads_finite']:
      bad.append('grads')
    return ', '.join(bad) or 'grads'

  def _last_good(self) -> str:
    self.mngr.wait_until_finished()
    step = self.mngr.latest_step()
    if step is None:
      return 'no checkpoint was written yet'
    return f'the last good checkpoint is step {step}, {ckpt_lib.step_path(self.mngr, step)}'

  def check(self, history) -> None:
    """history: [(step, host metrics)] since the last check, in step order."""
    for step, m in history:
      if m['train/finite']:
        continue
      if self.policy == 'stop':
        raise FloatingPointError(
            f'non-finite values at step {step}: {self._terms(m)} (nonfinite=stop); '
            f'{self._last_good()} and nothing non-finite was saved. Lower optim.lr, raise '
            f'optim.warmup_steps or set optim.clip_norm; or set nonfinite=skip to drop such updates.')
      streak = int(m['train/nonfinite_streak'])
      logging.warning('step %d: non-finite %s; update dropped (%d in a row, %d in total)',
                      step, self._terms(m), streak, int(m['train/skipped_steps']))
      if streak >= self.max_skips:
        raise FloatingPointError(
            f'{streak} non-finite steps in a row, the last at step {step}: {self._terms(m)} '
            f'(nonfinite=skip, nonfinite_max_skips={self.max_skips}; their updates were '
            f'dropped); {self._last_good()}. Lower optim.lr, raise optim.warmup_steps or set '
            f'optim.clip_norm.')


_INTERNAL_METRICS = ('train/finite', 'train/grads_finite', 'train/nonfinite_streak')


def _train(config, programs, mesh, open_stream, steps_total, mngr, writer, notice, runner,
           monitor, workdir):
  """Restores (or initialises) the state and trains to steps_total; returns the state.

  Host and device synchronise at logging, checkpoint and evaluation steps, where the
  metrics of every step since the last one are read at once (non-finite checks
  included), and at most two steps are in flight: after dispatching step s the loop
  waits for step s - 1 to finish, then reads the next batch and puts it on the devices
  while step s runs. So a preemption notice is acted on within about two steps (the host
  never runs ahead by a whole log interval), at no cost in throughput: the device always
  has the next step queued. The time spent blocked on the iterator and the
  host-to-device copy is logged as train/data_wait_fraction.
  """
  # Restore straight into the target shardings; initialise only when there is nothing to resume.
  state, start, position = ckpt_lib.restore_latest(mngr, programs.abstract_state)
  if state is None:
    state = programs.init(np.int32(config.seed))
  data_iter, next_batch_index = open_stream(start, position)
  writer.resume(start)     # drops metric lines past `start`: this run logs those steps again
  n_params = sum(x.size for x in jax.tree.leaves(state.params['encoder']))
  logging.info('encoder parameters: %.2fM; %d steps of %d images', n_params / 1e6,
               steps_total, config.batch_size)
  progress = metrics_lib.Progress(steps_total, config.batch_size, start)
  schedule = optim.schedule(config.optim.lr, steps_total, config.optim.warmup_steps)
  guard = _FiniteGuard(config, mngr)
  eval_specs = suite.specs(config)

  first_batch_index = next_batch_index

  def next_batch():
    nonlocal next_batch_index
    t = time.perf_counter()
    local = next(data_iter)
    if next_batch_index == first_batch_index:
      sharding_lib.check_replicas_agree(local, mesh)    # once: replicas read the same rows
    batch = sharding_lib.to_global_batch(local, mesh)
    next_batch_index += 1
    progress.waited(time.perf_counter() - t)
    return batch

  def save(step):   # before the next batch is read: the position matches the state
    ckpt_lib.save(mngr, step, state, {'next_batch': next_batch_index,
                                      'global_batch_size': config.batch_size})

  def stop(step, saved, during=''):
    if not saved:
      save(step)
    mngr.wait_until_finished()
    message = (f'[lejepa_jax] preemption notice ({notice.source}){during}: saved the checkpoint '
               f'of step {step} to {ckpt_lib.step_path(mngr, step)}; exiting with status 0. '
               'Rerun the same command to resume.')
    logging.warning('%s', message)
    print(message, flush=True)
    raise preemption.Preempted(step, message)

  pending = []       # (step, device metrics) not read yet
  batch = next_batch() if start < steps_total else None
  for step in range(start + 1, steps_total + 1):
    state, step_metrics = programs.train_step(state, batch)
    if pending:        # at most two steps in flight (see the docstring)
      jax.block_until_ready(pending[-1][1]['train/loss'])
    pending.append((step, step_metrics))
    preempted = notice.poll()
    log_now = step % config.log_every == 0 or step == steps_total
    save_now = step % config.checkpoint_every == 0 or step == steps_total or preempted
    evals_now = suite.due(eval_specs, step) if step < steps_total else []
    diag_now = monitor.due(step)
    if not (log_now or save_now or evals_now or diag_now):
      batch = next_batch()     # overlaps the step just dispatched
      continue
    history = jax.device_get(pending)
    pending.clear()
    guard.check(history)       # before any save: a non-finite state is never written
    diag = {}
    if diag_now:
      with progress.paused():
        diag, arrays, warning = monitor(step, steps.variables(state))
        if jax.process_index() == 0:
          plots.save_arrays(workdir, step, arrays)
      if warning:
        logging.warning('%s', warning)
      if not log_now:
        writer.write(step, diag)
    if log_now:
      speed = progress.update(step)
      scalars = {k: v for k, v in history[-1][1].items() if k not in _INTERNAL_METRICS}
      scalars.update({'train/lr': float(schedule(step - 1)),
                      'train/images_per_sec': speed['images_per_sec'],
                      'train/step_seconds': speed['step_seconds'],
                      'train/data_wait_fraction': speed['data_wait_fraction'], **diag})
      writer.write(step, scalars)
      metrics_lib.log_line(step, steps_total, {k: scalars[k] for k in (
          'train/loss', 'train/inv', 'train/sigreg', 'train/probe_top1',
          'train/images_per_sec', 'train/data_wait_fraction')}, speed['eta_sec'])
    if save_now:
      save(step)
    if preempted:
      stop(step, saved=True)
    if evals_now:
      with progress.paused():  # evaluation time is not training time
        try:
          results = runner(steps.variables(state), evals_now, should_stop=notice.poll)
        except preemption.NoticeDuringEvaluation:
          stop(step, saved=save_now, during=' during the evaluation at this step (abandoned)')
        writer.write(step, results)
        _log_results(step, results)
    if step < steps_total:
      batch = next_batch()
  if start >= steps_total:
    logging.info('training already finished at step %d; evaluating only', start)
  return state


def _log_results(step: int, results: dict) -> None:
  shown = '  '.join(f'{k[len("eval/"):]}={v:.4f}' for k, v in results.items()
                    if not k.endswith('_std') and not k.endswith('_lr'))
  logging.info('step %d evaluation: %s', step, shown)


def _resume_batch(config, step: int, position: dict | None) -> int:
  """The global batch a run resumed after `step` reads first.

  From the checkpoint's position (any process count). A checkpoint without one resumes
  at `step` (one batch per step). If batch_size changed since the save, the stream goes
  on at the first whole new batch after the records already seen.
  """
  if position is None:
    return step
  saved_batch = position.get('global_batch_size', config.batch_size)
  if saved_batch == config.batch_size:
    return position['next_batch']
  records = position['next_batch'] * saved_batch
  logging.warning('batch_size changed from %d (checkpoint) to %d: the data stream resumes at '
                  'record %d of its global order', saved_batch, config.batch_size,
                  -(-records // config.batch_size) * config.batch_size)
  return -(-records // config.batch_size)


def _check_divisible(config, dp: int, blocks: int) -> None:
  """Both batch sizes split over the dp devices and the `blocks` the processes read
  (`sharding.batch_feed(mesh).count`: the process count unless replicas span processes)."""
  problems = []
  for key, value in (('batch_size', config.batch_size), ('eval.batch_size', config.eval.batch_size)):
    if value % dp or value % blocks:
      step = int(np.lcm(dp, blocks))
      problems.append(
          f'{key}={value} must divide by the data-parallel size {dp} and the {blocks} blocks '
          f'the processes read: set --config.{key} to a multiple of {step} (e.g. '
          f'{max(step, value // step * step)}), or change mesh')
  if problems:
    raise ConfigError('bad config: ' + '; '.join(problems))


def _check_data(config, train_source, test_source) -> None:
  """What only the data can tell: enough records, and the channels the config expects."""
  d = config.data
  for split, source in ((d.train_split, train_source), (d.test_split, test_source)):
    if not len(source):
      raise sources.MissingDataError(f'{d.name} split {split!r} under data.dir={d.get("dir")!r} '
                                     'has no records: point data.dir at the data')
    image = np.asarray(source[0]['image'])
    channels = image.shape[-1] if image.ndim == 3 else 1
    if channels != d.channels:
      raise ConfigError(f'data.channels={d.channels} but the images of {d.name} split {split!r} '
                        f'have {channels} channel(s): set --config.data.channels={channels} and '
                        f'give data.mean and data.std {channels} values each')
  if len(train_source) < config.batch_size:
    raise ConfigError(f'batch_size={config.batch_size} is larger than the {len(train_source)} '
                      f'records of data.train_split={d.train_split!r}: lower --config.batch_size')


def train_and_evaluate(config, workdir: str, *, devices=None) -> dict:
  """Pretrains (resuming from workdir's latest checkpoint), then evaluates. Returns eval metrics.

  `workdir` may be any path etils.epath understands (a local directory, gs://...).
  `devices` (default: all) are the devices of the mesh; a run resumes on any mesh.
  On a preemption notice (SIGTERM, or JAX's preemption service on a pod) it saves a
  checkpoint at the next step boundary, waits for it and raises `preemption.Preempted`
  (SystemExit with status 0); on non-finite values see `nonfinite` (FloatingPointError).
  """
  # Everything up to steps.build checks the config, the devices and the data without
  # writing anything: a bad value or a missing/corrupt file leaves the workdir as it was.
  validate(config)
  workdir = epath.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f'--workdir={workdir} is a file, not a directory: pass a directory')
  mesh = sharding_lib.make_mesh(config.get('mesh'), devices)
  try:
    feed = sharding_lib.batch_feed(mesh)
  except sharding_lib.MeshFeedError as e:
    raise ConfigError(f'bad config: mesh={dict(config.get("mesh") or {})}: {e}') from None
  dp = sharding_lib.data_parallel_size(mesh)
  _check_divisible(config, dp, feed.count)
  logging.info('mesh %s over %d devices, %d processes (%s); this process reads batch block '
               '%d of %d%s', dict(mesh.shape), mesh.devices.size, jax.process_count(),
               sharding_lib.describe_devices(mesh), feed.index, feed.count,
               f', shared with {feed.replicas - 1} replica process(es)' if feed.replicas > 1 else '')
  train_source = sources.get_source(config.data, config.data.train_split)
  test_source = sources.get_source(config.data, config.data.test_split)
  _check_data(config, train_source, test_source)
  steps_total = total_steps(config, len(train_source))

  def open_stream(step: int, position: dict | None):
    """(iterator of this process's training batches, index of its next global batch)."""
    next_batch = _resume_batch(config, step, position)
    dataset = pipeline.train_dataset(
        train_source, config.data, seed=config.seed,
        local_batch_size=config.batch_size // feed.count,
        process_index=feed.index, process_count=feed.count, start_batch=next_batch)
    return iter(dataset), next_batch

  programs = steps.build(config, mesh, steps_total)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    run_config.save(workdir, config)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  mngr = ckpt_lib.manager(workdir, max_to_keep=config.get('checkpoint_max_to_keep', 2),
                          keep_every=config.get('checkpoint_keep_every', 0))

  runner = suite.Runner(config, programs, train_source=train_source, test_source=test_source)
  with sharding_lib.activate(mesh):
    monitor = diagnostics.Monitor(config, programs, test_source)
    with preemption.Watcher() as notice:
      try:
        state = _train(config, programs, mesh, open_stream, steps_total, mngr, writer, notice,
                       runner, monitor, workdir)
      except BaseException:
        # Preempted, non-finite, interrupted...: an in-flight save still completes (and is
        # renamed into place) before the exception leaves.
        mngr.wait_until_finished()
        writer.close()
        mngr.close()
        raise
    mngr.wait_until_finished()
    results = runner(steps.variables(state), suite.specs(config))
  writer.write(steps_total, results)
  writer.close()
  mngr.close()
  _log_results(steps_total, results)
  print(f'[lejepa_jax] final frozen evaluation on {config.data.test_split}: '
        + summary(results), flush=True)
  if jax.process_index() == 0 and (config.get('diagnostics') or {}).get('plots', True):
    write_plots(workdir)
  return results


def write_plots(workdir) -> None:
  """PNGs of the run into WORKDIR/plots/; a plotting failure is logged, never fatal."""
  try:
    for path in plots.write_plots(workdir):
      logging.info('plot: %s', path)
  except Exception as e:  # pylint: disable=broad-except  (the run itself is done and saved)
    logging.warning('could not write the plots into %s/plots: %s', workdir, e)


def summary(results: dict) -> str:
  """'linear probe top-1 0.8420, k-NN top-1 0.8160, fewshot_1shot_top1 ...': the top-1
  figures of `results`, the paper's two first."""
  names = {'eval/linear_probe_top1': 'linear probe top-1', 'eval/knn_top1': 'k-NN top-1'}
  first = lambda k: (not k.endswith('linear_probe_top1'), not k.endswith('/knn_top1'), k)
  keys = sorted((k for k in results if k.endswith('top1')), key=first)
  return ', '.join(f'{names.get(k, k[len("eval/"):])} {results[k]:.4f}' for k in keys)
