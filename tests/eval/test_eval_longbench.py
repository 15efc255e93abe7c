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


# ------------------------------------------------------------------------------------------------
# the official settings, the recorded settings, the output folder
# ------------------------------------------------------------------------------------------------
# The official tables, as their files say: LongBench's config/model2maxlen.json and model2path.json (THUDM/LongBench,
# pred.py), and CAKE's experiments/LongBench/config/ (pred_cake.py).
LONGBENCH_MODEL2MAXLEN = {"llama2-7b-chat-4k": 3500, "longchat-v1.5-7b-32k": 31500, "xgen-7b-8k": 7500,
                          "internlm-7b-8k": 7500, "chatglm2-6b": 31500, "chatglm2-6b-32k": 31500,
                          "chatglm3-6b-32k": 31500, "vicuna-v1.5-7b-16k": 15500}
LONGBENCH_MODEL2PATH = {"llama2-7b-chat-4k": "meta-llama/Llama-2-7b-chat-hf",
                        "longchat-v1.5-7b-32k": "lmsys/longchat-7b-v1.5-32k",
                        "xgen-7b-8k": "Salesforce/xgen-7b-8k-inst",
                        "internlm-7b-8k": "internlm/internlm-chat-7b-8k", "chatglm2-6b": "THUDM/chatglm2-6b",
                        "chatglm2-6b-32k": "THUDM/chatglm2-6b-32k", "chatglm3-6b-32k": "THUDM/chatglm3-6b-32k",
                        "vicuna-v1.5-7b-16k": "lmsys/vicuna-7b-v1.5-16k"}
CAKE_MODEL2MAXLEN = {"llama2-7b-chat-4k": 3500, "llama2-13b-chat-4k": 3500, "llama3.1-8b-128k": 127500,
                     "mistral-0.3-7b-32k": 31500, "qwen2.5-7b-instruct": 31500}
CAKE_MODEL2PATH = {"llama2-7b-chat-4k": "meta-llama/Llama-2-7b-chat-hf",
                   "llama2-13b-chat-4k": "meta-llama/Llama-2-13b-chat-hf",
                   "llama3.1-8b-128k": "meta-llama/Llama-3.1-8B-Instruct",
                   "mistral-0.3-7b-32k": "mistralai/Mistral-7B-Instruct-v0.3",
                   "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct"}
# max_position_embeddings of the CAKE models' configs
CAKE_POSITIONS = {"llama2-7b-chat-4k": 4096, "llama2-13b-chat-4k": 4096, "llama3.1-8b-128k": 131072,
                  "mistral-0.3-7b-32k": 32768, "qwen2.5-7b-instruct": 32768}


def test_official_models_are_the_official_tables():
    by_name = {m.name: m for m in longbench.OFFICIAL_MODELS}
    assert {n: m.max_length for n, m in by_name.items()} == {**LONGBENCH_MODEL2MAXLEN, **CAKE_MODEL2MAXLEN}
    assert {n: m.hub_id for n, m in by_name.items()} == {**LONGBENCH_MODEL2PATH, **CAKE_MODEL2PATH}
    # the rule for other models gives the official value from each CAKE model's own config
    for name, positions in CAKE_POSITIONS.items():
        assert longbench.max_length_rule(positions) == CAKE_MODEL2MAXLEN[name], name
    assert longbench.max_length_rule(8192) == 7500 and longbench.max_length_rule(1024) == 500


def test_official_model_is_named_or_recognised_from_the_path():
    find = longbench.official_model
    assert find(None, "/models/Meta-Llama-3.1-8B-Instruct").name == "llama3.1-8b-128k"
    assert find(None, "meta-llama/Llama-2-13b-chat-hf").name == "llama2-13b-chat-4k"
    assert find(None, "mistralai/Mistral-7B-Instruct-v0.3").name == "mistral-0.3-7b-32k"
    assert find(None, "THUDM/chatglm2-6b-32k").name == "chatglm2-6b-32k"  # the longest match
    assert find(None, "THUDM/chatglm2-6b").name == "chatglm2-6b"
    assert find(None, "/models/my-llama3") is None and find(None, None) is None
    assert find("qwen2.5-7b-instruct", "/models/my-llama3").name == "qwen2.5-7b-instruct"
    # CAKE's tau rows are found from the same names
    from cakekv.methods.cake import TAU_TABLE, tau_entry
    assert {tau_entry(longbench.official_model(n, None).hub_id) for n in CAKE_MODEL2PATH} == set(TAU_TABLE)


