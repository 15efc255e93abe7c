#!/usr/bin/env bash
# The issue-15 grid on one GPU with the shipped tiny model: every method, spancake and its ablations at budgets
# 64-1024 on the needle grid and the synthetic tasks (question-aware), and the needle grid under the
# context-only protocol. One process per (task, protocol, method or ablation, group of budgets) runs its
# budgets with one model load; the tiny model is launch-bound, so PARALLEL processes share the GPU. Jobs
# start by priority; TIMEOUT stops the rest (the folders that finished are merged, the log says which).
#
# Time (estimated, not measured on a GPU): 75 jobs, each one model load (~10 s) plus 2-3 budgets of 200 needle
# prompts (10 per cell) or 180 synthetic prompts (6 tasks x 3 lengths x 10) in batches of 32, or 80
# context-only needle prompts answered one context at a time. From run_grid.sh on an H100 (12 processes:
# ~0.3 s per needle prompt, ~0.4 s per synthetic prompt in batches of 8), assuming batches of 32 cost about
# half as much per prompt: ~5700 process-seconds over 16 processes, about 6-7 minutes on one H200 with 16
# cores. TIMEOUT (default 470 s) keeps the whole run under 8 minutes: what it cuts is listed in the log
# (the ablations go last).
#
#   bash experiments/run_beyond_grid.sh OUT [PARALLEL]
#   OUT/{needle,synthetic,needle_context_only}/ merged reports (+ confidence.md); OUT/runs/ per job; OUT/logs/
set -u
OUT=${1:?usage: run_beyond_grid.sh OUT [PARALLEL]}
PARALLEL=${2:-16}
BUDGET_GROUPS=${BUDGET_GROUPS:-"64,128,256 512,1024"}  # one process per group
METHODS=${METHODS:-"h2o spancake streamingllm snapkv pyramidkv adakv cake defensivekv layer_defensivekv lava"}
CONTEXT_ONLY=${CONTEXT_ONLY:-"spancake streamingllm snapkv adakv cake layer_defensivekv"}  # needle only
export OUT PY=${PYTHON:-python3} OMP_NUM_THREADS=1
export NEEDLE_ARGS=${NEEDLE_ARGS:-"--lengths 1024 2048 4096 8192 --depths 0 25 50 75 100 --samples 10 --max-new-tokens 8 --batch-size 32"}
export SYNTHETIC_ARGS=${SYNTHETIC_ARGS:-"--lengths 2048 4096 8192 --samples 10 --batch-size 32"}
export CONTEXT_ARGS=${CONTEXT_ARGS:-"--lengths 1024 2048 4096 8192 --depths 0 25 50 75 100 --samples 4 --max-new-tokens 8 --protocol context-only"}
# spancake's ablations: label and options (one ingredient off or changed, the rest at the defaults;
# spans off is cake itself)
ABLATIONS=(
  "spancake.pure_spans span_weight=1.0"
  "spancake.no_after span_after=0"
  "spancake.uniform_layers tau1=10000.0 tau2=10000.0"
  "spancake.head_budgets head_budgets=True"
  "spancake.no_decode_spans decode_spans=False"
)
mkdir -p "$OUT/logs" "$OUT/runs"

run_one() {  # task label budgets method [KEY=VALUE ...]; task: needle | synthetic | needle_context_only
  local task=$1 label=$2 budgets=$3 method=$4 args script=$1 opts=() start=$SECONDS
  shift 4
  for o in "$@"; do opts+=(--option "$o"); done
  case $task in
    needle) args=$NEEDLE_ARGS ;;
    synthetic) args=$SYNTHETIC_ARGS ;;
    needle_context_only) args=$CONTEXT_ARGS script=needle ;;
  esac
  # shellcheck disable=SC2086
  "$PY" "experiments/run_$script.py" --methods "$method" --budgets "$budgets" --no-progress $args "${opts[@]}" \
    --out "$OUT/runs/$task/$label@$budgets" > "$OUT/logs/$task-$label@$budgets.log" 2>&1
  echo "$task $label $budgets: exit $? in $((SECONDS - start))s"
}
export -f run_one

{  # by priority: the methods' grids, then context-only, then the ablations (TIMEOUT cuts from the end)
  for task in synthetic needle needle_context_only; do echo "$task full 64 full"; done
  for group in $BUDGET_GROUPS; do
    for task in synthetic needle; do for m in $METHODS; do echo "$task $m $group $m"; done; done
  done
  for group in $BUDGET_GROUPS; do for m in $CONTEXT_ONLY; do echo "needle_context_only $m $group $m"; done; done
  for group in $BUDGET_GROUPS; do
    for task in synthetic needle; do
      for a in "${ABLATIONS[@]}"; do read -r label opts <<< "$a"; echo "$task $label $group spancake $opts"; done
    done
  done
} > "$OUT/logs/jobs.txt"
timeout "${TIMEOUT:-470}" xargs -P "$PARALLEL" -L 1 bash -c 'run_one "$@"' _ < "$OUT/logs/jobs.txt" \
  | tee "$OUT/logs/progress.log"
echo "grid: ${SECONDS}s; $(grep -c 'exit 0' "$OUT/logs/progress.log") of $(wc -l < "$OUT/logs/jobs.txt") jobs finished"
for task in needle synthetic needle_context_only; do
  kind=${task%_context_only}
  dirs=()
  for d in "$OUT/runs/$task"/*/; do name=$(basename "$d"); dirs+=("$d=${name%@*}"); done
  "$PY" experiments/merge_results.py "$kind" "$OUT/$task" "${dirs[@]}" > "$OUT/logs/merge-$task.log" 2>&1 \
    && "$PY" experiments/confidence.py "$kind" "$OUT/$task" >> "$OUT/logs/merge-$task.log" 2>&1
done
echo "total: ${SECONDS}s"
