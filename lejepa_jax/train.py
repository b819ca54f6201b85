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
from lejepa_jax import config as config_lib
from lejepa_jax import diagnostics
from lejepa_jax import init_from
from lejepa_jax import metrics as metrics_lib
from lejepa_jax import optim
from lejepa_jax import plots
from lejepa_jax import preemption
from lejepa_jax import run_config
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import steps
from lejepa_jax.data import pipeline
from lejepa_jax.evaluators import suite

# The config checks' public names, where users of the training API found them first.
ConfigError = config_lib.ConfigError
validate = config_lib.validate
total_steps = config_lib.total_steps


class _FiniteGuard:
  """Reads the per-step non-finite flags of the train step when the loop syncs anyway.

  nonfinite='stop': the first non-finite step ends the run, naming the step, the terms
  and the last good checkpoint (the check runs before every save, so no non-finite state
  is ever written). nonfinite='skip': the step already dropped the update in-graph; this
  logs it and ends the run once nonfinite_max_skips steps in a row were dropped.
  """
  TERMS = ('inv', 'sigreg', 'loss', 'probe_loss')

  def __init__(self, config, mngr):
    config = config_lib.resolve(config)
    self.policy = config.nonfinite
    self.max_skips = int(config.nonfinite_max_skips)
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
    if config.init_from:
      state = init_from.apply(state, config.init_from, config.model.depth, config.model.scan)
      logging.info('encoder initialised from %s', config.init_from)
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
  saved_batch = position.get('global_batch_size')     # absent in older checkpoints: unchanged
  if saved_batch in (None, config.batch_size):
    return position['next_batch']
  records = position['next_batch'] * saved_batch
  logging.warning('batch_size changed from %d (checkpoint) to %d: the data stream resumes at '
                  'record %d of its global order', saved_batch, config.batch_size,
                  -(-records // config.batch_size) * config.batch_size)
  return -(-records // config.batch_size)


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
  config_lib.validate(config)
  config = config_lib.resolve(config)    # every key present: stored so in config.json too
  workdir = epath.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f'--workdir={workdir} is a file, not a directory: pass a directory')
  run = config_lib.prepare(config, devices)
  mesh, feed, steps_total, programs = run.mesh, run.feed, run.total_steps, run.programs
  if config.init_from:
    init_from.check(config, programs.abstract_state.params['encoder'])
  train_source, test_source = run.train_source, run.test_source
  logging.info('mesh %s over %d devices, %d processes (%s); this process reads batch block '
               '%d of %d%s', dict(mesh.shape), mesh.devices.size, jax.process_count(),
               sharding_lib.describe_devices(mesh), feed.index, feed.count,
               f', shared with {feed.replicas - 1} replica process(es)' if feed.replicas > 1 else '')

  def open_stream(step: int, position: dict | None):
    """(iterator of this process's training batches, index of its next global batch)."""
    next_batch = _resume_batch(config, step, position)
    dataset = pipeline.train_dataset(
        train_source, config.data, seed=config.seed,
        local_batch_size=config.batch_size // feed.count,
        process_index=feed.index, process_count=feed.count, start_batch=next_batch)
    return iter(dataset), next_batch

  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    run_config.save(workdir, config)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  mngr = ckpt_lib.manager(workdir, max_to_keep=config.checkpoint_max_to_keep,
                          keep_every=config.checkpoint_keep_every)

  runner = suite.Runner(config, programs, train_source=train_source, test_source=test_source,
                        eval_sources=run.eval_sources)
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
  if jax.process_index() == 0 and config.diagnostics.plots:
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
