"""What would fit: remat policies, mesh splits and smaller batches, cheapest first."""
from __future__ import annotations

from lejepa_jax.plan.assessment import Assessment, assess, gib, mesh_candidates, with_overrides
from lejepa_jax.plan.topologies import RECOMPUTE_ORDER





def _flags(base, cand: dict) -> list[str]:
  """--config.KEY=VALUE flags that turn the base config into a candidate."""
  out = []
  if cand['remat'] != base.model.remat:
    out.append(f'--config.model.remat={cand["remat"]}')
  if cand['mesh'] != cand['base_mesh']:
    out += [f'--config.mesh.{k}={v}' for k, v in cand['mesh'].items()]
  if cand['batch_size'] != base.batch_size:
    ratio = cand['batch_size'] / base.batch_size   # lr as the config has it; warmup in images
    out += [f'--config.batch_size={cand["batch_size"]}',
            f'--config.optim.warmup_steps={round(base.optim.warmup_steps / ratio)}']
  return out


def search(config, devices, base: Assessment, *, total_steps: int, usable: int,
           log=print) -> dict:
  """The cheapest (batch, mesh, remat) whose train step fits; order in the module docstring.

  Candidates compile the train step only (the evaluation programs are far smaller).
  """
  tried, cache = [], {}
  chips = len(devices)
  base_mesh = dict(base.mesh)
  policies = [p for p in RECOMPUTE_ORDER if p in _remat_policies()]
  if not hasattr(base.encoder, 'num_heads'):      # a ResNet: no remat policies (yet)
    policies = ['none']
  if base.kind != 'sharding':
    cache[(config.batch_size, tuple(base_mesh.items()), base.remat)] = base
    if base.state_bytes > usable:
      return {'flags': None, 'fits': False, 'tried': tried,
              'reason': f'the state alone ({gib(base.state_bytes)} per chip) exceeds the usable '
                        f'{gib(usable)}: no remat, split or batch changes that; use more chips'}

  def attempt(batch, mesh, remat) -> Assessment:
    key = (batch, tuple(mesh.items()), remat)
    if key not in cache:
      log(f'search: batch {batch}, mesh {mesh}, remat {remat}')
      a = assess(with_overrides(config, remat=remat, mesh=mesh, batch_size=batch), devices,
                 total_steps=total_steps, usable=usable, with_eval=False, log=log)
      cache[key] = a
      tried.append({'batch_size': batch, 'mesh': mesh, 'remat': remat, 'fits': a.fits,
                    'train_step_bytes_per_chip': a.train_bytes or a.oom_bytes,
                    **({'reason': a.reason} if a.reason else {})})
    return cache[key]

  def cheapest(batch, mesh, first: bool) -> str | None:
    """Least-recompute policy that fits at (batch, mesh), memory falling along `policies`."""
    start = policies.index(base.remat) if base.remat in policies else len(policies) - 1
    if not first and not attempt(batch, mesh, policies[-1]).fits:
      return None              # another mesh: worth a scan only if the leanest policy fits
    if attempt(batch, mesh, policies[start]).fits:
      best = policies[start]   # walk down to less recomputation while it still fits
      for p in reversed(policies[:start]):
        if not attempt(batch, mesh, p).fits:
          break
        best = p
      return best
    return next((p for p in policies[start + 1:] if attempt(batch, mesh, p).fits), None)

  batch = config.batch_size
  while batch >= 1:
    meshes = [m for m in mesh_candidates(config, base.encoder, chips, batch) if m != base_mesh]
    if base.kind != 'sharding' and batch % (base_mesh['data'] * base_mesh['fsdp']) == 0:
      meshes.insert(0, base_mesh)
    for i, mesh in enumerate(meshes):
      remat = cheapest(batch, mesh, first=i == 0)
      if remat is not None:
        a = cache[(batch, tuple(mesh.items()), remat)]
        cand = {'remat': remat, 'mesh': mesh, 'base_mesh': base_mesh, 'batch_size': batch}
        return {'flags': _flags(config, cand), 'batch_size': batch, 'mesh': mesh, 'remat': remat,
                'batch_per_chip': a.batch_per_chip, 'train_step_bytes_per_chip': a.train_bytes,
                'fits': True, 'tried': tried}
    if batch % 2:
      break
    batch //= 2
  return {'flags': None, 'fits': False, 'tried': tried,
          'reason': 'no remat policy, fsdp x tensor split or smaller batch that was tried fits'}


def _remat_policies():
  from lejepa_jax.models import vit
  return vit.REMAT_POLICIES


# ----------------------------------------------------------------------------- report
