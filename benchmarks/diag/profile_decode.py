"""Where a decode step's time goes, per method: GPU kernel time of eager steps (torch.profiler, top
kernels) next to the wall time of captured steps. Diagnostic for the decode-speed work.

  python3 benchmarks/diag/profile_decode.py --context 8192 --methods snapkv cake adakv
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_generate import build_model, parse_method  # noqa: E402

import cakekv  # noqa: E402
from cakekv import cache_kwargs, cache_of  # noqa: E402
from cakekv import step_graph  # noqa: E402


def decode(model, cache, token, steps):
    for _ in range(steps):
        out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--methods", nargs="+", default=["snapkv", "cake", "adakv"])
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--shape", default="llama-3.1-8b")
    args = ap.parse_args()
    model = build_model(args.shape, args.context, "cuda", torch.bfloat16)
    ids = torch.randint(0, 1000, (1, args.context), device="cuda")
    for spec in args.methods:
        name, options = parse_method(spec)
        for graphs in ("0", "1"):
            os.environ[step_graph.ENV_SWITCH] = graphs
            with torch.no_grad(), cakekv.compress(model, method=name, budget=args.budget, window=32, **options):
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                cache = cache_of(out)
                token = decode(model, cache, out.logits[:, -1:].argmax(-1), 4)
                torch.cuda.synchronize()
                if graphs == "0":
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        decode(model, cache, token, args.steps)
                        torch.cuda.synchronize()
                    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
                    total = sum(e.self_device_time_total for e in events) / args.steps / 1000
                    count = sum(e.count for e in events) / args.steps
                    print(f"\n## {spec}: eager step GPU time {total:.2f} ms in {count:.0f} kernels")
                    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
                        print(f"  {e.self_device_time_total / args.steps / 1000:7.3f} ms {e.count / args.steps:6.0f}x  {e.key[:110]}")
                else:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    decode(model, cache, token, 16)
                    torch.cuda.synchronize()
                    replays = cache.step_graph.replays if cache.step_graph else -1
                    print(f"## {spec}: captured step {1000 * (time.perf_counter() - t0) / 16:.2f} ms/token "
                          f"(replays {replays})")
            del cache, out
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
