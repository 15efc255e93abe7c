"""How long the command line takes to refuse a bad argument: each case run as `python -m cakekv.cli ...` in a fresh
interpreter (what a user types), `--repeats` times; prints the median and the slowest, and saves JSON.

    python benchmarks/bench_cli_errors.py --out benchmarks/results/cli_errors_cpu
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = [  # (what, argv): every one exits 2 with one line naming the argument
    ("budget below window", ["generate", "--prompt-file", "p.txt", "--budget", "0"]),
    ("unknown method", ["generate", "--prompt-file", "p.txt", "--method", "nope"]),
    ("--option without =", ["generate", "--prompt-file", "p.txt", "--option", "gamma"]),
    ("--option given twice", ["generate", "--prompt-file", "p.txt", "--option", "gamma=1", "--option", "gamma=2"]),
    ("--window 0", ["generate", "--prompt-file", "p.txt", "--window", "0"]),
    ("unknown option name", ["generate", "--prompt-file", "p.txt", "--option", "gama=1"]),
    ("demo budget below window", ["demo", "--budgets", "8"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="folder for cli_errors.json")
    args = parser.parse_args()
    rows = []
    for what, argv in CASES:
        times, code, err = [], None, ""
        for _ in range(args.repeats):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "cakekv.cli", *argv], capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            code, err = done.returncode, done.stderr.strip().splitlines()[-1]
        rows.append({"case": what, "argv": argv, "exit": code, "median_s": statistics.median(times),
                     "max_s": max(times), "message": err})
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  exit  median s  max s  message")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['exit']:>4}  {r['median_s']:8.2f}  {r['max_s']:5.2f}  {r['message'][:70]}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cli_errors.json"), "w") as f:
            json.dump({"python": sys.version.split()[0], "cpus": os.cpu_count(), "repeats": args.repeats,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
