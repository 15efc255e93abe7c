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
export OUT PARALLEL
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
source "$(dirname "$0")/grid_jobs.sh"

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
} | run_jobs 520
merge_tasks needle needle_context_only
echo "total: ${SECONDS}s"
