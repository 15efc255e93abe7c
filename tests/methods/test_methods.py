"""The methods beyond CAKE and SnapKV against their plain-PyTorch references (tests/reference_methods.py), MHA
and GQA: kept entries, per-head and per-layer budgets, storage. The compress() contract, for every registered
method: tests/methods/test_contract.py."""
from __future__ import annotations

import random

import pytest
import torch

from cakekv import cache_of
import reference_methods as R
from helpers import BUDGET, WINDOW, capture_qkv, kept_prefix, prefill, prompt, tiny_model
from reference import assert_same_selection

REFERENCES = {
    "streamingllm": lambda L, s: R.streamingllm_reference(L, BUDGET, WINDOW),
    "h2o": lambda L, s: R.h2o_reference(L, s, BUDGET, WINDOW),
    "pyramidkv": lambda L, s: R.pyramidkv_reference(L, s, BUDGET, WINDOW),
    "adakv": lambda L, s: R.adakv_reference(L, s, BUDGET, WINDOW),
    "defensivekv": lambda L, s: R.defensivekv_reference(L, s, BUDGET, WINDOW),
    "layer_defensivekv": lambda L, s: R.layer_defensivekv_reference(L, s, BUDGET, WINDOW),
    "lava": lambda L, s: R.lava_reference(L, s, BUDGET, WINDOW),
    "spancake": lambda L, s: R.spancake_reference(L, s, BUDGET, WINDOW),
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
    kept, budgets, scores = R.defensivekv_reference(layers, scale, BUDGET, WINDOW, head_budgets=False)
    out, _ = prefill(model, ids, "defensivekv", head_budgets=False)
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


@pytest.mark.parametrize("protected_set", ["reach", "below"])
def test_defensivekv_protected_set(captured, protected_set):
    """Both counts against the reference; "below" protects exactly one entry less per head (the one whose
    mass reaches the target) wherever the cap does not bind."""
    model, ids, layers, scale = captured
    kept, budgets, scores = R.defensivekv_reference(layers, scale, BUDGET, WINDOW, protected_set=protected_set)
    out, _ = prefill(model, ids, "defensivekv", protected_set=protected_set)
    for i, layer in enumerate(cache_of(out).layers):
        assert layer.head_prefix[0] == list(budgets[i])
        for h, got in enumerate(kept_prefix(layer)):
            assert_same_selection(got, kept[i][h], scores[i][h])
    q, k, v, wo = layers[0]
    counts = {which: (R.defensive_layer(q, k, v, wo, scale, WINDOW, 300, protected_set=which)
                      == R.defensive_layer(q, k, v, wo, scale, WINDOW, 300, protected_set=which).max()).sum(-1)
              for which in ("reach", "below")}                  # budget 300 > n: the cap does not bind
    assert (counts["reach"] == counts["below"] + 1).all(), counts


@pytest.fixture(scope="module")
def shipped_needle():
    """The shipped trained model on a needle prompt of its own format (real, peaked attention)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cakekv.eval.common import tiny_model_path
    from cakekv.eval.haystack import TokenCounter, haystack_sentences
    from cakekv.eval.prompts import encode_prompt
    from cakekv.eval.synthetic import fact_sample

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    sample = fact_sample(TokenCounter(tok), haystack_sentences("essay", 1), 700, random.Random(5), depth=0.4)
    ids = encode_prompt(tok, sample.prompt(tok, False), "question-aware").full.reshape(1, -1)
    code = tok(" " + sample.expected[0], add_special_tokens=False)["input_ids"]
    start = next(i for i in range(ids.shape[1]) if ids[0, i:i + len(code)].tolist() == code)
    return model, ids, capture_qkv(model, ids), list(range(start, start + len(code)))


@pytest.mark.parametrize("options", [{}, dict(span_before=0, span_after=5, span_weight=1.0), dict(cascading=False)],
                         ids=["defaults", "pure-spans", "one-cut"])
def test_spancake_matches_reference_on_shipped_model(shipped_needle, options):
    model, ids, layers, needle = shipped_needle
    spans = {k: v for k, v in options.items() if k.startswith("span_")}
    names = dict(span_before="before", span_after="after", span_weight="weight")
    kw = {names[k]: v for k, v in spans.items()}
    if "cascading" in options:
        kw["cascading"] = options["cascading"]
    budget, window = 96, 16
    kept, budgets, scores = R.spancake_reference(layers, model.model.layers[0].self_attn.scaling, budget, window,
                                                 **kw)
    out, _ = prefill(model, ids, "spancake", budget=budget, window=window, **options)
    cache = cache_of(out)
    assert [layer.head_prefix[0] for layer in cache.layers] == [list(b) for b in budgets]
    for i, layer in enumerate(cache.layers):
        for h, got in enumerate(kept_prefix(layer, window=window)):
            assert_same_selection(got, kept[i][h], scores[i][h])


def test_spancake_keeps_the_code_that_cake_cuts(shipped_needle):
    # The question peaks on the needle's key; CAKE keeps a part of the code that follows it, the spans all of it.
    model, ids, _, needle = shipped_needle

    def whole_code_kept(method):
        out, _ = prefill(model, ids, method, budget=96, window=16)
        return sum(set(needle) <= set(head) for layer in cache_of(out).layers for head in kept_prefix(layer, window=16))

    assert whole_code_kept("spancake") > whole_code_kept("cake")


@pytest.mark.parametrize("options, pooling", [({}, (33, "max")), (dict(span_before=20), (41, "max")),
                                              (dict(decode_spans=False), (5, "avg")), (dict(span_weight=0.0), (5, "avg"))])
def test_spancake_decode_pooling_covers_the_span(options, pooling):
    # decode-time eviction pools over the span radius (max), so the rest of a value being copied stays
    from cakekv.methods import get_method
    method = get_method("spancake")(tiny_model("llama").config, BUDGET, WINDOW, **options)
    assert method.pooling == pooling
