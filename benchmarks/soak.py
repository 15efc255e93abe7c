"""Soak: many compressed generations in one process, and one long generation with decode eviction.

On the shipped tiny Llama (or any local model), it checks what a long-lived serving or evaluation process
needs: (1) `--calls` compressed `generate` calls keep the process RSS (and, on CUDA, allocated memory) flat
and leave no cache alive; (2) a `--long`-token greedy generation with decode eviction keeps every layer's
cache bytes constant once the caps are reached; (3) the same generation twice gives identical tokens.
Prints a table, writes JSON (and a PNG with matplotlib) to --out.

  python benchmarks/soak.py --calls 1000 --long 4000 --out benchmarks/results/soak_cpu
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time

import torch
from transformers import AutoModelForCausalLM

import cakekv
from cakekv import cache_kwargs, cache_of
from cakekv.cache import CompressedCache

TINY = os.path.join(os.path.dirname(cakekv.__file__), "assets", "tiny-llama")


def rss_mib() -> float:
    """Resident set size now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_caches() -> int:
    gc.collect()
    return sum(type(o) is CompressedCache for o in gc.get_objects())  # type(): no __class__ hooks


def repeated_generate(model, calls: int, prompt_len: int, method: str, budget: int, every: int) -> list[dict]:
    """RSS, CUDA memory and live caches every `every` calls of a compressed greedy generate."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    samples = []
    for call in range(1, calls + 1):
        ids = torch.randint(5, model.config.vocab_size, (1, prompt_len), generator=g).to(device)
        with torch.no_grad(), cakekv.compress(model, method=method, budget=budget, window=8):
            model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        if call % every == 0 or call == 1:
            samples.append(dict(call=call, rss_mib=rss_mib(), live_caches=live_caches(),
                                cuda_mib=torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None))
    return samples


def long_generation(model, new_tokens: int, prompt_len: int, method: str, budget: int,
                    **options) -> tuple[list[int], list[int]]:
    """Greedy tokens of one long decode with decode eviction, and the cache's stored bytes after each step."""
    device = next(model.parameters()).device
    ids = torch.randint(5, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    tokens, stored = [], []
    with torch.no_grad(), cakekv.compress(model, method=method, budget=budget, window=8, **options):
        out = model(input_ids=ids.to(device), use_cache=True)
        cache = cache_of(out)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            tokens.append(int(token))
            out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            stored.append(sum(layer.storage.nbytes for layer in cache.layers))
    return tokens, stored


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=TINY)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--method", default="cake")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--long", type=int, default=4000)
    ap.add_argument("--out", default="results/soak")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    start = time.perf_counter()
    samples = repeated_generate(model, args.calls, args.prompt, args.method, args.budget, args.every)
    calls_s = time.perf_counter() - start
    tokens, stored = long_generation(model, args.long, args.prompt, args.method, args.budget)
    again, _ = long_generation(model, args.long, args.prompt, args.method, args.budget)
    steady = stored[len(stored) // 10:]  # past the first steps (the caps are reached at the first step)
    result = dict(
        model=args.model, device=args.device, method=args.method, budget=args.budget, calls=args.calls,
        calls_seconds=calls_s, samples=samples, rss_growth_mib=samples[-1]["rss_mib"] - samples[1]["rss_mib"]
        if len(samples) > 1 else 0.0, max_live_caches=max(s["live_caches"] for s in samples),
        long_tokens=args.long, stored_bytes_min=min(steady), stored_bytes_max=max(steady),
        identical_tokens=tokens == again, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("| calls | RSS MiB | live caches | CUDA MiB |\n|---|---|---|---|")
    for s in samples:
        cuda = "-" if s["cuda_mib"] is None else f"{s['cuda_mib']:.1f}"
        print(f"| {s['call']} | {s['rss_mib']:.1f} | {s['live_caches']} | {cuda} |")
    print(f"\nRSS growth after the first {args.every} calls: {result['rss_growth_mib']:.1f} MiB; "
          f"{args.long}-token generation: stored bytes {min(steady)}..{max(steady)} after step {len(stored) // 10}; "
          f"two runs identical: {result['identical_tokens']}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(dict(result, stored_bytes=stored), f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([s["call"] for s in samples], [s["rss_mib"] for s in samples], marker="o")
    a.set(xlabel="compressed generate calls", ylabel="process RSS (MiB)", title="repeated generate")
    b.plot(range(1, len(stored) + 1), [x / 1024 for x in stored])
    b.set(xlabel="decode step", ylabel="cache KiB (all layers)", title=f"{args.method} {args.budget}, decode eviction")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "soak.png"), dpi=120)


if __name__ == "__main__":
    main()
