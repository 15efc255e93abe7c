#!/usr/bin/env bash
# Issue 29's quality check on one GPU with the shipped tiny model: chunked prefill (the prompt read CHUNK tokens at a
# time, the cache cut back to the budget after each chunk) against one-shot prefill, question-aware needle and
# synthetic tasks at 8K tokens, for cake and spancake at budgets 256-1024. Labels: METHOD (one shot) and
# METHOD.chunkedCHUNK.
#
#   bash experiments/run_chunked_grid.sh OUT [PARALLEL]
#   OUT/{needle,synthetic}/ merged reports (+ confidence.md); OUT/runs/ per job; OUT/logs/
set -u
OUT=${1:?usage: run_chunked_grid.sh OUT [PARALLEL]}
PARALLEL=${2:-16}
CHUNK=${CHUNK:-2048}
BUDGET_GROUPS=${BUDGET_GROUPS:-"256 512 1024"}
METHODS=${METHODS:-"cake spancake"}
export OUT PARALLEL
export NEEDLE_ARGS=${NEEDLE_ARGS:-"--lengths 8192 --depths 0 25 50 75 100 --samples 10 --max-new-tokens 8 --batch-size 25"}
export SYNTHETIC_ARGS=${SYNTHETIC_ARGS:-"--lengths 8192 --samples 10 --batch-size 20"}
source "$(dirname "$0")/grid_jobs.sh"

for group in $BUDGET_GROUPS; do
  for task in needle synthetic; do
    for m in $METHODS; do
      echo "$task $m.chunked$CHUNK $group $m --prefill-chunk $CHUNK"
      echo "$task $m $group $m"
    done
  done
done | run_jobs 300
merge_tasks needle synthetic
echo "total: ${SECONDS}s"
