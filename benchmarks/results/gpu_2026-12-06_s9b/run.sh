#!/usr/bin/env bash
# The next GPU call, prepared 2026-12-06 and not run (the session's device time ran out): build, the whole suite
# (it runs the fused attention_max CUDA kernel's tests: tests/ops/test_ops_cuda.py), chunked prefill's cost at
# 32K-1M and its quality against one-shot at 8K (with the probes), the re-read's cost at 32K / 128K, then the
# kvzip / spanzip needle grid (8 processes: 16 ran out of memory on an H100). Each step's timeout is cut to
# DEADLINE (default 560 s); STEPS picks steps (default: all, in this order). Results under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-560}
STEPS=${STEPS:-"suite chunked chunked_grid cost kvzip_grid"}
left() { local t=$((DEADLINE - SECONDS - 10)); t=$((t < $1 ? t : $1)); echo $((t < 1 ? 1 : t)); }
CAKEKV_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps . \
  > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader; echo "built at ${SECONDS}s"
for step in $STEPS; do
  [ "$(left 30)" -lt 30 ] && { echo "no time left for $step"; break; }
  case $step in
    suite)
      OMP_NUM_THREADS=2 timeout "$(left 170)" python3 -m pytest -q -n 8 -p no:cacheprovider --durations=10 tests \
        2>&1 | tee "$OUT/gpu_suite.log" | tail -4 ;;
    chunked)
      timeout "$(left 130)" python3 benchmarks/bench_generate.py --contexts 32768 131072 524288 1048576 \
        --budgets 4096 --new-tokens 8 --no-static-baseline --no-hf-baseline --methods cake:prefill_chunk=8192 \
        --out "$OUT/chunked" 2>&1 | tee "$OUT/chunked.log" | grep "^|" | tail -4 ;;
    chunked_grid)
      TIMEOUT=$(( $(left 90) - 10 )) bash experiments/run_chunked_grid.sh /tmp/chunked_grid 16 \
        > "$OUT/chunked_grid.log" 2>&1
      tail -2 "$OUT/chunked_grid.log"; tar czf "$OUT/chunked_grid.tgz" -C /tmp chunked_grid ;;
    cost)
      timeout "$(left 150)" python3 benchmarks/bench_generate.py --contexts 32768 131072 --budgets 1024 \
        --new-tokens 8 --no-static-baseline --methods cake kvzip kvzip:reread=span --out "$OUT/reread_cost" 2>&1 \
        | tee "$OUT/reread_cost.log" | grep "^|" | tail -8 ;;
    kvzip_grid)
      TIMEOUT=$(( $(left 400) - 15 )) bash experiments/run_kvzip_grid.sh /tmp/kvzip_grid 8 > "$OUT/kvzip_grid.log" 2>&1
      tail -2 "$OUT/kvzip_grid.log"; tar czf "$OUT/kvzip_grid.tgz" -C /tmp kvzip_grid ;;
  esac
  echo "$step done at ${SECONDS}s"
done
