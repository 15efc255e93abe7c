"""Synthetic RULER-style tasks and the needle heatmap: deterministic generation, exact scoring,
results written; the shared runner (protocols, runs, PNG writer)."""
from __future__ import annotations

import argparse
import json
import random
import re
import struct
import sys
from collections import Counter

import pytest
import torch

from cakekv.eval import generation, haystack, models, needle, prompts, report, synthetic
from cakekv.eval.args import parse_int_list, parse_options, setup_from_args, split_list
from cakekv.eval.runs import Run, evaluate_items, expand_runs
from helpers import byte_tokenizer, eval_args, needs_eval_extra, tiny_lm


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", synthetic.TASKS)
def test_samples_are_deterministic_and_sized(tok, task):
    a = synthetic.make_sample(task, tok, 1500, seed=3)
    b = synthetic.make_sample(task, tok, 1500, seed=3)
    c = synthetic.make_sample(task, tok, 1500, seed=4)
    assert a == b
    assert (a.context, a.expected) != (c.context, c.expected)
    n = len(tok(a.prompt(tok, chat=False).text)["input_ids"])
    assert 1350 <= n <= 1500, n  # fills the target length without exceeding it
    assert a.expected and all(isinstance(e, str) and e for e in a.expected)


def test_needles_are_in_the_context(tok):
    for task, n_expected in (("niah_single", 1), ("niah_multikey", 1), ("niah_multivalue", 4),
                             ("niah_multiquery", 4)):
        s = synthetic.make_sample(task, tok, 800, seed=1)
        assert len(s.expected) == n_expected
        for key in s.meta["keys"]:
            assert key in s.after and key in s.answer_prefix
        for needle_text in s.meta["needles"]:
            assert s.context.count(needle_text) == 1
        for value in s.expected:
            assert f"is: {value}." in s.context
    # multikey: the distractor keys' numbers are in the context but not expected
    s = synthetic.make_sample("niah_multikey", tok, 800, seed=1)
    numbers = re.findall(r"is: (\d{7})\.", s.context)
    assert len(numbers) == 4 and s.expected[0] in numbers


