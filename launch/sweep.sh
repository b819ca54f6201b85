#!/usr/bin/env bash
# A small lambda x learning-rate sweep of the CPU default, then label-free model selection
# (python -m lejepa_jax.select): does the final training loss (/ lamb^alpha) rank the runs
# the way the linear probe does?
#
#   bash launch/sweep.sh [OUTDIR] [STEPS] [--config.KEY=VALUE ...]
#   bash launch/sweep.sh /tmp/lejepa_sweep 300   # 8 runs, ~2.5-3 min each: 20-25 min on 2 idle cores
#
# OUTDIR (default /tmp/lejepa_sweep) gets one workdir per run, OUTDIR/lamb${L}_lr${LR}, and
# its log, OUTDIR/lamb${L}_lr${LR}.log. STEPS (default 300) training steps per run; warmup
# is STEPS/10 and the loss is logged about 12 times per run (select averages the last 3).
# Extra arguments are passed to every training run.
# Rerunning the same command skips finished runs (metrics.jsonl has the probe accuracy)
# and resumes interrupted ones from their last checkpoint; a finished run is not redone with
# a new STEPS: use a new OUTDIR for that.
#
# Environment (defaults in brackets):
#   CONFIG         config file [configs/fmnist.py]; configs/fmnist.py:runlocal for a smoke test
#   LAMBS, LRS     the grid ["0.02 0.05 0.1 0.2"] x ["1e-3 2e-3"]
#   EVAL_EXAMPLES  eval.max_examples: images of each split for the frozen evaluation [10000]
#                  (Fashion-MNIST's test split is 10000: all of it; 0: the full 60k + 10k)
#   PROBE_EPOCHS   epochs of the linear probe (evals.linear_probe.epochs) [10]
#   SELECT_FLAGS   flags for lejepa_jax.select, e.g. "--pick_alpha=best --last_n=2" []
set -euo pipefail

OUTDIR=${1:-/tmp/lejepa_sweep}
STEPS=${2:-300}
shift $(( $# < 2 ? $# : 2 ))
CONFIG=${CONFIG:-configs/fmnist.py}
LAMBS=${LAMBS:-"0.02 0.05 0.1 0.2"}
LRS=${LRS:-"1e-3 2e-3"}
EVAL_EXAMPLES=${EVAL_EXAMPLES:-10000}
PROBE_EPOCHS=${PROBE_EPOCHS:-10}
SELECT_FLAGS=${SELECT_FLAGS:-}

if ! [[ $STEPS =~ ^[0-9]+$ ]] || (( STEPS < 2 )); then
  echo "sweep.sh: STEPS must be an integer >= 2, got '$STEPS'" >&2; exit 2
fi
WARMUP=$(( STEPS / 10 )); (( WARMUP >= 1 )) || WARMUP=1
LOG_EVERY=$(( STEPS / 12 )); (( LOG_EVERY >= 1 )) || LOG_EVERY=1
CKPT_EVERY=$(( STEPS / 3 )); (( CKPT_EVERY >= 1 )) || CKPT_EVERY=1
METRIC=eval/linear_probe_top1

PROBE_FLAG="--config.evals.linear_probe.epochs=$PROBE_EPOCHS"

read -r -a lambs <<< "$LAMBS"
read -r -a lrs <<< "$LRS"
total=$(( ${#lambs[@]} * ${#lrs[@]} ))
mkdir -p "$OUTDIR"
echo "[sweep] $total runs of $CONFIG, $STEPS steps each (warmup $WARMUP), eval on" \
     "$EVAL_EXAMPLES examples per split (0: all), probe $PROBE_EPOCHS epochs -> $OUTDIR"

i=0; failed=(); start=$SECONDS
for L in "${lambs[@]}"; do
  for LR in "${lrs[@]}"; do
    i=$(( i + 1 ))
    name="lamb${L}_lr${LR}"; dir="$OUTDIR/$name"
    if [[ -f "$dir/metrics.jsonl" ]] && grep -q "\"$METRIC\"" "$dir/metrics.jsonl"; then
      echo "[sweep $i/$total] $name: finished, skipped"
      continue
    fi
    echo "[sweep $i/$total] $name: training (log: $dir.log) ..."
    t0=$SECONDS
    if python -m lejepa_jax.main --config="$CONFIG" --workdir="$dir" \
        --config.lamb="$L" --config.optim.lr="$LR" --config.total_steps="$STEPS" \
        --config.optim.warmup_steps="$WARMUP" --config.log_every="$LOG_EVERY" \
        --config.checkpoint_every="$CKPT_EVERY" --config.eval.max_examples="$EVAL_EXAMPLES" \
        ${PROBE_FLAG:+"$PROBE_FLAG"} "$@" > "$dir.log" 2>&1; then
      echo "[sweep $i/$total] $name: done in $(( SECONDS - t0 ))s; $(grep 'final frozen' "$dir.log" | sed 's/.*test: //')"
    else
      echo "[sweep $i/$total] $name: FAILED after $(( SECONDS - t0 ))s (last lines of $dir.log:)"
      tail -n 5 "$dir.log" | sed 's/^/    /'
      failed+=("$name")
    fi
  done
done
echo "[sweep] training done in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s;" \
     "${#failed[@]} failed${failed:+: ${failed[*]}}"

# shellcheck disable=SC2086  # SELECT_FLAGS is a list of flags
python -m lejepa_jax.select "$OUTDIR"/* --metric="$METRIC" $SELECT_FLAGS
