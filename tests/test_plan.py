"""lejepa_jax.plan: accelerator-type parsing, the report's closed forms, not fitting, search,
and a compile for a real TPU topology with libtpu's compile-only devices."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from configs import vitg
from lejepa_jax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30
KEYS = ('topology', 'chips', 'hbm_bytes_per_chip', 'params', 'bytes_per_chip', 'fits',
        'flops_per_step', 'model_flops_per_step', 'remat', 'estimated_hours')


def _env():
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)      # plan sets its own device count
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return env


def _plan(*args, timeout=300):
  """Runs the CLI; returns (exit status, parsed last stdout line or None, stdout, stderr)."""
  p = subprocess.run([sys.executable, '-m', 'lejepa_jax.plan', *args], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=timeout)
  lines = p.stdout.strip().splitlines()
  report = json.loads(lines[-1]) if lines and lines[-1].startswith('{') else None
  return p.returncode, report, p.stdout, p.stderr


def _vit_params(w, depth, mlp, patch, image, channels, registers=0):
  """Closed-form parameter count of models.vit.ViT without a linear head."""
  block = (2 * w +                      # norm1
           w * 3 * w + 3 * w +          # qkv kernel + bias
           w * w + w +                  # out projection
           2 * w +                      # norm2
           w * mlp + mlp + mlp * w + w)  # mlp
  return (patch * patch * channels * w + w +           # patch embedding
          (image // patch) ** 2 * w + w + registers * w +  # positions, CLS, registers
          depth * block + 2 * w)                        # blocks, final norm


# ----------------------------------------------------------------------------- (d) parsing
@pytest.mark.parametrize('spec, chip, chips, desc', [
    ('v5p-128', 'v5p', 64, 'v5p:4x4x4'),
    ('v4-128', 'v4', 64, 'v4:4x4x4'),
    ('v4-8', 'v4', 4, 'v4:2x2x1'),
    ('v4-32', 'v4', 16, 'v4:2x2x4'),
    ('v5p-256', 'v5p', 128, 'v5p:4x4x8'),
    ('v5litepod-256', 'v5e', 256, 'v5e:16x16'),
    ('v5litepod-8', 'v5e', 8, 'v5e:2x4'),
    ('v5litepod-1', 'v5e', 1, 'v5e:1x1'),
    ('v6e-64', 'v6e', 64, 'v6e:8x8'),
    ('v6e-128', 'v6e', 128, 'v6e:8x16'),
    ('v5p:4x4x4', 'v5p', 64, 'v5p:4x4x4'),
    ('v5e:16x16', 'v5e', 256, 'v5e:16x16'),
    ('v5litepod:4x4', 'v5e', 16, 'v5e:4x4'),
    ('v4:2x2x3', 'v4', 12, 'v4:2x2x3'),
])
def test_parse_topology(spec, chip, chips, desc):
  t = plan.parse_topology(spec)
  assert (t.chip.name, t.chips, t.desc) == (chip, chips, desc)
  assert math.prod(t.shape) == chips


def test_parse_topology_chip_table():
  assert plan.parse_topology('v4-128').chip.hbm_bytes == 32 * GiB
  assert plan.parse_topology('v5litepod-16').chip.peak_flops == 197e12
  assert plan.parse_topology('v5p-8').chip.hbm_bytes == 95 * GiB
  assert plan.parse_topology('v6e-8').chip.peak_flops == 918e12
  # with --devices, a chip name alone gives memory and peak; the chip count is the devices
  t = plan.parse_topology('v5p', devices=8)
  assert (t.chips, t.shape, t.chip.name) == (8, None, 'v5p')
  assert plan.parse_topology('v5p-16', devices=8).chips == 8


@pytest.mark.parametrize('spec, devices, words', [
    ('v9-8', None, 'accelerator type'),
    ('tpu-128', None, 'v5p-128'),
    ('v5p-7', None, 'TensorCores'),
    ('v5litepod-3', None, '4, 8, 16'),
    ('v5litepod-512', None, 'multislice'),
    ('v5p:4x4', None, '3 dimensions'),
    ('v5p', None, 'accelerator type'),        # a bare chip needs --devices
    ('v5p-128', 8, 'has 64 chips'),
])
def test_parse_topology_errors(spec, devices, words):
  with pytest.raises(plan.PlanError, match=words):
    plan.parse_topology(spec, devices)


def test_bad_topology_on_the_command_line_exits_1_with_the_reason():
  code, report, _, err = _plan('--config=configs/vitg.py:runlocal', '--topology=v5x-64', timeout=60)
  assert code == 1 and report is None
  assert 'v5x-64' in err and 'v5p-128' in err and 'Traceback' not in err


# ----------------------------------------------------------------------------- (b) the report
def test_report_on_simulated_devices_matches_closed_forms():
  code, r, out, err = _plan('--config=configs/vitg.py:runlocal', '--topology=v5p', '--devices=8')
  assert code == 0, err
  for key in KEYS:
    assert key in r, key
  c = vitg.get_config('runlocal')
  m, d = c.model, c.data
  assert (r['topology'], r['chips'], r['hbm_bytes_per_chip']) == ('v5p', 8, 95 * GiB)
  assert r['usable_bytes_per_chip'] == int(95 * GiB * (1 - plan.MARGIN))
  assert r['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert r['remat'] == m.remat and r['batch_per_chip'] == c.batch_size // 8
  params = _vit_params(m.width, m.depth, m.mlp_dim, m.patch_size, d.global_size, d.channels)
  head = m.embedding_dim * (m.width + 1)       # the linear head on the final CLS
  assert head > 0 and r['params'] == params + head
  # model flops: batch x (6 P T + 6 head views + 12 L w sum seq^2)
  seqs = ([(d.global_size // m.patch_size) ** 2 + 1] * d.num_global_views +
          [(d.local_size // m.patch_size) ** 2 + 1] * d.num_local_views)
  assert r['tokens_per_image'] == sum(seqs)
  expected = c.batch_size * (6 * params * sum(seqs) + 6 * head * len(seqs) +
                             12 * m.depth * m.width * sum(s * s for s in seqs))
  assert r['model_flops_per_step'] == pytest.approx(expected, rel=1e-12)
  # compiled flops include the backward pass, the projector, SIGReg and the full remat
  # recomputation: above the model count, within a small factor of it
  assert 1.0 < r['flops_per_step'] / r['model_flops_per_step'] < 3.0
  seconds = r['total_steps'] * r['flops_per_step'] / (8 * 459e12)
  assert r['total_steps'] == c.total_steps
  assert r['estimated_hours']['at_peak'] == pytest.approx(seconds / 3600, rel=1e-9)
  assert r['estimated_hours']['at_50pct'] == pytest.approx(2 * seconds / 3600, rel=1e-9)
  # memory: the train step's total is XLA's arguments + temporaries + outputs - aliased + code
  fns = r['functions']
  assert {'train_step', 'features', 'knn/chunk_correct'} <= set(fns)
  assert any(name.startswith('linear_probe/') for name in fns)
  ts = fns['train_step']
  assert ts['total'] == ts['argument'] + ts['temporary'] + ts['output'] - ts['alias'] + ts['code']
  assert ts['alias'] > 0                       # the state is donated
  assert r['train_step_bytes_per_chip'] == ts['total']
  assert r['bytes_per_chip'] == max(f['total'] for f in fns.values())
  assert r['fits'] is True and r['reason'] is None
  # the table is printed before the JSON line
  assert 'train_step' in out.splitlines()[-2] or 'FITS' in out


# ----------------------------------------------------------------------------- (c) not fitting
def test_tiny_memory_does_not_fit_and_says_why():
  code, r, _, err = _plan('--config=configs/vitg.py:runlocal', '--topology=v5e', '--devices=8',
                          '--hbm_gib=0.00015', '--noeval', '--noexact_flops', '--search', '--check')
  assert code == 2, err           # --check: "does not fit" as an exit status for launch scripts
  assert r['fits'] is False and r['hbm_bytes_per_chip'] == int(0.00015 * GiB)
  assert 'train_step needs' in r['reason'] and 'State (params + optimizer' in r['reason']
  assert r['bytes_per_chip'] > r['usable_bytes_per_chip']
  # the state alone is bigger than this memory: nothing that search may change helps
  assert r['state_bytes_per_chip'] > r['usable_bytes_per_chip']
  assert r['search']['flags'] is None and 'state alone' in r['search']['reason']


def test_indivisible_width_does_not_fit_and_search_finds_a_mesh():
  # width 60 on fsdp=8: the sharding cannot split the embed axis (as ViT-g's 1664 on 256 chips)
  code, r, _, err = _plan('--config=configs/vitg.py:runlocal', '--topology=v5p', '--devices=8',
                          '--config.model.width=60', '--config.model.remat=none', '--noeval',
                          '--noexact_flops', '--search')
  assert code == 0, err
  assert r['fits'] is False
  assert 'dimension 60' in r['reason'] and 'fsdp=8' in r['reason']
  assert 'Traceback' not in err
  s = r['search']
  assert s['fits'] is True and s['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 2}
  assert '--config.mesh.fsdp=4' in s['flags'] and '--config.mesh.tensor=2' in s['flags']
  assert s['remat'] == 'none' and len(s['tried']) == 1   # no recomputation needed: one compile
  assert s['tried'][0]['mesh'] == s['mesh'] and s['tried'][0]['fits']


def test_reason_weighs_state_against_activations():
  a = plan.Assessment(mesh={'data': 1, 'fsdp': 64, 'tensor': 1}, batch_size=2048,
                      batch_per_chip=32, remat='dots_no_batch', state_bytes=GiB // 2,
                      functions={'train_step': {'temporary': 44 * GiB, 'total': 45 * GiB}})
  text = plan.advice(a, usable=30 * GiB)
  assert '0.50 GiB per chip' in text and '44.00 GiB' in text and '32 images' in text
  assert 'activations dominate' in text and '--config.model.remat=full' in text
  text = plan.advice(a, usable=GiB // 4)
  assert 'state alone exceeds' in text and '>= 2x the chips' in text
  # the compiler's RESOURCE_EXHAUSTED message when nothing compiled
  a.functions = {}
  text = plan.advice(a, 30 * GiB, 'the total memory required for HLO temporaries (44.36G) exceeds')
  assert '44.36 GiB' in text


def test_search_picks_the_least_recomputation_that_fits():
  """Memory between what remat=none and remat=full need: search must step up from none."""
  config = vitg.get_config('runlocal')
  with config.unlocked():
    config.model.remat = 'none'
    config.batch_size = 64
  devices = jax.devices()
  big = 1 << 40
  none = plan.assess(config, devices, total_steps=20, usable=big, with_eval=False)
  full = plan.assess(plan.with_overrides(config, remat='full'), devices, total_steps=20,
                     usable=big, with_eval=False)
  assert full.train_bytes < none.train_bytes
  usable = (full.train_bytes + none.train_bytes) // 2
  base = dataclasses.replace(none, fits=False, kind='memory')   # what plan found at `usable`
  s = plan.search(config, devices, base, total_steps=20, usable=usable, log=lambda *a: None)
  assert s['fits'] and s['flags'][0].startswith('--config.model.remat=')
  assert s['remat'] in ('dots', 'dots_no_batch', 'full') and s['batch_size'] == 64
  order = plan.RECOMPUTE_ORDER
  tried = [t['remat'] for t in s['tried']]
  assert tried == list(order[1:order.index(s['remat']) + 1])  # stepped up one policy at a time
  assert all(not t['fits'] for t in s['tried'][:-1]) and s['tried'][-1]['fits']


# ----------------------------------------------------------------------------- (a) real TPU
_TPU_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import jax
    from configs import vitg
    from lejepa_jax import plan, sharding, steps
    topology = plan.parse_topology(sys.argv[1])
    plan.libtpu_env(topology)
    jax.config.update('jax_platforms', 'cpu')
    try:
      devices = plan.tpu_devices(topology)
    except plan.PlanError as e:
      print(json.dumps({'skip': str(e)[:300]})); sys.exit(0)
    config = vitg.get_config('runlocal')
    with config.unlocked():         # kernels split into whole (8, 128) TPU tiles: no padding
      config.model.width, config.model.num_heads, config.model.mlp_dim = 512, 4, 1024
    a = plan.assess(config, devices, total_steps=20, usable=1 << 40, sizes=(2000, 2000))
    p = a.programs
    compiled = a.compiled['train_step']
    state_in = compiled.input_shardings[0][0]
    # state_shardings is a prefix of the state (optax's MaskedNodes get a sharding too), so
    # compare leaf by leaf along the abstract state, whose leaves carry those shardings.
    want = jax.tree_util.tree_leaves_with_path(p.abstract_state)
    got = dict(jax.tree_util.tree_leaves_with_path(state_in))
    prefix = jax.tree.leaves(jax.tree.map(
        lambda s, x: s == x.sharding if isinstance(x, jax.ShapeDtypeStruct) else True,
        p.state_shardings, p.abstract_state))
    same = all(prefix) and len(want) == len(got) and all(
        x.sharding.is_equivalent_to(got[path], len(x.shape)) for path, x in want)
    enc = p.state_shardings.params['encoder']
    blocks = enc['blocks']
    print(json.dumps({
        'platform': devices[0].platform, 'kind': devices[0].device_kind,
        'same_shardings': same,
        'qkv': list(blocks['attn']['qkv_kernel'].spec),
        'mlp_in': list(blocks['mlp_in']['kernel'].spec),
        'mlp_out': list(blocks['mlp_out']['kernel'].spec),
        'mesh': a.mesh, 'functions': sorted(a.functions), 'fits': a.fits,
        'argument': a.functions['train_step']['argument'], 'state': a.state_bytes,
        'params_total': a.params_total, 'params': a.params,
        'batch': plan.per_chip_bytes(steps.abstract_batch(config, p.mesh)),
        'flops': a.functions['train_step']['flops']}))
''')


def test_compiles_for_a_tpu_topology_with_the_rules_sharding():
  p = subprocess.run([sys.executable, '-c', _TPU_SCRIPT, 'v5p:2x2x1'], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  if 'skip' in r:
    pytest.skip(f'libtpu cannot load here: {r["skip"]}')
  assert r['platform'] == 'tpu' and 'v5' in r['kind']
  assert r['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert r['fits'] is True
  assert {'train_step', 'features', 'knn/chunk_correct', 'linear_probe/train_final'} <= set(
      r['functions'])
  # parameters split as the logical-axis rules say: embed -> fsdp, mlp/heads -> tensor
  # (leading None: the scanned 'layers' axis; qkv is (embed, 3, heads, kv))
  assert r['qkv'] == [None, 'fsdp', None, 'tensor', None]
  assert r['mlp_in'] == [None, 'fsdp', 'tensor']
  assert r['mlp_out'] == [None, 'tensor', 'fsdp']
  # the compiled program takes the state exactly as Programs.state_shardings lays it out
  assert r['same_shardings']
  # per chip, the state is params + two Adam moments (float32) over 4 chips, plus the small
  # replicated leaves (probe head, biases without an embed axis) ...
  sharded = 3 * 4 * r['params_total'] / 4
  assert sharded <= r['state'] < 1.05 * sharded
  # ... and what the compiled train step takes per chip is that state and a quarter of the
  # batch (give or take TPU tile padding)
  assert r['state'] + r['batch'] <= r['argument'] < 1.05 * (r['state'] + r['batch'])
  assert r['flops'] > 0


@pytest.mark.parametrize('spec, chip, chips, desc', [
    ('h100-8', 'h100', 8, 'h100:1x8'), ('h100-2x8', 'h100', 16, 'h100:2x8'),
    ('a100-8', 'a100', 8, 'a100:1x8'), ('h200-4x8', 'h200', 32, 'h200:4x8')])
def test_parse_gpu_nodes(spec, chip, chips, desc):
  t = plan.parse_topology(spec)
  assert (t.chip.name, t.chips, t.desc, t.platform) == (chip, chips, desc, 'cuda')
  # memory as CUDA reports it: below the spec sheet's 80 / 141 GB in GiB terms, above 75 GiB
  assert 75 * GiB < plan.parse_topology('h100-8').chip.hbm_bytes < 80 * GiB
  assert 135 * GiB < plan.parse_topology('h200-8').chip.hbm_bytes < 141 * GiB


def test_gpu_target_config_is_the_proto_xla_reads():
  from lejepa_jax.plan import topologies
  text = topologies.gpu_target_config(topologies.GPU_SPECS['h100'])
  # the fields of the public H100 target config (jax-ml/jax issue 28376) with its values
  for line in ('core_count: 132', 'shared_memory_per_core: 233472', 'l2_cache_size: 52428800',
               'device_memory_size: 84929347584', 'shared_memory_per_block_optin: 232448',
               'cuda_compute_capability { major: 9 minor: 0 }', 'platform_name: "CUDA"'):
    assert line in text


_GPU_SCRIPT = textwrap.dedent('''
    import json, sys
    try:
      import jax_cuda12_plugin  # noqa: F401
    except ImportError:
      print(json.dumps({'skip': 'the CUDA plugin is not installed (pip install -e .[gpu])'}))
      sys.exit(0)
    from configs import fmnist
    from lejepa_jax import plan
    c = fmnist.get_config('runlocal')
    c.model.dtype = 'bfloat16'
    topology = plan.parse_topology('h100-2x2')
    devices = plan.compile_devices(topology, None)
    r = plan.plan(c, topology, devices, with_exact_flops=True, log=lambda *a: None)
    r['kinds'] = sorted({d.device_kind for d in devices})
    r['processes'] = sorted({d.process_index for d in devices})
    # SIGReg at a paper config's size (8 views x 256 rows x 1024 slices per GPU): as a column
    # reduction its 34 sums did not fit an H100 block's shared memory (ptxas refused it)
    import jax, jax.numpy as jnp
    from lejepa_jax import sigreg
    import numpy as np
    one = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices[:1]), ('d',)),
                                     jax.sharding.PartitionSpec())
    fn = jax.jit(jax.value_and_grad(lambda z: sigreg.sigreg(z, jax.random.PRNGKey(0))))
    fn.lower(jax.ShapeDtypeStruct((8, 256, 1024), jnp.float32, sharding=one)).compile(
        plan.GPU_COMPILER_OPTIONS)
    r['sigreg_compiled'] = True
    # ... and across 4 nodes x 8 GPUs as the train step runs it: left to XLA's partitioner,
    # the devices' 34 partial sums met in one all-gathered column reduction ptxas refused
    from lejepa_jax import sharding, stats
    gpus = plan.topologies.gpu_devices(plan.parse_topology('h100-4x8'))
    mesh = sharding.make_mesh({'data': -1}, devices=gpus)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
    on_mesh = jax.jit(jax.value_and_grad(lambda z: stats.regulariser_on_mesh(
        'epps_pulley', z, jax.random.PRNGKey(0), batch_axes=sharding.BATCH_AXES, mesh=mesh)))
    hlo = on_mesh.lower(jax.ShapeDtypeStruct((8, 256 * 32, 1024), jnp.float32, sharding=rows)
                        ).compile(plan.GPU_COMPILER_OPTIONS).as_text()
    r['sigreg_32_gpus'] = ('all-reduce' in hlo, 'all-gather' in hlo)
    print(json.dumps(r))
''')


def test_compiles_for_gpu_nodes_without_a_gpu():
  p = subprocess.run([sys.executable, '-c', _GPU_SCRIPT], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  if 'skip' in r:
    pytest.skip(r['skip'])
  assert r['platform'] == 'cuda' and r['chips'] == 4 and r['processes'] == [0, 1]
  assert r['hbm_bytes_per_chip'] == 84_929_347_584 and r['simulated_devices'] is False
  assert r['fits'] is True and r['functions']['train_step']['total'] > 0
  assert r['flops_per_step'] > 0          # from the CPU lowering: GPU cost analysis has none
  assert r['sigreg_compiled']
  assert r['sigreg_32_gpus'] == [True, False]


def test_flops_extrapolated_in_depth_equal_the_unrolled_program():
  """exact_flops at depth 4 (from depths 1 and 2) = the cost of the unrolled depth-4 program,
  while XLA's count of the scanned program sees one block only."""
  from lejepa_jax import sharding, steps
  config = plan.with_overrides(vitg.get_config('runlocal'), depth=4)
  exact = plan.exact_flops(config, total_steps=20, depth=4)
  unrolled = plan.with_overrides(config, scan=False, mesh={'data': 1, 'fsdp': 1, 'tensor': 1})
  with unrolled.unlocked():
    unrolled.model.cls_only_last = False   # every token in every block, as the scanned program
  mesh = sharding.make_mesh(unrolled.mesh, devices=jax.devices()[:1])
  p = steps.build(unrolled, mesh, 20)
  with sharding.activate(mesh):
    direct = p.train_step.lower(p.abstract_state, steps.abstract_batch(unrolled, mesh))
    direct = direct.cost_analysis()['flops']
  assert exact['train_step'] == pytest.approx(direct, rel=1e-4)  # depth 1 reuses its one CLS
  one = plan.exact_flops(plan.with_overrides(config, depth=1), total_steps=20, depth=1)
  scanned = plan.with_overrides(config, mesh={'data': 1, 'fsdp': 1, 'tensor': 1})
  p = steps.build(scanned, mesh, 20)
  with sharding.activate(mesh):
    raw = p.train_step.lower(p.abstract_state, steps.abstract_batch(scanned, mesh)).cost_analysis()
  assert raw['flops'] == pytest.approx(one['train_step'], rel=0.02)   # the body once
  assert raw['flops'] < 0.5 * exact['train_step']



