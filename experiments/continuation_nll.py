#!/usr/bin/env python
"""The language-modelling side of a compressed cache: mean negative log-likelihood (and perplexity) of a
text's last CONT tokens given its first LENGTH - CONT tokens compressed, per method and budget, against
the full cache. The prefix is prefilled (and compressed) alone, then the continuation runs as one chunk
over the compressed cache, so every continuation token sees the kept entries only. Texts: the `essay`
haystack (prose) shuffled with different seeds.

  python experiments/continuation_nll.py --methods full cake spancake spancake:span_weight=1.0 \\
      --budgets 128 512 --length 2048 --cont 256 --texts 4 --out results/nll

A method may carry options: `spancake:span_weight=1.0,span_after=8`.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cakekv  # noqa: E402
from cakekv import cache_kwargs, cache_of  # noqa: E402
from cakekv.eval import report  # noqa: E402
from cakekv.eval.args import parse_options  # noqa: E402
from cakekv.eval.haystack import haystack_sentences  # noqa: E402
from cakekv.eval.models import load_model  # noqa: E402


def text_ids(tok, length: int, seed: int) -> torch.Tensor:
    text = " ".join(haystack_sentences("essay", seed))[: 8 * length]  # >= 2 characters per token
    ids = tok(text, return_tensors="pt")["input_ids"]
    if ids.shape[1] < length:
        raise ValueError(f"length: the essay haystack has only {ids.shape[1]} tokens")
    return ids[:, :length]


@torch.no_grad()
def continuation_nll(model, ids: torch.Tensor, cont: int, method: str, budget: int, window: int, options) -> float:
    prefix, rest = ids[:, :-cont], ids[:, -cont:]
    with cakekv.compress(model, method=method, budget=budget, window=window, **options):
        cache = cache_of(model(input_ids=prefix, use_cache=True))
        logits = model(input_ids=rest, use_cache=True, **cache_kwargs(model, cache)).logits.float()
    targets = rest[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], targets[0], reduction="mean")
    return nll.item()


def write_report(out: str, rows: list[dict], info: dict) -> None:
    """results.json and results.md (NLL to 4 decimals: methods differ in the second)."""
    os.makedirs(out, exist_ok=True)
    report.write_json(os.path.join(out, "results.json"), {"info": info, "results": rows})
    full = next((r["nll"] for r in rows if r["budget"] is None), None)
    md = [f"# Continuation NLL ({info['texts']} essay texts of {info['length']} tokens, the last {info['cont']} "
          "scored)", "",
          report.markdown_table(["method", "budget", "mean NLL", "vs full", "perplexity"],
                                [[r["method"], r["budget"] or "-", f"{r['nll']:.4f}",
                                  "-" if full is None else f"{r['nll'] - full:+.4f}", f"{r['ppl']:.2f}"] for r in rows])]
    report.write_text(os.path.join(out, "results.md"), "\n".join(md))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["full", "cake", "spancake"])
    p.add_argument("--budgets", nargs="+", type=int, default=[128, 512])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--cont", type=int, default=256)
    p.add_argument("--texts", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="texts are the essay haystack shuffled with seeds seed, seed+1, ...")
    p.add_argument("--out", default="results/nll")
    args = p.parse_args(argv)
    model, tok = load_model(None, "cpu", "float32", None)
    texts = [text_ids(tok, args.length, args.seed + i) for i in range(args.texts)]
    rows = []
    for spec in args.methods:
        name, _, opts = spec.partition(":")
        options = parse_options([o for o in opts.split(",") if o], [name])
        for budget in ([args.budgets[0]] if name == "full" else args.budgets):
            nlls = [continuation_nll(model, ids, args.cont, name, budget, args.window, options) for ids in texts]
            mean = sum(nlls) / len(nlls)
            rows.append({"method": spec, "budget": None if name == "full" else budget, "nll": round(mean, 4),
                         "ppl": round(math.exp(mean), 3), "per_text": [round(x, 4) for x in nlls]})
            print(rows[-1], flush=True)
    write_report(args.out, rows, {"length": args.length, "cont": args.cont, "texts": args.texts, "seed": args.seed,
                                  "window": args.window, "model": "cakekv/tiny-llama"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
