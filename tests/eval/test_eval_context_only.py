"""Context-only evaluation compresses each context once: the questions sharing a context are answered
from copies of one compressed prefill, exactly as each would be answered alone, in the evaluation
runners (needle/synthetic items, LongBench files) as in ``generate_batch``."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

import cakekv.pipeline
from cakekv.eval import generation, haystack, longbench, models, prompts, report, synthetic
from cakekv.eval.args import setup_from_args
from cakekv.eval.runs import evaluate_items, item_batches
from helpers import byte_tokenizer, eval_args, needs_eval_extra, tiny_lm


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models: one thread is fast and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shipped():
    return models.load_model(None, "cpu", "float32")


def fact_prompts(tok, contexts: int, questions: int, length: int) -> tuple[list[prompts.Encoded], list[str]]:
    """Context-only prompts of ``contexts`` documents with ``questions`` facts each, one question per
    fact, the documents' questions interleaved (a context's prompts are not next to each other), and
    the code each asks for."""
    counter = haystack.TokenCounter(tok)
    sentences = haystack.haystack_sentences("essay", 0)
    per_context = []
    for c in range(contexts):
        sample = synthetic.fact_sample(counter, sentences, length, random.Random(c), n_facts=questions)
        group = []
        for name, code in sample.meta["facts"].items():
            question, prefix = haystack.fact_question("secret code", name)
            group.append((prompts.make_prompt(tok, "", sample.context, question, chat=False, answer_prefix=prefix),
                          code))
        per_context.append(group)
    pairs = [group[q] for q in range(questions) for group in per_context]
    return [prompts.encode_prompt(tok, prompt, "context-only") for prompt, _ in pairs], [code for _, code in pairs]


@pytest.fixture
def prefills(monkeypatch):
    """The context lengths of the compressed prefills run."""
    lengths = []
    real = cakekv.pipeline.prefill_context

    def spy(model, context_ids):
        lengths.append(context_ids.shape[1])
        return real(model, context_ids)

    monkeypatch.setattr(cakekv.pipeline, "prefill_context", spy)
    return lengths


@pytest.mark.parametrize("method, budget", [("cake", 48), ("snapkv", 48), ("adakv", 64), ("full", None)])
def test_shared_prefill_answers_like_one_prompt_at_a_time(shipped, prefills, method, budget):
    model, tok = shipped
    encoded, codes = fact_prompts(tok, contexts=2, questions=3, length=240)
    assert prompts.context_groups(encoded) == [[0, 2, 4], [1, 3, 5]]
    assert min(e.context.numel() for e in encoded) > 3 * 48  # compressed for real
    kw = dict(method=method, budget=budget, window=8, protocol="context-only", max_new_tokens=8,
              extra_eos=[generation.newline_token_id(tok)])
    shared = generation.generate_batch(model, tok, encoded, **kw)
    assert prefills == [encoded[0].context.numel(), encoded[1].context.numel()]
    prefills.clear()
    alone = [generation.generate(model, tok, e, **kw) for e in encoded]
    assert prefills == [e.context.numel() for e in encoded]
    assert [g.tokens for g in shared] == [g.tokens for g in alone]
    assert [g.text for g in shared] == [g.text for g in alone]
    if budget is None:  # each question gets its own answer: the fact it asks for
        assert all(g.text.strip().rstrip(".") == code for g, code in zip(shared, codes))
    for s, a, e in zip(shared, alone, encoded):
        assert (s.prompt_tokens, s.bytes_before, s.bytes_after, s.bytes_kept, s.kept_per_layer) == \
            (a.prompt_tokens, a.bytes_before, a.bytes_after, a.bytes_kept, a.kept_per_layer)
        assert s.prompt_tokens == e.full.numel()
        assert s.questions_per_prefill == 3 and a.questions_per_prefill == 1 and s.seconds > 0
    assert report.prefill_count(g.questions_per_prefill for g in shared) == 2


def test_evaluate_items_groups_the_prompts_of_a_context(monkeypatch):
    """Context-only items go to ``generate_batch`` one context (and answer length) at a time, whatever
    --batch-size, and come back in the items' order."""
    needs_eval_extra("matplotlib")  # setup_from_args checks that the report can plot
    tok = byte_tokenizer()
    texts = [("a" * 60, "?1"), ("b" * 40, "?2"), ("a" * 60, "?3"), ("a" * 60, "?4"), ("b" * 40, "?5")]
    items = [(prompts.encode_prompt(tok, prompts.Prompt(c, q), "context-only"), 5 if i == 3 else 3, i)
             for i, (c, q) in enumerate(texts)]
    assert item_batches(items, 1, "context-only") == [[0, 2], [1, 4], [3]]
    assert item_batches(items, 1, "question-aware") == [[1], [4], [0], [2], [3]]
    calls = []
    real = generation.generate_batch

    def spy(model, tokenizer, encoded_list, **kw):
        calls.append(len(encoded_list))
        return real(model, tokenizer, encoded_list, **kw)

    monkeypatch.setattr(generation, "generate_batch", spy)
    args = eval_args(synthetic.add_arguments, ["--methods", "snapkv", "--budgets", "24", "--window", "4",
                                                "--protocol", "context-only", "--no-progress"])
    setup = setup_from_args(args, tiny_lm(), tok)
    records = evaluate_items(setup, items, desc="test",
                             record=lambda run, i, gen: (i, gen.tokens, gen.questions_per_prefill))
    assert calls == [2, 2, 1]
    assert [r[0] for r in records] == list(range(5)) and [r[2] for r in records] == [2, 2, 2, 1, 2]
    alone = [real(setup.model, tok, [e], method="snapkv", budget=24, window=4, protocol="context-only",
                  max_new_tokens=n)[0].tokens for e, n, _ in items]
    assert [r[1] for r in records] == alone


