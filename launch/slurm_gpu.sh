#!/usr/bin/env bash
# Pretrain on a GPU cluster under SLURM: one process per GPU; JAX reads the
# SLURM environment in jax.distributed.initialize().
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm_gpu.sh WORKDIR [CONFIG] [flags...]
# First, on this (the first) node, python -m lejepa_jax.plan compiles the run for as many
# simulated CPU devices as the job has GPUs: no GPU compile is possible without the GPUs, so
# this checks that the mesh shards the model and batch (memory is the CPU compiler's estimate
# against an 80 GiB H100, PLAN_CHIP=a100 for A100s). The job stops if it does not fit.
# SKIP_PLAN=1 skips that check.
#SBATCH --job-name=lejepa_jax
#SBATCH --time=72:00:00
set -euo pipefail
WORKDIR=${1:?workdir}; CONFIG=${2:-configs/vitg.py}; shift $(( $# < 2 ? $# : 2 ))
OVERRIDES=(); for a in "$@"; do [[ $a == --config.* ]] && OVERRIDES+=("$a"); done
if [ -z "${SKIP_PLAN:-}" ]; then
  python -m lejepa_jax.plan --config="$CONFIG" --topology="${PLAN_CHIP:-h100}" \
    --devices="${SLURM_NTASKS:?run under sbatch}" --noexact_flops --check ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
    || { echo "plan: $CONFIG will not run on $SLURM_NTASKS GPUs (reason above)"; exit 1; }
fi
srun python -m lejepa_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=yes "$@"