def test_variable_tracking_chain(tok):
    s = synthetic.make_sample("variable_tracking", tok, 800, seed=2)
    assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (\d+)\.", s.context))
    links = dict(re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", s.context))
    holders = {v for v, value in assigned.items() if value == s.meta["value"]}
    changed = True
    while changed:  # follow the chain by hand
        new = {a for a, b in links.items() if b in holders}
        changed = not new <= holders
        holders |= new
    assert holders == set(s.expected) and len(s.expected) == 5
    assert s.meta["value"] in s.after


def test_common_words_are_most_common(tok):
    s = synthetic.make_sample("common_words", tok, 1500, seed=0)
    words = re.findall(r"\d+\. (\S+)", s.context)
    counts = Counter(words)
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(s.expected)
    assert min(counts[w] for w in s.expected) > max(c for w, c in counts.items() if w not in s.expected)
    assert words and [int(i) for i in re.findall(r"(\d+)\. ", s.context)] == list(range(1, len(words) + 1))


def test_haystack_and_depth(tok, tmp_path):
    count = haystack.TokenCounter(tok)
    sentences = ["One two three.", "Four five six.", "Seven eight."]
    filled = haystack.fill(sentences, count, 40)
    assert filled == sentences[:2]  # 15 + 15 = 30 tokens, a third (13) would pass 40
    assert haystack.insert_at_depth(filled, "N.", 0.0, count)[0] == "N."
    assert haystack.insert_at_depth(filled, "N.", 1.0, count)[-1] == "N."
    assert haystack.insert_at_depth(filled, "N.", 0.5, count) == [sentences[0], "N.", sentences[1]]
    essay = haystack.haystack_sentences("essay", seed=0)
    assert len(essay) > 500 and essay == haystack.haystack_sentences("essay", seed=0)
    assert essay != haystack.haystack_sentences("essay", seed=1) and sorted(essay) == sorted(
        haystack.haystack_sentences("essay", seed=1))
    path = tmp_path / "filler.txt"
    path.write_text("First sentence here. Second one!\nThird?")
    assert haystack.haystack_sentences(str(path)) == ["First sentence here.", "Second one!", "Third?"]
    with pytest.raises(FileNotFoundError):
        haystack.haystack_sentences(str(tmp_path / "missing.txt"))


def test_fact_sample_matches_tiny_model_format(tok):
    count = haystack.TokenCounter(tok)
    s = synthetic.fact_sample(count, haystack.haystack_sentences("essay", 0), 700, random.Random(0),
                              depth=0.0, n_facts=3)
    name, code = s.meta["name"], s.expected[0]
    assert s.context.startswith(f"The secret code of {name} is {code}.\n")
    assert s.after + s.answer_prefix == f"\nWhat is the secret code of {name}? The secret code of {name} is"
    assert len(s.meta["facts"]) == 3 and all(f"of {n} is {c}." in s.context for n, c in s.meta["facts"].items())


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def test_score_items_exact():
    assert synthetic.score_items("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) \
        == pytest.approx(2 / 3)
    assert synthetic.score_items("12345678", ["1234567"]) == 0.0  # whole numbers only
    assert synthetic.score_items("ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0  # case-insensitive
    assert synthetic.score_items("xABCDE", ["ABCDE"]) == 0.0
    assert synthetic.score_items("anything", []) == 0.0


# ------------------------------------------------------------------------------------------------
# runner
# ------------------------------------------------------------------------------------------------
def test_expand_runs_and_options():
    runs = expand_runs(["full", "cake", "full"], [64, 128, 64], window=8)
    assert [r.label for r in runs] == ["full", "cake-64", "cake-128"]
    with pytest.raises(ValueError, match="unknown method"):
        expand_runs(["nope"], [64], 8)
    with pytest.raises(ValueError, match="window \\+ 1"):
        expand_runs(["cake"], [8], 8)
    with pytest.raises(ValueError, match="at least one budget"):
        expand_runs(["cake"], [], 8)
    assert parse_options(["gamma=100", "cascading=false", "pooling=max"]) == \
        {"gamma": 100, "cascading": False, "pooling": "max"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["gamma"])
    assert split_list(["a,b", "c d"]) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="budgets"):
        parse_int_list("12,x", "budgets")


def test_context_only_full_cache_equals_question_aware(tok):
    """With the full cache the two protocols decode the same tokens (compression is the only difference)."""
    model = tiny_lm()
    sample = synthetic.make_sample("niah_single", tok, 300, seed=0)
    prompt = sample.prompt(tok, chat=False)
    qa = prompts.encode_prompt(tok, prompt, "question-aware")
    co = prompts.encode_prompt(tok, prompt, "context-only")
    assert torch.equal(qa.full, co.full)  # byte tokens: both ways give the same ids
    kw = dict(method="full", budget=None, window=8, max_new_tokens=12)
    a = generation.generate(model, tok, qa, protocol="question-aware", **kw)
    b = generation.generate(model, tok, co, protocol="context-only", **kw)
    assert a.tokens == b.tokens and len(a.tokens) == 12
    with torch.no_grad():
        ref = model.generate(qa.full[None], max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert ref[0, qa.full.numel():].tolist() == a.tokens
    # compressed: the cache is smaller than the prompt under both protocols
    for protocol, enc in (("question-aware", qa), ("context-only", co)):
        g = generation.generate(model, tok, enc, method="cake", budget=40, window=8, protocol=protocol,
                            max_new_tokens=4)
        assert max(g.kept_per_layer) < g.prompt_tokens / 2 and g.bytes_kept < g.bytes_after < g.bytes_before
    # a min_new_tokens / extra EOS request is honoured by the manual loop
    eos = a.tokens[0]
    g = generation.generate(model, tok, co, method="full", budget=None, window=8, protocol="context-only",
                        max_new_tokens=12, extra_eos=[eos])
    assert g.tokens == [eos]
    g = generation.generate(model, tok, co, method="full", budget=None, window=8, protocol="context-only",
                        max_new_tokens=12, extra_eos=[eos], min_new_tokens=1)
    assert g.tokens[0] != eos


@pytest.fixture(scope="module")
def shipped():
    return models.load_model(None, "cpu", "float32")


@pytest.mark.parametrize("method, budget", [("full", None), ("snapkv", 48), ("cake", 48)])
def test_batch_equals_one_at_a_time(shipped, method, budget):
    """A left-padded batch of prompts of different lengths (all longer than the budget) answers each
    prompt as it is answered alone; rows stop at their own EOS (the newline here)."""
    model, tok = shipped
    counter = haystack.TokenCounter(tok)
    sentences = haystack.haystack_sentences("essay", 0)
    encoded = [prompts.encode_prompt(tok, synthetic.fact_sample(counter, sentences, n, random.Random(n), depth=0.3,
                                                               n_facts=2).prompt(tok, chat=False), "question-aware")
               for n in (60, 240, 120)]
    assert len({e.full.numel() for e in encoded}) == 3 and min(e.full.numel() for e in encoded) > 48
    kw = dict(method=method, budget=budget, window=8, protocol="question-aware", max_new_tokens=10,
              extra_eos=[generation.newline_token_id(tok)])
    batch = generation.generate_batch(model, tok, encoded, **kw)
    alone = [generation.generate(model, tok, e, **kw) for e in encoded]
    assert [g.tokens for g in batch] == [g.tokens for g in alone]
    assert [g.text for g in batch] == [g.text for g in alone]
    assert [g.prompt_tokens for g in batch] == [e.full.numel() for e in encoded]
    # each row's own tokens (plus those fed after its EOS until the batch's last row ends)
    assert all(b.bytes_before >= a.bytes_before for b, a in zip(batch, alone))
    if budget is None:
        assert all(g.kv_fraction == 1.0 for g in batch)
    if budget is not None:
        assert all(sum(g.kept_per_layer) / len(g.kept_per_layer) < g.prompt_tokens for g in batch)


def test_evaluate_items_batches_in_item_order(tok, monkeypatch):
    """Batches of at most --batch-size prompts of one max_new_tokens, sorted by length; the records
    come back in the items' order, equal to one-at-a-time records."""
    needs_eval_extra("matplotlib")  # setup_from_args checks that the report can plot
    items = [(prompts.encode_prompt(tok, prompts.Prompt("a" * n, "?"), "question-aware"), max_new, i)
             for i, (n, max_new) in enumerate([(50, 3), (20, 3), (80, 3), (35, 3), (60, 5)])]
    batches = []
    real = generation.generate_batch

    def spy(model, tokenizer, encoded_list, **kw):
        batches.append(([e.full.numel() for e in encoded_list], kw["max_new_tokens"]))
        return real(model, tokenizer, encoded_list, **kw)

    monkeypatch.setattr(generation, "generate_batch", spy)

    def evaluate(batch_size):
        batches.clear()
        args = eval_args(needle.add_arguments, ["--methods", "full,snapkv", "--budgets", "40", "--window", "8",
                                                "--batch-size", str(batch_size), "--no-progress"])
        setup = setup_from_args(args, tiny_lm(), tok)
        assert setup.batch_size == batch_size and report.environment_info(setup)["batch_size"] == batch_size
        return evaluate_items(setup, items, desc="test", record=lambda run, i, gen: (run.label, i, gen.tokens))

    alone = evaluate(1)
    assert [r[:2] for r in alone] == [(label, i) for label in ("full", "snapkv-40") for i in range(5)]
    assert evaluate(3) == alone
    assert batches == [([22, 37, 52], 3), ([82], 3), ([62], 5)] * 2


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size"):
        setup_from_args(eval_args(needle.add_arguments, ["--batch-size", "0"]))


def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24]), data


def needle_args(out) -> argparse.Namespace:
    return eval_args(needle.add_arguments, [
        "--lengths", "400,500", "--depths", "0", "100", "--methods", "full,cake", "--budgets", "40",
        "--window", "8", "--max-new-tokens", "3", "--style", "ruler", "--out", str(out), "--no-progress"])


def test_needle_end_to_end(tmp_path):
    needs_eval_extra("matplotlib")
    args = needle_args(tmp_path / "needle")
    paths = needle.run(args, model=tiny_lm(), tokenizer=byte_tokenizer())
    (w, h), _ = _png_size(paths["png"])
    assert w > 20 and h > 20
    report = json.load(open(paths["json"], encoding="utf-8"))
    assert report["lengths"] == [400, 500] and report["depths"] == [0.0, 100.0]
    assert set(report["results"]) == {"full", "cake-40"}
    records = [json.loads(x) for x in open(paths["records"], encoding="utf-8")]
    assert len(records) == 2 * 2 * 2
    for label, entry in report["results"].items():
        grid = entry["grid"]
        assert len(grid) == 2 and all(len(row) == 2 for row in grid)  # depth rows x length columns
        mine = [r for r in records if Run(r["method"], r["budget"]).label == label]
        assert entry["accuracy"] == round(100 * sum(r["found"] for r in mine) / len(mine), 2)
        for r in mine:
            assert r["found"] == synthetic.score_items(r["pred"], [r["needle"]])
            assert r["length"] * 0.8 <= r["prompt_tokens"] <= r["length"] + 2
    # the same needle for every method in a cell
    assert len({(r["length"], r["depth"], r["needle"]) for r in records}) == 4
    assert "## cake-40" in open(paths["markdown"], encoding="utf-8").read()
    # a known grid: cell values are the fraction found
    fake = [dict(r, found=1.0 if r["depth"] == 0.0 else 0.0) for r in records]
    paths = needle.write_report(str(tmp_path / "again"), fake, [400, 500], [0.0, 100.0], {})
    report = json.load(open(paths["json"], encoding="utf-8"))
    assert report["results"]["full"]["grid"] == [[1.0, 1.0], [0.0, 0.0]]
    assert report["results"]["cake-40"]["accuracy"] == 50.0
    from matplotlib.image import imread
    pixels = {tuple(round(255 * c) for c in px[:3]) for row in imread(paths["png"]) for px in row}
    assert {(0xF0, 0x49, 0x6E), (0x0C, 0xD7, 0x9F)} <= pixels  # missed (red) and found (green) cells


def test_missing_matplotlib_stops_an_evaluation_before_the_model_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with pytest.raises(ImportError, match=r"plot with matplotlib.*pip install matplotlib"):
        setup_from_args(needle_args(tmp_path / "needle"))


def test_synthetic_end_to_end(tmp_path):
    needs_eval_extra("matplotlib")
    out = tmp_path / "synthetic"
    args = eval_args(synthetic.add_arguments, [
        "--tasks", "niah_multivalue,common_words", "--lengths", "300", "--samples", "1", "--methods", "full",
        "cake", "--budgets", "48", "--window", "8", "--max-new-tokens", "4", "--protocol", "context-only",
        "--out", str(out), "--no-progress"])
    paths = synthetic.run(args, model=tiny_lm(), tokenizer=byte_tokenizer())
    report = json.load(open(paths["json"], encoding="utf-8"))
    assert report["tasks"] == ["niah_multivalue", "common_words"] and report["info"]["protocol"] == "context-only"
    records = [json.loads(x) for x in open(paths["records"], encoding="utf-8")]
    assert len(records) == 4
    for r in records:
        assert r["score"] == synthetic.score_items(r["pred"], r["expected"])
    for label, entry in report["results"].items():
        mine = [r for r in records if Run(r["method"], r["budget"]).label == label]
        for task in report["tasks"]:
            scores = [r["score"] for r in mine if r["task"] == task]
            assert entry["tasks"][task] == round(100 * sum(scores) / len(scores), 2)
    _png_size(paths["png"])
    assert "| method | budget | niah_multivalue | common_words | avg |" in open(paths["markdown"]).read()
    with pytest.raises(ValueError, match="unknown task"):
        synthetic.run(eval_args(synthetic.add_arguments, ["--tasks", "nope"]))


@pytest.mark.parametrize("protocol", ["question-aware", "context-only"])
def test_prefill_chunk_reads_each_prompt_in_chunks(tok, monkeypatch, protocol):
    """--prefill-chunk reaches compress (recorded with the options): each prompt (context-only: context) is read in
    chunks of at most that many tokens, and the answers are those of compress(prefill_chunk=...) itself."""
    needs_eval_extra("matplotlib")
    import cakekv.patch as patch
    spans = []
    real = patch.prefill_chunks
    monkeypatch.setattr(patch, "prefill_chunks", lambda *a: spans.append(real(*a)) or spans[-1])
    items = [(prompts.encode_prompt(tok, prompts.Prompt("a" * n, "?"), protocol), 3, i)
             for i, n in enumerate([150, 90])]
    args = eval_args(needle.add_arguments, ["--methods", "cake", "--budgets", "40", "--window", "8",
                                            "--prefill-chunk", "48", "--protocol", protocol, "--no-progress"])
    setup = setup_from_args(args, tiny_lm(), tok)
    assert setup.options == {"prefill_chunk": 48}
    assert report.environment_info(setup)["options"] == {"prefill_chunk": 48}
    records = evaluate_items(setup, items, desc="test", record=lambda run, i, gen: gen.tokens)
    assert len(spans) == 2 and all(len(s) > 1 and max(b - a for a, b in s) <= 48 for s in spans)
    expected = [generation.generate(tiny_lm(), tok, e, method="cake", budget=40, window=8, protocol=protocol,
                                    max_new_tokens=3, options={"prefill_chunk": 48}).tokens for e, _, _ in items]
    assert records == expected


def test_prefill_chunk_is_checked_before_the_model_loads():
    with pytest.raises(ValueError, match="prefill_chunk: must be >= window"):
        setup_from_args(eval_args(needle.add_arguments, ["--window", "8", "--prefill-chunk", "8"]))
