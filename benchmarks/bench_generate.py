"""Prefill time, decode speed and peak memory of `generate`: full cache vs cakekv methods and budgets.

Random weights of a real model shape (default: Llama-3.1-8B, bf16) built directly on the GPU, so no
download is needed; speed and memory do not depend on the weights. Prints a markdown table and writes
JSON (and a PNG when matplotlib is available) to --out.

  python benchmarks/bench_generate.py --contexts 32768 --budgets 512 1024 2048 --out results/bench_generate

A method may carry options: `cake:head_budgets=true,decode_evict=false`, and `prefill_chunk=N` (compress's chunked
prefill: `cake:prefill_chunk=8192`). Two baselines are measured in
the same run: `hf` (plain transformers, full DynamicCache, the same decode loop) and `hf-static-short`
(transformers' StaticCache with its compiled decode, `generate(cache_implementation="static")`, on a
prompt of `budget` tokens: what a short cache costs at best). Decode steps over a cakekv cache run as
CUDA graphs (set CAKEKV_CUDA_GRAPHS=0 to measure them eagerly). `--batch B` runs B rows, left-padded to
lengths spread over [0.9, 1] x context.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import cakekv
from cakekv import cache_kwargs, cache_of
from cakekv.eval.common import parse_options

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def build_model(shape: str, max_len: int, device: str, dtype):
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_len + 1024, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def parse_method(spec: str) -> tuple[str, dict]:
    """`name[:key=value,...]` -> (name, keyword arguments of compress: the method's options and `prefill_chunk`)."""
    name, _, opts = spec.partition(":")
    items = [o for o in opts.split(",") if o]
    chunk = [o for o in items if o.startswith("prefill_chunk=")]
    options = parse_options([o for o in items if o not in chunk])
    return name, options | ({"prefill_chunk": int(chunk[-1].partition("=")[2])} if chunk else {})


def run_hf_static_short(model, ids, budget, new_tokens):
    """transformers' best decode on a short cache: StaticCache + its compiled step, prompt of `budget`."""
    prompt = ids[:, -budget:]
    kwargs = dict(do_sample=False, cache_implementation="static", pad_token_id=0)

    def timed(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        assert out.shape[1] == prompt.shape[1] + n
        return time.perf_counter() - t0

    timed(new_tokens + 1), timed(new_tokens + 1)  # compile, warm
    one, many = timed(1), timed(new_tokens + 1)
    decode_s = many - one
    return dict(method="hf-static-short", budget=budget, ragged_layers=0, graph_replays=-1, first_steps_s=float("nan"), prefill_s=one,
                decode_ms_per_token=1000 * decode_s / new_tokens, tokens_per_s=ids.shape[0] * new_tokens / decode_s,
                peak_gib=float("nan"), kv_gib=float("nan"))


def left_padded(ids, batch):
    """`batch` rows of lengths spread over [0.9, 1] x n, left-padded to n (row 0 full)."""
    n = ids.shape[1]
    rows = ids.expand(batch, n).clone()
    mask = torch.ones_like(rows)
    for b in range(1, batch):
        mask[b, : int(n * 0.1 * b / batch)] = 0
    return rows, mask


WARM_STEPS = 3


def run_one(model, ids, spec, budget, window, new_tokens, mask=None):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    method, options = parse_method(spec)
    ctx = (cakekv.compress(model, method=method, budget=budget, window=window, **options)
           if method != "hf" else None)
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            prefill_s = time.perf_counter() - t0
            cache = cache_of(out)
            token = out.logits[:, -1:].argmax(-1)

            def decode(steps):
                nonlocal out, token, mask
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(steps):
                    if mask is not None:
                        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                    out = model(input_ids=token, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
                    token = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                return time.perf_counter() - t0

            # The first steps warm up and capture the decode step (once per generate); timed apart.
            first_steps_s = decode(WARM_STEPS)
            decode_s = decode(new_tokens)
        kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        ragged = sum(bool(getattr(layer, "ragged", False)) for layer in cache.layers)
        graph = getattr(cache, "step_graph", None)
        graph_replays = -1 if graph is None or graph.failed else graph.replays  # -1: eager decode
    finally:
        if ctx is not None:
            ctx.remove()
    peak = torch.cuda.max_memory_allocated() - base
    del cache, out
    return dict(method=spec, budget=budget, ragged_layers=ragged, graph_replays=graph_replays, prefill_s=prefill_s, first_steps_s=first_steps_s, decode_ms_per_token=1000 * decode_s / new_tokens,
                tokens_per_s=ids.shape[0] * new_tokens / decode_s, peak_gib=peak / 2**30, kv_gib=kv_bytes / 2**30)


def table_row(r: dict) -> str:
    return (f"| {r['context']} | {r['batch']} | {r['method']} | {r['budget']} | {r['prefill_s']:.2f} | "
            f"{r['decode_ms_per_token']:.1f} | {r['tokens_per_s']:.1f} | {r['peak_gib']:.2f} | {r['kv_gib']:.3f} | "
            f"{r['ragged_layers']} | {r.get('graph_replays', -1)} | {r.get('first_steps_s', float('nan')):.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768])
    ap.add_argument("--methods", nargs="+", default=["full", "cake", "snapkv"])
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-static-baseline", action="store_true", help="skip hf-static-short (compiles for minutes)")
    ap.add_argument("--no-hf-baseline", action="store_true", help="skip hf, the full cache (past the GPU's memory at "
                                                                   "long prompts)")
    ap.add_argument("--out", default="results/bench_generate")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = build_model(args.shape, max(args.contexts), "cuda", torch.bfloat16)
    rows = []
    for n in args.contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
        ids, mask = left_padded(ids, args.batch) if args.batch > 1 else (ids, None)
        run_one(model, ids[:, -2048:], "hf", 0, args.window, 4)  # warm-up
        configs = [] if args.no_hf_baseline else [("hf", None)]
        configs += [(m, None) for m in args.methods if m == "full"]
        configs += [(m, b) for m in args.methods if m != "full" for b in args.budgets]
        for method, budget in configs:
            row = run_one(model, ids, method, budget or args.window + 1, args.window, args.new_tokens, mask)
            row.update(context=n, batch=args.batch, method=method, budget=budget)
            rows.append(row)
            print(table_row(row), flush=True)
            write_results(args, rows)
        if not args.no_static_baseline:
            for budget in args.budgets:
                row = run_hf_static_short(model, ids, budget, args.new_tokens)
                row.update(context=n, batch=args.batch)
                rows.append(row)
                print(table_row(row), flush=True)
                write_results(args, rows)
    write_results(args, rows)


def write_results(args, rows):
    """Table, JSON and PNG of the rows so far (written after every row: a long run keeps what it measured)."""
    header = ("| context | batch | method | budget | prefill s | decode ms/token | tokens/s | peak GiB (over weights) "
              "| KV GiB | ragged layers | graph replays | first 3 steps s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(map(table_row, rows))
    import transformers
    meta = dict(shape=args.shape, device=torch.cuda.get_device_name(), torch=torch.__version__,
                transformers=transformers.__version__, window=args.window, new_tokens=args.new_tokens,
                cuda_graphs=os.environ.get("CAKEKV_CUDA_GRAPHS", "1") != "0")
    with open(os.path.join(args.out, "bench_generate.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "bench_generate.md"), "w") as f:
        f.write(table + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        labels = [f"{r['method']}\n{r['budget'] or ''}\n{r['context'] // 1024}K" for r in rows]
        rows_mem = [r["peak_gib"] if r["peak_gib"] == r["peak_gib"] else 0.0 for r in rows]
        axes[0].bar(labels, [r["decode_ms_per_token"] for r in rows])
        axes[0].set_ylabel("decode ms / token")
        axes[1].bar(labels, rows_mem)
        axes[1].set_ylabel("peak GiB over weights")
        for ax in axes:
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle(f"{args.shape}, bf16, {meta['device']}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench_generate.png"), dpi=120)
        plt.close(fig)
    except ImportError:
        pass




if __name__ == "__main__":
    main()
