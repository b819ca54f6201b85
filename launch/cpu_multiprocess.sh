#!/usr/bin/env bash
# Several JAX processes on one machine talking through gloo CPU collectives:
# the multi-host code path (per-process data shards, global arrays, Orbax) on a laptop.
#   launch/cpu_multiprocess.sh NUM_PROCESSES WORKDIR [CONFIG] [flags...]
set -euo pipefail
N=${1:?number of processes}; WORKDIR=${2:?workdir}; CONFIG=${3:-configs/fmnist.py:runlocal}
shift $(( $# < 3 ? $# : 3 ))
PORT=${PORT:-$(python -c 'import portpicker; print(portpicker.pick_unused_port())')}
pids=()
for ((i = 0; i < N; i++)); do
  python -m lejepa_jax.main --config="$CONFIG" --workdir="$WORKDIR" --cpu_devices=2 \
    --coordinator_address="localhost:$PORT" --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
