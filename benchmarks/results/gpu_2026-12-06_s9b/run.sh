#!/usr/bin/env bash
# The session's second GPU call: the fused attention_max CUDA kernel restored (csrc/cuda/attention_max.cu, with
# window_stats on the shared tiles of attention_tiles.cuh); if its op tests fail, window_stats goes back to the
# kernel verified before (window_stats_verified.cu here) and the library is rebuilt. Then the whole suite, the
# chunked prefill against one-shot at 8K (probes), the re-read's cost at 32K / 128K, and the context-only needle grid
# for the time left. Results under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-540}
HERE=benchmarks/results/gpu_2026-12-06_s9b
left() { local t=$((DEADLINE - SECONDS - 10)); t=$((t < $1 ? t : $1)); echo $((t < 1 ? 1 : t)); }
build() {
  CAKEKV_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps . \
    > "$OUT/build_$1.log" 2>&1
}
optests() {
  OMP_NUM_THREADS=2 timeout "$(left 120)" python3 -m pytest -q -n 8 -p no:cacheprovider tests/ops \
    > "$OUT/ops_$1.log" 2>&1
}
if build tiles && optests tiles; then
  echo "tiles: built and op tests pass at ${SECONDS}s"
else
  tail -3 "$OUT/ops_tiles.log" 2>/dev/null; tail -5 "$OUT/build_tiles.log"
  cp "$HERE/window_stats_verified.cu" csrc/cuda/window_stats.cu
  build verified || { tail -20 "$OUT/build_verified.log"; exit 1; }
  optests verified; echo "verified window_stats: op tests rc=$? at ${SECONDS}s"; tail -2 "$OUT/ops_verified.log"
fi
OMP_NUM_THREADS=2 timeout "$(left 170)" python3 -m pytest -q -n 8 -p no:cacheprovider --durations=10 tests 2>&1 \
  | tee "$OUT/gpu_suite.log" | tail -3
echo "suite done at ${SECONDS}s"
[ "${SUITE_ONLY:-0}" = 1 ] && exit 0
TIMEOUT=$(( $(left 75) - 10 )) BUDGET_GROUPS="256 1024" SYNTHETIC_ARGS="--lengths 8192 --samples 4 --batch-size 20" \
  bash experiments/run_chunked_grid.sh /tmp/chunked_grid 16 > "$OUT/chunked_grid.log" 2>&1
tail -2 "$OUT/chunked_grid.log"; tar czf "$OUT/chunked_grid.tgz" -C /tmp chunked_grid
echo "chunked grid done at ${SECONDS}s"
timeout "$(left 150)" python3 benchmarks/bench_generate.py --contexts 32768 131072 --budgets 1024 --new-tokens 8 \
  --no-static-baseline --no-hf-baseline --methods cake kvzip kvzip:reread=span --out "$OUT/reread_cost" 2>&1 \
  | tee "$OUT/reread_cost.log" | grep "^|" | tail -6
echo "cost done at ${SECONDS}s"
TIMEOUT=$(( $(left 300) - 15 )) QUESTION_AWARE="" BUDGET_GROUPS="64,128,256,512" \
  bash experiments/run_kvzip_grid.sh /tmp/kvzip_grid 16 > "$OUT/kvzip_grid.log" 2>&1
tail -2 "$OUT/kvzip_grid.log"; tar czf "$OUT/kvzip_grid.tgz" -C /tmp kvzip_grid
echo "all done at ${SECONDS}s"
