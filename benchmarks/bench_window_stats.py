"""Benchmark: cakekv's fused window_stats op vs the eager PyTorch equivalent, on CUDA.

Shape of Llama-3.1-8B (H=32, Hkv=8, D=128, bf16) with a Q=32 observation window, for several cache
lengths N. For each N it reports the median time over repeats (CUDA events, after warm-up), the peak
memory allocated on top of the inputs (torch.cuda.max_memory_allocated delta), the K-read floor
(bytes of K / 3.0e12 B/s, the time to stream K once from HBM) and the largest absolute difference between
the op's outputs and the eager ones. Prints a markdown table and writes results.json (and, when matplotlib
is importable, window_stats.png) to --out.

    python benchmarks/bench_window_stats.py [--sizes 4096,32768,131072] [--out results/bench_window_stats]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import torch

import cakekv._ops as cakekv_ops

HBM_BYTES_PER_S = 3.0e12


def eager_window_stats(q, k, q_pos, k_pos, scale):
    """The usual eager implementation: repeat K over the query heads, fp32 logits of all heads, mask,
    softmax, then mean / unbiased variance / entropy over the window queries. Materialises [B, H, Q, N]."""
    B, H, Q, D = q.shape
    G = H // k.shape[1]
    k_rep = k.repeat_interleave(G, dim=1)  # [B, H, N, D]
    logits = torch.matmul(q.float(), k_rep.float().transpose(-1, -2)) * scale  # [B, H, Q, N]
    kp = k_pos.repeat_interleave(G, dim=1)[:, :, None, :]  # [B, H, 1, N]
    visible = (kp >= 0) & (kp <= q_pos[:, None, :, None])
    attn = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    attn = torch.nan_to_num(attn, nan=0.0)  # queries that see no key: all-zero rows
    mean = attn.mean(dim=2)
    var = attn.var(dim=2) if Q > 1 else torch.zeros_like(mean)
    ent = -(attn * torch.log(attn + 1e-10)).sum(dim=2)
    return mean, var, ent


def cakekv_window_stats(q, k, q_pos, k_pos, scale):
    return cakekv_ops.window_stats(q, k, q_pos, k_pos, scale)


def time_ms(fn, warmup, repeats):
    """Median milliseconds of fn() over `repeats` runs (CUDA events, after `warmup` runs)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_mb(fn):
    """Peak memory allocated while fn() runs, above what was allocated before (MiB); returns (MiB, output)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, out


def bench_one(N, args, dtype):
    B, H, Hkv, D, Q = 1, args.heads, args.kv_heads, args.head_dim, args.window
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, Q, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype, generator=g)
    k_pos = torch.arange(N, device="cuda").expand(B, Hkv, N).contiguous()
    q_pos = torch.arange(N - Q, N, device="cuda").expand(B, Q).contiguous()  # the last Q prompt tokens
    scale = D ** -0.5
    row = {"N": N, "B": B, "H": H, "Hkv": Hkv, "D": D, "Q": Q, "dtype": str(dtype).replace("torch.", "")}
    k_bytes = k.numel() * k.element_size()
    row["k_read_floor_ms"] = k_bytes / HBM_BYTES_PER_S * 1e3

    run_op = lambda: cakekv_window_stats(q, k, q_pos, k_pos, scale)  # noqa: E731
    row["cakekv_mb"], op_out = peak_extra_mb(run_op)
    row["cakekv_ms"] = time_ms(run_op, args.warmup, args.repeats)

    run_eager = lambda: eager_window_stats(q, k, q_pos, k_pos, scale)  # noqa: E731
    try:
        row["eager_mb"], eager_out = peak_extra_mb(run_eager)
        row["eager_ms"] = time_ms(run_eager, args.warmup, args.repeats)
        for name, a, b in zip(("mean", "var", "entropy"), op_out, eager_out):
            row[f"max_abs_diff_{name}"] = (a - b).abs().max().item()
        row["speedup"] = row["eager_ms"] / row["cakekv_ms"]
    except torch.cuda.OutOfMemoryError:
        row.update(eager_mb=None, eager_ms=None, speedup=None)
        eager_out = None
    del eager_out, op_out
    torch.cuda.empty_cache()
    return row


def fmt(x, spec, missing="OOM"):
    return missing if x is None else format(x, spec)


def markdown(rows):
    head = ("| N | cakekv ms | eager ms | speedup | cakekv extra MiB | eager extra MiB | K-read floor ms "
            "| max abs diff mean / var / entropy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        diffs = " / ".join(fmt(r.get(f"max_abs_diff_{n}"), ".1e", "n/a") for n in ("mean", "var", "entropy"))
        lines.append(f"| {r['N']} | {r['cakekv_ms']:.3f} | {fmt(r['eager_ms'], '.3f')} | "
                     f"{fmt(r['speedup'], '.1f')}{'' if r['speedup'] is None else 'x'} | {r['cakekv_mb']:.1f} | "
                     f"{fmt(r['eager_mb'], '.1f')} | {r['k_read_floor_ms']:.4f} | {diffs} |")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ns = [r["N"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    ax_t.plot(ns, [r["cakekv_ms"] for r in rows], "o-", label="cakekv window_stats")
    eager = [(r["N"], r["eager_ms"]) for r in rows if r["eager_ms"] is not None]
    if eager:
        ax_t.plot(*zip(*eager), "s-", label="eager PyTorch")
    ax_t.plot(ns, [r["k_read_floor_ms"] for r in rows], "k--", label="K-read floor (3 TB/s)")
    ax_t.set(xscale="log", yscale="log", xlabel="cache length N", ylabel="ms (median)", title="time")
    ax_t.legend()
    width = 0.38
    xs = range(len(rows))
    ax_m.bar([x - width / 2 for x in xs], [r["cakekv_mb"] for r in rows], width, label="cakekv")
    ax_m.bar([x + width / 2 for x in xs], [r["eager_mb"] or 0.0 for r in rows], width, label="eager")
    ax_m.set(xticks=list(xs), xticklabels=[str(n) for n in ns], xlabel="cache length N", ylabel="MiB",
             yscale="log", title="peak extra memory")
    ax_m.legend()
    r0 = rows[0]
    fig.suptitle(f"window_stats, H={r0['H']} Hkv={r0['Hkv']} D={r0['D']} Q={r0['Q']} {r0['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4096,32768,131072", help="comma-separated cache lengths N")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="results/bench_window_stats")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_window_stats: needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    rows = [bench_one(int(n), args, dtype) for n in args.sizes.split(",")]

    print(f"\nwindow_stats on {torch.cuda.get_device_name()}: B=1 H={args.heads} Hkv={args.kv_heads} "
          f"D={args.head_dim} Q={args.window} {args.dtype}\n")
    print(markdown(rows))
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "hbm_bytes_per_s": HBM_BYTES_PER_S, "warmup": args.warmup, "repeats": args.repeats}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    wrote_png = plot(rows, os.path.join(args.out, "window_stats.png"))
    print(f"\nwrote {args.out}/results.json" + (" and window_stats.png" if wrote_png else " (no matplotlib: no PNG)"))
    worst = max((r.get(f"max_abs_diff_{n}") or 0.0) for r in rows for n in ("mean", "var", "entropy"))
    print(f"largest |cakekv - eager| over all outputs: {worst:.2e}" + ("" if math.isfinite(worst) else " (!)"))


if __name__ == "__main__":
    main()
