#!/usr/bin/env bash
# Diagnose: does a TORCH_CHECK failing inside libcakekv_ops raise RuntimeError or kill the process?
# Builds the library with cmake in several flag variants and calls a failing op from each in a fresh process.
set -u
OUT=${OUT:-/tmp/diag}; mkdir -p $OUT
cd "$(dirname "$0")/../.."
g++ --version | head -1; python3 -c "import torch; print(torch.__version__, torch._C._GLIBCXX_USE_CXX11_ABI); print(torch.__config__.show())" | head -12
probe='import sys, torch; torch.ops.load_library(sys.argv[1]); k = torch.randn(1, 1, 4, 2)
try:
    torch.ops.cakekv.gather_kept(k, k, torch.tensor([[[4]]]))
except RuntimeError as e:
    print("RAISED", str(e).splitlines()[0])'
variant() {  # name, extra cmake args...
  local name=$1; shift
  local dir=/tmp/build-$name
  CAKEKV_CUDA=0 cmake -S . -B $dir -G Ninja -DPython_EXECUTABLE=$(which python3) "$@" >$dir.log 2>&1 && ninja -C $dir >>$dir.log 2>&1 || { echo "$name: build failed"; tail -5 $dir.log; return; }
  local lib=$(ls $dir/libcakekv_ops*.so)
  python3 -c "$probe" $lib > $OUT/$name.txt 2>&1; echo "$name: rc=$? $(tail -c 300 $OUT/$name.txt | tr '\n' ' ')"
  TORCH_SHOW_CPP_STACKTRACES=0 python3 -c "$probe" $lib >/dev/null 2>&1; echo "$name (TORCH_SHOW_CPP_STACKTRACES=0): rc=$?"
}
variant default
variant cxx17 -DCAKEKV_CXX_STD=17
variant O0 -DCMAKE_BUILD_TYPE=Debug
variant static_off -DCMAKE_SHARED_LINKER_FLAGS=-shared-libgcc
variant stripped -DCMAKE_SHARED_LINKER_FLAGS=-s
# a backtrace of the crash, if it crashes
lib=$(ls /tmp/build-default/libcakekv_ops*.so)
timeout 120 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 -c "$probe" $lib > $OUT/gdb.txt 2>&1
grep -A40 "SIGSEGV\|SIGABRT\|signal" $OUT/gdb.txt | head -60
