#!/usr/bin/env bash
# Chunked prefill on one GPU (issue 29), from the repository root: build, its tests, then peak memory and time of
# cake one-shot against cake with prefill_chunk=8192 at 32K and 128K (with the full-cache baseline), and chunked
# alone at 512K and 1M (Llama-3.1-8B shape, budget 4096 as the issue asks). Results under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
CAKEKV_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps . \
  > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
OMP_NUM_THREADS=2 timeout 100 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_chunked_prefill.py 2>&1 \
  | tee "$OUT/chunked_tests.log" | tail -3
timeout 200 python3 benchmarks/bench_generate.py --contexts 32768 131072 --budgets 4096 --new-tokens 8 \
  --no-static-baseline --methods cake cake:prefill_chunk=8192 --out "$OUT/chunked_128k" 2>&1 \
  | tee "$OUT/chunked_128k.log" | tail -8
timeout 250 python3 benchmarks/bench_generate.py --contexts 524288 1048576 --budgets 4096 --new-tokens 8 \
  --no-static-baseline --no-hf-baseline --methods cake:prefill_chunk=8192 --out "$OUT/chunked_1m" 2>&1 \
  | tee "$OUT/chunked_1m.log" | tail -8
