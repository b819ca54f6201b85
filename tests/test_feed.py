"""Which rows of the global batch each process reads (`sharding.batch_feed`).

JAX requires processes whose devices hold the same rows of a global array to pass the
same data to `make_array_from_process_local_data`, and cannot check it. These tests derive
the blocks from the process of every mesh device, as a pod or a one-process-per-GPU
SLURM job lays them out, and check them against a brute-force reading of the mesh.
"""
import itertools

import numpy as np
import pytest

from lejepa_jax import sharding


def _rows_held(processes, global_batch):
  """Brute force: process -> the set of global batch rows its devices hold."""
  data, fsdp, tensor = processes.shape
  per_shard = global_batch // (data * fsdp)
  held = {}
  for d, f, t in itertools.product(range(data), range(fsdp), range(tensor)):
    shard = d * fsdp + f
    held.setdefault(int(processes[d, f, t]), set()).update(
        range(shard * per_shard, (shard + 1) * per_shard))
  return held


LAYOUTS = {
    # (data, fsdp, tensor) grid of process indices
    'one process': np.zeros((1, 4, 2), int),
    'fsdp across 2 processes x 2 devices': np.array([0, 0, 1, 1]).reshape(1, 4, 1),
    'tensor=4 across 2 processes x 2 devices': np.array([0, 0, 1, 1]).reshape(1, 1, 4),
    'SLURM, 1 GPU per process, fsdp=4 tensor=2': np.arange(8).reshape(1, 4, 2),
    'data=2 fsdp=2 tensor=2, 4 processes x 2': np.arange(4).repeat(2).reshape(2, 2, 2),
    'processes interleaved along fsdp': np.array([0, 1, 0, 1]).reshape(1, 4, 1),
    'tensor=2 spanning processes whose fsdp shards differ': np.array(
        [[0, 1], [0, 1], [2, 3], [2, 3]]).reshape(1, 4, 2),
}


@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_every_process_reads_exactly_the_rows_its_devices_hold(name):
  processes = LAYOUTS[name]
  global_batch = 48
  held = _rows_held(processes, global_batch)
  feeds = {p: sharding.feed_from_process_grid(processes, process_index=p) for p in held}
  counts = {f.count for f in feeds.values()}
  assert len(counts) == 1
  count = counts.pop()
  local = global_batch // count
  # A process's block, laid out by JAX onto its devices' rows in order, must be the records
  # of those rows in the global batch that one process would read: block index * local + i.
  for p, feed in feeds.items():
    rows = sorted(held[p])
    assert len(rows) == local, (name, p)
    replicas = [q for q in held if held[q] == held[p]]
    assert feed.replicas == len(replicas), (name, p)
    assert {feeds[q].index for q in replicas} == {feed.index}     # replicas read the same block
  # Distinct row sets read distinct blocks, together the whole batch once.
  by_rows = {tuple(sorted(r)): feeds[p].index for p, r in held.items()}
  assert sorted(by_rows.values()) == list(range(count))


def test_one_process_per_gpu_with_tensor_2_shares_blocks_between_pairs():
  processes = LAYOUTS['SLURM, 1 GPU per process, fsdp=4 tensor=2']
  feeds = [sharding.feed_from_process_grid(processes, process_index=p) for p in range(8)]
  assert [(f.index, f.count, f.replicas) for f in feeds] == [
      (0, 4, 2), (0, 4, 2), (1, 4, 2), (1, 4, 2), (2, 4, 2), (2, 4, 2), (3, 4, 2), (3, 4, 2)]


def test_a_mesh_whose_processes_hold_overlapping_rows_is_refused_naming_the_axis():
  # fsdp=2, tensor=3 over 3 processes x 2 devices: process 1 holds shards 0 and 1,
  # processes 0 and 2 one each; no feeding gives replicas identical and distinct rows.
  processes = np.array([[0, 0, 1], [1, 2, 2]]).reshape(1, 2, 3)
  with pytest.raises(sharding.MeshFeedError) as e:
    sharding.feed_from_process_grid(processes, process_index=0)
  message = str(e.value)
  assert "'tensor'" in message and 'cannot be fed' in message, message
  assert 'process(es) [1] hold batch shards [0, 1]' in message, message


def test_the_feed_of_a_real_mesh_matches_its_devices():
  import jax
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  feed = sharding.batch_feed(mesh)
  assert (feed.index, feed.count, feed.replicas) == (0, 1, 1)   # one process holds everything
  batch = {'x': np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  arrays = sharding.to_global_batch(batch, mesh)
  np.testing.assert_array_equal(np.asarray(arrays['x']), batch['x'])
  assert arrays['x'].sharding.spec == sharding.batch_sharding(mesh).spec
  assert len(jax.devices()) == 8
