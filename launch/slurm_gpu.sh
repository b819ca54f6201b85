#!/usr/bin/env bash
# Pretrain on a GPU cluster under SLURM: one process per GPU; JAX reads the
# SLURM environment in jax.distributed.initialize().
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm_gpu.sh WORKDIR [CONFIG] [flags...]
#SBATCH --job-name=lejepa_jax
#SBATCH --time=72:00:00
set -euo pipefail
WORKDIR=${1:?workdir}; CONFIG=${2:-configs/vitg.py}; shift $(( $# < 2 ? $# : 2 ))
srun python -m lejepa_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=yes "$@"
