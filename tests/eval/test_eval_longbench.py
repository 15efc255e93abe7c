"""LongBench: every metric against hand-computed values and against scores computed by LongBench's own
scorer (tests/eval/data/longbench_official_*.json, make_longbench_fixtures.py), prompt building, and the
pipeline end to end on a fixture in LongBench's JSONL format, with a tiny random Llama and a byte-level
tokenizer built offline."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from cakekv.eval import generation, longbench, metrics, prompts
from helpers import CHAT_TEMPLATE, byte_tokenizer, eval_args, needs_eval_extra, tiny_lm


# ------------------------------------------------------------------------------------------------
# metrics, each against values computed by hand
# ------------------------------------------------------------------------------------------------
def test_normalize_answer():
    assert metrics.normalize_answer("An apple; THE  end!") == "apple end"
    assert metrics.normalize_answer("theater") == "theater"  # articles only as whole words
    assert metrics.normalize_zh_answer("北京， 是 首都。") == "北京是首都"


def test_qa_f1():
    # "eiffel tower paris" vs "eiffel tower": 2 shared, P = 2/3, R = 1, F1 = 0.8
    assert metrics.qa_f1_score("The Eiffel Tower, Paris.", "Eiffel Tower") == pytest.approx(0.8)
    assert metrics.qa_f1_score("London", "Paris") == 0.0
    assert metrics.qa_f1_score("the", "a") == 0.0  # both empty after normalisation
    # multiset overlap: common {cat: 1, dog: 1} = 2 of 3 tokens each -> P = R = F1 = 2/3
    assert metrics.qa_f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)


def test_qa_f1_zh():
    # by character: [北, 京, 市] vs [北, 京] -> P = 2/3, R = 1, F1 = 0.8
    assert metrics.qa_f1_zh_score("北京市", "北京", zh_tokenizer="char") == pytest.approx(0.8)
    assert metrics.qa_f1_zh_score("。", "北京", zh_tokenizer="char") == 0.0
    try:
        import jieba  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install jieba"):
            metrics.qa_f1_zh_score("北京市", "北京")
    else:
        assert metrics.qa_f1_zh_score("北京", "北京") == 1.0


def test_rouge_l():
    needs_eval_extra("rouge")
    # one sentence each: LCS "the cat on the mat" -> word set {the, cat, on, mat} = 4;
    # distinct words m = n = 5 -> R = P = 0.8
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8)
    # sentences split on ".": hyp ["a b c", "d e"], ref ["a c", "e f"]; union of LCS words {a, c, e};
    # m = |{a, c, e, f}| = 4, n = |{a, b, c, d, e}| = 5 -> R = 3/4, P = 3/5, F = 2/3
    assert metrics.rouge_l("a b c. d e", "a c. e f") == pytest.approx(2 / 3)
    # the package's backtrack (left on ties) recovers "b a" (set {a, b}) rather than "a a" -> F = 1
    assert metrics.rouge_l("b a a", "a b a") == pytest.approx(1.0)
    assert metrics.rouge_l("", "a b") == 0.0
    assert metrics.rouge_l("...", "a b") == 0.0
    assert metrics.rouge_l("x y", "") == 0.0
    # (a sentence pair past the package's recursion limit: in the official fixtures, scored 0)


def test_rouge_zh():
    needs_eval_extra("rouge")
    # chars: hyp [今 天 天 气 很 好], ref [今 天 天 气 不 错]; LCS set {今, 天, 气} = 3; m = n = 5 -> 0.6
    assert metrics.rouge_zh_score("今天天气很好", "今天天气不错", zh_tokenizer="char") == pytest.approx(0.6)


def test_classification():
    classes = ["Entity", "Location", "Human being"]
    assert metrics.classification_score("Entity", "Entity", all_classes=classes) == 1.0
    assert metrics.classification_score("Entity or Location", "Entity", all_classes=classes) == 0.5
    assert metrics.classification_score("no idea", "Entity", all_classes=classes) == 0.0
    # substrings of the gold label are dropped; the official loop removes while iterating, skipping the
    # element after each removal: [ab, abc, b, abcd] -> removes ab (skips abc), removes b -> [abc, abcd]
    tricky = ["ab", "abc", "b", "abcd"]
    assert metrics.classification_score("abcd", "abcd", all_classes=tricky) == 0.5
    assert metrics.classification_score("abcd", "abcd", all_classes=tricky, classification_quirk=False) == 1.0
    with pytest.raises(ValueError, match="all_classes"):
        metrics.classification_score("x", "y")


def test_retrieval_and_count():
    assert metrics.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert metrics.retrieval_score("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5
    assert metrics.retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert metrics.retrieval_score("Paragraph 13", "Paragraph 3") == 0.0  # whole numbers only
    assert metrics.retrieval_zh_score("段落12", "段落12") == 1.0
    assert metrics.retrieval_zh_score("答案是段落1", "段落12") == 0.0
    assert metrics.count_score("There are 7 unique paragraphs, not 8", 7) == 0.5
    assert metrics.count_score("seven", "7") == 0.0
    with pytest.raises(ValueError, match="Paragraph"):
        metrics.retrieval_score("1", "no id here")


def test_fuzz_ratio_and_code_sim():
    # kitten / sitting: difflib blocks "itt" + "n" = 4 matches; LCS = 4 -> 2 * 4 / 13 = 0.615 -> 62
    assert metrics.fuzz_ratio("kitten", "sitting") == 62
    # "x = foo(1)" vs "x = foo(2)": 9 of 10 characters match -> 90
    assert metrics.fuzz_ratio("x = foo(1)", "x = foo(2)") == 90
    assert metrics.fuzz_ratio("", "") == 100  # equality is checked before emptiness
    assert metrics.fuzz_ratio("abc", "") == 0
    assert metrics.fuzz_ratio(None, "abc") == 0
    with pytest.raises(ValueError, match="fuzz_backend must be one of"):
        metrics.fuzz_ratio("a", "b", backend="nope")
    # first line without ` # or // (leading newlines stripped)
    pred = "\n```python\n# set x\nx = foo(1)\ny = 2\n"
    assert metrics.first_code_line(pred) == "x = foo(1)"
    assert metrics.code_sim_score(pred, "x = foo(2)") == pytest.approx(0.9)
    assert metrics.first_code_line("# only\n// comments") == ""
    assert metrics.code_sim_score("# only", "x") == 0.0


def test_fuzz_ratio_indel():
    needs_eval_extra("rapidfuzz")
    assert metrics.fuzz_ratio("kitten", "sitting", backend="indel") == 62


FIXTURES = os.path.join(os.path.dirname(__file__), "data")
# What scoring each fixture needs: difflib's scores every dataset (ROUGE-L summaries, jieba-segmented Chinese),
# indel's only the code datasets (rapidfuzz's ratio).
FIXTURE_PACKAGES = {"difflib": ("rouge", "jieba"), "indel": ("rapidfuzz",)}


@pytest.mark.parametrize("backend", metrics.FUZZ_BACKENDS)
def test_scores_equal_longbench_official(backend):
    """Every example and dataset score equals what LongBench's eval.py / metrics.py computed (with
    fuzzywuzzy on difflib, LongBench's environment, or on python-Levenshtein for "indel")."""
    needs_eval_extra(*FIXTURE_PACKAGES[backend])
    with open(os.path.join(FIXTURES, f"longbench_official_{backend}.json"), encoding="utf-8") as f:
        official = json.load(f)
    assert official["fuzz_backend"] == backend
    by_dataset = {}
    for ex in official["examples"]:
        if backend != "difflib" and metrics.DATASET2METRIC[ex["dataset"]] != "code_sim":
            continue  # the same numbers as with difflib
        got = metrics.score_example(ex["dataset"], ex["prediction"], ex["answers"], ex["all_classes"],
                                    fuzz_backend=backend)
        assert got == ex["score"], ex
        by_dataset.setdefault(ex["dataset"], []).append(ex)
    for name, exs in by_dataset.items():
        got = metrics.dataset_score(name, [e["prediction"] for e in exs], [e["answers"] for e in exs],
                                    exs[0]["all_classes"], fuzz_backend=backend)
        assert got == official["dataset_scores"][name], name
    # the fixtures reach what they are for: both backends differ somewhere, ROUGE-L's zero cases occur
    other = "indel" if backend == "difflib" else "difflib"
    with open(os.path.join(FIXTURES, f"longbench_official_{other}.json"), encoding="utf-8") as f:
        assert any(a["score"] != b["score"] for a, b in zip(official["examples"], json.load(f)["examples"]))


