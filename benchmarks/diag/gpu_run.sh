#!/usr/bin/env bash
# One device call: build with CUDA, run the CUDA tests, profile decode steps, then generate benchmarks.
# Results under $OUT. Each part is optional and bounded by its own timeout:
#   TESTS="tests/ops/test_decode_ops.py ..."   pytest arguments (8 workers, 2 CPU threads each)
#   PROFILE="cake snapkv" PROFILE_CONTEXT=8192  benchmarks/diag/profile_decode.py methods
#   BENCH="--contexts 32768 --methods cake ...; --contexts 131072 ..."   bench_generate.py runs, ';'-separated,
#                                               each packed into $OUT/bench<i>.tgz (--budgets 1024 --new-tokens 32
#                                               added; the device returns at most 8 files, so folders are packed)
#   SANITIZE="racecheck memcheck" SANITIZE_TESTS="tests/ops/test_decode_ops.py -k cuda"   compute-sanitizer tools
#                                               over those tests (one process each, after the benchmarks)
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
CAKEKV_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-build-isolation --no-deps \
  -C build-dir=/tmp/skb . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
git log -1 --format="commit %h %s" 2>/dev/null || true
if [ -n "${TESTS:-}" ]; then
  start=$(date +%s)
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -n 8 -p no:cacheprovider \
    -o faulthandler_timeout=100 $TESTS > $OUT/gpu_tests.log 2>&1
  echo "pytest exit $? after $(( $(date +%s) - start )) s" | tee -a $OUT/gpu_tests.log
  tail -15 $OUT/gpu_tests.log
fi
if [ -n "${PROFILE:-}" ]; then
  # shellcheck disable=SC2086
  timeout ${PROFILE_TIMEOUT:-150} python3 benchmarks/diag/profile_decode.py --context ${PROFILE_CONTEXT:-8192} \
    --methods $PROFILE > $OUT/profile.log 2>&1
  grep -v Warning $OUT/profile.log | tail -60
fi
i=0
IFS=';' read -ra RUNS <<< "${BENCH:-}"
for run in "${RUNS[@]}"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_generate.py $run --budgets 1024 --new-tokens 32 \
    --out /tmp/bench$i > $OUT/bench$i.log 2>&1
  echo "bench$i ($run): exit $?"; grep "^|" $OUT/bench$i.log
  tar czf $OUT/bench$i.tgz -C /tmp bench$i
done
for tool in ${SANITIZE:-}; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout ${SANITIZE_TIMEOUT:-120} compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -x \
    -p no:cacheprovider $SANITIZE_TESTS > $OUT/sanitizer_$tool.log 2>&1
  echo "compute-sanitizer $tool: exit $? after $(( $(date +%s) - start )) s"; tail -4 $OUT/sanitizer_$tool.log
done
