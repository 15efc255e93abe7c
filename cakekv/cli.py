"""The ``cakekv`` command line.

    cakekv methods [NAME ...]                    list the compression methods and their options (with
                                                 NAMEs: each option's type, default, constraint and doc)
    cakekv demo [--device cpu]                   facts hidden in a long document, answered by the shipped
                                                 tiny model with the full cache and compressed caches, then
                                                 every fact asked of one document compressed once
    cakekv generate --model PATH --method cake --budget 1024 --prompt-file F
                                                 one compressed generation with any local causal LM
    cakekv eval needle|synthetic|longbench ...   the evaluations (see `cakekv eval NAME --help`)
"""
from __future__ import annotations

import argparse
import contextlib
import random
import sys

from .defaults import QUERY_AGNOSTIC_METHOD

# Only what a command needs is imported, inside it: torch and transformers cost seconds, and help or
# argument errors need neither.


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
def cmd_methods(args) -> int:
    from .methods import available_methods, describe_options, get_method
    for name in args.names:
        get_method(name)  # an unknown name fails before anything is printed
    if not args.names:
        for name in available_methods():
            print(f"{name:<20} " + ", ".join(f"{o.name}={o.default!r}" for o in describe_options(name)))
        return 0
    for name in args.names:
        print(f"{name}:")
        for o in describe_options(name):
            kind = f"{o.type}, {o.constraint}" if o.constraint else o.type
            print(f"  {o.name}={o.default!r} ({kind}): {o.doc}")
    return 0


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------
DEMO_METHODS = ("full", "cake", "spancake", "snapkv", "streamingllm")


def _demo_table(rows, header=("method", "budget", "answer", "correct", "KV kept", "KV memory", "time")) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*map(str, r)) for r in rows]
    return "\n".join(out)


def cmd_demo(args) -> int:
    from .eval.args import parse_int_list, split_list
    from .arguments import check_arguments
    from .eval.runs import expand_runs
    from .methods import available_methods

    known = available_methods()
    methods = split_list(args.methods) if args.methods else [m for m in DEMO_METHODS if m in known]
    budgets = parse_int_list(args.budgets, "budgets")
    runs = expand_runs(methods, budgets, args.window)
    check_arguments(args.reuse_method, budgets[0], args.window)  # the last table's, before the model loads
    if args.length < 64:
        raise ValueError("length: the document needs at least 64 tokens")
    import torch  # after the checks: a mistyped flag fails at once
    if args.threads:
        torch.set_num_threads(args.threads)
    with _quiet_transformers():  # a clean table: no loading bars or length notices
        return _demo(args, runs, budgets[0])


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' notices and progress bars off for the block."""
    from transformers.utils import logging as hf_logging

    from .eval.models import no_progress_bars
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with no_progress_bars():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _demo(args, runs, reuse_budget: int) -> int:
    from .eval.generation import generate
    from .eval.haystack import TokenCounter, haystack_sentences
    from .eval.models import load_model
    from .eval.prompts import encode_prompt
    from .eval.report import fmt_bytes
    from .eval.synthetic import fact_sample, score_items
    model, tok = load_model(None, args.device, args.dtype)
    rng = random.Random(f"demo:{args.seed}")
    sample = fact_sample(TokenCounter(tok), haystack_sentences("essay", args.seed), args.length, rng,
                         depth=args.depth, n_facts=args.facts)
    encoded = encode_prompt(tok, sample.prompt(tok, chat=False), args.protocol)
    name, answer = sample.meta["name"], sample.expected[0]
    print(f"document: {encoded.full.numel()} tokens, {len(sample.meta['facts'])} facts hidden in it, e.g. "
          f"\"The secret code of {name} is {answer}.\" at {100 * args.depth:.0f}% depth")
    print(f"question: \"What is the secret code of {name}?\"   expected: {answer}   "
          f"(protocol {args.protocol}, window {args.window})\n")
    rows = []
    for run in runs:
        gen = generate(model, tok, encoded, method=run.method, budget=run.budget, window=args.window,
                       protocol=args.protocol, max_new_tokens=args.max_new_tokens)
        text = gen.text.strip().split("\n")[0]
        correct = score_items(gen.text, [answer]) == 1.0
        kept = (f"{sum(gen.kept_per_layer) / len(gen.kept_per_layer):.0f} / {gen.prompt_tokens}"
                if gen.kept_per_layer else "-")
        memory = (f"{fmt_bytes(gen.bytes_kept)} ({100 * gen.kv_fraction:.0f}%)"
                  if gen.kv_fraction is not None else "-")
        rows.append((run.method, run.budget if run.budget is not None else "-", text[:32],
                     "yes" if correct else "no", kept, memory, f"{gen.seconds:.2f}s"))
    print(_demo_table(rows))
    print("\nKV kept: entries per layer per KV head after the run (mean over layers) / prompt tokens; "
          "KV memory: K/V bytes of the entries kept after the run (% of a full cache of the same tokens).")
    if any(row[3] == "no" and row[1] != "-" for row in rows):
        print("A wrong answer that begins like the code is cut by token-level selection: the question's attention "
              "peaks on the fact's first tokens, so a method that ranks each token alone keeps those and evicts "
              "the rest of the value; spancake keeps the span after each peak (README, Methods).")
    print(f"\nOne document, every fact asked after it was compressed once with {args.reuse_method} at budget "
          f"{reuse_budget} (each question from its own copy of the compressed cache):\n")
    print(_demo_table(_demo_questions(args, model, tok, sample, reuse_budget),
                      ("question", "expected", "answer", "correct")))
    return 0


