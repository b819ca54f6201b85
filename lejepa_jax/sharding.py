"""Device mesh, logical-axis rules and batch sharding.

The mesh has three axes: 'data' (pure data parallel), 'fsdp' (data parallel
with parameters sharded along 'embed') and 'tensor' (Megatron-style model
parallel on 'mlp' and 'heads'). The batch is split over ('data', 'fsdp').
"""
from __future__ import annotations

import contextlib
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


def to_global_batch(local_batch, mesh):
  """Process-local numpy batch (leading dim = local batch) -> global jax.Arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
