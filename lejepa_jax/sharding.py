"""Device mesh, logical-axis rules and batch sharding.

The mesh has three axes: 'data' (pure data parallel), 'fsdp' (data parallel
with parameters sharded along 'embed', a ResNet's along 'conv_out') and 'tensor' (Megatron-style model
parallel on 'mlp' and 'heads'). The batch is split over ('data', 'fsdp').
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# logical name -> mesh axis (or None: replicated)
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('conv_out', 'fsdp'),          # ResNets: output channels of convolutions and BatchNorms
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('seq', None),
    ('layers', None),
)


@contextlib.contextmanager
def activate(mesh, rules=DEFAULT_RULES):
  """The mesh and logical-axis rules under which model code is traced and run."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def mesh_shape(requested: dict | None, num_devices: int) -> tuple[int, ...]:
  """Resolves {'data': -1, 'fsdp': 1, 'tensor': 1} (-1 = the rest) to sizes."""
  requested = dict(requested or {})
  unknown = set(requested) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}')
  sizes = [int(requested.get(a, -1 if a == 'data' else 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {requested}')
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f'config.mesh {requested}: {num_devices} devices not divisible by {fixed}')
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} '
                     f'devices, have {num_devices}')
  return tuple(sizes)


def make_mesh(mesh_config=None, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axes: XLA's partitioner propagates shardings from the annotations.
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_sharding(abstract_tree, mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree whose leaves may be nn.Partitioned boxes."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


class MeshFeedError(ValueError):
  """A mesh whose batch rows no assignment of records to processes can feed correctly."""


@dataclasses.dataclass(frozen=True)
class Feed:
  """Which rows of every global batch this process reads: block `index` of `count` equal blocks.

  Processes whose devices hold the same batch rows (replicas along 'tensor' that span
  processes, e.g. one process per GPU with mesh.tensor=2) share a block and must read
  identical records; JAX's `make_array_from_process_local_data` requires it and cannot
  check it. `count` is the number of distinct blocks (the process count when no
  process holds another's rows), `index` this process's block, `replicas` the number
  of processes that read each block.
  """
  index: int
  count: int
  replicas: int


def feed_from_process_grid(processes: np.ndarray, axis_names=MESH_AXES,
                           process_index: int = 0) -> Feed:
  """The Feed of `process_index`, given the process of every device of the mesh.

  `processes` has the mesh's shape. The batch is split over BATCH_AXES; devices that
  differ only along the other axes hold the same rows. Every process must hold either
  exactly the rows of another process or none of them (and all the same number of
  shards); otherwise no feeding is correct and MeshFeedError names the axis at fault.
  """
  batch_dims = [axis_names.index(a) for a in BATCH_AXES]
  other_dims = [i for i in range(processes.ndim) if i not in batch_dims]
  # (batch shard, replica) grid: rows of a shard live on every device of its replica row.
  grid = np.transpose(processes, batch_dims + other_dims).reshape(
      math.prod(processes.shape[i] for i in batch_dims), -1)
  shards_of = {}
  for shard, row in enumerate(grid):
    for p in set(row.tolist()):
      shards_of.setdefault(p, set()).add(shard)
  blocks = sorted({tuple(sorted(s)) for s in shards_of.values()})
  holders = {b: sorted(p for p, s in shards_of.items() if tuple(sorted(s)) == b) for b in blocks}
  seen = [s for b in blocks for s in b]
  sizes = {len(b) for b in blocks}
  if len(seen) != len(set(seen)) or len(sizes) != 1:
    shown = '; '.join(f'process(es) {holders[b]} hold batch shards {list(b)}' for b in blocks)
    spanned = [axis_names[i] for i in other_dims if processes.shape[i] > 1]
    axis = repr(spanned[0]) if spanned else f'the batch axes {BATCH_AXES}'
    raise MeshFeedError(
        f'the mesh {dict(zip(axis_names, processes.shape))} cannot be fed correctly: {shown}. '
        f'The {axis} axis spans processes so that they hold overlapping but different, or '
        f'unequal, sets of batch rows (replicas must read identical records, the others '
        f'disjoint blocks of one size). Choose '
        f'mesh sizes so that each group of processes along {axis} holds whole, equal blocks of '
        f'the batch (e.g. --config.mesh.tensor equal to the devices per process, or a multiple '
        f'of the processes it spans), or order the devices so that it does')
  block = next(b for b in blocks if process_index in holders[b])
  return Feed(index=blocks.index(block), count=len(blocks), replicas=len(holders[block]))


@functools.lru_cache(maxsize=None)
def batch_feed(mesh) -> Feed:
  """This process's Feed on `mesh` (raises MeshFeedError for a mesh no feeding fits)."""
  processes = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
  return feed_from_process_grid(processes, tuple(mesh.axis_names), jax.process_index())


def describe_devices(mesh) -> str:
  """'device ids [[0 1] [2 3]], processes [[0 0] [1 1]]' in the mesh's shape, for the log."""
  ids = np.vectorize(lambda d: d.id, otypes=[int])(mesh.devices)
  processes = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
  flat = lambda a: np.array2string(a, separator=' ').replace('\n', '')
  return f'device ids {flat(ids)}, processes {flat(processes)}'


def to_global_batch(local_batch, mesh):
  """Process-local numpy batch (this process's Feed block of rows) -> global jax.Arrays.

  The global batch has `batch_feed(mesh).count` blocks; JAX puts each device's rows of
  this process's block on it (replicas of the block, in other processes, pass the same rows).
  """
  sharding, count = batch_sharding(mesh), batch_feed(mesh).count

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * count, *x.shape[1:]))
  return jax.tree.map(put, local_batch)


def check_replicas_agree(local_batch, mesh) -> None:
  """Raises when processes that share a Feed block were handed different records.

  One all-gather of a checksum per process; meant for the first batch of a run (the
  pipeline keys every record and draw on the global position, so one agreeing batch
  shows the streams agree). A no-op when no block has several processes.
  """
  feed = batch_feed(mesh)
  if feed.replicas == 1 or jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils   # only on multi-process runs
  digest = np.zeros(2, np.float64)
  for x in jax.tree.leaves(local_batch):
    x = np.asarray(x, np.float64)
    digest += (x.sum(), (x * np.arange(1, x.shape[0] + 1).reshape(-1, *[1] * (x.ndim - 1))).sum())
  everyone = multihost_utils.process_allgather(np.concatenate([[feed.index], digest]))
  mine = everyone[everyone[:, 0] == feed.index][:, 1:]
  if not np.allclose(mine, mine[0], rtol=1e-12, atol=0):
    raise RuntimeError(
        f'processes that hold the same batch rows (Feed block {feed.index} of {feed.count}) '
        f'were fed different records: checksums {mine.tolist()}. The data pipeline must give '
        'replicas the same rows; this is a bug, please report it with the mesh and process count')
