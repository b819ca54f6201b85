#!/usr/bin/env bash
# Pretrain on a Cloud TPU pod slice: the same command runs on every worker;
# jax.distributed.initialize() discovers the pod by itself.
#   launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/workdir [configs/vitg.py] [extra flags...]
# First, worker 0 compiles the run for the slice's accelerator type (python -m lejepa_jax.plan,
# compile-only, the TPU stays idle) and the job stops there, with plan's reason, if it would
# not fit in HBM. SKIP_PLAN=1 skips that check.
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; WORKDIR=${3:?workdir (gs:// path)}
CONFIG=${4:-configs/vitg.py}; shift $(( $# < 4 ? $# : 4 ))
tpu() { gcloud compute tpus tpu-vm "$@" "$TPU_NAME" --zone "$ZONE"; }
ACCEL=$(tpu describe --format='value(acceleratorType)')     # e.g. v5p-128
OVERRIDES=(); for a in "$@"; do [[ $a == --config.* ]] && OVERRIDES+=("$a"); done
tpu ssh --worker=all --command "cd ~/lejepa_jax && pip install -q -e '.[tpu]'"
if [ -z "${SKIP_PLAN:-}" ]; then
  # --check: exit status 2 when it does not fit; the JSON line's reason says why.
  tpu ssh --worker=0 --command "cd ~/lejepa_jax && python -m lejepa_jax.plan --config=$CONFIG \
    --topology=$ACCEL --check ${OVERRIDES[*]:-}" || { echo "plan: $CONFIG will not run on $ACCEL" \
    "(see its reason above; python -m lejepa_jax.plan ... --search suggests a change)"; exit 1; }
fi
tpu ssh --worker=all --command "
  cd ~/lejepa_jax && python -m lejepa_jax.main --config=$CONFIG --workdir=$WORKDIR --distributed=yes $*"
