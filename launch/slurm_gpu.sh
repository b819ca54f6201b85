#!/usr/bin/env bash
# Pretrain on a GPU cluster under SLURM; jax.distributed.initialize() reads the SLURM
# environment (coordinator = the first node, process count and index from the tasks).
# One process per GPU (PROCESSES=gpu, the default when the job has a task per GPU):
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 launch/slurm_gpu.sh WORKDIR [CONFIG] [flags...]
# One process per node driving all its GPUs (PROCESSES=node, the default with one task per node):
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=96 launch/slurm_gpu.sh WORKDIR [CONFIG] [flags...]
# Either way the data workers follow the cores each task has (SLURM_CPUS_PER_TASK).
# NCCL and XLA settings for clusters: docs/pod.md ("GPU clusters under SLURM").
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
NODES=${SLURM_JOB_NUM_NODES:-1}; TASKS=${SLURM_NTASKS:?run under sbatch}
PROCESSES=${PROCESSES:-$( [ "$TASKS" -eq "$NODES" ] && echo node || echo gpu )}
case "$PROCESSES" in
  gpu) GPUS_PER_NODE=$(( TASKS / NODES )); SRUN=(srun); PER_PROCESS=--gpus_per_process=one ;;
  node) GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
        SRUN=(srun --ntasks-per-node=1); PER_PROCESS=--gpus_per_process=all ;;
  *) echo "PROCESSES must be gpu (one process per GPU) or node (one per node), got $PROCESSES"; exit 2 ;;
esac
[ "${GPUS_PER_NODE:-0}" -gt 0 ] || { echo "no GPUs found on this node (SLURM_GPUS_ON_NODE unset)"; exit 2; }
if [ -z "${SKIP_PLAN:-}" ]; then
  run python -m lejepa_jax.plan --config="$CONFIG" \
    --topology="${PLAN_CHIP:-h100}-${NODES}x${GPUS_PER_NODE}" --check ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
    || { echo "plan: $CONFIG will not run on $(( NODES * GPUS_PER_NODE )) GPUs (reason above)"; exit 1; }
fi
if [ -z "${SKIP_SELFTEST:-}" ]; then
  run "${SRUN[@]}" python -m lejepa_jax.selftest --config="$CONFIG" --workdir="$WORKDIR" --distributed=yes \
    "$PER_PROCESS" \
    ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
    || { echo "selftest: a check failed on the GPUs (its table above says what differs)"; exit 1; }
fi
run "${SRUN[@]}" python -m lejepa_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=yes \
  "$PER_PROCESS" "$@"
