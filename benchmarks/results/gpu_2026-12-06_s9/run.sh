#!/usr/bin/env bash
# One GPU call, from the repository root, within DEADLINE seconds (default 560): build, then the STEPS named (default:
# all, in this order), each step's timeout cut to the time left; results under $OUT.
#   suite        the whole test suite (issue 25: a complete green GPU run)
#   cost         prefill / decode / peak of the re-reading methods against cake at 32K and 128K (issue 26)
#   chunked      chunked prefill's peak and time at 32K-1M, budget 4096 (issue 29; one shot cannot hold 512K)
#   chunked_grid chunked against one-shot prefill, needle and synthetic at 8K, 2K chunks (issue 29)
#   kvzip_grid   the context-only and question-aware needle grids of kvzip / spanzip (issue 26)
set -o pipefail
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-560}
STEPS=${STEPS:-"suite cost chunked chunked_grid kvzip_grid"}
left() { local t=$((DEADLINE - SECONDS - 10)); echo $((t < $1 ? t : $1)); }
CAKEKV_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps . \
  > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader; echo "built at ${SECONDS}s"
for step in $STEPS; do
  case $step in
    suite)
      OMP_NUM_THREADS=2 timeout "$(left 170)" python3 -m pytest -q -n 8 -p no:cacheprovider --durations=10 tests \
        2>&1 | tee "$OUT/gpu_suite.log" | tail -4 ;;
    cost)
      timeout "$(left 110)" python3 benchmarks/bench_generate.py --contexts 32768 131072 --budgets 1024 \
        --new-tokens 8 --no-static-baseline --methods cake kvzip kvzip:reread=span --out "$OUT/reread_cost" 2>&1 \
        | tee "$OUT/reread_cost.log" | grep "^|" | tail -8 ;;
    chunked)
      timeout "$(left 130)" python3 benchmarks/bench_generate.py --contexts 32768 131072 524288 1048576 \
        --budgets 4096 --new-tokens 8 --no-static-baseline --no-hf-baseline --methods cake:prefill_chunk=8192 \
        --out "$OUT/chunked" 2>&1 | tee "$OUT/chunked.log" | grep "^|" | tail -4 ;;
    chunked_grid)
      TIMEOUT=$(( $(left 150) - 15 )) bash experiments/run_chunked_grid.sh /tmp/chunked_grid 16 \
        > "$OUT/chunked_grid.log" 2>&1
      tail -2 "$OUT/chunked_grid.log"; tar czf "$OUT/chunked_grid.tgz" -C /tmp chunked_grid ;;
    kvzip_grid)
      TIMEOUT=$(( $(left 400) - 15 )) bash experiments/run_kvzip_grid.sh /tmp/kvzip_grid 16 > "$OUT/kvzip_grid.log" 2>&1
      tail -2 "$OUT/kvzip_grid.log"; tar czf "$OUT/kvzip_grid.tgz" -C /tmp kvzip_grid ;;
  esac
  echo "$step done at ${SECONDS}s"
done
