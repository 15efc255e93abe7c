"""Synthetic RULER-style long-context tasks, generated offline from a seed and scored exactly.

Tasks (:data:`TASKS`), each at a target prompt length in tokens:

* ``niah_single`` -- one needle "One of the special magic numbers for KEY is: VALUE." in a haystack;
  asked for KEY's number.
* ``niah_multikey`` -- four needles with different keys; asked for one key's number.
* ``niah_multivalue`` -- four needles with the same key and different numbers; asked for all of them.
* ``niah_multiquery`` -- four needles with different keys; asked for all four keys' numbers.
* ``variable_tracking`` -- a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops) and a distractor
  chain scattered in the haystack; asked for every variable holding the value.
* ``common_words`` -- a numbered list of words where 10 words appear 30 times and the others 3
  times (fewer when the length is short); asked for the 10 most common.

Score of a sample: the fraction of the expected items found in the greedy answer (an item counts
when it occurs as a whole word/number, case-insensitive). Task score: 100 x the mean over samples.

Haystacks and needle texts: :mod:`.haystack` (``noise``, ``essay`` or a text file).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
from typing import Any, Sequence

from . import report
from .args import add_common_arguments, parse_lengths, script_main, setup_from_args, split_list
from .haystack import (ADJECTIVES, MAGIC_INTRO, NOUNS, TokenCounter, check_haystack, distinct, fact_needle,
                       fact_question, haystack_sentences, hide_needles, magic_needle, magic_question, person_name,
                       random_code, random_key)
from .plots import plot_scores_vs_budget
from .prompts import Prompt, make_prompt
from .runs import Run, Setup, evaluate_items

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
         "common_words")


# ----------------------------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sample:
    task: str
    before: str           # instruction before the context
    context: str          # the haystack with the needles (compressed first under context-only)
    after: str            # the question
    answer_prefix: str    # appended after the (chat-wrapped) question
    expected: list[str]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def prompt(self, tokenizer, chat: bool) -> Prompt:
        return make_prompt(tokenizer, self.before, self.context, self.after, chat=chat,
                           answer_prefix=self.answer_prefix)


def variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def niah_sample(task: str, counter: TokenCounter, sentences: Sequence[str], length: int, rng: random.Random,
                depth: float | None = None, n_needles: int = 4) -> Sample:
    def keys(n):
        return distinct(n, lambda: random_key(rng))

    if task == "niah_single":
        asked, values = keys(1), [random_code(rng)]
        pairs = list(zip(asked, values))
    elif task == "niah_multikey":
        all_keys = keys(n_needles)
        pairs, asked = [(k, random_code(rng)) for k in all_keys], all_keys[:1]
    elif task == "niah_multivalue":
        asked = keys(1)
        pairs = [(asked[0], v) for v in dict.fromkeys(random_code(rng) for _ in range(n_needles))]
    elif task == "niah_multiquery":
        asked = keys(n_needles)
        pairs = [(k, random_code(rng)) for k in asked]
    else:
        raise ValueError(f"task: unknown needle task {task!r}")
    needles = [magic_needle(k, v) for k, v in pairs]
    rng.shuffle(needles)
    expected = [v for k, v in pairs if k in asked]
    who = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    after, prefix = magic_question(who, many=len(expected) > 1)
    context = hide_needles(needles, (MAGIC_INTRO, after, prefix), counter=counter, sentences=sentences,
                           length=length, rng=rng, depth=depth if len(needles) == 1 else None)
    return Sample(task, MAGIC_INTRO, context, after, prefix, expected,
                  {"keys": asked, "needles": needles, "depth": depth})


def fact_sample(counter: TokenCounter, sentences: Sequence[str], length: int, rng: random.Random,
                depth: float | None = None, n_facts: int = 1, attribute: str = "secret code",
                digits: int = 5) -> Sample:
    """A needle in the format of the shipped tiny model: fact lines "The secret code of NAME is
    CODE." in filler lines, asked "What is the secret code of NAME? The secret code of NAME is". The
    first fact (the one asked) goes at ``depth``, the others at random lines."""
    names = distinct(n_facts, lambda: person_name(rng))
    codes = [random_code(rng, digits) for _ in names]
    facts = [fact_needle(attribute, n, c) for n, c in zip(names, codes)]
    after, prefix = fact_question(attribute, names[0])
    context = hide_needles(facts, (after, prefix), counter=counter, sentences=sentences, length=length, rng=rng,
                           depth=0.5 if depth is None else depth, joiner="\n")
    return Sample("fact", "", context, after, prefix, [codes[0]],
                  {"name": names[0], "facts": dict(zip(names, codes)), "depth": depth})


def variable_tracking_sample(counter: TokenCounter, sentences: Sequence[str], length: int, rng: random.Random,
                             hops: int = 4, chains: int = 2) -> Sample:
    used: set[str] = set()

    def fresh():
        while True:
            v = variable_name(rng)
            if v not in used:
                used.add(v)
                return v

    all_chains = []
    values = list(dict.fromkeys(random_code(rng, 5) for _ in range(chains * 2)))[:chains]
    for value in values:
        names = [fresh() for _ in range(hops + 1)]
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        all_chains.append((value, names, lines))
    # interleave the chains, keeping each chain's order
    order = [c for c, (_, _, lines) in enumerate(all_chains) for _ in lines]
    rng.shuffle(order)
    cursor = [0] * len(all_chains)
    needles = []
    for c in order:
        needles.append(all_chains[c][2][cursor[c]])
        cursor[c] += 1
    value, names, _ = all_chains[0]
    before = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    after = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
              f"variables are assigned the value {value}, they are:")
    context = hide_needles(needles, (before, after, prefix), counter=counter, sentences=sentences,
                           length=length, rng=rng)
    return Sample("variable_tracking", before, context, after, prefix, list(names),
                  {"value": value, "chains": [c[1] for c in all_chains]})


def _pseudo_words(rng: random.Random):
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    while True:
        yield "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))


def common_words_sample(counter: TokenCounter, length: int, rng: random.Random, n_common: int = 10,
                        freq_common: int = 30, freq_rare: int = 3) -> Sample:
    pool = list(dict.fromkeys(ADJECTIVES + NOUNS))
    rng.shuffle(pool)
    common_words, rare_words = pool[:n_common], pool[n_common:]
    extra = _pseudo_words(random.Random(rng.random()))
    shuffle_seed = rng.random()
    before = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.\n")
    after = f"\nQuestion: What are the {n_common} most common words in the above list?"
    prefix = f" Answer: The top {n_common} words that appear most often in the list are:"
    overhead = counter(before) + counter(after) + counter(prefix) + 8

    def words_for(n_rare, f_common):
        while len(rare_words) < n_rare:  # past the real words: pronounceable pseudo-words
            w = next(extra)
            if w not in pool and w not in rare_words:
                rare_words.append(w)
        words = common_words * f_common + rare_words[:n_rare] * freq_rare
        random.Random(shuffle_seed).shuffle(words)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    def cost(n_rare, f_common):
        return overhead + len(counter.tokenizer(words_for(n_rare, f_common), add_special_tokens=False)["input_ids"])

    # the common words' frequency must leave them clearly on top; lower it for short prompts
    f_common = freq_common
    while f_common > freq_rare + 1 and cost(0, f_common) > length:
        f_common -= 1
    lo, hi = 0, 1
    while cost(hi, f_common) <= length and hi < 1_000_000:
        hi *= 2
    while lo < hi - 1:  # the most rare words whose prompt fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid, f_common) <= length else (lo, mid)
    return Sample("common_words", before, words_for(lo, f_common), after, prefix, list(common_words),
                  {"freq_common": f_common, "freq_rare": freq_rare, "n_rare": lo})


def make_sample(task: str, tokenizer, length: int, seed: int, *, haystack: str = "noise",
                counter: TokenCounter | None = None, depth: float | None = None) -> Sample:
    """One sample of ``task`` at about ``length`` prompt tokens, fully determined by ``seed``."""
    counter = counter or TokenCounter(tokenizer)
    rng = random.Random(f"{task}:{length}:{seed}")
    if task.startswith("niah_"):
        return niah_sample(task, counter, haystack_sentences(haystack, seed), length, rng, depth=depth)
    if task == "variable_tracking":
        return variable_tracking_sample(counter, haystack_sentences(haystack, seed), length, rng)
    if task == "common_words":
        return common_words_sample(counter, length, rng)
    raise ValueError(f"tasks: unknown task {task!r}; known: {', '.join(TASKS)}")


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
def contains_item(prediction: str, item: str) -> bool:
    """``item`` occurs in ``prediction`` as a whole word / number (case-insensitive)."""
    return re.search(r"(?<![A-Za-z0-9])" + re.escape(item) + r"(?![A-Za-z0-9])", prediction,
                     re.IGNORECASE) is not None


def score_items(prediction: str, expected: Sequence[str]) -> float:
    """Fraction of the expected items found in the prediction."""
    if not expected:
        return 0.0
    return sum(contains_item(prediction, e) for e in expected) / len(expected)


# ----------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------
def max_new_tokens_for(task: str) -> int:
    return {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_multiquery": 64,
            "variable_tracking": 48, "common_words": 96}[task]


def evaluate(setup: Setup, tasks: Sequence[str], lengths: Sequence[int], samples: int, *,
             haystack: str = "noise", max_new_tokens: int | None = None) -> list[dict]:
    """Every run x task x length x sample; one record per generation."""
    counter = TokenCounter(setup.tokenizer)
    items = []
    for task in tasks:
        for length in lengths:
            for i in range(samples):
                sample = make_sample(task, setup.tokenizer, length, setup.seed * 100_003 + i, haystack=haystack,
                                     counter=counter)
                encoded = setup.encode(sample.prompt(setup.tokenizer, setup.chat))
                items.append((encoded, max_new_tokens or max_new_tokens_for(task), (length, i, sample)))

    def record(run, payload, gen):
        length, i, sample = payload
        return {"method": run.method, "budget": run.budget, "task": sample.task, "length": length, "sample": i,
                "prompt_tokens": gen.prompt_tokens, "expected": sample.expected, "pred": gen.text,
                "score": score_items(gen.text, sample.expected), "time_s": round(gen.seconds, 4),
                "kv_fraction": gen.kv_fraction}

    return evaluate_items(setup, items, desc="synthetic", record=record)


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """{run label: {task: score, ..., 'avg': x}} with scores 100 x mean, per length and overall."""
    table: dict[str, Any] = {}
    for rec in records:
        label = Run(rec["method"], rec["budget"]).label
        entry = table.setdefault(label, {"method": rec["method"], "budget": rec["budget"], "by_length": {}})
        entry["by_length"].setdefault(str(rec["length"]), {}).setdefault(rec["task"], []).append(rec["score"])
    for entry in table.values():
        overall: dict[str, list[float]] = {}
        for length, per in entry["by_length"].items():
            for task, scores in per.items():
                overall.setdefault(task, []).extend(scores)
                per[task] = round(100 * sum(scores) / len(scores), 2)
            per["avg"] = round(sum(v for k, v in per.items() if k != "avg") / len(per), 2)
        entry["tasks"] = {t: round(100 * sum(s) / len(s), 2) for t, s in overall.items()}
        entry["avg"] = round(sum(entry["tasks"].values()) / len(entry["tasks"]), 2)
    return table


def write_report(out: str, records: Sequence[dict], info: dict[str, Any]) -> dict[str, str]:
    table = summarize(records)
    tasks = [t for t in TASKS if any(t in e["tasks"] for e in table.values())]
    lengths = sorted({int(r["length"]) for r in records})
    labels = sorted(table, key=lambda k: Run.from_label(k).order)
    paths = {"json": os.path.join(out, "results.json"), "markdown": os.path.join(out, "results.md"),
             "png": os.path.join(out, "results.png"), "records": os.path.join(out, "predictions.jsonl")}
    report.write_json(paths["json"], {"task": "synthetic", "info": info, "tasks": tasks, "lengths": lengths,
                                      "results": table})
    report.write_jsonl(paths["records"], records)
    md = [f"# Synthetic RULER-style tasks ({info.get('protocol', '?')} protocol)", "",
          f"model: `{info.get('model', '?')}`, window {info.get('window', '?')}, context lengths "
          f"{', '.join(map(str, lengths))}, {info.get('samples', '?')} samples per task and length; "
          "score = 100 x fraction of expected items found", ""]

    md.append(report.markdown_table(["method", "budget", *tasks, "avg"],
                                    [[table[k]["method"], table[k]["budget"], *[table[k]["tasks"].get(t) for t in tasks],
                                      table[k]["avg"]] for k in labels]))
    if len(lengths) > 1:
        for length in lengths:
            md += ["", f"## {length} tokens", ""]
            md.append(report.markdown_table(
                ["method", "budget", *tasks, "avg"],
                [[table[k]["method"], table[k]["budget"], *[table[k]["by_length"].get(str(length), {}).get(t) for t in tasks],
                  table[k]["by_length"].get(str(length), {}).get("avg")] for k in labels]))
    report.write_text(paths["markdown"], "\n".join(md))
    plot_scores_vs_budget({Run.from_label(k): table[k]["avg"] for k in labels}, paths["png"],
                          title="Synthetic tasks, average score", ylabel="average score (%)")
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", default=",".join(TASKS),
                        help="tasks, comma or space separated (default: all)")
    parser.add_argument("--lengths", nargs="+", default="4096", help="prompt lengths in tokens (default: 4096)")
    parser.add_argument("--samples", type=int, default=5, help="samples per task and length (default: 5)")
    parser.add_argument("--haystack", default="noise",
                        help="noise (RULER's repeated sentences), essay (stdlib docstrings) or a text file")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the per-task answer length")
    add_common_arguments(parser, default_out="results/synthetic")


def run(args: argparse.Namespace, model=None, tokenizer=None) -> dict[str, str]:
    tasks = split_list(args.tasks)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks: unknown task {t!r}; known: {', '.join(TASKS)}")
    lengths = parse_lengths(args.lengths, "prompt")
    if args.samples < 1:
        raise ValueError("samples: must be >= 1")
    check_haystack(args.haystack)
    setup = setup_from_args(args, model, tokenizer)
    records = evaluate(setup, tasks, lengths, args.samples, haystack=args.haystack,
                       max_new_tokens=args.max_new_tokens)
    if not setup.group.main:
        return {}  # the main process writes the report of every shard
    info = report.environment_info(setup, tasks=tasks, lengths=lengths, samples=args.samples, haystack=args.haystack)
    paths = write_report(setup.out, records, info)
    report.print_file(paths["markdown"])
    return paths


main = script_main("cakekv eval synthetic", __doc__, add_arguments, run)
