"""Orbax checkpoints of everything the next step depends on.

Items: 'state' (params, optimizer state, BatchNorm statistics, step, non-finite
counters, RNG key; sharded arrays saved and restored in place) and 'data_position'
(one small JSON file written by process 0: the next global batch of the training
stream and the global batch size). The position does not depend on the number of
processes, so a run saved on N hosts resumes on any other number. Checkpoints of
earlier versions hold 'data' instead (Grain's iterator state, one file per process):
their position is read from any of those files, so they resume on any count too.

Saves are asynchronous: `save` returns once the arrays are copied off the devices (the
state may then be donated to the next step) and Orbax writes them in a background
thread. A checkpoint is written to `STEP.orbax-checkpoint-tmp` and renamed to `STEP`
when complete, so a killed run never leaves a half-written `STEP`. Orbax waits for the
previous save before starting the next; call `mngr.wait_until_finished()` at the end.

Restore goes straight into the target shardings of `abstract_state`, so a run resumes
onto another mesh or device count. An unreadable newest checkpoint (truncated or
missing file) is reported with its path and the one before it is used; the unreadable
one is moved aside to WORKDIR/checkpoints_unreadable/ (nothing is deleted).
"""
from __future__ import annotations

import json

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from lejepa_jax import cli
from lejepa_jax import workdir as workdir_lib

UNREADABLE = 'checkpoints_unreadable'
POSITION = 'data_position'    # {'next_batch': int, 'global_batch_size': int}
LEGACY_DATA = 'data'          # Grain's per-process iterator files (checkpoints before 2026-12)


def directory(workdir) -> epath.Path:
  """WORKDIR/checkpoints; a gs:// workdir stays a gs:// path (never made local).

  A relative local path is made absolute (Orbax and TensorStore want one);
  a URL is absolute already.
  """
  path = epath.Path(workdir)
  return (path if path.is_absolute() else path.absolute()) / workdir_lib.CHECKPOINTS_DIR


def manager(workdir, *, max_to_keep: int = 2, keep_every: int = 0) -> ocp.CheckpointManager:
  """Keeps the newest `max_to_keep` checkpoints, and for good every step % keep_every == 0."""
  policies = [checkpoint_managers.LatestN(max_to_keep)]
  if keep_every:
    policies.append(checkpoint_managers.EveryNSteps(keep_every))
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=True,
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
  return ocp.CheckpointManager(
      directory(workdir), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     POSITION: ocp.JsonCheckpointHandler()})


def step_path(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
  return epath.Path(mngr.directory) / str(step)


def save(mngr: ocp.CheckpointManager, step: int, state, position: dict) -> None:
  """Starts writing `step` (after the previous save has finished); returns once the arrays
  are captured, so training may go on (and donate `state`).

  `position`: {'next_batch': the global batch the resumed run reads first,
  'global_batch_size': G} (JSON; written once, by process 0).
  """
  mngr.wait_until_finished()
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      **{POSITION: ocp.args.JsonSave(dict(position))}), force=True)


def _legacy_position(path: epath.Path) -> dict | None:
  """The position in a checkpoint of an earlier version: Grain's iterator state files
  `process_I-of-N.json` (one per process, all at the same global batch)."""
  files = sorted(path.glob('process_*-of-*.json')) if path.exists() else []
  for f in files:
    state = json.loads(f.read_text())
    if isinstance(state, dict) and isinstance(state.get('next_index'), int):
      return {'next_batch': state['next_index']}
  if files:   # a multi-worker iterator's state: the loop reads one batch per step anyway
    logging.info('%s: Grain iterator state without next_index; the data stream resumes at '
                 'the checkpoint step', path)
  return None


def _restore_step(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """(state, position) of one checkpoint; position None when it holds none (very old runs)."""
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  has_position = (step_path(mngr, step) / POSITION).exists()
  if has_position:
    items[POSITION] = ocp.args.JsonRestore()
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  position = (dict(restored[POSITION]) if has_position else
              _legacy_position(step_path(mngr, step) / LEGACY_DATA))
  if position is not None and not isinstance(position.get('next_batch'), int):
    raise ValueError(f'{step_path(mngr, step) / POSITION}: no integer next_batch in {position}')
  return restored.state, position


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))



