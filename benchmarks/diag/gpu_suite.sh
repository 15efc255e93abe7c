#!/usr/bin/env bash
# One device session: build with CUDA, profile decode steps, then run the test-suite (8 workers; a test
# hanging over 100 s dumps its stack; 2 CPU threads per worker: 8 workers with 16 threads each oversubscribed the
# machine and the CPU tests crawled).
# Results under $OUT (tests log with the slowest tests, profile log).
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
CAKEKV_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-build-isolation --no-deps -C build-dir=/tmp/skb . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ -n "${PROFILE:-snapkv cake adakv}" ]; then
  timeout ${PROFILE_TIMEOUT:-180} python3 benchmarks/diag/profile_decode.py --context ${PROFILE_CONTEXT:-8192} \
    --methods ${PROFILE:-snapkv cake adakv} 2>&1 | tee $OUT/profile.log | grep -v Warning
fi
if [ "${TESTS:-1}" = 1 ]; then
  start=$(date +%s)
  OMP_NUM_THREADS=2 timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -n 8 -p no:cacheprovider --durations=25 -o faulthandler_timeout=100 ${TEST_ARGS:-tests} > $OUT/gpu_tests.log 2>&1
  echo "pytest exit $? after $(( $(date +%s) - start )) s" | tee -a $OUT/gpu_tests.log
  tail -40 $OUT/gpu_tests.log
fi
