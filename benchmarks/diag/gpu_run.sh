#!/usr/bin/env bash
# One device session: build with CUDA, inspect how libstdc++ is linked, run the CUDA tests that cover the
# decode path, then the generate benchmark at 32K and 128K. Results under $OUT.
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
env | grep -E "^(CXXFLAGS|CFLAGS|LDFLAGS|CPPFLAGS|CMAKE_[A-Z_]*|CXX|CC)=" || echo "no compiler flags in env"
CAKEKV_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-build-isolation --no-deps -C build-dir=/tmp/skb . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
grep -m1 -o "LINK_FLAGS = .*\|LINK_LIBRARIES = .*" /tmp/skb/build.ninja | head -3
lib=$(python3 -c "import cakekv._ops, glob, os, sys; print([f for p in sys.path if p for f in glob.glob(os.path.join(p, 'cakekv', 'libcakekv_ops*.so'))][0])")
echo "lib: $lib"; readelf -d $lib | grep NEEDED

${EXTRA:-true}
timeout 240 python3 -m pytest -q tests/ops/test_ops.py tests/test_step_graph.py -p no:cacheprovider -W "default::RuntimeWarning" 2>&1 | tee $OUT/tests.log | tail -25
for ctx in 32768 131072; do
  [ $ctx = 131072 ] && METHODS="snapkv cake cake:decode_evict=false adakv"
  timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_generate.py --contexts $ctx --methods ${METHODS:-full snapkv pyramidkv streamingllm adakv lava cake cake:decode_evict=false} \
    --budgets 1024 --new-tokens 32 ${STATIC:+} $([ $ctx = 131072 ] && echo --no-static-baseline) --out $OUT/g$((ctx / 1024)) 2>&1 | grep "^|" 
done
