"""Context-only evaluation, one prefill per question (the old path) against one prefill per context (the
shared path), on a small LongBench-shaped run of the shipped tiny model on CPU: prints a markdown table
and writes JSON + markdown.

Each context is a document of fact lines ("The secret code of NAME is CODE.") in filler text, asked one
question per fact through a LongBench template (hotpotqa's by default, its official answer length).
The old path is ``generate_batch`` called with one prompt at a time (each prompt prefills its context);
the shared path is one ``generate_batch`` call over all prompts (the prompts of a context share its
prefill). The two give the same answers (checked on every run); times are medians over ``--repeats``
interleaved runs; "new: sum of row s" is the sum of the shared path's per-row ``seconds`` (each row's share
of its context's prefill plus its own continuation), which should be close to its wall time.

  python benchmarks/bench_context_only.py --out benchmarks/results/context_only_cpu
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

from cakekv.eval import generation, haystack, longbench, models, prompts, report, synthetic


def longbench_prompts(tok, dataset: str, contexts: int, questions: int, length: int, seed: int):
    """(encoded context-only prompts, expected codes): ``contexts`` documents of about ``length``
    tokens with ``questions`` facts each, one LongBench example per fact, in the file's usual order
    (a context's questions one after another)."""
    counter = haystack.TokenCounter(tok)
    sentences = haystack.haystack_sentences("essay", seed)
    chat = prompts.use_chat(tok, "auto")
    encoded, codes = [], []
    for c in range(contexts):
        sample = synthetic.fact_sample(counter, sentences, length, random.Random(f"{seed}:{c}"), n_facts=questions)
        for name, code in sample.meta["facts"].items():
            example = {"context": sample.context, "input": f"What is the secret code of {name}?"}
            prompt, _ = longbench.build_prompt(tok, example, dataset, max_length=None, chat=chat)
            encoded.append(prompts.encode_prompt(tok, prompt, "context-only"))
            codes.append(code)
    return encoded, codes


HEADER = ["method", "budget", "contexts", "questions", "prefills old", "prefills new", "old s", "new s", "speed-up",
          "new: sum of row s", "codes found"]


def table_row(r: dict) -> list:
    return [r["method"], r["budget"], r["contexts"], r["questions"], r["prefills_old"], r["prefills_new"], r["old_s"],
            r["new_s"], f"{r['speedup']:.2f}x", r["new_row_seconds_sum"], f"{r['codes_found']}/{r['questions']}"]


def timed(call):
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="hotpotqa", help="LongBench template and answer length")
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--questions", type=int, default=4, help="questions per context")
    ap.add_argument("--length", type=int, default=2048, help="context length in tokens (about)")
    ap.add_argument("--methods", nargs="+", default=["full", "snapkv", "cake"])
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/context_only_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load_model(None, "cpu", "float32")
    encoded, codes = longbench_prompts(tok, args.dataset, args.contexts, args.questions, args.length, args.seed)
    assert len(prompts.context_groups(encoded)) == args.contexts
    kw = dict(window=args.window, protocol="context-only", max_new_tokens=longbench.DATASET2MAXLEN[args.dataset])
    rows = []
    print(report.markdown_table(HEADER, []), flush=True)
    for method in args.methods:
        budget = None if method == "full" else args.budget
        run = dict(kw, method=method, budget=budget)
        old_times, new_times, row_sums = [], [], []
        for _ in range(args.repeats):  # interleaved, so that a busy machine slows both alike
            old_s, old = timed(lambda: [generation.generate_batch(model, tok, [e], **run)[0] for e in encoded])
            new_s, new = timed(lambda: generation.generate_batch(model, tok, encoded, **run))
            if [g.tokens for g in old] != [g.tokens for g in new]:
                raise AssertionError(f"{method}: the shared prefill changed an answer")
            old_times.append(old_s)
            new_times.append(new_s)
            row_sums.append(sum(g.seconds for g in new))
        row = {"method": method, "budget": budget, "contexts": args.contexts, "questions": len(encoded),
               "context_tokens": statistics.mean(e.context.numel() for e in encoded),
               "question_tokens": statistics.mean(e.question.numel() for e in encoded),
               "new_tokens": statistics.mean(len(g.tokens) for g in new),
               "prefills_old": report.prefill_count(g.questions_per_prefill for g in old),
               "prefills_new": report.prefill_count(g.questions_per_prefill for g in new),
               "old_s": statistics.median(old_times), "new_s": statistics.median(new_times),
               "old_s_runs": old_times, "new_s_runs": new_times, "new_row_seconds_sum": statistics.median(row_sums),
               "codes_found": sum(code in g.text for g, code in zip(new, codes))}
        row["speedup"] = row["old_s"] / row["new_s"]
        rows.append(row)
        print(report.markdown_table(HEADER, [table_row(row)]).splitlines()[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    info = report.environment_info(command="python " + " ".join(sys.argv), threads=args.threads,
                                   load_average=os.getloadavg(), **{k: v for k, v in vars(args).items()
                                                                    if k not in ("out", "threads")})
    report.write_json(os.path.join(args.out, "bench_context_only.json"), {"info": info, "rows": rows})
    table = report.markdown_table(HEADER, [table_row(r) for r in rows])
    report.write_text(os.path.join(args.out, "bench_context_only.md"),
                      f"# Context-only: one prefill per question (old) vs per context (new)\n\n`{info['command']}`\n\n"
                      f"{table}\n\n{args.threads} thread(s) on a machine of {os.cpu_count()} CPUs, load average "
                      f"{info['load_average'][0]:.1f} at the end (other jobs share the CPUs: absolute times vary, "
                      "the two paths are interleaved so that both see the same load)\n")


if __name__ == "__main__":
    main()
