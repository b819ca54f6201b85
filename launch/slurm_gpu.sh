#!/usr/bin/env bash
# Pretrain on a GPU cluster under SLURM: one process per GPU; JAX reads the
# SLURM environment in jax.distributed.initialize().
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm_gpu.sh WORKDIR [CONFIG] [flags...]
# Before training, two checks that stop the job on failure:
#   1. on this (the first) node, python -m lejepa_jax.plan compiles the run for the job's GPUs
#      (nodes x GPUs per node, compile-only: the GPUs stay idle) and stops the job if it would
#      not fit in the memory JAX preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION, set to 0.9 here
#      for plan and training alike). PLAN_CHIP=a100 / h200 for those GPUs. (SKIP_PLAN=1)
#   2. every task runs python -m lejepa_jax.selftest on the GPUs (a few minutes): SIGReg and
#      train steps across the mesh, each host's data rows, a checkpoint round trip to the
#      workdir, the preemption notice path. (SKIP_SELFTEST=1 skips it)
# DRY_RUN=1 prints the commands instead of running them.
#SBATCH --job-name=lejepa_jax
#SBATCH --time=72:00:00
set -euo pipefail
WORKDIR=${1:?workdir}; CONFIG=${2:-configs/vitg.py}; shift $(( $# < 2 ? $# : 2 ))
run() { if [ -n "${DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi; }
OVERRIDES=(); for a in "$@"; do [[ $a == --config.* ]] && OVERRIDES+=("$a"); done
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
NODES=${SLURM_JOB_NUM_NODES:-1}; GPUS_PER_NODE=$(( ${SLURM_NTASKS:?run under sbatch} / NODES ))
if [ -z "${SKIP_PLAN:-}" ]; then
  run python -m lejepa_jax.plan --config="$CONFIG" \
    --topology="${PLAN_CHIP:-h100}-${NODES}x${GPUS_PER_NODE}" --check ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
    || { echo "plan: $CONFIG will not run on $SLURM_NTASKS GPUs (reason above)"; exit 1; }
fi
if [ -z "${SKIP_SELFTEST:-}" ]; then
  run srun python -m lejepa_jax.selftest --config="$CONFIG" --workdir="$WORKDIR" --distributed=yes \
    ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
    || { echo "selftest: a check failed on the GPUs (its table above says what differs)"; exit 1; }
fi
run srun python -m lejepa_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=yes "$@"
