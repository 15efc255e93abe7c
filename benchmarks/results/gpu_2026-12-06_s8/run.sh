#!/usr/bin/env bash
# The eighth session's one GPU call, from the repository root, within DEADLINE seconds (default 560): build, the
# whole suite, the re-reading methods' cost against cake at 32K / 128K, chunked prefill's peak and time at 128K / 1M
# (Llama-3.1-8B shape, bench_generate.py), then the issue-26 needle grid (experiments/run_kvzip_grid.sh) for what
# is left. Each step's timeout is cut to the time left. Results under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-560}
left() { local t=$((DEADLINE - SECONDS - 10)); echo $((t < $1 ? t : $1)); }
CAKEKV_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps . \
  > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader; echo "built at ${SECONDS}s"
OMP_NUM_THREADS=2 timeout "$(left 170)" python3 -m pytest -q -n 8 -p no:cacheprovider --durations=10 tests 2>&1 \
  | tee "$OUT/gpu_suite.log" | tail -4
echo "suite done at ${SECONDS}s"
timeout "$(left 110)" python3 benchmarks/bench_generate.py --contexts 32768 131072 --budgets 1024 --new-tokens 8 \
  --no-static-baseline --methods cake kvzip kvzip:reread=span --out "$OUT/reread_cost" 2>&1 \
  | tee "$OUT/reread_cost.log" | grep "^|" | tail -8
echo "cost done at ${SECONDS}s"
timeout "$(left 100)" python3 benchmarks/bench_generate.py --contexts 131072 1048576 --budgets 4096 --new-tokens 8 \
  --no-static-baseline --no-hf-baseline --methods cake:prefill_chunk=8192 --out "$OUT/chunked" 2>&1 \
  | tee "$OUT/chunked.log" | grep "^|" | tail -4
echo "chunked done at ${SECONDS}s"
TIMEOUT=$(( $(left 300) - 15 )) bash experiments/run_kvzip_grid.sh /tmp/grid 16 > "$OUT/grid.log" 2>&1
tail -3 "$OUT/grid.log"
tar czf "$OUT/grid.tgz" -C /tmp grid
echo "all done at ${SECONDS}s"
