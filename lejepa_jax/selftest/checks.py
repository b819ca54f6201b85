"""The self-test's checks: each runs on the devices at hand and returns one `Row`.

Every check takes `broken=True` to feed it a deliberately wrong input (the bug the check
exists for) so that a test can see the row fail and read what differs.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
import zlib

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lejepa_jax import checkpoint as ckpt_lib
from lejepa_jax import preemption
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import stats
from lejepa_jax import steps
from lejepa_jax.data import pipeline

# Tolerances (relative) of the comparisons between meshes. SIGReg computes in float32 whatever
# the embeddings' dtype, so its tolerance is one; a train step in bfloat16 rounds activations.
SIGREG_RTOL = 1e-4            # value; gradient: this x 10, relative to the largest entry
REPLAY_RTOL = {'float32': 1e-4, 'bfloat16': 2e-2}
METRICS = ('loss', 'inv', 'sigreg', 'probe_loss', 'grad_norm')


@dataclasses.dataclass
class Row:
  check: str
  ok: bool | None           # None: skipped (the reason is in `detail`)
  detail: str
  figures: dict = dataclasses.field(default_factory=dict)

  @property
  def status(self) -> str:
    return {True: 'pass', False: 'FAIL', None: 'skip'}[self.ok]


def _all_hosts(ok: bool) -> bool:
  """True when `ok` holds on every process."""
  if jax.process_count() == 1:
    return bool(ok)
  return bool(np.all(multihost_utils.process_allgather(np.int32(bool(ok)))))


def _global(host_array: np.ndarray, sharding) -> jax.Array:
  """A global array from the same host array on every process (each puts its own shards)."""
  return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])


def _host(x) -> np.ndarray:
  """The whole of a (possibly multi-host) array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ---------------------------------------------------------------- SIGReg across devices
def sigreg_across_devices(config, mesh, *, rows_per_device: int = 16, broken: bool = False) -> Row:
  """SIGReg (the config's statistic and options) of embeddings sharded over the mesh's batch
  axes, value and gradient, equals the same computation on one device of the gathered batch.
  broken: each device tests only its own rows (no cross-device mean: the classic bug)."""
  options = steps.regulariser_options(config.sigreg)
  statistic = options.pop('statistic')
  dp = sharding_lib.data_parallel_size(mesh)
  views, n, dim = 2, rows_per_device * dp, int(config.model.projector_out)
  dtype = jnp.dtype(config.model.dtype)
  z_host = np.random.default_rng(config.seed).standard_normal((views, n, dim)).astype(dtype)
  key = jax.random.PRNGKey(config.seed)

  def penalty(z):
    return stats.regulariser(statistic, z, key, **options)

  batch_axes = sharding_lib.batch_sharding(mesh).spec[0]
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, batch_axes))
  z = _global(z_host, sharded)
  if broken:
    def local_only(zs):
      return penalty(zs)[None]
    per_shard = jax.shard_map(local_only, mesh=mesh, in_specs=sharded.spec,
                              out_specs=jax.sharding.PartitionSpec(batch_axes))
    fn = jax.jit(jax.value_and_grad(lambda z: jnp.mean(per_shard(z))))
  else:   # as the train step computes it (losses.lejepa_loss with batch_axes)
    fn = jax.jit(jax.value_and_grad(lambda z: stats.regulariser_on_mesh(
        statistic, z, key, batch_axes=batch_axes, mesh=mesh, **options)))
  value, grad = fn(z)
  one = jax.local_devices()[0]
  ref_value, ref_grad = jax.jit(jax.value_and_grad(penalty))(jax.device_put(z_host, one))
  value_rel = _rel(_host(value), _host(ref_value))
  grad_rel = _rel(_host(grad), _host(ref_grad))
  ok = _all_hosts(value_rel <= SIGREG_RTOL and grad_rel <= 10 * SIGREG_RTOL)
  detail = (f'{statistic} of {views} x {n} x {dim} {dtype.name} rows over {dp} devices vs one '
            f'device: value rel {value_rel:.1e}, gradient rel {grad_rel:.1e} (tolerance '
            f'{SIGREG_RTOL:g} / {10 * SIGREG_RTOL:g})')
  if not ok:
    detail += (f'; sharded {float(_host(value)):.6g} vs single-device '
               f'{float(_host(ref_value)):.6g}')
  return Row('sigreg_sharded_equals_single_device', ok, detail,
             {'value_rel': value_rel, 'grad_rel': grad_rel, 'devices': dp})


