"""Compress once, answer many: a compressed context cloned for each question continues exactly as if the
context had been compressed again for that question, and the original stays untouched."""
from __future__ import annotations

import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of
from cakekv.defaults import QUERY_AGNOSTIC_METHOD
from helpers import BUDGET, WINDOW, prompt, tiny_model


def answer(model, cache, question, steps=6):
    """The question's logits and `steps` greedy tokens after it, continuing from `cache`."""
    out = model(input_ids=question, use_cache=True, **cache_kwargs(model, cache))
    logits, tokens = [out.logits[:, -1]], []
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        out = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache))
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), torch.cat(tokens, 1)


def layer_state(cache):
    return [(layer.seen, [list(r) for r in layer.head_counts],
             layer.storage.pos.clone(), layer.keys.clone()) for layer in cache.layers]


@pytest.mark.parametrize("method", ["cake", "snapkv", "adakv"])
def test_clones_answer_like_fresh_compressions_and_leave_the_context_alone(method):
    model = tiny_model("llama", kv_heads=2)
    context = prompt(200, seed=4)
    questions = [prompt(9, seed=5), prompt(13, seed=6)]
    with torch.no_grad(), cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW):
        compressed = cache_of(model(input_ids=context, use_cache=True))
        before = layer_state(compressed)
        got = [answer(model, compressed.clone(), q) for q in questions]
        want = []
        for q in questions:
            fresh = cache_of(model(input_ids=context, use_cache=True))
            want.append(answer(model, fresh, q))
    for (g_logits, g_tokens), (w_logits, w_tokens) in zip(got, want):
        assert torch.equal(g_tokens, w_tokens)
        torch.testing.assert_close(g_logits, w_logits, rtol=0, atol=0)
    for (seen, counts, pos, keys), (seen0, counts0, pos0, keys0) in zip(layer_state(compressed), before):
        assert seen == seen0 and counts == counts0 and torch.equal(pos, pos0) and torch.equal(keys, keys0)


def test_clone_refused_mid_prefill():
    model = tiny_model("llama", kv_heads=2)
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW) as handle:
        cache = handle.new_cache()
        cache.layers[0].prefilling = True
        with pytest.raises(RuntimeError, match="cache: cannot clone"):
            cache.clone()


CONTEXT = ("The secret code of Ada Berg is 48213. The harbour of Lisbon opens at dawn. " * 12
           + "The secret code of Tom Lane is 99120. ")  # about 450 tokens: compressed at budget 64


def shipped_tiny_llama():
    """The shipped tiny Llama (loaded afresh: tests may spy on it) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cakekv.eval.common import tiny_model_path

    path = tiny_model_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def cakekv_pipeline(model, tok, **settings):
    from transformers import pipeline

    import cakekv.pipeline  # noqa: F401  (registers the task)

    return pipeline("cakekv-text-generation", model=model, tokenizer=tok, **settings)


def tiny_pipeline(**settings):
    """The cakekv pipeline built with `settings` on the shipped tiny Llama, with the model and tokenizer."""
    model, tok = shipped_tiny_llama()
    return cakekv_pipeline(model, tok, **settings), model, tok


def recorded_compressions(monkeypatch) -> list:
    """The handles of the pipeline's `compress` calls, in order, once its calls are made."""
    import cakekv.pipeline

    handles = []

    def recording(model, **kwargs):
        handles.append(cakekv.compress(model, **kwargs))
        return handles[-1]

    monkeypatch.setattr(cakekv.pipeline, "compress", recording)
    return handles


def evicted(handle) -> bool:
    """Whether every layer of the handle's last cache holds fewer entries than the tokens it has seen."""
    return bool(handle.stats) and all(s["kept"][0] < s["tokens"][0] for s in handle.stats)


