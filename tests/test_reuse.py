"""Compress once, answer many: a compressed context cloned for each question continues exactly as if the
context had been compressed again for that question, and the original stays untouched."""
from __future__ import annotations

import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of
from conftest import tiny_model
from test_core import BUDGET, WINDOW, prompt


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
             (layer.pos_flat if layer.ragged else layer.pos).clone(), layer.keys.clone()) for layer in cache.layers]


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
