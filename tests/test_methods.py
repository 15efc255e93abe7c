"""The methods beyond CAKE and SnapKV against their plain-PyTorch references (MHA and GQA), and the compress()
contract for every registered method."""
from __future__ import annotations

import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of
import reference_methods as R
from helpers import (BUDGET, WINDOW, capture_qkv, continuation_nll, kept_prefix, left_padded, prefill, prompt, tiny_model)
from reference import assert_same_selection

METHODS = [m for m in cakekv.available_methods() if m != "full"]
REFERENCES = {
    "streamingllm": lambda L, s: R.streamingllm_reference(L, BUDGET, WINDOW),
    "h2o": lambda L, s: R.h2o_reference(L, s, BUDGET, WINDOW),
    "pyramidkv": lambda L, s: R.pyramidkv_reference(L, s, BUDGET, WINDOW),
    "adakv": lambda L, s: R.adakv_reference(L, s, BUDGET, WINDOW),
    "defensivekv": lambda L, s: R.defensivekv_reference(L, s, BUDGET, WINDOW),
    "layer_defensivekv": lambda L, s: R.layer_defensivekv_reference(L, s, BUDGET, WINDOW),
    "lava": lambda L, s: R.lava_reference(L, s, BUDGET, WINDOW),
}


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def captured(request):
    model = tiny_model("llama", kv_heads=request.param)
    ids = prompt(150, seed=3)
    return model, ids, capture_qkv(model, ids), model.model.layers[0].self_attn.scaling


@pytest.mark.parametrize("method", list(REFERENCES))
def test_method_matches_reference(method, captured):
    model, ids, layers, scale = captured
    kept, budgets, scores = REFERENCES[method](layers, scale)
    out, handle = prefill(model, ids, method)
    cache = cache_of(out)
    assert [layer.head_prefix[0] for layer in cache.layers] == [list(b) for b in budgets]
    total = sum(sum(b) for b in budgets)
    assert total == (BUDGET - WINDOW) * len(budgets) * model.config.num_key_value_heads
    for i, layer in enumerate(cache.layers):
        for h, got in enumerate(kept_prefix(layer)):
            if scores is None:
                assert got == kept[i][h]
            else:
                assert_same_selection(got, kept[i][h], scores[i][h])
        # storage holds exactly the kept entries (ragged) or, with uniform heads, no padding at all
        if layer.ragged:
            assert layer.keys.shape[0] == sum(layer.head_counts[0])
        else:
            assert layer.keys.shape[2] == max(layer.head_counts[0]) == min(layer.head_counts[0])


def test_budgets_move_between_heads_and_layers(captured):
    model, ids, _, _ = captured
    out, _ = prefill(model, ids, "pyramidkv")
    per_layer = [layer.head_prefix[0][0] for layer in cache_of(out).layers]
    assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > per_layer[-1]
    if model.config.num_key_value_heads > 1:
        for method in ("adakv", "lava", "defensivekv"):
            out, _ = prefill(model, ids, method)
            assert any(len(set(layer.head_prefix[0])) > 1 for layer in cache_of(out).layers), method


def test_cake_head_budgets_and_uniform_defensivekv(captured):
    model, ids, layers, scale = captured
    hkv = model.config.num_key_value_heads
    out, _ = prefill(model, ids, "cake", head_budgets=True)
    uniform, _ = prefill(model, ids, "cake")
    for a, b in zip(cache_of(out).layers, cache_of(uniform).layers):
        assert sum(a.head_prefix[0]) == b.head_prefix[0][0] * hkv  # same layer budgets, split by score
    kept, budgets, scores = R.defensivekv_reference(layers, scale, BUDGET, WINDOW, head_adaptive=False)
    out, _ = prefill(model, ids, "defensivekv", head_adaptive=False)
    for i, layer in enumerate(cache_of(out).layers):
        assert layer.head_prefix[0] == budgets[i]
        for h, got in enumerate(kept_prefix(layer)):
            assert_same_selection(got, kept[i][h], scores[i][h])


def test_layer_defensivekv_cascading_equals_global(captured):
    model, ids, _, _ = captured
    glob, _ = prefill(model, ids, "layer_defensivekv")
    casc, _ = prefill(model, ids, "layer_defensivekv", cascading=True)
    for a, b in zip(cache_of(glob).layers, cache_of(casc).layers):
        assert kept_prefix(a) == kept_prefix(b)