def _demo_questions(args, model, tok, sample, budget: int) -> list[tuple]:
    """Rows (question, expected, answer, correct) of each fact of `sample` asked of its document under the
    context-only protocol: one compressed prefill of the document, then each question from a clone of its cache
    (cakekv.pipeline's prefill_context and question_caches, through generate_batch)."""
    import dataclasses

    from .eval.generation import generate_batch
    from .eval.haystack import fact_question
    from .eval.prompts import encode_prompt
    from .eval.synthetic import score_items

    facts = sample.meta["facts"]
    asked = [dataclasses.replace(sample, after=after, answer_prefix=prefix)
             for after, prefix in (fact_question("secret code", name) for name in facts)]
    encoded = [encode_prompt(tok, s.prompt(tok, chat=False), "context-only") for s in asked]
    gens = generate_batch(model, tok, encoded, method=args.reuse_method, budget=budget, window=args.window,
                          protocol="context-only", max_new_tokens=args.max_new_tokens)
    return [(s.after.strip(), code, gen.text.strip().split("\n")[0][:32],
             "yes" if score_items(gen.text, [code]) == 1.0 else "no")
            for s, code, gen in zip(asked, facts.values(), gens)]


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .arguments import check_arguments, check_prefill_chunk
    from .eval.args import split_options
    from .eval.runs import FULL

    # the checks that need no torch first: a mistyped flag fails at once
    # full keeps everything: its budget means nothing and is not checked
    check_arguments(args.method, args.window + 1 if args.method == FULL else args.budget, args.window)
    check_prefill_chunk(args.prefill_chunk, args.window)
    split_options(args.option)
    if args.prompt_file == "-":
        prompt_text = sys.stdin.read()
    else:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt_text = f.read()
        except OSError as e:
            raise FileNotFoundError(f"prompt-file: cannot read {args.prompt_file!r}: {e.strerror or e}") from None
    from .eval.args import compress_options
    # the method's declarations (torch, not transformers)
    options = compress_options(args.option, [args.method], args.prefill_chunk, args.window)
    from .eval.generation import generate
    from .eval.models import load_model
    from .eval.prompts import encode_prompt, make_prompt, use_chat
    from .eval.report import fmt_bytes

    model, tok = load_model(args.model, args.device, args.dtype, args.attn_implementation)
    chat = use_chat(tok, args.chat)
    encoded = encode_prompt(tok, make_prompt(tok, "", prompt_text, "", chat=chat), "question-aware")
    gen = generate(model, tok, encoded, method=args.method, budget=None if args.method == FULL else args.budget,
                   window=args.window, protocol="question-aware", max_new_tokens=args.max_new_tokens,
                   options=options)
    print(gen.text)
    kept = f"{sum(gen.kept_per_layer) / len(gen.kept_per_layer):.0f}" if gen.kept_per_layer else "-"
    mem = (f"{fmt_bytes(gen.bytes_kept)} of {fmt_bytes(gen.bytes_before)} "
           f"({100 * gen.kv_fraction:.1f}%; {fmt_bytes(gen.bytes_after)} allocated)"
           if gen.kv_fraction is not None else "-")
    budget = "- (full cache)" if args.method == FULL else args.budget
    print(f"[cakekv] method {args.method}, budget {budget}, window {args.window}, chat {chat}: "
          f"{gen.prompt_tokens} prompt tokens, {len(gen.tokens)} new tokens, {kept} KV entries kept per layer "
          f"and KV head, KV memory {mem}, {gen.seconds:.2f} s", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .eval import longbench, needle, synthetic
    module = {"needle": needle, "synthetic": synthetic, "longbench": longbench}[args.task]
    module.run(args)
    return 0


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .eval import longbench, needle, synthetic
    from .eval.prompts import PROTOCOLS

    parser = argparse.ArgumentParser(prog="cakekv", description="KV-cache eviction (CAKE and siblings) for "
                                     "long-context inference with transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("methods", help="list the compression methods and their options")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="methods whose options to describe (type, default, constraint, doc)")
    p.set_defaults(func=cmd_methods, parser=p)

    p = sub.add_parser("demo", help="answer a question about a long document with the shipped tiny model, "
                                    "with the full cache and compressed caches")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"methods (default: those of {', '.join(DEMO_METHODS)} that are available)")
    p.add_argument("--budgets", nargs="+", default="128", help="KV budgets, e.g. 64,256 (default: %(default)s)")
    p.add_argument("--window", type=int, default=16, help="observation window (default: %(default)s)")
    p.add_argument("--length", type=int, default=2048, help="document length in tokens (default: %(default)s)")
    p.add_argument("--facts", type=int, default=4, help="facts hidden in the document (default: %(default)s)")
    p.add_argument("--depth", type=float, default=0.3,
                   help="where the asked fact sits, 0 = start, 1 = end (default: %(default)s)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="question-aware")
    p.add_argument("--reuse-method", default=QUERY_AGNOSTIC_METHOD,
                   help="method of the last table, every fact asked of one document compressed once at the first "
                        "budget (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_demo, parser=p)

    p = sub.add_parser("generate", help="generate with a compressed KV cache from any local causal LM")
    p.add_argument("--model", default=None, help="local model folder or cached Hugging Face id, loaded offline "
                                                 "(default: the shipped tiny model)")
    p.add_argument("--method", default="cake", help="compression method (default: %(default)s)")
    p.add_argument("--budget", type=int, default=1024,
                   help="KV entries kept per layer per KV head, window included (default: %(default)s)")
    p.add_argument("--window", type=int, default=32, help="observation window (default: %(default)s)")
    p.add_argument("--prompt-file", required=True, help="file with the prompt ('-' for stdin)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: %(default)s: cuda when "
                                                    "available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: %(default)s: the "
                                                   "model's on GPU, float32 on CPU)")
    p.add_argument("--attn-implementation", default=None, help="sdpa, eager or flash_attention_2 (default: the "
                                                               "model's, sdpa for most)")
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="wrap the prompt with the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (repeatable), e.g. --option decode_evict=False; Python or JSON spelling "
                        "(see `cakekv methods NAME`)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                   help="read a longer prompt this many tokens at a time, the cache cut back to the budget after "
                        "each chunk (default: one forward)")
    p.set_defaults(func=cmd_generate, parser=p)

    p = sub.add_parser("eval", help="run an evaluation: needle, synthetic or longbench")
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    for name, module, text in (("needle", needle, "needle in a haystack heatmap"),
                               ("synthetic", synthetic, "synthetic RULER-style tasks"),
                               ("longbench", longbench, "LongBench predictions and official metrics")):
        q = tasks.add_parser(name, help=text, description=module.__doc__.split("\n")[0])
        module.add_arguments(q)
        q.set_defaults(func=cmd_eval, parser=q)
    return parser


def main(argv=None) -> int:
    from .eval.args import check_ranges
    from .eval.errors import report_user_errors
    parser = build_parser()
    args = parser.parse_args(argv)
    check_ranges(args.parser, args)  # the subcommand's usage line with the error
    return report_user_errors(args.func)(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
