"""Needle in a haystack: accuracy over a grid of context lengths x needle depths, per method/budget.

One needle "One of the special magic numbers for KEY is: NNNNNNN." is put into filler text at a
given depth (fraction of the haystack's tokens before it, moved to the next sentence boundary) of
a prompt of a given length; the model is asked for KEY's number. A cell counts as found when the
7 digits occur as a number in the greedy answer; with ``--samples`` > 1 a cell is the fraction
found over different needles.

The haystack is a text file (``--haystack FILE``) or, by default, prose from the docstrings of
Python's standard library shuffled with the seed (offline, deterministic). The heatmap follows the
papers: x = context length, y = depth, red (missed) to green (found).
"""
from __future__ import annotations

import argparse
import os
import random
from typing import Any, Sequence

from . import report
from .args import add_common_arguments, parse_float_list, parse_lengths, script_main, setup_from_args
from .haystack import TokenCounter, check_haystack, haystack_sentences
from .plots import plot_heatmaps
from .runs import Run, Setup, evaluate_items
from .synthetic import Sample, fact_sample, niah_sample, score_items


STYLES = ("ruler", "fact")


def make_needle(style: str, counter, sentences, length: int, depth_percent: float, rng) -> Sample:
    """The needle prompt of one cell: RULER's magic-number needle, or the fact format of the shipped
    tiny model ("The secret code of NAME is CODE.")."""
    if style == "ruler":
        return niah_sample("niah_single", counter, sentences, length, rng, depth=depth_percent / 100.0)
    if style == "fact":
        return fact_sample(counter, sentences, length, rng, depth=depth_percent / 100.0)
    raise ValueError(f"style: expected one of {STYLES}, got {style!r}")


def evaluate(setup: Setup, lengths: Sequence[int], depths: Sequence[float], samples: int = 1, *,
             haystack: str = "essay", max_new_tokens: int = 32, style: str = "ruler") -> list[dict]:
    """One record per run x length x depth x sample. ``depths`` in percent (0 = start, 100 = end)."""
    counter = TokenCounter(setup.tokenizer)
    sentences = haystack_sentences(haystack, setup.seed)
    items = []
    for length in lengths:
        for depth in depths:
            for i in range(samples):
                rng = random.Random(f"{setup.seed}:{length}:{depth}:{i}")
                sample = make_needle(style, counter, sentences, length, depth, rng)
                encoded = setup.encode(sample.prompt(setup.tokenizer, setup.chat))
                items.append((encoded, max_new_tokens, (length, depth, i, sample)))

    def record(run, payload, gen):
        length, depth, i, sample = payload
        return {"method": run.method, "budget": run.budget, "length": length, "depth": depth, "sample": i,
                "prompt_tokens": gen.prompt_tokens, "needle": sample.expected[0], "pred": gen.text,
                "found": score_items(gen.text, sample.expected), "time_s": round(gen.seconds, 4),
                "kv_fraction": gen.kv_fraction}

    return evaluate_items(setup, items, desc="needle", record=record)


def grids(records: Sequence[dict], lengths: Sequence[int], depths: Sequence[float]) -> dict[str, Any]:
    """{run label: {'method', 'budget', 'grid' (depth rows x length columns, fraction found), 'accuracy'}}."""
    cells: dict[str, dict[tuple, list[float]]] = {}
    meta: dict[str, tuple] = {}
    for r in records:
        label = Run(r["method"], r["budget"]).label
        meta[label] = (r["method"], r["budget"])
        cells.setdefault(label, {}).setdefault((r["depth"], r["length"]), []).append(r["found"])
    out = {}
    for label, per in cells.items():
        grid = [[(sum(per[(d, n)]) / len(per[(d, n)])) if (d, n) in per else None for n in lengths] for d in depths]
        values = [v for row in grid for v in row if v is not None]
        out[label] = {"method": meta[label][0], "budget": meta[label][1], "grid": grid,
                      "accuracy": round(100 * sum(values) / len(values), 2) if values else None}
    return out