# ---- the compress() contract for every method ---------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_short_prompt_is_identical(method):
    model = tiny_model("llama", kv_heads=2, layers=2)
    ids = prompt(BUDGET, seed=2)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    # budget above prompt + generated tokens, so that decode eviction (CAKE) has nothing to do either
    with cakekv.compress(model, method=method, budget=BUDGET + 10, window=WINDOW):
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_chunked_continuation_equals_token_by_token(method):
    model = tiny_model("llama", kv_heads=2, layers=2)
    ids, cont = prompt(110, seed=4), prompt(12, seed=9)
    chunked, _ = continuation_nll(model, ids, cont, method, chunked=True)
    stepwise, _ = continuation_nll(model, ids, cont, method, chunked=False)
    assert abs(chunked - stepwise) < 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_each_row_alone(method):
    model = tiny_model("qwen2", kv_heads=2, layers=2)
    prompts = [prompt(n, seed=20 + n) for n in (33, 95, 140)]
    ids, mask = left_padded(prompts)
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW) as handle:
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                               pad_token_id=0)
        stats = handle.stats
        alone = [model.generate(input_ids=p, max_new_tokens=10, do_sample=False, pad_token_id=0) for p in prompts]
        alone_heads = []
        for p in prompts:
            model.generate(input_ids=p, max_new_tokens=1, do_sample=False, pad_token_id=0)
            alone_heads.append([s["budget_per_head"][0] for s in handle.stats])
    for r, single in enumerate(alone):
        assert torch.equal(batch[r, ids.shape[1]:], single[0, prompts[r].shape[1]:]), f"row {r} differs"
    assert stats[0]["budget"][0] is None
    for r in (1, 2):  # per-head budgets equal those of the row alone
        assert [s["budget_per_head"][r] for s in stats] == alone_heads[r]


DECODE_STEPS = 500


@pytest.mark.parametrize("method,kw", [(m, {}) for m in METHODS] + [("cake", {"head_budgets": True})],
                         ids=METHODS + ["cake-head_budgets"])
def test_decode_eviction_holds_the_budget_over_500_tokens(method, kw):
    """Long generations stay within memory: with decode_evict=True every KV head of every layer keeps at
    most its budget after each of 500 generated tokens (uniform and ragged layouts), the newest token is
    always kept, and the storage stops growing after the first appends."""
    model = tiny_model("llama", kv_heads=2, layers=2)
    n = 100
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, decode_evict=True, **kw):
        with torch.no_grad():
            out = model(input_ids=prompt(n, seed=5), use_cache=True)
            cache = cache_of(out)
            budgets = [layer.head_budgets[0] for layer in cache.layers]
            assert all(sum(b) < 2 * (n - 1) for b in budgets)  # the prompt was compressed
            stored = []
            for step in range(DECODE_STEPS):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache), use_cache=True)
                for layer, budget in zip(cache.layers, budgets):
                    counts = layer.head_counts[0]
                    assert all(c <= b for c, b in zip(counts, budget)), f"step {step}: {counts} > {budget}"
                    assert int(layer.padded_pos()[0].max()) == n + step
                stored.append(sum(layer.stored_bytes() for layer in cache.layers))
    assert len(set(stored[2:])) == 1, "the cache kept growing"
    assert [layer.head_counts[0] for layer in cache.layers] == budgets  # held at, not below, the budget
    if method in ("adakv", "lava") or kw:
        assert any(layer.ragged for layer in cache.layers)


BAD_OPTIONS = {  # a wrong value raises ValueError, a wrong type TypeError (every case: tests/test_options.py)
    "streamingllm": ("sinks", -1, ValueError), "h2o": None, "pyramidkv": ("beta", 0, ValueError),
    "adakv": ("floor_alpha", 1.5, ValueError), "defensivekv": ("threshold", 2.0, ValueError),
    "layer_defensivekv": ("cascading", "yes", TypeError), "lava": ("floor_alpha", -0.1, ValueError),
    "cake": ("head_floor", 2.0, ValueError), "snapkv": ("kernel_size", 4, ValueError),
}


@pytest.mark.parametrize("method", METHODS)
def test_bad_options_raise_named_errors(method):
    model = tiny_model("llama", layers=1)
    with pytest.raises(TypeError, match="^bogus"):
        cakekv.compress(model, method=method, budget=64, window=8, bogus=1)
    if BAD_OPTIONS.get(method):
        name, value, error = BAD_OPTIONS[method]
        with pytest.raises(error, match=f"^{name}"):
            cakekv.compress(model, method=method, budget=64, window=8, **{name: value})
    assert model.config._attn_implementation == "sdpa"


def test_all_methods_registered():
    assert {"streamingllm", "h2o", "pyramidkv", "adakv", "defensivekv", "layer_defensivekv", "lava"} <= set(
        cakekv.available_methods())
