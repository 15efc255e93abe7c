#!/usr/bin/env bash
# Issue 5's results grid on one GPU with the shipped tiny model: needle heatmaps and the synthetic-task
# table of every method at budgets 64/128/256/512. The tiny model is launch-bound, so one process per
# (task, method) runs in parallel (batches of 8 prompts each); the folders are merged at the end.
#
#   bash experiments/run_grid.sh OUT [PARALLEL]        # OUT/needle, OUT/synthetic, OUT/logs
set -u
OUT=${1:?usage: run_grid.sh OUT [PARALLEL]}
PARALLEL=${2:-10}
METHODS=${METHODS:-"full streamingllm h2o snapkv pyramidkv adakv cake defensivekv layer_defensivekv lava"}
export OUT PY=${PYTHON:-python3} OMP_NUM_THREADS=1
export BUDGETS=${BUDGETS:-"64 128 256 512"}
export NEEDLE_ARGS=${NEEDLE_ARGS:-"--lengths 1024 2048 4096 8192 --depths 0 25 50 75 100 --samples 2 --max-new-tokens 8"}
export SYNTHETIC_ARGS=${SYNTHETIC_ARGS:-"--lengths 2048 4096 8192 --samples 4"}
mkdir -p "$OUT/logs"

run_one() {  # task method
  local args
  if [ "$1" = needle ]; then args=$NEEDLE_ARGS; else args=$SYNTHETIC_ARGS; fi
  # shellcheck disable=SC2086
  "$PY" "experiments/run_$1.py" --methods "$2" --budgets $BUDGETS --batch-size 8 --no-progress $args \
    --out "$OUT/$1/$2" > "$OUT/logs/$1-$2.log" 2>&1
  echo "$1 $2: exit $? after ${SECONDS}s"
}
export -f run_one

for m in $METHODS; do echo "needle $m"; echo "synthetic $m"; done | xargs -P "$PARALLEL" -L 1 bash -c 'run_one $0 $1'
"$PY" experiments/merge_results.py needle "$OUT/needle" "$OUT"/needle/*/ > "$OUT/logs/merge-needle.log" 2>&1
"$PY" experiments/merge_results.py synthetic "$OUT/synthetic" "$OUT"/synthetic/*/ > "$OUT/logs/merge-synthetic.log" 2>&1
