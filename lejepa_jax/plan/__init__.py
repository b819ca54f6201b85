"""Plan a run before renting the slice: compile it ahead of time for a TPU slice or GPU nodes.

    python -m lejepa_jax.plan --config=configs/vitg.py --topology=v5p-128 [--search]
    python -m lejepa_jax.plan --config=configs/vitg.py --topology=v5p:4x4x4
    python -m lejepa_jax.plan --config=configs/vitl14.py --topology=h100-8     # or h100-2x8
    python -m lejepa_jax.plan --config=configs/vitg.py:runlocal --topology=v5p --devices=8
    python -m lejepa_jax.plan ... --config.model.remat=full --config.batch_size=1024

`--topology` is a Cloud TPU accelerator type (v4-N and v5p-N count TensorCores, so
v5p-128 is 64 chips; v5litepod-N and v6e-N count chips) or a topology string
(v5p:4x4x4, v5e:16x16, v4:4x4x4, v6e:8x8). libtpu (`pip install -e '.[tpu]'`)
provides compile-only devices for it; no TPU is needed. GPU nodes: CHIP-N (one node of N
GPUs) or CHIP-MxN (M nodes), CHIP one of a100, h100, h200 (SXM parts): the CUDA plugin
(`pip install -e '.[gpu]'`) gives compile-only GPUs from a device description written from
NVIDIA's public specifications (topologies.GPU_SPECS); no GPU is needed. XLA's GPU compiler
never reports running out of memory, so `fits` compares plan's own total per GPU with the
memory JAX preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default; the JSON's
gpu_memory_fraction). GPU flops come from the CPU lowering (the GPU cost analysis has
none). `--devices=N` compiles for N
simulated CPU devices instead (where libtpu is absent, or for GPU jobs: then
--topology may name just the chip, e.g. v5p or h100, for its memory and peak);
CPU compiles check the sharding, their memory numbers are the CPU compiler's.

Nothing is allocated: `steps.build` gives the state as ShapeDtypeStructs with the
run's shardings and the run's jitted functions, which plan lowers and compiles
(`jit(...).lower(abstract args).compile()`): the train step on
`steps.abstract_batch`, `features` on `steps.abstract_images(eval.batch_size)`, and
the evaluators' programs (`linear_probe.programs`, `knn.programs`) on
`features.abstract_features` of the train and test splits. What plan compiles is
what `train.train_and_evaluate` executes.

Output: a table per compiled function (per chip: argument, temporary, output,
aliased and code bytes, flops), then, as the LAST line, one JSON object:

  topology, topology_desc  as given / the topology string compiled for ('v5p:4x4x4')
  chip, chips, simulated_devices  chip generation, number of chips (= devices; v4 and
                        v5p are compiled as megacore: one device per chip)
  hbm_bytes_per_chip    published HBM of the chip (or --hbm_gib)
  usable_bytes_per_chip HBM minus a 5% margin (XLA itself refuses above ~96%:
                        30.75 of 32 GiB on v4; the rest covers the input pipeline's
                        next batch in flight and fragmentation)
  mesh, batch_size, batch_per_chip  resolved mesh, global batch, images per
                        data-parallel shard (batch / (data x fsdp))
  remat                 config.model.remat (a key of models.vit.REMAT_POLICIES)
  params                encoder parameters (leaves of the abstract state's
                        params['encoder']); params_total adds projector and probe
  state_bytes_per_chip  params + optimizer state + batch stats + step/rng per chip,
                        from the shardings (what stays in HBM for the whole run)
  functions             per compiled function: argument, temporary, output, alias,
                        code bytes (XLA's memory_analysis, per chip), resident (the
                        state and extracted features that stay in HBM during
                        evaluation but are not that function's arguments), total =
                        argument + temporary + output - alias + code + resident, and
                        flops per chip (train_step, features: the exact count below / chips;
                        the evaluators: XLA's cost_analysis, loop bodies once)
  train_step_bytes_per_chip  the train step's total
  bytes_per_chip        max of total over the compiled functions (when the compiler says
                        RESOURCE_EXHAUSTED: the train step's arguments + the temporaries it
                        asked for, a lower bound)
  fits                  bytes_per_chip <= usable_bytes_per_chip and everything compiled;
                        reason says why not (state vs temporaries, the compiler's
                        message for RESOURCE_EXHAUSTED, the parameter a mesh axis does not
                        divide) and what to change
  flops_per_step        flops of one train step over all chips, from XLA's cost analysis of
                        the program plan compiles, counted before partitioning: XLA counts
                        a loop body once (the scanned blocks, and on TPU the windowed-einsum
                        loops the SPMD partitioner makes of FSDP matmuls), so plan lowers the
                        same config unrolled (model.scan=False) at depth 1 and 2 on one CPU
                        device and extrapolates linearly in depth:
                        F(L) = F(1) + (L - 1) * (F(2) - F(1)) (see `exact_flops`). Includes
                        the remat policy's recomputation, the projector, SIGReg and the
                        optimizer. (--noexact_flops: the compiled scanned program's raw count
                        times chips, which is too low.)
  model_flops_per_step  analytic: batch x (6 x params x tokens_per_image
                        + 12 x depth x width x sum over views of seq_len^2), with
                        seq_len = (crop / patch)^2 + 1 + registers per view (the
                        projector and probe heads are left out)
  tokens_per_image      sum of seq_len over the views (814 for ViT-g/14, 2x224 + 6x98)
  total_steps, train_size  lejepa_jax.config.total_steps(config, train_size); train_size from a
                        table of known datasets, the local source, or --train_size
  peak_flops_per_chip   published bf16 peak
  estimated_hours       {'at_peak', 'at_50pct'}: total_steps x flops_per_step /
                        (chips x peak) / 3600, and twice that; hours_from names the flops
                        used (flops_per_step, or model_flops_per_step when there is none)
  search                with --search: the cheapest change that fits, as
                        --config.KEY=VALUE flags, its train step's bytes per chip, flops
                        and hours, and every candidate tried (candidates compile the
                        train step only; run plan with the flags for the whole report)
  compile_seconds       wall time of all compiles

`--search` tries, in this order of preference: keeping the batch (its science), the
config's mesh, then fsdp x tensor splits of the chips (tensor ascending), and for each
the remat policy with the least recomputation that fits (none < dots < dots_no_batch <
full; memory is assumed to fall in that order, so policies known to be worse are not
compiled); then half the global batch (the config's lr kept, warmup kept in images).
Exit status: 0 when it compiled or did not fit (fits: false and reason); 1 on usage
errors and on compile errors other than running out of memory or an indivisible
sharding, printed as the compiler gives them; with --check, 2 when it does not fit.
"""
from lejepa_jax.plan.topologies import (CHIPS, GiB, KNOWN_SPLIT_SIZES, MARGIN, RECOMPUTE_ORDER,
                                        Chip, PlanError, Topology, default_shape, eval_sizes,
                                        gpu_devices, libtpu_env, parse_topology, split_size,
                                        tpu_devices)
from lejepa_jax.plan.assessment import (GPU_COMPILER_OPTIONS, Assessment, advice, assess, exact_flops, model_flops,
                                        per_chip_bytes, sharding_problems, with_overrides)
from lejepa_jax.plan.fit_search import search
from lejepa_jax.plan.report import compile_devices, define_flags, main, plan

__all__ = ['GPU_COMPILER_OPTIONS', 'CHIPS', 'GiB', 'KNOWN_SPLIT_SIZES', 'MARGIN', 'RECOMPUTE_ORDER', 'Chip', 'PlanError',
           'Topology', 'default_shape', 'eval_sizes', 'libtpu_env', 'parse_topology',
           'split_size', 'tpu_devices', 'Assessment', 'advice', 'assess', 'exact_flops',
           'model_flops', 'per_chip_bytes', 'sharding_problems', 'with_overrides', 'search',
           'compile_devices', 'define_flags', 'gpu_devices', 'main', 'plan']
