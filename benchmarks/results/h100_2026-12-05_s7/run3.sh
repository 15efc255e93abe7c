#!/usr/bin/env bash
# Run 3 of this session, on one GPU, from the repository root: build, the whole suite, the issue-26 needle grid
# (experiments/run_kvzip_grid.sh, cut at GRID_SECONDS, 270 by default), kvzip's cost against cake (bench_generate.py). Results under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
CAKEKV_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps . \
  > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
OMP_NUM_THREADS=2 timeout 170 python3 -m pytest -q -n 8 -p no:cacheprovider --durations=10 tests 2>&1 \
  | tee "$OUT/run3_gpu_suite.log" | tail -8
TIMEOUT=${GRID_SECONDS:-270} bash experiments/run_kvzip_grid.sh /tmp/grid 16 > "$OUT/run3_grid.log" 2>&1
tail -4 "$OUT/run3_grid.log"
tar czf "$OUT/run3_grid.tgz" -C /tmp grid
[ "${SKIP_COST:-0}" = 1 ] || timeout 110 python3 benchmarks/bench_generate.py --contexts 32768 131072 --methods cake kvzip --budgets 1024 \
  --new-tokens 8 --no-static-baseline --out "$OUT/kvzip_cost" 2>&1 | tee "$OUT/run3_kvzip_cost.log" | tail -12