def test_max_length_resolution():
    config = type("Config", (), {"max_position_embeddings": 32768})()
    llama3 = longbench.official_model("llama3.1-8b-128k", None)
    assert longbench.resolve_max_length(None, llama3, config) == (127500, "official (llama3.1-8b-128k)")
    assert longbench.resolve_max_length(None, None, config) == (31500, "rule (max_position_embeddings 32768)")
    assert longbench.resolve_max_length(2000, llama3, config) == (2000, "--max-length")
    config.max_position_embeddings = 512
    with pytest.raises(ValueError, match="^--max-length: .*max_position_embeddings 512"):
        longbench.resolve_max_length(None, None, config)


def fake_generation(monkeypatch) -> list[dict]:
    """Generation replaced by a fixed answer; returns the keyword arguments of each call."""
    calls = []

    def fake_generate_batch(model, tokenizer, encoded_list, **kw):
        calls.append(kw)
        return [generation.Generation("town 3", [5], 10, 0.0, None, None, None, None) for _ in encoded_list]

    monkeypatch.setattr(generation, "generate_batch", fake_generate_batch)
    return calls


def run_fixture(tmp_path, *argv, datasets="hotpotqa", **kw):
    args = eval_args(longbench.add_arguments, ["--data-dir", str(tmp_path / "data"), "--datasets", datasets,
                                               "--out", str(tmp_path / "out"), "--no-progress", *argv])
    return longbench.run(args, model=kw.get("model") or tiny_lm(), tokenizer=byte_tokenizer())


def test_default_max_length_is_the_same_for_every_dataset_and_recorded(tmp_path, monkeypatch):
    needs_eval_extra("matplotlib")
    write_fixture(tmp_path / "data")
    fake_generation(monkeypatch)
    paths = run_fixture(tmp_path, "--methods", "full")  # tiny_lm: 4096 positions -> the rule's 3500
    info = json.load(open(paths["json"], encoding="utf-8"))["info"]
    assert info["max_length"] == 3500 and info["max_length_source"] == "rule (max_position_embeddings 4096)"
    paths = run_fixture(tmp_path, "--methods", "full", "--model-name", "llama3.1-8b-128k", "--overwrite",
                        datasets="hotpotqa,lcc")
    info = json.load(open(paths["json"], encoding="utf-8"))["info"]
    assert info["max_length"] == 127500 and info["official_model"] == "llama3.1-8b-128k"


def test_every_resolved_setting_is_recorded(tmp_path, monkeypatch):
    needs_eval_extra("matplotlib")
    write_fixture(tmp_path / "data")
    calls = fake_generation(monkeypatch)
    paths = run_fixture(tmp_path, "--methods", "full", "cake", "snapkv", "--budgets", "128", "1024", "--window", "8",
                        "--model-name", "llama3.1-8b-128k", "--option", "decode_evict=False")
    info = json.load(open(paths["json"], encoding="utf-8"))["info"]
    settings = json.load(open(tmp_path / "out" / "settings.json", encoding="utf-8"))
    import transformers
    assert info["transformers"] == settings["transformers"] == transformers.__version__
    assert info["torch"] == settings["torch"] == torch.__version__
    assert settings["dtype"] == "float32" and settings["attn_implementation"] == "sdpa"
    assert settings["max_length"] == 127500 and settings["chat"] == "official" and settings["double_bos"] is False
    runs = settings["runs"]
    assert set(runs) == {"full", "cake-128", "cake-1024", "snapkv-128", "snapkv-1024"}
    # CAKE's taus of the named model at each budget (its table: 1.6 / 0.6 at 128, 1.6 / 0.4 at 1024)
    assert (runs["cake-128"]["tau1"], runs["cake-128"]["tau2"]) == (1.6, 0.6)
    assert (runs["cake-1024"]["tau1"], runs["cake-1024"]["tau2"]) == (1.6, 0.4)
    assert runs["cake-128"]["gamma"] == 200.0 and runs["cake-128"]["kernel_size"] == 5  # every option
    assert runs["full"] == {"decode_evict": False} and runs["cake-128"]["decode_evict"] is False
    assert "tau1" not in runs["snapkv-128"] and runs["snapkv-128"]["pooling"] == "max"
    assert info["runs"] == runs
    cake_calls = [c for c in calls if c["method"] == "cake"]
    assert [(c["options"]["tau1"], c["options"]["tau2"]) for c in cake_calls] == [(1.6, 0.6)] * 2 + [(1.6, 0.4)] * 2