# ---------------------------------------------------------------- replay on a smaller mesh
def _reduced(config, depth: int):
  """The config at `depth` blocks (same width, heads, dtype, remat, mesh): it fits a smaller
  mesh, and the sharded code paths are the same."""
  c = ml_collections.ConfigDict(config.to_dict())
  from lejepa_jax.models import resnet, vit
  if resnet.is_resnet(c.model.variant):
    return c               # a ResNet's depth is its variant
  full_depth = c.model.depth or vit.VARIANTS[c.model.variant][1]
  c.model.depth = min(depth, full_depth)
  return c


def smaller_mesh(mesh) -> tuple[jax.sharding.Mesh | None, str]:
  """(mesh, description) to replay on: this host's devices when the mesh spans hosts, else
  one device; None when the mesh has a single device already."""
  if jax.process_count() > 1:
    return sharding_lib.make_mesh({'data': -1}, devices=jax.local_devices()), (
        f'{jax.local_device_count()} local devices of each host')
  if mesh.devices.size == 1:
    return None, 'one device only'
  return sharding_lib.make_mesh({'data': 1}, devices=jax.local_devices()[:1]), 'one device'


def _synthetic_batch(config, batch_size: int, seed: int) -> dict:
  d = config.data
  rng = np.random.default_rng(seed)
  return {
      'global': rng.standard_normal((batch_size, d.num_global_views, d.global_size,
                                     d.global_size, d.channels)).astype(np.float32),
      'local': rng.standard_normal((batch_size, d.num_local_views, d.local_size, d.local_size,
                                    d.channels)).astype(np.float32),
      'label': rng.integers(0, d.num_classes, batch_size).astype(np.int32)}


def _replay(config, mesh, batches: list[dict]) -> tuple[list[dict], dict]:
  """Per-step metrics, and the norms of the encoder's and the projector's parameters after
  training on `batches` from init. (Not leaf by leaf: a parameter that starts at zero with
  a near-zero gradient, a final LayerNorm bias, is moved by Adam by +-lr whatever the sign of
  its gradient's rounding noise, so such leaves differ between any two reduction orders.)"""
  programs = steps.build(config, mesh, total_steps=100)
  sharding = sharding_lib.batch_sharding(mesh)
  with sharding_lib.activate(mesh):
    state = programs.init(jnp.int32(config.seed))
    history = []
    for batch in batches:
      state, metrics = programs.train_step(state, {k: _global(v, sharding)
                                                   for k, v in batch.items()})
      history.append({k: float(_host(metrics[f'train/{k}'])) for k in METRICS})
    norms = jax.jit(lambda p: {k: optax.tree.norm(p[k]) for k in ('encoder', 'projector')})(
        state.params)
  return history, {k: float(_host(v)) for k, v in norms.items()}