def test_longbench_shares_prefills_and_writes_in_data_order(tmp_path, shipped, prefills):
    """LongBench examples with the same context (not consecutive in the file) share a prefill; the
    predictions file keeps the data's order and equals the per-question answers; the report counts
    the prefills against the examples."""
    needs_eval_extra("matplotlib")
    model, tok = shipped
    data_dir = tmp_path / "data"
    os.makedirs(data_dir)
    contexts = [" ".join(f"The secret code of {n} is {c}." for n, c in facts) * 6
                for facts in ([("Ada Berg", 48213), ("Tom Lane", 99120)], [("Eva Moss", 31877), ("Ian Holt", 20545)])]
    rows = [{"context": contexts[i % 2], "input": f"What is the secret code of {name}?", "answers": [str(code)],
             "_id": f"q{i}"}
            for i, (name, code) in enumerate([("Ada Berg", 48213), ("Eva Moss", 31877), ("Tom Lane", 99120),
                                              ("Ian Holt", 20545), ("Ada Berg", 48213)])]
    with open(data_dir / "hotpotqa.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    out = tmp_path / "out"
    args = eval_args(longbench.add_arguments, [
        "--data-dir", str(data_dir), "--datasets", "hotpotqa", "--methods", "cake", "--budgets", "32",
        "--window", "8", "--max-new-tokens", "6", "--protocol", "context-only", "--out", str(out), "--no-progress"])
    paths = longbench.run(args, model=model, tokenizer=tok)
    assert len(prefills) == 2
    records = longbench.read_jsonl(out / "pred" / "cake-32" / "hotpotqa.jsonl")
    assert [r["_id"] for r in records] == [row["_id"] for row in rows]
    assert [r["questions_per_prefill"] for r in records] == [3, 2, 3, 2, 3]
    alone = []
    for row in rows:
        prompt, _ = longbench.build_prompt(tok, row, "hotpotqa", max_length=None, chat=prompts.use_chat(tok, "auto"))
        alone.append(generation.generate(model, tok, prompts.encode_prompt(tok, prompt, "context-only"),
                                         method="cake", budget=32, window=8, protocol="context-only",
                                         max_new_tokens=6).text)
    assert [r["pred"] for r in records] == alone
    entry = json.load(open(paths["json"], encoding="utf-8"))["results"]["cake-32"]["datasets"]["hotpotqa"]
    assert (entry["n"], entry["prefills"]) == (5, 2)
    assert "2 prefills for 5 examples" in open(paths["markdown"], encoding="utf-8").read()