def test_pipeline_answers_each_question_from_the_context_compressed_once(monkeypatch):
    handles = recorded_compressions(monkeypatch)
    qa, model, tok = tiny_pipeline(method="cake", budget=64, window=8)
    questions = ["What is the secret code of Ada Berg?", "What is the secret code of Tom Lane?"]
    got = qa(context=CONTEXT, questions=questions, max_new_tokens=6, do_sample=False)
    assert [g["question"] for g in got] == questions
    assert len(handles) == 1 and evicted(handles[0])  # the context was compressed, once
    for question, result in zip(questions, got):
        context_ids = tok(CONTEXT, return_tensors="pt")["input_ids"].to(model.device)
        question_ids = tok(question, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        ids = torch.cat([context_ids, question_ids], 1)
        with torch.no_grad(), cakekv.compress(model, method="cake", budget=64, window=8):
            fresh = cache_of(model(input_ids=context_ids, use_cache=True))  # the context compressed again
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                 **cache_kwargs(model, fresh))
        assert result["answer"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert not any(name.startswith("cakekv_") for name in [model.config._attn_implementation])  # unpatched
    with pytest.raises(TypeError, match="questions"):
        qa(context=CONTEXT, questions=[])


def settings_of(handle) -> tuple:
    return handle.method.name, handle.budget, handle.window, handle.method.options.kernel_size, handle.prefill_chunk


def test_pipeline_compresses_with_its_settings_unless_a_call_gives_others(monkeypatch):
    handles = recorded_compressions(monkeypatch)
    qa, _, _ = tiny_pipeline(method="snapkv", budget=64, window=8, options={"kernel_size": 3})
    ask = dict(context=CONTEXT, questions="What is the secret code of Tom Lane?", max_new_tokens=1)
    qa(**ask)
    qa(**ask, budget=48)              # this call only
    qa(**ask, options={})             # options replaced as a whole: snapkv's default kernel
    qa(**ask, method="cake", window=4)
    qa(**ask, prefill_chunk=100)      # the context read 100 tokens at a time
    qa(**ask)
    assert [settings_of(h) for h in handles] == [
        ("snapkv", 64, 8, 3, None), ("snapkv", 48, 8, 3, None), ("snapkv", 64, 8, 7, None), ("cake", 64, 4, 3, None),
        ("snapkv", 64, 8, 3, 100), ("snapkv", 64, 8, 3, None)]
    assert all(evicted(h) for h in handles)


BAD_SETTINGS = [dict(budget=0), dict(window=0), dict(budget=8, window=8), dict(budget=64.0), dict(prefill_chunk=4),
                dict(method="nosuch"), dict(options={"gamma": "high"}), dict(options={"tau3": 1.0}),
                dict(method="snapkv", options={"gamma": 200.0})]


@pytest.mark.parametrize("bad", BAD_SETTINGS, ids=lambda bad: "-".join(f"{k}={v}" for k, v in bad.items()))
def test_pipeline_refuses_bad_settings_as_compress_does_when_built_and_called(monkeypatch, bad):
    handles = recorded_compressions(monkeypatch)
    qa, model, _ = tiny_pipeline()
    settings = {"method": QUERY_AGNOSTIC_METHOD, **{k: v for k, v in bad.items() if k != "options"}}
    with pytest.raises((TypeError, ValueError)) as want:  # the pipeline's method when none is named
        cakekv.compress(model, **settings, **bad.get("options", {}))
    with pytest.raises(want.type) as built:
        tiny_pipeline(**bad)
    with pytest.raises(want.type) as called:
        qa(context=CONTEXT, questions="Who?", max_new_tokens=1, **bad)
    assert str(built.value) == str(called.value) == str(want.value)
    assert not handles  # refused before any compression


def test_pipeline_refuses_options_that_are_not_a_dict():
    with pytest.raises(TypeError, match="options: must be a dict"):
        tiny_pipeline(options="gamma=200")


def test_pipeline_leaves_the_model_where_it_is_unless_device_is_passed(monkeypatch):
    """transformers' Pipeline moves the model to the first accelerator when no device is given (to cuda:0 on
    a GPU machine): simulated here with an accelerator reported available and the model's moves recorded."""
    import transformers.pipelines.base

    monkeypatch.setattr(transformers.pipelines.base, "is_torch_cuda_available", lambda: True)
    model, tok = shipped_tiny_llama()
    moves = []
    monkeypatch.setattr(model, "to", lambda *args, **kwargs: moves.append(args) or model)
    qa = cakekv_pipeline(model, tok)
    assert moves == [] and qa.device == model.device == torch.device("cpu")
    cakekv_pipeline(model, tok, device="cuda:0")  # the user's choice: moved
    assert moves == [(torch.device("cuda:0"),)]


def test_pipeline_defaults_to_the_query_agnostic_method(monkeypatch):
    """No method named: the pipeline compresses its context, before any question, with the query-agnostic method,
    given the tokenizer's repeat instruction."""
    handles = recorded_compressions(monkeypatch)
    qa, _, _ = tiny_pipeline(budget=64, window=8)
    qa(context=CONTEXT, questions="What is the secret code of Tom Lane?", max_new_tokens=1)
    assert QUERY_AGNOSTIC_METHOD == "kvzip" and [h.method.name for h in handles] == ["kvzip"]
    assert handles[0].method.options.repeat_ids and all(evicted(h) for h in handles)
