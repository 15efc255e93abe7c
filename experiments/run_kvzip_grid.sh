#!/usr/bin/env bash
# Issue 26 on one GPU with the shipped tiny model: the context-only needle grid (the question after compression)
# for full, kvzip, spanzip and spancake, and the question-aware needle grid for kvzip and spanzip (spancake's is in
# run_beyond_grid.sh's results, README), at budgets 64-1024; then the variants (the cheaper re-read of kvzip and
# spanzip; spanzip's ablations: CAKE's layer budgets, the window on the re-read's scale by peak, no window) on both
# grids. One process per (protocol, label, group of budgets), as run_beyond_grid.sh; jobs start by priority and
# TIMEOUT stops the rest (the variants go last; the log lists what finished); the merged reports carry Wilson
# intervals (confidence.py).
#
# Time (estimated, not measured on a GPU): 31 jobs, each one model load plus 2-3 budgets of 200 question-aware
# needle prompts in batches of 32 or 80 context-only prompts (one prefill and re-read per context); the beyond grid
# ran 75 such jobs in 346 s on one H200 with 16 processes. TIMEOUT (default 520 s) keeps the run under 9 minutes.
#
#   bash experiments/run_kvzip_grid.sh OUT [PARALLEL]
#   OUT/{needle_context_only,needle}/ merged reports (+ confidence.md); OUT/runs/ per job; OUT/logs/
set -u
OUT=${1:?usage: run_kvzip_grid.sh OUT [PARALLEL]}
PARALLEL=${2:-16}
BUDGET_GROUPS=${BUDGET_GROUPS:-"64,128,256 512,1024"}
CONTEXT_ONLY=${CONTEXT_ONLY:-"spanzip kvzip spancake"}
QUESTION_AWARE=${QUESTION_AWARE:-"spanzip kvzip"}
export OUT PY=${PYTHON:-python3} OMP_NUM_THREADS=1
export NEEDLE_ARGS=${NEEDLE_ARGS:-"--lengths 1024 2048 4096 8192 --depths 0 25 50 75 100 --samples 10 --max-new-tokens 8 --batch-size 32"}
export CONTEXT_ARGS=${CONTEXT_ARGS:-"--lengths 1024 2048 4096 8192 --depths 0 25 50 75 100 --samples 4 --max-new-tokens 8 --protocol context-only"}
# variants: label, method and options (one ingredient changed, the rest at the defaults): the cheaper re-read
# (reread=span), then spanzip's ablations
ABLATIONS=(
  "kvzip.span kvzip reread=span"
  "spanzip.span spanzip reread=span"
  "spanzip.cake_layers spanzip ranking=cake"
  "spanzip.peak_scale spanzip normalise=max"
  "spanzip.no_window spanzip window_weight=0.0"
)
mkdir -p "$OUT/logs" "$OUT/runs"

run_one() {  # task label budgets method [KEY=VALUE ...]; task: needle | needle_context_only
  local task=$1 label=$2 budgets=$3 method=$4 args opts=() start=$SECONDS
  shift 4
  for o in "$@"; do opts+=(--option "$o"); done
  case $task in
    needle) args=$NEEDLE_ARGS ;;
    needle_context_only) args=$CONTEXT_ARGS ;;
  esac
  # shellcheck disable=SC2086
  "$PY" experiments/run_needle.py --methods "$method" --budgets "$budgets" --no-progress $args "${opts[@]}" \
    --out "$OUT/runs/$task/$label@$budgets" > "$OUT/logs/$task-$label@$budgets.log" 2>&1
  echo "$task $label $budgets: exit $? in $((SECONDS - start))s"
}
export -f run_one

{  # by priority: the methods' grids, then spanzip's ablations (TIMEOUT cuts from the end)
  echo "needle_context_only full 64 full"
  for group in $BUDGET_GROUPS; do
    for m in $CONTEXT_ONLY; do echo "needle_context_only $m $group $m"; done
    for m in $QUESTION_AWARE; do echo "needle $m $group $m"; done
  done
  for ablation in "${ABLATIONS[@]}"; do
    read -r label method opts <<< "$ablation"
    for group in $BUDGET_GROUPS; do
      for task in needle_context_only needle; do echo "$task $label $group $method $opts"; done
    done
  done
} > "$OUT/logs/jobs.txt"
timeout "${TIMEOUT:-520}" xargs -P "$PARALLEL" -L 1 bash -c 'run_one "$@"' _ < "$OUT/logs/jobs.txt" \
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
