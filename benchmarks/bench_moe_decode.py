"""Decode speed of mixture-of-experts families against a dense model of the same attention shape.

With transformers' default experts implementation a step is captured as a CUDA graph; with
`experts_implementation="eager"` the expert loop reads back which experts a step hit (`.nonzero()`), the capture
fails and cakekv decodes eagerly (with a warning, reported in the "captured" column). Random weights built on the
GPU, bf16; each family plain (transformers' own cache) and under `cake`.

  python benchmarks/bench_moe_decode.py --context 4096 --budget 512 --out results/moe
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM)

import cakekv

ATTENTION = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                 vocab_size=32000, max_position_embeddings=40960)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(intermediate_size=2816)),
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(intermediate_size=1408, num_local_experts=8,
                                                        num_experts_per_tok=2)),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(intermediate_size=1408, moe_intermediate_size=704,
                                                            shared_expert_intermediate_size=1408, num_experts=8,
                                                            num_experts_per_tok=2)),
}


def build(family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**ATTENTION, **extra, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_cls(config).to(torch.bfloat16)
    return model.eval()


def ms_per_token(model, ids, new_tokens, method, budget):
    """Decode ms per token: (time of prefill + new_tokens) - (time of prefill + 1 token), over new_tokens - 1."""
    def timed(n):
        ctx = cakekv.compress(model, method=method, budget=budget, window=32) if method else None
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            if ctx:
                ctx.__enter__()
            try:
                torch.cuda.synchronize()
                t = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                return time.perf_counter() - t, [str(w.message) for w in caught if "cakekv" in str(w.message)]
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)

    timed(4)  # warm-up
    one, _ = timed(1)
    full, notes = timed(new_tokens)
    return 1000 * (full - one) / (new_tokens - 1), notes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="results/moe_decode")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for family in FAMILIES:
        model = build(family)
        ids = torch.randint(3, ATTENTION["vocab_size"], (1, args.context), device="cuda")
        for method in (None, "cake"):
            ms, notes = ms_per_token(model, ids, args.new_tokens, method, args.budget)
            rows.append({"family": family, "method": method or "hf", "ms_per_token": round(ms, 3),
                         "eager_warning": any("eagerly" in n for n in notes)})
        del model
        torch.cuda.empty_cache()
    print(f"| family | method | ms/token | captured |  (context {args.context}, budget {args.budget}, "
          f"{torch.cuda.get_device_name()})")
    print("|---|---|---|---|")
    for r in rows:
        captured = "-" if r["method"] == "hf" else ("no (eager)" if r["eager_warning"] else "yes")
        print(f"| {r['family']} | {r['method']} | {r['ms_per_token']:.2f} | {captured} |")
    with open(os.path.join(args.out, "moe_decode.json"), "w") as f:
        json.dump({"args": vars(args), "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
