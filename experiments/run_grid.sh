#!/usr/bin/env bash
# The results grid on one GPU with the shipped tiny model: needle heatmaps and the synthetic-task
# table of every method at budgets 64/128/256/512. The tiny model is launch-bound, so one process per
# (task, method, budget) runs in parallel (batches of 8 prompts each); the folders are merged at the end
# (a run cut short by TIMEOUT leaves the others' results).
#
#   bash experiments/run_grid.sh OUT [PARALLEL]        # OUT/needle, OUT/synthetic, OUT/logs
set -u
OUT=${1:?usage: run_grid.sh OUT [PARALLEL]}
PARALLEL=${2:-12}
METHODS=${METHODS:-"full streamingllm h2o snapkv pyramidkv adakv cake defensivekv layer_defensivekv lava"}
BUDGETS=${BUDGETS:-"64 128 256 512"}
export OUT PY=${PYTHON:-python3} OMP_NUM_THREADS=1
export NEEDLE_ARGS=${NEEDLE_ARGS:-"--lengths 1024 2048 4096 8192 --depths 0 25 50 75 100 --samples 2 --max-new-tokens 8"}
export SYNTHETIC_ARGS=${SYNTHETIC_ARGS:-"--lengths 2048 4096 8192 --samples 3"}
mkdir -p "$OUT/logs"

run_one() {  # task method budget
  local args label=$2-$3
  if [ "$2" = full ]; then label=full; fi
  if [ "$1" = needle ]; then args=$NEEDLE_ARGS; else args=$SYNTHETIC_ARGS; fi
  # shellcheck disable=SC2086
  "$PY" "experiments/run_$1.py" --methods "$2" --budgets "$3" --batch-size 8 --no-progress $args \
    --out "$OUT/$1/$label" > "$OUT/logs/$1-$label.log" 2>&1
  echo "$1 $2 $3: exit $? at ${SECONDS}s"
}
export -f run_one

for task in needle synthetic; do
  for m in $METHODS; do
    if [ "$m" = full ]; then echo "$task full 64"; else for b in $BUDGETS; do echo "$task $m $b"; done; fi
  done
done | timeout "${TIMEOUT:-100000}" xargs -P "$PARALLEL" -L 1 bash -c 'run_one $0 $1 $2'
for task in needle synthetic; do
  "$PY" experiments/merge_results.py "$task" "$OUT/$task" "$OUT/$task"/*/ > "$OUT/logs/merge-$task.log" 2>&1
done
