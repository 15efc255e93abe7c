"""Writes longbench_official_<backend>.json: LongBench scores of hand-picked and generated examples,
computed by LongBench's own scorer, for tests/eval/test_eval_longbench.py to compare cakekv.eval.metrics
with.

    python tests/eval/data/make_longbench_fixtures.py LONGBENCH_DIR

LONGBENCH_DIR holds LongBench v1's ``eval.py`` and ``metrics.py`` (THUDM/LongBench, the ``LongBench/``
folder of the 2024-12 layout; read at c5ea10b). Needs the packages of its requirements.txt: ``rouge``,
``jieba``, ``fuzzywuzzy``, numpy. fuzzywuzzy picks its ratio from the environment: without
``python-Levenshtein`` (LongBench's requirements) difflib's, written to longbench_official_difflib.json;
with it (``pip install Levenshtein``) the InDel ratio, written to longbench_official_indel.json.
"""
from __future__ import annotations

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

EN_WORDS = ("the council approved a new budget for schools and roads after long debate . members said "
            "that funding would rise by ten percent next year , while critics warned of higher taxes").split()
ZH_TEXT = ("会议讨论了明年的预算安排，代表们认为教育和交通投入需要增加。也有人担心税收会提高，"
           "政府表示将在下个月公布详细方案并听取公众意见。")
CODE = ["    return self.layers[idx](x)", "x = torch.cat([a, b], dim=-1)", "for i in range(n):",
        "if key not in cache: cache[key] = compute(key)", "print(f'{name}: {value:.3f}')",
        "def forward(self, hidden_states, attention_mask=None):", "    self.weight = nn.Parameter(torch.ones(dim))"]
TREC = ["Abbreviation", "Entity", "Description", "Human", "Location", "Numeric value", "Expression abbreviated",
        "Animal", "Event", "Organization", "Individual", "Country", "City", "Date", "Distance"]


def en_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(EN_WORDS) for _ in range(words))


def zh_text(rng: random.Random) -> str:
    start = rng.randrange(len(ZH_TEXT) - 8)
    return ZH_TEXT[start:start + rng.randint(4, 40)]


def mutate(rng: random.Random, line: str) -> str:
    chars = list(line)
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(chars) + 1)
        op = rng.choice("ids")
        if op == "i":
            chars.insert(i, rng.choice("abcxyz_().,= "))
        elif chars and i < len(chars):
            if op == "d":
                del chars[i]
            else:
                chars[i] = rng.choice("abcxyz_")
    return "".join(chars)