def test_missing_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge", None)  # as if not installed
    with pytest.raises(ImportError, match=r"ROUGE-L .* uses the rouge package.*pip install rouge"):
        metrics.check_scorer("gov_report")
    metrics.check_scorer("hotpotqa")  # needs no package


def test_score_example_rules():
    classes = ["Location", "Entity"]
    # first-line rule for trec: "Location" only -> 1 (without it both classes match -> 0.5)
    assert metrics.score_example("trec", "\n\nLocation\nEntity", ["Location"], classes) == 1.0
    assert metrics.score_example("passage_count", "\n\n7\n8", ["7"]) == 0.5  # no first-line rule
    # max over the gold answers
    assert metrics.score_example("triviaqa", "Paris\nbla", ["London", "Paris"]) == 1.0
    assert metrics.score_example("hotpotqa", "Paris France", ["Paris", "France"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        metrics.score_example("nope", "x", ["y"])


def test_dataset_score_and_average():
    assert metrics.dataset_score("passage_count", ["1", "2", "3"], [["1"], ["1"], ["1"]]) == 33.33
    assert metrics.dataset_score("trec", ["A", "B"], [["A"], ["A"]], ["A", "B"]) == 50.0  # one class list
    assert metrics.dataset_score("trec", ["A", "B"], [["A"], ["B"]], [["A", "B"], ["A", "B"]]) == 100.0
    assert metrics.dataset_score("hotpotqa", [], []) == 0.0
    assert metrics.average_score([33.33, 50.0, 100.0]) == 61.11
    assert set(metrics.DATASET2METRIC) == set(longbench.DATASETS)
    assert set(longbench.DATASET2MAXLEN) == set(longbench.DATASETS) == set(longbench.DATASET2PROMPT)
    assert len(longbench.DATASETS_EN) == 16 and len(longbench.DATASETS_ZH) == 5


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------
def test_templates_and_maxlen():
    assert longbench.DATASET2MAXLEN["gov_report"] == 512 and longbench.DATASET2MAXLEN["hotpotqa"] == 32
    assert longbench.DATASET2MAXLEN["samsum"] == 128 and longbench.DATASET2MAXLEN["lcc"] == 64
    t = longbench.DATASET2PROMPT["hotpotqa"].format(context="CTX", input="Q?")
    assert t.startswith("Answer the question based on the given passages.") and t.endswith("Question: Q?\nAnswer:")
    assert longbench.DATASET2PROMPT["lcc"].format(context="def f():\n") == \
        "Please complete the code given below. \ndef f():\nNext line of code:\n"
    assert "{input}" in longbench.DATASET2PROMPT["repobench-p"]
    for name, template in longbench.DATASET2PROMPT.items():
        assert template.count("{context}") == 1, name
    assert longbench.NO_CHAT_DATASETS == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}


def test_middle_truncation_and_split():
    tok = byte_tokenizer()
    ex = {"context": "A" * 40 + "B" * 40, "input": "Who?"}
    template = longbench.DATASET2PROMPT["hotpotqa"]
    full = template.format(**ex)
    # not truncated: prompt = template; split right after the context
    prompt, truncated = longbench.build_prompt(tok, ex, "hotpotqa", max_length=10_000, chat=False)
    assert not truncated and prompt.text == full
    assert prompt.context.endswith("B" * 40) and prompt.question.startswith("\n\nAnswer the question")
    # truncated to 200 tokens: BOS + 199 bytes; first 100 tokens (BOS skipped -> 99 chars) + last 100 chars
    prompt, truncated = longbench.build_prompt(tok, ex, "hotpotqa", max_length=200, chat=False)
    assert truncated and prompt.text == full[:99] + full[-100:]
    # the question part is what survives of the template's tail (here cut by the truncation)
    assert prompt.question == full[-100:] and prompt.context == full[:99]
    assert prompt.add_special_tokens
    code = {"context": "x = 1\n" * 100, "input": ""}
    prompt, truncated = longbench.build_prompt(tok, code, "lcc", max_length=100, chat=False)
    assert truncated and prompt.question == "Next line of code:\n"
    full_code = longbench.DATASET2PROMPT["lcc"].format(**code)
    assert prompt.context == full_code[:49] + full_code[-50:-19]


def test_chat_wrapping():
    tok = byte_tokenizer(CHAT_TEMPLATE)
    ex = {"context": "some passages", "input": "Who?", "all_classes": None}
    prompt, _ = longbench.build_prompt(tok, ex, "hotpotqa", max_length=None, chat=True)
    assert prompt.text.startswith("<s><|user|>\nAnswer the question") and prompt.text.endswith("<|assistant|>\n")
    assert prompt.context.endswith("some passages") and not prompt.add_special_tokens  # BOS not doubled
    doubled, _ = longbench.build_prompt(tok, ex, "hotpotqa", max_length=None, chat=True, double_bos=True)
    assert doubled.add_special_tokens
    enc = prompts.encode_prompt(tok, prompt, "question-aware")
    assert enc.full[:2].tolist() != [1, 1] and enc.full[0].item() == 1
    for name in ("lcc", "lsht", "trec"):  # never wrapped
        p, _ = longbench.build_prompt(tok, {"context": "c", "input": "i", "all_classes": []}, name,
                                      max_length=None, chat=True)
        assert "<|user|>" not in p.text
    enc = prompts.encode_prompt(tok, prompt, "context-only")
    assert torch.equal(torch.cat([enc.context, enc.question]), enc.full)
    assert tok.decode(enc.question) == prompt.question


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        longbench.load_data(str(tmp_path), "hotpotqa")
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        longbench.resolve_datasets(["hotpot"])
    assert longbench.resolve_datasets(["zh", "lcc"]) == [*longbench.DATASETS_ZH, "lcc"]


# ------------------------------------------------------------------------------------------------
# the pipeline end to end
# ------------------------------------------------------------------------------------------------
def write_fixture(data_dir) -> dict[str, list[dict]]:
    """A few examples of 4 datasets (QA, code, Chinese classification, count) in LongBench's format."""
    passages = " ".join(f"Passage {i}: the river {i} flows past the old mill near town {i}." for i in range(12))
    code = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(10))
    news = "".join(f"新闻{i}：今天的市场很平稳，专家认为经济稳定。\n类别：财经\n" for i in range(4))
    data = {
        "hotpotqa": [
            {"input": "Which town has river 3?", "context": passages, "answers": ["town 3"], "length": 150},
            {"input": "What flows past the mill?", "context": passages[:200], "answers": ["the river"], "length": 40},
        ],
        "lcc": [
            {"input": "", "context": code, "answers": ["def f10(x):"], "length": 60},
            {"input": "", "context": code[:100], "answers": ["    return x + 2"], "length": 20},
        ],
        "lsht": [
            {"input": "新闻：股市今天上涨。\n类别：", "context": news, "answers": ["财经"],
             "all_classes": ["财经", "体育", "娱乐"], "length": 100},
        ],
        "passage_count": [
            {"input": "", "context": passages[:300], "answers": [3], "length": 60},
        ],
    }
    os.makedirs(data_dir, exist_ok=True)
    for name, rows in data.items():
        with open(os.path.join(data_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                row = {"dataset": name, "language": "zh" if name == "lsht" else "en", "all_classes": None,
                       "_id": f"{name}-{i}", **row}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return data


@pytest.mark.parametrize("protocol, batch_size", [("question-aware", 1), ("question-aware", 2), ("context-only", 2)])
def test_pipeline_end_to_end(tmp_path, protocol, batch_size):
    needs_eval_extra("matplotlib")
    data = write_fixture(tmp_path / "data")
    out = tmp_path / "out"
    args = eval_args(longbench.add_arguments, [
        "--data-dir", str(tmp_path / "data"), "--datasets", "hotpotqa,lcc", "lsht", "passage_count",
        "--methods", "full", "cake", "--budgets", "48", "--window", "8", "--max-length", "600",
        "--max-new-tokens", "6", "--protocol", protocol, "--batch-size", str(batch_size), "--out", str(out),
        "--no-progress"])
    paths = longbench.run(args, model=tiny_lm(), tokenizer=byte_tokenizer(CHAT_TEMPLATE))
    for p in paths.values():
        assert os.path.isfile(p) and os.path.getsize(p) > 0
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = json.load(open(paths["json"], encoding="utf-8"))
    assert report["info"]["protocol"] == protocol and report["info"]["max_length"] == 600
    assert report["info"]["batch_size"] == batch_size
    assert set(report["results"]) == {"full", "cake-48"}
    for run, entry in report["results"].items():
        assert set(entry["datasets"]) == set(data)
        for name, rows in data.items():
            records = longbench.read_jsonl(out / "pred" / run / f"{name}.jsonl")
            assert len(records) == len(rows)
            assert [r["answers"] for r in records] == [row["answers"] for row in rows]
            assert all(0 < r["new_tokens"] <= 6 and r["kv_bytes_before"] > 0 for r in records)
            # the table is the official metric over the written predictions
            expected = metrics.dataset_score(name, [r["pred"] for r in records], [r["answers"] for r in records],
                                             [r["all_classes"] for r in records])
            assert entry["datasets"][name]["score"] == expected
        assert entry["avg"] == metrics.average_score(v["score"] for v in entry["datasets"].values())
        # the long hotpotqa example was middle-truncated to 600 tokens (+ chat wrapping)
        first = longbench.read_jsonl(out / "pred" / run / "hotpotqa.jsonl")[0]
        assert first["truncated"] and first["prompt_tokens"] < 640
    # compression really happened for cake on the long prompt, not for full
    cake = longbench.read_jsonl(out / "pred" / "cake-48" / "hotpotqa.jsonl")[0]
    full = longbench.read_jsonl(out / "pred" / "full" / "hotpotqa.jsonl")[0]
    assert cake["kv_bytes_after"] < full["kv_bytes_after"] and cake["kv_bytes_kept"] < full["kv_bytes_kept"]
    md = open(paths["markdown"], encoding="utf-8").read()
    assert "| method | budget | hotpotqa | passage_count | lcc | lsht | avg |" in md


def test_pipeline_scores_known_predictions(tmp_path, monkeypatch):
    """With generation replaced by known answers, the written table equals hand-computed scores, and
    each dataset is generated with its official max_new_tokens (samsum rules included)."""
    needs_eval_extra("rouge", "matplotlib")
    write_fixture(tmp_path / "data")
    with open(tmp_path / "data" / "samsum.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"input": "Dialogue: A: hi\nSummary: ", "context": "Dialogue: B: yo\nSummary: B greets.",
                            "answers": ["A says hi."], "all_classes": None, "length": 10}) + "\n")
    canned = {
        "hotpotqa": ["Town 3.", "the old river"],    # F1 1.0 ; "old river" vs "river": P=1/2 R=1 -> 2/3
        "lcc": ["```\ndef f10(x):\n", "# c\n    return x + 3"],  # 1.0 ; 15/16 chars -> ratio 94
        "lsht": ["财经\n体育"],                          # first line -> 1.0
        "passage_count": ["3 or 4"],                  # 0.5
        "samsum": ["\nA says hi.\nB: ok"],            # first line "A says hi." -> ROUGE-L 1.0
    }
    calls = []
    order = {k: iter(v) for k, v in canned.items()}
    current = {}

    def fake_generate_batch(model, tokenizer, encoded_list, **kw):
        calls.append(kw)
        return [generation.Generation(next(order[current["name"]]), [5] * 3, int(encoded.full.numel()), 0.01, 100, 60, 50,
                                  [10.0, 10.0]) for encoded in encoded_list]

    real_build = longbench.build_prompt

    def spy_build(tokenizer, example, dataset, **kw):
        current["name"] = dataset
        return real_build(tokenizer, example, dataset, **kw)

    monkeypatch.setattr(generation, "generate_batch", fake_generate_batch)
    monkeypatch.setattr(longbench, "build_prompt", spy_build)
    args = eval_args(longbench.add_arguments, [
        "--data-dir", str(tmp_path / "data"), "--datasets", "hotpotqa,lcc,lsht,passage_count,samsum",
        "--methods", "full", "--budgets", "16", "--window", "4", "--out", str(tmp_path / "out"), "--no-progress"])
    paths = longbench.run(args, model=tiny_lm(), tokenizer=byte_tokenizer())
    report = json.load(open(paths["json"], encoding="utf-8"))["results"]["full"]
    scores = {k: v["score"] for k, v in report["datasets"].items()}
    assert scores == {"hotpotqa": round(100 * (1 + 2 / 3) / 2, 2), "lcc": round(100 * (1 + 0.94) / 2, 2),
                      "lsht": 100.0, "passage_count": 50.0, "samsum": 100.0}
    assert report["avg"] == round((83.33 + 97.0 + 100 + 50 + 100) / 5, 2)
    assert report["datasets"]["hotpotqa"]["kv_fraction"] == 0.5
    by_len = [c["max_new_tokens"] for c in calls]
    assert by_len == [32, 32, 64, 64, 64, 32, 128]
    samsum_call = calls[-1]
    assert samsum_call["min_new_tokens"] == 1 and samsum_call["extra_eos"] == [byte_tokenizer().encode(
        "\n", add_special_tokens=False)[-1]]
    assert all(c["min_new_tokens"] == 0 and not c["extra_eos"] for c in calls[:-1])
    # --score-only rescores the same files to the same table
    args = eval_args(longbench.add_arguments, ["--score-only", "--out", str(tmp_path / "out")])
    paths = longbench.run(args)
    again = json.load(open(paths["json"], encoding="utf-8"))["results"]["full"]
    assert {k: v["score"] for k, v in again["datasets"].items()} == scores


def test_resume_keeps_existing_predictions(tmp_path, monkeypatch):
    needs_eval_extra("matplotlib")
    write_fixture(tmp_path / "data")
    batches = []

    def fake_generate_batch(model, tokenizer, encoded_list, **kw):
        batches.append(len(encoded_list))
        return [generation.Generation("town 3", [5], 10, 0.0, None, None, None, None) for _ in encoded_list]

    monkeypatch.setattr(generation, "generate_batch", fake_generate_batch)
    argv = ["--data-dir", str(tmp_path / "data"), "--datasets", "hotpotqa", "--methods", "full",
            "--out", str(tmp_path / "out"), "--no-progress", "--batch-size", "2", "--limit", "1"]
    longbench.run(eval_args(longbench.add_arguments, argv), model=tiny_lm(), tokenizer=byte_tokenizer())
    assert batches == [1]
    argv[-1] = "2"
    longbench.run(eval_args(longbench.add_arguments, argv + ["--resume"]), model=tiny_lm(),
                  tokenizer=byte_tokenizer())
    assert batches == [1, 1]  # only the second example was generated
    assert len(longbench.read_jsonl(tmp_path / "out" / "pred" / "full" / "hotpotqa.jsonl")) == 2