def test_resnet50_at_batch_1024_fits_a_v5p_8_compiled_by_libtpu():
  """The paper's CNN at the batch of its ImageNet-100 run, compiled for a v5p-8 (4 chips) with
  libtpu's compile-only devices: it fits; parameters are torchvision's ResNet-50 without the
  classifier; the exact flop count (the CPU lowering) is within 10% of 3 x the analytic
  forward convolutions (measured 0.95: the backward pass skips the image's gradient; BatchNorm,
  projector, SIGReg and optimizer add little). The slowest compile of the suite (about 4
  minutes on a 2-core VM, whatever the batch: libtpu's convolutions)."""
  code, r, out, err = _plan('--config=configs/imagenette_resnet18.py', '--topology=v5p-8',
                            '--config.model.variant=resnet50', '--config.batch_size=1024',
                            '--noeval', timeout=1200)
  if code != 0 and 'libtpu' in err and r is None:
    pytest.skip(f'libtpu cannot load here: {err.strip().splitlines()[-1][:300]}')
  assert code == 0 and r is not None, err[-3000:]
  assert (r['topology'], r['chips'], r['fits'], r['platform']) == ('v5p-8', 4, True, 'tpu')
  assert r['params'] == 23_508_032
  assert r['batch_per_chip'] == 256 and r['tokens_per_image'] is None
  assert r['bytes_per_chip'] < r['usable_bytes_per_chip']
  assert 0.9 <= r['flops_per_step'] / r['model_flops_per_step'] <= 1.1
