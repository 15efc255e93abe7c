"""Compress once, answer many: a compressed context cloned for each question continues exactly as if the
context had been compressed again for that question, and the original stays untouched."""
from __future__ import annotations

import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of
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


def test_pipeline_answers_each_question_from_the_context_compressed_once():
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import cakekv.pipeline  # noqa: F401  (registers the task)
    from cakekv.eval.common import tiny_model_path

    path = tiny_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    context = ("The secret code of Ada Berg is 48213. The harbour of Lisbon opens at dawn. " * 12
               + "The secret code of Tom Lane is 99120. ")
    questions = ["What is the secret code of Ada Berg?", "What is the secret code of Tom Lane?"]
    qa = pipeline("cakekv-text-generation", model=model, tokenizer=tok, method="cake", budget=64, window=8)
    got = qa(context=context, questions=questions, max_new_tokens=6, do_sample=False)
    assert [g["question"] for g in got] == questions
    for question, result in zip(questions, got):
        ids = torch.cat([tok(context, return_tensors="pt")["input_ids"],
                         tok(question, return_tensors="pt", add_special_tokens=False)["input_ids"]], 1)
        with torch.no_grad(), cakekv.compress(model, method="cake", budget=64, window=8):
            context_ids = ids[:, :-len(tok(question, add_special_tokens=False)["input_ids"])]
            fresh = cache_of(model(input_ids=context_ids, use_cache=True))  # the context compressed again
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                 **cache_kwargs(model, fresh))
        assert result["answer"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert not any(name.startswith("cakekv_") for name in [model.config._attn_implementation])  # unpatched
    with pytest.raises(TypeError, match="questions"):
        qa(context=context, questions=[])
