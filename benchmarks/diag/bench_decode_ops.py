"""GPU time per call of the decode ops on one layer of random segments, timed as a CUDA graph of `--iters`
calls (no launch overhead: what a captured decode step pays): ragged_attention without and with its
weights, SDPA over the same entries as a padded layer (what a non-evicting layer runs), evict_lowest on
the weights, append_entries. Llama-3.1-8B-like heads (32 query heads over 8 KV heads, head dim 128),
`--entries` per segment, every segment one over its cap (a decode step's eviction).

  python3 benchmarks/diag/bench_decode_ops.py --entries 1056 4128 --batch 1 8
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import cakekv._ops as ops


def segments(batch, kv_heads, entries, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    segs = batch * kv_heads
    pos = torch.cat([torch.randperm(entries, generator=g) for _ in range(segs)]).to(device)
    offsets = (torch.arange(segs + 1) * entries).to(device)
    k = torch.randn(segs * entries, 128, generator=g).to(device, dtype)
    v = torch.randn(segs * entries, 128, generator=g).to(device, dtype)
    return k, v, pos, offsets


def timed(fn, iters):
    """Microseconds per call of `fn`, replayed from a CUDA graph of `iters` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, nargs="+", default=[1056, 4128])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--q-len", type=int, default=1)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype, dev, rows = torch.bfloat16, "cuda", []
    print("| batch | entries/segment | ragged_attention us | with weights us | SDPA (padded) us | evict_lowest us "
          "| append_entries us |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch:
        for n in args.entries:
            k, v, pos, offsets = segments(batch, 8, n, dev, dtype)
            q = torch.randn(batch, 32, args.q_len, 128, device=dev, dtype=dtype)
            q_pos = torch.full((batch, args.q_len), n + 10, device=dev) + torch.arange(args.q_len, device=dev)
            order = ops.position_order(pos, offsets)
            over = torch.full((batch, 8), 1 << 40, device=dev)  # never runs out: every call evicts
            work = pos.clone()
            kp, vp = k.view(batch, 8, n, 128), v.view(batch, 8, n, 128)

            attn_us = timed(lambda: ops.ragged_attention(q, k, v, pos, offsets, q_pos, 0.088), args.iters)
            weighted_us = timed(lambda: ops.ragged_attention_with_weights(q, k, v, pos, offsets, q_pos, 0.088),
                                args.iters)
            sdpa_us = timed(lambda: F.scaled_dot_product_attention(q, kp, vp, scale=0.088, enable_gqa=True),
                            args.iters)
            _, weights = ops.ragged_attention_with_weights(q, k, v, pos, offsets, q_pos, 0.088)

            def evict():
                ops.evict_lowest(weights, work, order, offsets, q_pos, over, 200.0, 32, 5, "avg", args.q_len)

            evict_us = timed(evict, args.iters)  # evicts iters * q_len entries of n: scores stay comparable
            free = pos.clone()
            free.view(batch * 8, n)[:, :args.q_len] = -1
            new = torch.randn(batch, 8, args.q_len, 128, device=dev, dtype=dtype)

            def append():
                free.view(batch * 8, n)[:, :args.q_len] = -1  # the same free slots each call
                ops.append_entries(k, v, free, offsets, new, new, q_pos)

            append_us = timed(append, args.iters)
            rows.append(dict(batch=batch, entries=n, attention_us=attn_us, attention_weights_us=weighted_us,
                             sdpa_us=sdpa_us, evict_us=evict_us, append_us=append_us))
            print(f"| {batch} | {n} | {attn_us:.1f} | {weighted_us:.1f} | {sdpa_us:.1f} | {evict_us:.1f} "
                  f"| {append_us:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