def cases() -> list[dict]:
    """(dataset, prediction, answers, all_classes) to score."""
    rng = random.Random(13)
    out = []

    def add(dataset, prediction, answers, all_classes=None):
        out.append({"dataset": dataset, "prediction": prediction, "answers": answers, "all_classes": all_classes})

    # ROUGE-L (English): exact, partial, multi-sentence, repeated words, edge cases, long texts
    ref = "The council approved the budget. Funding for schools rises by ten percent. Critics warned of taxes."
    for pred in (ref, "The council approved a budget. Critics warned.", "Funding rises. The council approved.",
                 "the the the council council", "", "...", "   ", "no overlap at all here",
                 "The council approved the budget\nFunding for schools rises", "THE COUNCIL approved the budget."):
        add("gov_report", pred, [ref])
    for _ in range(12):
        add(rng.choice(["qmsum", "multi_news", "gov_report"]), en_text(rng, rng.randint(1, 60)),
            [en_text(rng, rng.randint(5, 60)), en_text(rng, rng.randint(5, 60))])
    add("samsum", "\n\nTom will bring the cake.\nAnn agrees.", ["Tom will bring the cake to Ann's party."])
    add("samsum", "Ann and Tom meet at 5.", ["Ann and Tom will meet at 5 pm.", "They meet at five."])
    long_a = " ".join(f"w{i % 97}" for i in range(300))
    long_b = " ".join(f"w{(i * 7) % 97}" for i in range(300))
    add("gov_report", long_a, [long_b])                      # a long LCS, within the recursion limit
    very_long = " ".join(f"t{i}" for i in range(1100))
    add("gov_report", very_long, [very_long + " end"])        # backtrack far past the recursion limit: 0
    # ROUGE-L on jieba words (Chinese)
    for _ in range(10):
        add(rng.choice(["dureader", "vcsum"]), zh_text(rng), [zh_text(rng)])
    add("dureader", "", [ZH_TEXT[:20]])
    add("vcsum", ZH_TEXT, [ZH_TEXT])
    # code similarity: the first line without ` # //, then fuzz.ratio
    for line in CODE:
        add(rng.choice(["lcc", "repobench-p"]), mutate(rng, line), [line])
        add("lcc", "# a comment\n```python\n" + mutate(rng, line) + "\nmore()", [line])
    add("lcc", "\n\n// only comments\n# here", [CODE[0]])
    add("repobench-p", CODE[1], [CODE[1]])
    long_line = "result = compute_attention(query_states, key_states, value_states, mask=attention_mask, " \
                "dropout=0.0, scale=self.scaling, sliding_window=self.sliding_window, softcap=None) + residual " \
                "* self.residual_scale"
    for _ in range(4):
        add("lcc", mutate(rng, long_line), [long_line])       # >= 200 characters: difflib's junk heuristic
        add("lcc", long_line[::-1][:150] + long_line[:80], [long_line])
    add("lcc", "naïve = ‘résumé’ → x", ["naive = 'resume' -> x"])
    # pairs where difflib's matcher finds fewer matches than the InDel ratio's LCS
    add("lcc", "x = torch.ca([xz,bb, im=-1)", [CODE[1]])
    add("repobench-p", "for.  ix rang(n)", [CODE[2]])
    add("lcc", "def f(a, b): return a + b", [long_line])
    add("lcc", long_line.replace("_", " "), [long_line])
    # QA F1, English and Chinese
    for pred, answers in [("The Eiffel Tower, Paris.", ["Eiffel Tower"]), ("London", ["Paris"]),
                          ("the", ["a"]), ("cat cat dog", ["cat dog dog"]), ("Paris France", ["Paris", "France"])]:
        add("hotpotqa", pred, answers)
    add("triviaqa", "\nParis\nbla", ["London", "Paris"])
    add("multifieldqa_zh", "北京是中国的首都。", ["北京"])
    add("multifieldqa_zh", "答案：上海市", ["上海", "上海市"])
    # classification (the official removal quirk), retrieval, count
    add("trec", "Location", ["Location"], TREC)
    add("trec", "Entity or Location", ["Entity"], TREC)
    add("trec", "Numeric value and Individual", ["Individual"], TREC)
    add("lsht", "abcd", ["abcd"], ["ab", "abc", "abcd"])
    add("passage_retrieval_en", "Paragraph 3 or Paragraph 5", ["Paragraph 3"])
    add("passage_retrieval_zh", "答案是段落12", ["段落12"])
    add("passage_count", "There are 7 unique paragraphs, not 8", ["7"])
    return out


def main(longbench_dir: str) -> None:
    sys.path.insert(0, os.path.abspath(longbench_dir))
    import fuzzywuzzy.fuzz
    from eval import dataset2metric, scorer  # LongBench's eval.py (and through it its metrics.py)

    backend = "difflib" if fuzzywuzzy.fuzz.SequenceMatcher.__module__ == "difflib" else "indel"
    rows = cases()
    for row in rows:
        prediction = row["prediction"]
        if row["dataset"] in ["trec", "triviaqa", "samsum", "lsht"]:
            prediction = prediction.lstrip("\n").split("\n")[0]
        metric = dataset2metric[row["dataset"]]
        row["score"] = max([0.0] + [metric(prediction, a, all_classes=row["all_classes"]) for a in row["answers"]])
    by_dataset = {}
    for row in rows:
        by_dataset.setdefault(row["dataset"], []).append(row)
    dataset_scores = {name: scorer(name, [r["prediction"] for r in rs], [r["answers"] for r in rs],
                                   rs[0]["all_classes"])
                      for name, rs in by_dataset.items()}
    path = os.path.join(HERE, f"longbench_official_{backend}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"fuzz_backend": backend, "examples": rows, "dataset_scores": dataset_scores}, f,
                  ensure_ascii=False, indent=1)
    print(f"wrote {path}: {len(rows)} examples, {len(dataset_scores)} datasets")


if __name__ == "__main__":
    main(sys.argv[1])
