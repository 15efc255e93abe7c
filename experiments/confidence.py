#!/usr/bin/env python
"""Binomial 95 % confidence intervals (Wilson) of a merged needle or synthetic results folder, written next to
its report as confidence.md and confidence.json.

  python experiments/confidence.py needle DIR       # per run: overall and per (depth, length) cell, needles found
  python experiments/confidence.py synthetic DIR    # per run: per task and overall, expected items found

A needle counts as one trial; a synthetic sample as len(expected) trials (its items), so an interval is over
the items found. Trials are not independent across cells of one haystack seed: read the intervals as a guide
to the sample size, not as a test."""
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cakekv.eval import report  # noqa: E402
from cakekv.eval.runs import Run  # noqa: E402


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cell(k: float, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"found": round(k, 3), "n": n, "pct": round(100 * k / n, 1), "lo": round(100 * lo, 1),
            "hi": round(100 * hi, 1)}


def shown(c: dict) -> str:
    return f"{c['pct']:.0f} [{c['lo']:.0f}, {c['hi']:.0f}] (n={c['n']})"


def tally(records, key, trials, found):
    out: dict = {}
    for r in records:
        label = Run(r["method"], r["budget"]).label
        k, n = out.setdefault(label, {}).get(key(r), (0.0, 0))
        out[label][key(r)] = (k + found(r), n + trials(r))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("needle", "synthetic"):
        print(__doc__, file=sys.stderr)
        return 2
    task, folder = argv
    with open(os.path.join(folder, "predictions.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if task == "needle":
        counts = tally(records, lambda r: (r["depth"], r["length"]), lambda r: 1, lambda r: r["found"])
        columns = sorted({r["length"] for r in records})
    else:
        counts = tally(records, lambda r: r["task"], lambda r: len(r["expected"]),
                       lambda r: r["score"] * len(r["expected"]))
        columns = list(dict.fromkeys(r["task"] for r in records))
    labels = sorted(counts, key=lambda k: Run.from_label(k).order)
    table = {}
    for label in labels:
        per = counts[label]
        k, n = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
        table[label] = {"overall": cell(k, n), "cells": {str(key): cell(*v) for key, v in per.items()}}
    md = [f"# {task}: 95 % Wilson intervals ({'needles' if task == 'needle' else 'expected items'} found)", "",
          report.markdown_table(["run", "overall % [95 % CI] (n)"], [[k, shown(table[k]["overall"])] for k in labels])]
    if task == "synthetic":
        md += ["", report.markdown_table(["run", *columns],
                                         [[k, *[shown(table[k]["cells"][t]) if t in table[k]["cells"] else None
                                                for t in columns]] for k in labels])]
    else:
        depths = sorted({r["depth"] for r in records})
        for k in labels:
            md += ["", f"## {k}", "", report.markdown_table(
                ["depth \\ length", *map(str, columns)],
                [[f"{d:g}%", *[shown(table[k]["cells"][str((d, n))]) if str((d, n)) in table[k]["cells"] else None
                               for n in columns]] for d in depths])]
    report.write_json(os.path.join(folder, "confidence.json"), table)
    report.write_text(os.path.join(folder, "confidence.md"), "\n".join(md))
    print("\n".join(md[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
