#!/usr/bin/env bash
# The full cache on the same grid, and PyramidKV on the shallow shipped model (8 layers) at 7.7K tokens,
# budget 512, against snapkv and streamingllm (and pyramidkv with beta=4). Usage: run_extra.sh OUT
set -euo pipefail
out=${1:?usage: run_extra.sh OUT}
export OMP_NUM_THREADS=1
python -m cakekv.cli eval needle --lengths 1024 2048 4096 --depths 0 25 50 75 100 --samples 1 --methods full \
  --device cpu --no-progress --out "$out/full"
deep=(--lengths 7700 --depths 0 25 50 75 100 --samples 1 --budgets 512 --device cpu --no-progress)
python -m cakekv.cli eval needle "${deep[@]}" --methods full pyramidkv snapkv streamingllm --out "$out/shallow-7700"
python -m cakekv.cli eval needle "${deep[@]}" --methods pyramidkv --option beta=4 --out "$out/shallow-7700-beta4"
