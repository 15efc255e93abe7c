"""Summarise run.sh / run_extra.sh: per method and budget, needle accuracy (exact number found) and digit
accuracy (needle digits reproduced at their place in the answer's first number) with the default and
with official=True, and how many of the cells' answers differ. Usage: summarize.py OUT > results.md"""
import json
import os
import re
import sys


def records(folder):
    with open(os.path.join(folder, "predictions.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def digits(rec):
    found = re.search(r"\d+", rec["pred"])
    got = found.group(0) if found else ""
    return sum(a == b for a, b in zip(got, rec["needle"])) / len(rec["needle"])


def scores(recs):
    n = len(recs)
    return 100 * sum(r["found"] for r in recs) / n, 100 * sum(digits(r) for r in recs) / n, n


def by_run(folder):
    out = {}
    for r in records(folder):
        out.setdefault((r["method"], r["budget"]), []).append(r)
    return out


def main(out):
    print("| method | budget | setting | needle % | digits % | cells | answers differing from default |")
    print("|---|---|---|---|---|---|---|")
    if os.path.isdir(os.path.join(out, "full")):
        for (m, b), recs in by_run(os.path.join(out, "full")).items():
            print("| full | - | - | %.1f | %.1f | %d | |" % scores(recs))
    for name in sorted(os.listdir(out)):
        if not name.endswith("-default"):
            continue
        method = name[: -len("-default")]
        default = by_run(os.path.join(out, name))
        variants = [("official=True", f"{method}-official")]
        if method == "defensivekv":
            variants.append(("protected_set=below", "defensivekv-below"))
        for key in sorted(default, key=lambda k: k[1]):
            base = default[key]
            print("| %s | %d | default | %.1f | %.1f | %d | |" % ((method, key[1]) + scores(base)))
            for label, folder in variants:
                if not os.path.isdir(os.path.join(out, folder)):
                    continue
                other = by_run(os.path.join(out, folder))[key]
                differ = sum(a["pred"] != b["pred"] for a, b in zip(base, other))
                print("| %s | %d | %s | %.1f | %.1f | %d | %d |" % ((method, key[1], label) + scores(other) + (differ,)))
    for name in ("shallow-7700", "shallow-7700-beta4"):
        folder = os.path.join(out, name)
        if not os.path.isdir(folder):
            continue
        print(f"\n{name}: 7.7K tokens, 5 depths")
        print("\n| method | budget | needle % | digits % | cells |\n|---|---|---|---|---|")
        for (m, b), recs in by_run(folder).items():
            print("| %s | %s | %.1f | %.1f | %d |" % ((m, b) + scores(recs)))


if __name__ == "__main__":
    main(sys.argv[1])
