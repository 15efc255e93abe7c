#!/usr/bin/env bash
# official=True against the default, per method, on the shipped tiny model (CPU, one thread): needle grid
# (lengths 1K/2K/4K x depths 0-100%, one needle per cell), budgets 128 and 256. Usage:
#   bash benchmarks/results/fidelity_cpu/run.sh OUT [METHOD ...]
# then `python benchmarks/results/fidelity_cpu/summarize.py OUT > benchmarks/results/fidelity_cpu/results.md`.
set -euo pipefail
out=${1:?usage: run.sh OUT [METHOD ...]}; shift
methods=("${@:-adakv cake lava defensivekv layer_defensivekv pyramidkv}")
export OMP_NUM_THREADS=1
grid=(--lengths 1024 2048 4096 --depths 0 25 50 75 100 --samples 1 --budgets 128 256 --device cpu --no-progress)
for m in ${methods[@]}; do
  python -m cakekv.cli eval needle "${grid[@]}" --methods "$m" --out "$out/$m-default"
  python -m cakekv.cli eval needle "${grid[@]}" --methods "$m" --option official=True --out "$out/$m-official"
done
# the DefensiveKV protected-set count alone (official=False, the official count)
if [[ " ${methods[*]} " == *" defensivekv "* ]]; then
  python -m cakekv.cli eval needle "${grid[@]}" --methods defensivekv --option protected_set=below \
    --out "$out/defensivekv-below"
fi
