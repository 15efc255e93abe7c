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
export OUT PARALLEL
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
source "$(dirname "$0")/grid_jobs.sh"

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
} | run_jobs 470
merge_tasks needle synthetic needle_context_only
echo "total: ${SECONDS}s"
