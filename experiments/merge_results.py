#!/usr/bin/env python
"""Merge the results folders of several `cakekv eval needle|synthetic` runs (e.g. one per method, run in
parallel or on different GPUs) into one report: JSON, markdown and the plot over all of them.

  python experiments/merge_results.py needle OUT DIR [DIR ...]
  python experiments/merge_results.py synthetic OUT DIR [DIR ...]

A folder given as DIR=NAME has its runs renamed NAME (runs of one method with different options, side by
side: `spancake/ = spancake[span_weight=0]`). Folders without predictions.jsonl (a run that did not finish)
are reported and skipped.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cakekv.eval import needle, synthetic  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in ("needle", "synthetic"):
        print(__doc__, file=sys.stderr)
        return 2
    task, out, dirs = argv[0], argv[1], argv[2:]
    records, info, missing = [], None, []
    renamed = [d.partition("=") for d in dirs]
    dirs = [d for d, _, _ in renamed]
    for d, _, name in renamed:
        path = os.path.join(d, "predictions.jsonl")
        if not os.path.isfile(path):
            missing.append(d)
            continue
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        records += [dict(r, method=name or r["method"]) for r in rows]
        with open(os.path.join(d, "results.json"), encoding="utf-8") as f:
            meta = json.load(f)
        info = info or meta
    if not records:
        print(f"no predictions in {dirs}", file=sys.stderr)
        return 1
    run_info = dict(info["info"], merged_from=[os.path.basename(d.rstrip("/")) for d in dirs if d not in missing])
    if task == "needle":
        paths = needle.write_report(out, records, info["lengths"], info["depths"], run_info)
    else:
        paths = synthetic.write_report(out, records, run_info)
    print(open(paths["markdown"], encoding="utf-8").read())
    if missing:
        print(f"skipped (no predictions): {missing}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