def replay_on_smaller_mesh(config, mesh, *, num_steps: int = 3, depth: int = 2,
                           broken: bool = False) -> Row:
  """A few train steps of the config (at `depth` blocks) on the full mesh equal the same
  steps replayed on a smaller mesh of the same hardware. broken: the replay's second batch
  is another one (a host fed the wrong rows)."""
  small, where = smaller_mesh(mesh)
  if small is None:
    return Row('train_steps_equal_on_a_smaller_mesh', None, f'skipped: {where}')
  c = _reduced(config, depth)
  dp = sharding_lib.data_parallel_size(mesh)
  batch_size = int(np.lcm(dp, sharding_lib.data_parallel_size(small))) * 2
  batches = [_synthetic_batch(c, batch_size, c.seed + i) for i in range(num_steps)]
  full_history, full_norms = _replay(c, mesh, batches)
  if broken:
    batches = batches[:1] + [_synthetic_batch(c, batch_size, c.seed + 1000)] + batches[2:]
  small_history, small_norms = _replay(c, small, batches)
  rtol = REPLAY_RTOL[jnp.dtype(c.model.dtype).name]
  worst = (0.0, '')
  for step, (a, b) in enumerate(zip(full_history, small_history), 1):
    for key in METRICS:
      r = _rel(a[key], b[key])
      if r > worst[0]:
        worst = (r, f'step {step} {key} {a[key]:.6g} vs {b[key]:.6g}')
  for name, value in full_norms.items():
    r = _rel(value, small_norms[name])
    if r > worst[0]:
      worst = (r, f'|{name} parameters| after {num_steps} steps {value:.6g} vs '
                  f'{small_norms[name]:.6g}')
  ok = _all_hosts(worst[0] <= rtol)
  detail = (f'{num_steps} steps of the config at depth {c.model.depth}, batch {batch_size}, '
            f'{dict(mesh.shape)} vs {where}: largest relative difference {worst[0]:.1e} '
            f'(tolerance {rtol:g})' + (f', {worst[1]}' if worst[1] else ''))
  return Row('train_steps_equal_on_a_smaller_mesh', ok, detail,
             {'max_rel': worst[0], 'steps': num_steps})


# ---------------------------------------------------------------- the data feed
def _fingerprints(batch: dict) -> list[int]:
  n = len(batch['global'])
  return [zlib.crc32(np.ascontiguousarray(batch['global'][i]).tobytes() +
                     np.ascontiguousarray(batch['local'][i]).tobytes()) for i in range(n)]


def host_rows(config, source, *, rows_per_host: int = 2, num_batches: int = 2,
              broken: bool = False) -> Row:
  """Every host's batch rows are the global positions the pipeline promises (its block of
  each global batch, the same views as a single reader of the whole batch draws), and no two
  hosts' rows are the same. One process checks as if it were 2 hosts. broken: every host
  reads block 0."""
  feed = sharding_lib.batch_feed(sharding_lib.make_mesh(config.mesh))
  simulated = jax.process_count() == 1
  hosts = 2 if simulated else feed.count
  mine = list(range(hosts)) if simulated else [feed.index]
  kwargs = dict(seed=config.seed)
  whole = pipeline.train_dataset(source, config.data, local_batch_size=hosts * rows_per_host,
                                 **kwargs)
  expected = [b for b, _ in zip(iter(whole), range(num_batches))]
  problems, prints = [], []
  for p in mine:
    it = iter(pipeline.train_dataset(source, config.data, local_batch_size=rows_per_host,
                                     process_index=0 if broken else p, process_count=hosts,
                                     **kwargs))
    for b in range(num_batches):
      got = next(it)
      want = {k: v[p * rows_per_host:(p + 1) * rows_per_host] for k, v in expected[b].items()}
      if not all(np.array_equal(got[k], want[k]) for k in ('global', 'local', 'label')):
        problems.append(f'host {p} batch {b}: rows differ from global positions '
                        f'{b * hosts * rows_per_host + p * rows_per_host}..'
                        f'{b * hosts * rows_per_host + (p + 1) * rows_per_host - 1}')
      prints += _fingerprints(got)
  all_prints = (np.asarray(multihost_utils.process_allgather(np.asarray(prints, np.int64)))
                .ravel().tolist() if jax.process_count() > 1 else prints)
  repeated = len(all_prints) - len(set(all_prints))
  if repeated:
    problems.append(f'{repeated} of {len(all_prints)} rows drawn by more than one host')
  ok = _all_hosts(not problems)
  detail = (f'{hosts} hosts{" (simulated)" if simulated else ""} x '
            f'{rows_per_host} rows x {num_batches} batches against one reader of the whole '
            f'batch: ' + ('; '.join(problems[:3]) if problems else 'every row where promised, '
                          'no row drawn twice'))
  return Row('host_rows_are_the_promised_global_positions', ok, detail,
             {'hosts': hosts, 'rows_checked': len(all_prints)})