def _set_aside(mngr: ocp.CheckpointManager, steps) -> None:
  """Moves unreadable checkpoints out of the manager's directory (a rerun saves those steps
  again); process 0 moves, the others wait for it.

  A local folder is renamed. On an object store (gs://...) a folder is only a prefix of
  object names: mkdir makes nothing and a prefix cannot be renamed, so every file is copied
  and then the step's objects are removed (a crash in between leaves two copies, never none).
  """

  def copy_tree(src: epath.Path, dst: epath.Path) -> None:
    for child in src.iterdir():
      if child.is_dir():
        copy_tree(child, dst / child.name)
      else:
        child.copy(dst / child.name)

  if jax.process_index() == 0:
    aside = epath.Path(mngr.directory).parent / UNREADABLE
    for step in steps:
      target, n = aside / str(step), 1
      while target.exists():
        target, n = aside / f'{step}.{n}', n + 1
      source = step_path(mngr, step)
      if '://' in str(source):
        copy_tree(source, target)
        source.rmtree()
      else:
        aside.mkdir(parents=True, exist_ok=True)
        source.rename(target)
      logging.warning('moved unreadable checkpoint %s to %s (kept for inspection; delete it '
                      'when done)', source, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('lejepa_jax: unreadable checkpoints set aside')
  mngr.reload()


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """(state, step, position) from the newest readable checkpoint, or (None, 0, None).

  `abstract_state` holds jax.ShapeDtypeStruct leaves with the target shardings;
  `position` is the data stream's, as `save` wrote it (None when the checkpoint has
  none: resume the stream at the step). Unreadable checkpoints newer than the one restored
  are reported with their paths and moved aside; when none is readable a RuntimeError
  lists them all and nothing is moved or deleted.

  Multi-process: every process must reach the same verdict. A file that only one process
  reads (its own shards) can fail there alone; Orbax's restore barrier then makes the
  others wait for its timeout before they fail too.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None, 0, None
  unreadable = []
  for step in steps:
    try:
      state, position = _restore_step(mngr, step, abstract_state)
      ok, error = True, None
    except Exception as e:  # pylint: disable=broad-except  (any failure: try the one before)
      ok, error = False, e
    if not _all_processes_agree(ok):
      reason = cli.describe_error(error, 400) if error else 'another process could not read it'
      logging.warning('checkpoint %s is unreadable (%s); trying the one before it',
                      step_path(mngr, step), reason)
      unreadable.append((step, reason))
      continue
    if unreadable:
      _set_aside(mngr, [s for s, _ in unreadable])
    logging.info('restored checkpoint at step %d from %s (data stream at global batch %s)',
                 step, mngr.directory, position and position['next_batch'])
    return state, step, position
  listing = '; '.join(f'{step_path(mngr, s)}: {reason}' for s, reason in unreadable)
  raise RuntimeError(
      f'no readable checkpoint in {mngr.directory} (nothing was moved or deleted): {listing}. '
      f'If the config changed (model size, optimizer), use a new --workdir; if they are '
      f'corrupt, move them away to start afresh.')


def restore_state(workdir, abstract_state, step: int | None = None):
  """(state, step) of checkpoint `step` (default: the newest) in WORKDIR/checkpoints, for
  evaluating or exporting a run without training it: the data-iterator item is not read.

  Raises FileNotFoundError naming the directory (and the steps it holds) when there is no
  such checkpoint. Opens the directory read-only (nothing is created, moved or deleted).
  """
  path = directory(workdir)
  mngr = ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(create=False, read_only=True),
      item_handlers={'state': ocp.StandardCheckpointHandler()})
  try:
    available = sorted(mngr.all_steps()) if path.exists() else []
    if not available:
      raise FileNotFoundError(f'no checkpoint in {path}: train first (python -m lejepa_jax.main '
                              f'--config=... --workdir={epath.Path(workdir)})')
    step = available[-1] if step is None else int(step)
    if step not in available:
      raise FileNotFoundError(f'no checkpoint of step {step} in {path}; it holds steps '
                              f'{available}: pass one of them as --step')
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored.state, step
  finally:
    mngr.close()