def test_cake_tau_warns_for_a_model_its_table_lacks(tmp_path, monkeypatch):
    needs_eval_extra("matplotlib")
    write_fixture(tmp_path / "data")
    fake_generation(monkeypatch)
    with pytest.warns(UserWarning, match="tau table has no entry for 'cakekv/tiny-llama'.*--model-name"):
        run_fixture(tmp_path, "--methods", "cake", "--budgets", "128", "--window", "8")
    settings = json.load(open(tmp_path / "out" / "settings.json", encoding="utf-8"))
    assert (settings["runs"]["cake-128"]["tau1"], settings["runs"]["cake-128"]["tau2"]) == (1.0, 1.0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both taus given: nothing to warn about
        run_fixture(tmp_path, "--methods", "cake", "--budgets", "128", "--window", "8", "--option", "tau1=2",
                    "--option", "tau2=3", "--overwrite")
    settings = json.load(open(tmp_path / "out" / "settings.json", encoding="utf-8"))
    assert (settings["runs"]["cake-128"]["tau1"], settings["runs"]["cake-128"]["tau2"]) == (2.0, 3.0)


def test_an_earlier_run_is_kept_unless_resume_or_overwrite(tmp_path, monkeypatch):
    needs_eval_extra("matplotlib")
    write_fixture(tmp_path / "data")
    fake_generation(monkeypatch)
    run_fixture(tmp_path, "--methods", "full")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"^--out: {out} holds an earlier run .*--resume.*--overwrite"):
        run_fixture(tmp_path, "--methods", "full")
    with pytest.raises(ValueError, match="^--resume, --overwrite: pass one of them"):
        run_fixture(tmp_path, "--methods", "full", "--resume", "--overwrite")
    stale = out / "pred" / "snapkv-64" / "hotpotqa.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}\n")
    run_fixture(tmp_path, "--methods", "full", "--overwrite")
    assert not stale.exists()  # the earlier run's outputs are gone
    assert len(longbench.read_jsonl(out / "pred" / "full" / "hotpotqa.jsonl")) == 2


def test_resume_checks_the_recorded_settings(tmp_path, monkeypatch):
    needs_eval_extra("matplotlib")
    write_fixture(tmp_path / "data")
    fake_generation(monkeypatch)
    run_fixture(tmp_path, "--methods", "full", "cake", "--budgets", "64", "--window", "8", "--limit", "1")
    with pytest.raises(ValueError, match=r"^--resume: .* differ from the earlier run in .*out: max_length "
                                         r"\(recorded 3500, now 2000\), window \(recorded 8, now 16\); .*--overwrite"):
        run_fixture(tmp_path, "--methods", "full", "--max-length", "2000", "--window", "16", "--resume")
    with pytest.raises(ValueError, match=r"^--resume: .*runs\.cake-64\.gamma \(recorded 200.0, now 50.0\)"):
        run_fixture(tmp_path, "--methods", "cake", "--budgets", "64", "--window", "8", "--option", "gamma=50",
                    "--resume")
    # the same settings (another run added): resumed, the runs of both recorded
    run_fixture(tmp_path, "--methods", "cake", "snapkv", "--budgets", "64", "--window", "8", "--resume")
    settings = json.load(open(tmp_path / "out" / "settings.json", encoding="utf-8"))
    assert set(settings["runs"]) == {"full", "cake-64", "snapkv-64"}
    # a folder without recorded settings cannot be checked
    os.remove(tmp_path / "out" / "settings.json")
    with pytest.raises(ValueError, match=r"^--resume: .*settings.json is missing.*--overwrite"):
        run_fixture(tmp_path, "--methods", "full", "--window", "8", "--resume")