def feed_rate(config, source, step_images_per_s: float, *, num_batches: int = 4,
              broken: bool = False) -> Row:
  """The host pipeline's images/s cover the train step's images/s per host (both measured
  here). broken: the pipeline is measured as if it were 1000x slower."""
  feed = sharding_lib.batch_feed(sharding_lib.make_mesh(config.mesh))
  local = config.batch_size // feed.count
  it = iter(pipeline.train_dataset(source, config.data, seed=config.seed, local_batch_size=local,
                                   process_index=feed.index, process_count=feed.count))
  next(it)                         # threads started, first batch (not timed)
  t = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  seconds = (time.perf_counter() - t) * (1000 if broken else 1)
  images_per_s = num_batches * local / seconds
  ok = _all_hosts(images_per_s >= step_images_per_s)
  detail = (f'host pipeline {images_per_s:.1f} images/s vs train step {step_images_per_s:.1f} '
            f'images/s per host ({local} images per host per step)')
  if not ok:
    detail += ': the step would wait for data; raise data.num_workers / num_threads'
  return Row('host_feed_covers_the_step', ok, detail,
             {'feed_images_per_s': images_per_s, 'step_images_per_s': step_images_per_s})


# ---------------------------------------------------------------- checkpoint round trip
def checkpoint_round_trip(programs, state, workdir, *, broken: bool = False) -> Row:
  """The real state writes to WORKDIR/selftest/checkpoints (local or gs://), restores on every
  host bitwise, and is removed. broken: the restored state is changed before the comparison."""
  where = epath.Path(workdir) / 'selftest'
  mngr = ckpt_lib.manager(where, max_to_keep=1)
  t = time.perf_counter()
  step = int(_host(state.step))
  ckpt_lib.save(mngr, step, state, {'next_batch': 0, 'global_batch_size': 0})
  mngr.wait_until_finished()
  mngr.close()
  written = time.perf_counter() - t
  restored, _ = ckpt_lib.restore_state(where, programs.abstract_state, step)
  if broken:
    restored = restored.replace(step=restored.step + 1)
  different = []
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                          jax.tree.leaves(restored)):
    if not all(np.array_equal(np.asarray(x.data), np.asarray(y.data))
               for x, y in zip(a.addressable_shards, b.addressable_shards)):
      different.append(jax.tree_util.keystr(path))
  ok = _all_hosts(not different)
  multihost_utils.sync_global_devices('selftest checkpoint compared')
  if jax.process_index() == 0:
    where.rmtree(missing_ok=True)
  multihost_utils.sync_global_devices('selftest checkpoint removed')
  leaves = len(jax.tree.leaves(state))
  detail = (f'{leaves} arrays to {ckpt_lib.directory(where)} in {written:.1f} s, restored on '
            f'{jax.process_count()} host(s): ' + (
                'bitwise equal' if not different else f'{len(different)} differ: '
                + ', '.join(different[:3])) + '; removed')
  return Row('checkpoint_restores_bitwise', ok, detail, {'write_s': written, 'arrays': leaves})


# ---------------------------------------------------------------- preemption notice
def preemption_notice(*, max_polls: int = 20, broken: bool = False) -> Row:
  """A notice on process 0 (SIGTERM to itself, what a preemption sends) reaches every host
  at the same poll of the training loop's watcher. broken: no notice is sent."""
  seen = 0
  with preemption.Watcher() as watcher:
    if watcher.source is None:
      return Row('preemption_notice_reaches_every_host', None,
                 'skipped: no notice source here (not the main thread)')
    if jax.process_index() == 0 and not broken:
      os.kill(os.getpid(), signal.SIGTERM)
    for poll in range(1, max_polls + 1):
      if watcher.poll():
        seen = poll
        break
      time.sleep(0.05)
  polls = (np.asarray(multihost_utils.process_allgather(np.int32(seen))).ravel().tolist()
           if jax.process_count() > 1 else [seen])
  ok = all(p > 0 for p in polls) and len(set(polls)) == 1
  detail = (f'{watcher.source} on process 0: ' + (
      f'seen by all {len(polls)} host(s) at poll {polls[0]}' if ok else
      f'poll at which each host saw it (0: never in {max_polls}): {polls}'))
  return Row('preemption_notice_reaches_every_host', ok, detail, {'polls': polls})
