"""Orbax checkpoints of everything the next step depends on.

Items: 'state' (params, optimizer state, BatchNorm statistics, step, RNG key;
sharded arrays saved and restored in place) and 'data' (the Grain iterator
position, one small file per process).
"""
from __future__ import annotations

from absl import logging
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp


def directory(workdir) -> epath.Path:
  """WORKDIR/checkpoints; a gs:// workdir stays a gs:// path (never made local).

  A relative local path is made absolute (Orbax and TensorStore want one);
  a URL is absolute already.
  """
  path = epath.Path(workdir)
  return (path if path.is_absolute() else path.absolute()) / 'checkpoints'


def manager(workdir, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      directory(workdir), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)
  mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iterator):
  """(state, step) from the latest checkpoint, or (None, 0) when there is none.

  `abstract_state` holds jax.ShapeDtypeStruct leaves with the target shardings;
  `data_iterator` is rewound in place.
  """
  step = mngr.latest_step()
  if step is None:
    return None, 0
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
  except Exception as e:
    raise RuntimeError(
        f'could not restore checkpoint step {step} in {mngr.directory}: {e}. If the config '
        f'changed (model size, optimizer), use a new --workdir; if the checkpoint is corrupt, '
        f'move {mngr.directory}/{step} away to resume from the previous one.') from e
  logging.info('restored checkpoint at step %d from %s', step, mngr.directory)
  return restored.state, step


def abstract_like(state):
  """Shape, dtype and sharding of every array of `state` (a restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)