def test_a_bad_prediction_line_names_its_file_and_line(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text('{"pred": "a", "answers": ["a"]}\n{"pred": "b", "answ')
    with pytest.raises(ValueError, match=f"^{path}:2: not valid JSON"):
        longbench.read_jsonl(path)
    path.write_text('{"pred": "a", "answers": ["a"]}\n\n{"pred": "b"}\n')
    with pytest.raises(ValueError, match=rf"^{path}:3: missing field\(s\) \['answers'\]"):
        longbench.score_file(str(path), "hotpotqa")


def test_every_missing_dataset_is_named_before_the_model_loads(tmp_path, monkeypatch):
    write_fixture(tmp_path / "data")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(longbench, "setup_from_args", no_model)
    args = eval_args(longbench.add_arguments, ["--data-dir", str(tmp_path / "data"), "--datasets",
                                               "hotpotqa,qasper,lcc,trec", "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=r"^--data-dir: no LongBench data for 2 datasets: .*qasper.jsonl, "
                                                r".*trec.jsonl\. cakekv never downloads"):
        longbench.run(args)


# pred.py's build_chat (LongBench) and pred_cake.py's (CAKE), retyped from their code
OFFICIAL_CHAT = {
    "llama2-7b-chat-4k": "[INST]{prompt}[/INST]",
    "llama3.1-8b-128k": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "mistral-0.3-7b-32k": "<s>[INST] {prompt} [/INST]",
    "internlm-7b-8k": "<|User|>:{prompt}<eoh>\n<|Bot|>:",
    "xgen-7b-8k": ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.\n\n" + " ### Human: {prompt}\n###"),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_CHAT))
def test_official_chat_strings(name):
    tok = byte_tokenizer(CHAT_TEMPLATE)
    official = longbench.official_model(name, None)
    fmt, chat = longbench.resolve_chat(None, official, tok, "m")  # the default for a model that has one
    assert fmt == "official"
    ex = {"context": "some passages", "input": "Who?"}
    prompt, _ = longbench.build_prompt(tok, ex, "hotpotqa", max_length=None, chat=chat)
    assert prompt.text == OFFICIAL_CHAT[name].format(prompt=longbench.DATASET2PROMPT["hotpotqa"].format(**ex))
    assert prompt.context.endswith("some passages")
    # BOS written as text (Mistral's <s>, this tokenizer's BOS) is not added again unless --double-bos
    assert prompt.add_special_tokens == (name != "mistral-0.3-7b-32k")
    code, _ = longbench.build_prompt(tok, {"context": "x = 1\n", "input": ""}, "lcc", max_length=None, chat=chat)
    assert code.text == longbench.DATASET2PROMPT["lcc"].format(context="x = 1\n")  # never wrapped


def official_post_process(response, model_name):  # THUDM/LongBench pred.py, retyped
    if "xgen" in model_name:
        response = response.strip().replace("Assistant:", "")
    elif "internlm" in model_name:
        response = response.split("<eoa>")[0]
    return response


@pytest.mark.parametrize("name", longbench.OFFICIAL_NAMES)
def test_answers_are_post_processed_as_the_official_runs_do(name):
    """XGen's and InternLM's answers are cleaned as pred.py cleans them before saving (others are kept as they are);
    a user's model (no official entry) keeps its answer."""
    official = longbench.official_model(name, None)
    gen = type("Gen", (), dict(prompt_tokens=9, tokens=[1], seconds=0.1, questions_per_prefill=1, bytes_before=1,
                               bytes_after=1, bytes_kept=1))()
    for text in (" Assistant: Paris <eoa> and more\n", "Paris", "  <eoa>Assistant:Assistant: x "):
        gen.text = text
        record = longbench.prediction_record("hotpotqa", {"answers": ["Paris"]}, False, gen, official=official)
        assert record["pred"] == official_post_process(text, name)
        assert longbench.prediction_record("hotpotqa", {"answers": ["Paris"]}, False, gen)["pred"] == text
    assert (official.post_process(" Assistant: Paris <eoa>") != " Assistant: Paris <eoa>") == (
        "xgen" in name or "internlm" in name)


def test_chat_format_choice():
    tok, plain = byte_tokenizer(CHAT_TEMPLATE), byte_tokenizer()
    qwen, glm = longbench.official_model("qwen2.5-7b-instruct", None), longbench.official_model("chatglm2-6b", None)
    assert longbench.resolve_chat(None, None, tok, "m") == ("template", True)
    assert longbench.resolve_chat(None, None, plain, "m") == ("off", False)
    assert longbench.resolve_chat(None, glm, tok, "m") == ("template", True)  # ChatGLM's format is remote code
    assert longbench.resolve_chat("off", qwen, tok, "m") == ("off", False)
    # Qwen2.5: its chat template with Qwen's system message (pred_cake.py)
    fmt, chat = longbench.resolve_chat(None, qwen, tok, "m")
    assert fmt == "official" and chat("Q") == ("<s><|user|>\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                                             "assistant.<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\n")
    with pytest.raises(ValueError, match="^--chat official: the official runs give no chat string for m "):
        longbench.resolve_chat("official", None, tok, "m")
    with pytest.raises(ValueError, match="^--chat official: .*chatglm2-6b; pass --chat template or --chat off"):
        longbench.resolve_chat("official", glm, tok, "m")
    with pytest.raises(ValueError, match="^--chat template: the tokenizer of m has no chat template"):
        longbench.resolve_chat("template", None, plain, "m")


def test_a_template_that_writes_the_date_is_never_used_silently():
    tok = byte_tokenizer("{{ bos_token }}Today is {{ strftime_now('%d %b %Y') }}.{% for m in messages %}"
                         "{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="^--chat: the chat template of m writes today's date .*--chat template "
                                         "to use it anyway, or --chat off"):
        longbench.resolve_chat(None, None, tok, "m")
    with pytest.warns(UserWarning, match="^--chat template: the chat template of m writes today's date"):
        assert longbench.resolve_chat("template", None, tok, "m") == ("template", True)
    assert longbench.resolve_chat("off", None, tok, "m") == ("off", False)
    # the official string of a model needs no template
    assert longbench.resolve_chat(None, longbench.official_model("llama3.1-8b-128k", None), tok, "m")[0] == "official"


# ------------------------------------------------------------------------------------------------
# LongBench-E: the official scorer_e's length intervals
# ------------------------------------------------------------------------------------------------
def test_longbench_e_datasets():
    # pred.py --e's list, each named {dataset}_e as the official loader's configs and data files
    assert [longbench.base_name(n) for n in longbench.DATASETS_E] == [
        "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa", "samsum",
        "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]
    assert longbench.data_path("d", "hotpotqa_e") == os.path.join("d", "hotpotqa_e.jsonl")
    assert longbench.base_name("multifieldqa_en") == "multifieldqa_en" and longbench.base_name("lcc_e") == "lcc"
    assert longbench.resolve_datasets(["e"]) == list(longbench.DATASETS_E)
    assert longbench.resolve_datasets(["hotpotqa_e", "hotpotqa"]) == ["hotpotqa_e", "hotpotqa"]
    assert longbench.resolve_datasets([]) == list(longbench.DATASETS_EN)
    with pytest.raises(ValueError, match="^--datasets: unknown LongBench dataset 'narrativeqa_e'"):
        longbench.resolve_datasets(["narrativeqa_e"])  # not in LongBench-E


def test_length_bucket_scores():
    # intervals by the length field: < 4000, < 8000, the rest
    assert [metrics.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 10 ** 6)] == [
        "0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]
    preds = ["Paris", "London", "the old river", "x", "x y z"]
    answers = [["Paris"], ["Paris"], ["the river"], ["y", "x"], ["x y z w"]]
    lengths = [100, 3999, 4000, 7999, 8000]
    # 0-4k: (1 + 0) / 2; 4-8k: ("old river" vs "river": P 1/2, R 1 -> 2/3, then 1) / 2; 8k+: P 1, R 3/4 -> 6/7
    assert metrics.length_bucket_scores("hotpotqa", preds, answers, lengths) == {
        "0-4k": 50.0, "4-8k": 83.33, "8k+": 85.71}
    # an interval without examples is None (NaN in the official result.json)
    assert metrics.length_bucket_scores("hotpotqa", preds[:2], answers[:2], lengths[:2]) == {
        "0-4k": 50.0, "4-8k": None, "8k+": None}
    # the first-line rule and one class list for the file, as scorer_e
    assert metrics.length_bucket_scores("trec", ["\nEntity\nLocation", "Location"], [["Entity"], ["Entity"]],
                                        [5000, 9000], ["Entity", "Location"]) == {
        "0-4k": None, "4-8k": 100.0, "8k+": 0.0}
    with pytest.raises(ValueError, match="differ in length"):
        metrics.length_bucket_scores("hotpotqa", preds, answers, lengths[:2])


# ------------------------------------------------------------------------------------------------
# LongBench v2: prompts, truncation, answer extraction, accuracy
# ------------------------------------------------------------------------------------------------
V2_EXAMPLE = {"_id": "q0", "domain": "Single-Document QA", "sub_domain": "Legal", "difficulty": "easy",
              "length": "short", "question": " Which? ", "choice_A": " a ", "choice_B": "b", "choice_C": "c",
              "choice_D": "d\n", "answer": "B", "context": "\n  THE DOCUMENT  \n"}
# prompts/0shot.txt, 0shot_cot.txt and 0shot_cot_ans.txt of THUDM/LongBench, filled by hand
V2_QUESTION = "What is the correct answer to this question: Which?\nChoices:\n(A) a\n(B) b\n(C) c\n(D) d\n\n"
V2_FORMAT = 'Format your response as follows: "The correct answer is (insert answer here)".'


def test_v2_prompts():
    tok = byte_tokenizer()
    prompt, truncated = longbench.build_prompt(tok, V2_EXAMPLE, "v2", max_length=None, chat=False)
    assert not truncated and prompt.text == (
        "Please read the following text and answer the question below.\n\n<text>\nTHE DOCUMENT\n</text>\n\n"
        + V2_QUESTION + V2_FORMAT)
    assert prompt.context.endswith("<text>\nTHE DOCUMENT") and prompt.question.startswith("\n</text>")
    cot, _ = longbench.build_prompt(tok, V2_EXAMPLE, "v2_cot", max_length=None, chat=False)
    assert cot.text == ("Please read the following text and answer the questions below.\n\n<text>\nTHE DOCUMENT\n"
                        "</text>\n\n" + V2_QUESTION + "Let\u2019s think step by step:")
    answer, _ = longbench.build_prompt(tok, V2_EXAMPLE, "v2_cot", max_length=None, chat=False, cot="B fits.")
    assert answer.text == ("Please read the following text and answer the questions below.\n\nThe text is too long "
                           "and omitted here.\n\n" + V2_QUESTION + "Let\u2019s think step by step: B fits.\n\nBased "
                           "on the above, what is the single, most likely answer choice? " + V2_FORMAT)
    assert answer.context.endswith("B fits.")  # the chain of thought stands where the text stood
    bare, _ = longbench.build_prompt(tok, V2_EXAMPLE, "v2_no_context", max_length=None, chat=False)
    assert bare.text == V2_QUESTION + "What is the single, most likely answer choice? " + V2_FORMAT
    assert bare.context == "" and bare.question == bare.text  # prompts/0shot_no_context.txt: no text
    # v2 is always chat-wrapped (vLLM's chat API), with the template's BOS not doubled
    wrapped, _ = longbench.build_prompt(byte_tokenizer(CHAT_TEMPLATE), V2_EXAMPLE, "v2", max_length=None, chat=True)
    assert wrapped.text.startswith("<s><|user|>\nPlease read") and not wrapped.add_special_tokens


def test_v2_middle_truncation():
    tok = byte_tokenizer()
    ex = {**V2_EXAMPLE, "context": "A" * 200 + "B" * 200}
    full = longbench.fill_v2(longbench.V2_PROMPTS["v2"], ex)
    # odd budget: the first 201 // 2 = 100 tokens (BOS + 99 bytes) and the last 101, decoded together
    prompt, truncated = longbench.build_prompt(tok, ex, "v2", max_length=201, chat=False)
    assert truncated and prompt.text == full[:99] + full[-101:]
    # v1 keeps int(201 / 2) = 100 tokens at each end
    assert longbench.truncate_middle(tok, full, 201) == (full[:99] + full[-100:], True)
    assert longbench.truncate_middle(tok, full, 10_000, version=2) == (full, False)


@pytest.mark.parametrize("response, letter", [
    ("The correct answer is (B)", "B"),
    ("**The correct answer is (C)**", "C"),             # markdown bold removed first
    ("The correct answer is **(D)**.", "D"),
    ("After reading: The correct answer is A.", "A"),   # the second rule: no parentheses
    ("The correct answer is C. So: The correct answer is (A)", "A"),  # the parenthesised rule comes first
    ("The correct answer is (B), not The correct answer is (C)", "B"),  # the first match
    ("The correct answer is Answer B", "A"),            # the official rule reads the A of "Answer"
    ("The correct answer is (E)", None),
    ("the correct answer is (A)", None),                # case-sensitive
    ("The correct answer is: (A)", None),
    ("B", None),
    ("", None),
])
def test_v2_answer_extraction(response, letter):
    assert metrics.extract_choice(response) == letter


def test_v2_accuracy_breakdown():
    rows = [("easy", "short", True), ("easy", "medium", False), ("hard", "long", True), ("hard", "short", True),
            ("hard", "medium", True), ("easy", "long", False)]
    records = [{"difficulty": d, "length": n, "judge": j} for d, n, j in rows]
    # overall 4/6; easy 1/3; hard 3/3; short 2/2; medium 1/2; long 1/2 (medium counted: result.py's fixed version)
    assert metrics.v2_accuracy(records) == {"overall": 66.7, "easy": 33.3, "hard": 100.0, "short": 100.0,
                                            "medium": 50.0, "long": 50.0}
    assert metrics.v2_accuracy(records[:2]) == {"overall": 50.0, "easy": 50.0, "hard": None, "short": 100.0,
                                                "medium": 0.0, "long": None}


def test_v2_settings_and_errors(tmp_path):
    config = type("Config", (), {"max_position_embeddings": 131072})()
    # the official v2 table: 120000 for its models, recognised from the path or the official model's id
    assert longbench.resolve_max_length(None, None, config, version=2, model_path="/m/Qwen2.5-7B-Instruct") == (
        120000, "official v2 (Qwen/Qwen2.5-7B-Instruct)")
    llama3 = longbench.official_model("llama3.1-8b-128k", None)
    assert longbench.resolve_max_length(None, llama3, config, version=2)[0] == 120000
    assert longbench.resolve_max_length(None, None, config, version=2, model_path="/m/other") == (
        127500, "rule (max_position_embeddings 131072)")
    assert longbench.resolve_datasets(None, 2) == ["v2"] and longbench.resolve_datasets([], 2, cot=True) == ["v2_cot"]
    with pytest.raises(ValueError, match="^--datasets: LongBench v2 is one set of questions"):
        longbench.resolve_datasets(["hotpotqa"], 2)
    with pytest.raises(ValueError, match="^--cot: .*--version 2"):
        longbench.resolve_datasets(["hotpotqa"], 1, cot=True)
    assert longbench.resolve_datasets(None, 2, no_context=True) == ["v2_no_context"]
    with pytest.raises(ValueError, match="^--no-context: .*--version 2"):
        longbench.resolve_datasets(None, 1, no_context=True)
    with pytest.raises(ValueError, match="^--no-context: .*not both"):
        longbench.resolve_datasets(None, 2, cot=True, no_context=True)
    (tmp_path / "data.json").write_text(json.dumps([V2_EXAMPLE, {"_id": "q1", "question": "?"}]))
    assert longbench.load_data(str(tmp_path), "v2", limit=1) == [V2_EXAMPLE]
    with pytest.raises(ValueError, match=r"data.json: question 1: missing field\(s\) \['domain'"):
        longbench.load_data(str(tmp_path), "v2_cot")
    with pytest.raises(FileNotFoundError, match=r"^--data-dir: .*other.data\.json\. cakekv never downloads"):
        longbench.load_data(str(tmp_path / "other"), "v2")


# ------------------------------------------------------------------------------------------------
# LongBench-E and v2 end to end: the command line on the tiny model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat-model")
    tiny_lm().save_pretrained(path)
    byte_tokenizer(CHAT_TEMPLATE).save_pretrained(path)
    return str(path)


def write_e_fixture(data_dir) -> None:
    """hotpotqa_e and trec_e in LongBench-E's format, with examples in every length interval."""
    passages = " ".join(f"Passage {i}: the river {i} flows past the mill near town {i}." for i in range(6))
    rows = {"hotpotqa_e": [{"input": f"Which town has river {i}?", "context": passages, "answers": [f"town {i}"],
                            "length": n, "all_classes": None} for i, n in enumerate((120, 4500, 9000))],
            "trec_e": [{"input": "Where is Paris?", "context": "Question: Who is he?\nType: Human being",
                        "answers": ["Location"], "length": n, "all_classes": ["Human being", "Location"]}
                       for n in (3000, 8100)]}
    os.makedirs(data_dir, exist_ok=True)
    for name, examples in rows.items():
        with open(os.path.join(data_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for i, ex in enumerate(examples):
                f.write(json.dumps({**ex, "dataset": name, "language": "en", "_id": f"{name}-{i}"}) + "\n")


def write_v2_fixture(data_dir, n: int = 3) -> list[dict]:
    data = [{**V2_EXAMPLE, "_id": f"q{i}", "difficulty": ("easy", "hard")[i % 2],
             "length": ("short", "medium", "long")[i % 3], "answer": "ABCD"[i % 4],
             "context": f"Document {i}. " + "The mill stands by the river. " * 8} for i in range(n)]
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "data.json"), "w", encoding="utf-8") as f:
        json.dump(data, f)
    return data


def cli_longbench(model_dir, tmp_path, *argv) -> int:
    from cakekv import cli
    return cli.main(["eval", "longbench", "--model", model_dir, "--data-dir", str(tmp_path / "data"), "--methods",
                     "full", "snapkv", "--budgets", "48", "--window", "8", "--max-new-tokens", "3", "--device", "cpu",
                     "--out", str(tmp_path / "out"), "--no-progress", *argv])


def test_longbench_e_end_to_end(tmp_path, chat_model_dir):
    needs_eval_extra("matplotlib")
    write_e_fixture(tmp_path / "data")
    assert cli_longbench(chat_model_dir, tmp_path, "--datasets", "hotpotqa_e,trec_e") == 0
    out = tmp_path / "out"
    results = json.load(open(out / "results.json", encoding="utf-8"))["results"]
    for run in ("full", "snapkv-48"):
        per = results[run]["datasets"]
        for name in ("hotpotqa_e", "trec_e"):
            records = longbench.read_jsonl(out / "pred" / run / f"{name}.jsonl")
            preds, answers = [r["pred"] for r in records], [r["answers"] for r in records]
            base, classes = longbench.base_name(name), [r["all_classes"] for r in records]
            assert per[name]["buckets"] == metrics.length_bucket_scores(
                base, preds, answers, [r["length"] for r in records], classes)
            assert per[name]["score"] == metrics.dataset_score(base, preds, answers, classes)
        assert set(per["trec_e"]["buckets"]) == {"0-4k", "4-8k", "8k+"} and per["trec_e"]["buckets"]["4-8k"] is None
        # eval.py --e's result.json: {dataset: {interval: score}}
        official = json.load(open(out / "pred" / run / "result.json", encoding="utf-8"))
        assert official == {name: per[name]["buckets"] for name in ("hotpotqa_e", "trec_e")}
        assert set(results[run]["buckets_avg"]) == {"0-4k", "4-8k", "8k+"}
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "## LongBench-E by length" in md and "| method | budget | dataset | 0-4k | 4-8k | 8k+ |" in md


def test_longbench_v2_end_to_end(tmp_path, chat_model_dir):
    needs_eval_extra("matplotlib")
    data = write_v2_fixture(tmp_path / "data")
    assert cli_longbench(chat_model_dir, tmp_path, "--version", "2") == 0
    # the chain-of-thought variant is another predictions file: the same folder, resumed
    assert cli_longbench(chat_model_dir, tmp_path, "--version", "2", "--cot", "--resume") == 0
    out = tmp_path / "out"
    assert "v2_cot" in json.load(open(out / "results.json", encoding="utf-8"))["results"]["full"]["datasets"]
    assert cli_longbench(chat_model_dir, tmp_path, "--version", "2", "--no-context", "--resume") == 0  # and another
    from cakekv import cli
    assert cli.main(["eval", "longbench", "--score-only", "--out", str(out)]) == 0  # every predictions file
    report = json.load(open(out / "results.json", encoding="utf-8"))
    settings = json.load(open(out / "settings.json", encoding="utf-8"))
    assert settings["version"] == 2 and settings["chat"] == "template"
    for run in ("full", "snapkv-48"):
        for name in ("v2", "v2_cot", "v2_no_context"):
            records = longbench.read_jsonl(out / "pred" / run / f"{name}.jsonl", ("response", "pred", "judge"))
            assert [r["_id"] for r in records] == [q["_id"] for q in data] and "context" not in records[0]
            assert all(r["pred"] == metrics.extract_choice(r["response"]) for r in records)
            assert all(r["judge"] == (r["pred"] == q["answer"]) for r, q in zip(records, data))
            assert all(("response_cot" in r) == (name == "v2_cot") for r in records)
            entry = report["results"][run]["datasets"][name]
            assert entry["accuracy"] == metrics.v2_accuracy(records) and entry["score"] == entry["accuracy"]["overall"]
    rows = (out / "result.txt").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "Model\tOverall\tEasy\tHard\tShort\tMedium\tLong"
    assert sorted(r.split("\t")[0] for r in rows[1:]) == ["full", "full_cot", "full_no_context", "snapkv-48",
                                                         "snapkv-48_cot", "snapkv-48_no_context"]
    assert "## LongBench v2 accuracy" in (out / "results.md").read_text(encoding="utf-8")
    assert report["info"]["version"] == 2
    assert cli.main(["eval", "longbench", "--data-dir", str(tmp_path / "data"), "--version", "2", "--datasets",
                     "hotpotqa", "--out", str(tmp_path / "other")]) == 2


def test_v2_cot_answers_in_two_steps(tmp_path, monkeypatch):
    """The chain of thought (1024 new tokens), then the answer prompt holding it (128), as the official pred.py;
    the letter is extracted from the answer step's response."""
    needs_eval_extra("matplotlib")
    write_v2_fixture(tmp_path / "data", n=2)
    tok = byte_tokenizer()
    texts = iter(["  A long thought.  ", " It is B? ", "The correct answer is (B)", "The correct answer is **C**"])
    calls = []

    def fake_generate_batch(model, tokenizer, encoded_list, **kw):
        calls.append((kw["max_new_tokens"], [tok.decode(e.full) for e in encoded_list]))
        return [generation.Generation(next(texts), [5, 6], 10, 0.5, None, None, None, None) for _ in encoded_list]

    monkeypatch.setattr(generation, "generate_batch", fake_generate_batch)
    args = eval_args(longbench.add_arguments, ["--data-dir", str(tmp_path / "data"), "--version", "2", "--cot",
                                               "--methods", "full", "--batch-size", "2", "--out",
                                               str(tmp_path / "out"), "--no-progress"])
    paths = longbench.run(args, model=tiny_lm(), tokenizer=tok)
    assert [c[0] for c in calls] == [1024, 128]
    assert calls[0][1][0].endswith("Let\u2019s think step by step:")
    assert "step by step: A long thought.\n\nBased on the above" in calls[1][1][0]  # stripped
    assert "step by step: It is B?\n\nBased on the above" in calls[1][1][1]
    records = longbench.read_jsonl(tmp_path / "out" / "pred" / "full" / "v2_cot.jsonl", ("pred", "judge"))
    assert [(r["response_cot"], r["response"], r["pred"], r["judge"]) for r in records] == [
        ("A long thought.", "The correct answer is (B)", "B", False),   # q0's answer is A
        ("It is B?", "The correct answer is **C**", "C", False)]        # q1's is B
    assert records[0]["new_tokens"] == 4 and records[0]["time_s"] == 1.0  # both steps
    accuracy = json.load(open(paths["json"], encoding="utf-8"))["results"]["full"]["datasets"]["v2_cot"]["accuracy"]
    assert accuracy == {"overall": 0.0, "easy": 0.0, "hard": 0.0, "short": 0.0, "medium": 0.0, "long": None}
