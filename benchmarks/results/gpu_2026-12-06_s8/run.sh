#!/usr/bin/env bash
# The eighth session's GPU run, from the repository root: build, the whole suite, the cost of the re-reading methods
# against cake at 32K and 128K (Llama-3.1-8B shape, bench_generate.py), then the issue-26 needle grid
# (experiments/run_kvzip_grid.sh) for what is left of the call (GRID_SECONDS). Results under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
CAKEKV_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps . \
  > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
OMP_NUM_THREADS=2 timeout 170 python3 -m pytest -q -n 8 -p no:cacheprovider --durations=10 tests 2>&1 \
  | tee "$OUT/gpu_suite.log" | tail -8
timeout 150 python3 benchmarks/bench_generate.py --contexts 32768 131072 --budgets 1024 --new-tokens 8 \
  --no-static-baseline --methods cake kvzip kvzip:reread=span spanzip:reread=span --out "$OUT/reread_cost" 2>&1 \
  | tee "$OUT/reread_cost.log" | tail -14
TIMEOUT=${GRID_SECONDS:-200} bash experiments/run_kvzip_grid.sh /tmp/grid 16 > "$OUT/grid.log" 2>&1
tail -4 "$OUT/grid.log"
tar czf "$OUT/grid.tgz" -C /tmp grid