def write_report(out: str, records: Sequence[dict], lengths: Sequence[int], depths: Sequence[float],
                 info: dict[str, Any]) -> dict[str, str]:
    table = grids(records, lengths, depths)
    labels = sorted(table, key=lambda k: Run.from_label(k).order)
    paths = {"json": os.path.join(out, "results.json"), "markdown": os.path.join(out, "results.md"),
             "png": os.path.join(out, "needle_heatmap.png"), "records": os.path.join(out, "predictions.jsonl")}
    actual = {}
    for r in records:
        actual.setdefault(str(r["length"]), set()).add(r["prompt_tokens"])
    report.write_json(paths["json"], {"task": "needle", "info": info, "lengths": list(lengths), "depths": list(depths),
                                      "prompt_tokens": {k: sorted(v) for k, v in actual.items()}, "results": table})
    report.write_jsonl(paths["records"], records)

    md = [f"# Needle in a haystack ({info.get('protocol', '?')} protocol)", "",
          f"model: `{info.get('model', '?')}`, window {info.get('window', '?')}, haystack {info.get('haystack', '?')}; "
          "accuracy = % of (length, depth) cells where the needle's number is in the answer", "",
          report.markdown_table(["method", "budget", "accuracy (%)"],
                                [[table[k]["method"], table[k]["budget"], table[k]["accuracy"]] for k in labels])]
    for k in labels:
        md += ["", f"## {k}", "", report.markdown_table(
            ["depth \\ length", *map(str, lengths)],
            [[f"{d:g}%", *[None if v is None else f"{100 * v:.0f}" for v in row]]
             for d, row in zip(depths, table[k]["grid"])])]
    report.write_text(paths["markdown"], "\n".join(md))
    panels = {k: [[float("nan") if v is None else v for v in row] for row in table[k]["grid"]] for k in labels}
    plot_heatmaps(panels, list(lengths), [f"{d:g}%" for d in depths], paths["png"],
                  title=f"Needle in a haystack ({info.get('model', '')}, {info.get('protocol', '')})",
                  xlabel="context length (tokens)", ylabel="needle depth")
    return paths


def parse_depths(values) -> list[float]:
    depths = parse_float_list(values, "depths")
    if not depths or any(d < 0 or d > 100 for d in depths):
        raise ValueError("depths: give percentages between 0 and 100")
    return depths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", nargs="+", default="1024,2048,4096",
                        help="context lengths in tokens (default: %(default)s)")
    parser.add_argument("--depths", nargs="+", default="0,25,50,75,100",
                        help="needle depths in percent of the context (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=1, help="needles per cell (default: 1)")
    parser.add_argument("--haystack", default="essay",
                        help="filler: a text file, 'essay' (stdlib docstrings, default) or 'noise'")
    parser.add_argument("--style", choices=STYLES, default=None,
                        help="needle wording: ruler (RULER's magic numbers) or fact (the shipped tiny model's "
                             "'The secret code of NAME is CODE.'); default: fact for the tiny model, else ruler")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length (default: 32)")
    add_common_arguments(parser, default_out="results/needle")


def run(args: argparse.Namespace, model=None, tokenizer=None) -> dict[str, str]:
    lengths = parse_lengths(args.lengths, "context")
    depths = parse_depths(args.depths)
    if args.samples < 1:
        raise ValueError("samples: must be >= 1")
    check_haystack(args.haystack)
    setup = setup_from_args(args, model, tokenizer)
    from .models import tiny_model_path
    tiny = args.model is None or os.path.realpath(args.model) == os.path.realpath(tiny_model_path())
    style = args.style or ("fact" if tiny else "ruler")
    records = evaluate(setup, lengths, depths, args.samples, haystack=args.haystack,
                       max_new_tokens=args.max_new_tokens, style=style)
    if not setup.group.main:
        return {}  # the main process writes the report of every shard
    info = report.environment_info(setup, lengths=lengths, depths=depths, samples=args.samples,
                                   haystack=args.haystack, style=style)
    paths = write_report(setup.out, records, lengths, depths, info)
    report.print_file(paths["markdown"])
    return paths


main = script_main("cakekv eval needle", __doc__, add_arguments, run)
