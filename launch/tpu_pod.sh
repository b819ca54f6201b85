#!/usr/bin/env bash
# Pretrain on a Cloud TPU pod slice: the same command runs on every worker;
# jax.distributed.initialize() discovers the pod by itself.
#   launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/workdir [configs/vitg.py] [extra flags...]
# Before training, two checks that stop the job on failure:
#   1. worker 0 compiles the run for the slice's accelerator type (python -m lejepa_jax.plan,
#      compile-only, the TPU stays idle): does it fit in HBM? (SKIP_PLAN=1 skips it)
#   2. every worker runs python -m lejepa_jax.selftest on the slice (a few minutes): SIGReg and
#      train steps across the mesh, each host's data rows, a checkpoint round trip to the
#      workdir, the preemption notice path. (SKIP_SELFTEST=1 skips it)
# DRY_RUN=1 prints the commands instead of running them (ACCEL=v5p-128 by default then).
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; WORKDIR=${3:?workdir (gs:// path)}
CONFIG=${4:-configs/vitg.py}; shift $(( $# < 4 ? $# : 4 ))
run() { if [ -n "${DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi; }
tpu() { run gcloud compute tpus tpu-vm "$@" "$TPU_NAME" --zone "$ZONE"; }
if [ -n "${DRY_RUN:-}" ]; then
  ACCEL=${ACCEL:-v5p-128}
else
  ACCEL=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" \
    --format='value(acceleratorType)')     # e.g. v5p-128
fi
OVERRIDES=(); for a in "$@"; do [[ $a == --config.* ]] && OVERRIDES+=("$a"); done
tpu ssh --worker=all --command "cd ~/lejepa_jax && pip install -q -e '.[tpu]'"
if [ -z "${SKIP_PLAN:-}" ]; then
  # --check: exit status 2 when it does not fit; the JSON line's reason says why.
  tpu ssh --worker=0 --command "cd ~/lejepa_jax && python -m lejepa_jax.plan --config=$CONFIG \
    --topology=$ACCEL --check ${OVERRIDES[*]:-}" || { echo "plan: $CONFIG will not run on $ACCEL" \
    "(see its reason above; python -m lejepa_jax.plan ... --search suggests a change)"; exit 1; }
fi
if [ -z "${SKIP_SELFTEST:-}" ]; then
  tpu ssh --worker=all --command "cd ~/lejepa_jax && python -m lejepa_jax.selftest \
    --config=$CONFIG --workdir=$WORKDIR --distributed=yes ${OVERRIDES[*]:-}" \
    || { echo "selftest: a check failed on $ACCEL (its table above says what differs)"; exit 1; }
fi
tpu ssh --worker=all --command "
  cd ~/lejepa_jax && python -m lejepa_jax.main --config=$CONFIG --workdir=$WORKDIR --distributed=yes $*"
