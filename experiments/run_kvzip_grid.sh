#!/usr/bin/env bash
# Issue 26 on one GPU with the shipped tiny model: the context-only needle grid (the question after compression)
# for kvzip against spancake and the full cache, and kvzip's question-aware needle grid (spancake's is in
# run_beyond_grid.sh's results), at budgets 64-1024. One process per (protocol, method, group of budgets), as
# run_beyond_grid.sh; the merged reports carry Wilson intervals (confidence.py).
#
#   bash experiments/run_kvzip_grid.sh OUT [PARALLEL]
#   OUT/{needle_context_only,needle}/ merged reports (+ confidence.md); OUT/runs/ per job; OUT/logs/
set -u
OUT=${1:?usage: run_kvzip_grid.sh OUT [PARALLEL]}
PARALLEL=${2:-12}
BUDGET_GROUPS=${BUDGET_GROUPS:-"64,128,256 512,1024"}
CONTEXT_ONLY=${CONTEXT_ONLY:-"kvzip spancake"}
QUESTION_AWARE=${QUESTION_AWARE:-"kvzip"}
export OUT PY=${PYTHON:-python3} OMP_NUM_THREADS=1
export NEEDLE_ARGS=${NEEDLE_ARGS:-"--lengths 1024 2048 4096 8192 --depths 0 25 50 75 100 --samples 10 --max-new-tokens 8 --batch-size 32"}
export CONTEXT_ARGS=${CONTEXT_ARGS:-"--lengths 1024 2048 4096 8192 --depths 0 25 50 75 100 --samples 4 --max-new-tokens 8 --protocol context-only"}
mkdir -p "$OUT/logs" "$OUT/runs"

run_one() {  # task method budgets; task: needle | needle_context_only
  local task=$1 method=$2 budgets=$3 args start=$SECONDS
  case $task in
    needle) args=$NEEDLE_ARGS ;;
    needle_context_only) args=$CONTEXT_ARGS ;;
  esac
  # shellcheck disable=SC2086
  "$PY" experiments/run_needle.py --methods "$method" --budgets "$budgets" --no-progress $args \
    --out "$OUT/runs/$task/$method@$budgets" > "$OUT/logs/$task-$method@$budgets.log" 2>&1
  echo "$task $method $budgets: exit $? in $((SECONDS - start))s"
}
export -f run_one

{
  echo "needle_context_only full 64"
  for group in $BUDGET_GROUPS; do for m in $CONTEXT_ONLY; do echo "needle_context_only $m $group"; done; done
  for group in $BUDGET_GROUPS; do for m in $QUESTION_AWARE; do echo "needle $m $group"; done; done
} > "$OUT/logs/jobs.txt"
timeout "${TIMEOUT:-570}" xargs -P "$PARALLEL" -L 1 bash -c 'run_one "$@"' _ < "$OUT/logs/jobs.txt" \
  | tee "$OUT/logs/progress.log"
echo "grid: ${SECONDS}s; $(grep -c 'exit 0' "$OUT/logs/progress.log") of $(wc -l < "$OUT/logs/jobs.txt") jobs finished"
for task in needle needle_context_only; do
  dirs=()
  for d in "$OUT/runs/$task"/*/; do [ -d "$d" ] && { name=$(basename "$d"); dirs+=("$d=${name%@*}"); }; done
  [ ${#dirs[@]} -gt 0 ] || continue
  "$PY" experiments/merge_results.py needle "$OUT/$task" "${dirs[@]}" > "$OUT/logs/merge-$task.log" 2>&1 \
    && "$PY" experiments/confidence.py needle "$OUT/$task" >> "$OUT/logs/merge-$task.log" 2>&1
done
echo "total: ${SECONDS}s"
