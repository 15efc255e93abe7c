"""Prefill time on CPU of the shipped tiny model under each method (what a CPU user waits before the first
token): prints a markdown table and writes JSON.

  python benchmarks/bench_prefill_cpu.py --lengths 1536 3072 6144 --methods h2o snapkv --out results/prefill_cpu
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM

import cakekv
from cakekv.eval.models import tiny_model_path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1536, 3072, 6144])
    ap.add_argument("--methods", nargs="+", default=["h2o", "snapkv"])
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/prefill_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32).eval()
    rows = []
    print("| tokens | method | prefill s |\n|---|---|---|")
    for n in args.lengths:
        ids = torch.randint(5, 1000, (1, n), generator=torch.Generator().manual_seed(n))
        for method in args.methods:
            with torch.no_grad(), cakekv.compress(model, method=method, budget=args.budget, window=32):
                start = time.perf_counter()
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
                seconds = time.perf_counter() - start
            rows.append({"tokens": n, "method": method, "budget": args.budget, "threads": args.threads,
                         "prefill_s": seconds})
            print(f"| {n} | {method} | {seconds:.2f} |", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefill_cpu.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
