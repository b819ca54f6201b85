#!/usr/bin/env bash
# Pretrain on a Cloud TPU pod slice: the same command runs on every worker;
# jax.distributed.initialize() discovers the pod by itself.
#   launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/workdir [configs/vitg.py] [extra flags...]
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; WORKDIR=${3:?workdir (gs:// path)}
CONFIG=${4:-configs/vitg.py}; shift $(( $# < 4 ? $# : 4 ))
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd ~/lejepa_jax && pip install -q -e . 'jax[tpu]' &&
  python -m lejepa_jax.main --config=$CONFIG --workdir=$WORKDIR --distributed=yes $*"
