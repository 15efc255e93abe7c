"""SpanZip (cakekv/methods/spanzip.py): the re-read's scores combined with the window's, spans and budgets against a
plain reference with whole attention matrices (tests/reference_methods.py), its relation to KVzip, the budget
contract, positions after the re-read, left-padded batches and bad options."""
from __future__ import annotations

import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of
import reference_methods as R
from helpers import (BUDGET, WINDOW, assert_batch_rows_alone, kept_prefix, masked_full_cache_logits, prefill, prompt,
                     tiny_model)
from reference import assert_same_selection

TASK = dict(first=(3, 4, 5), resume=(6, 7), answer=(8,))
OPTIONS = dict(chunk_size=48, repeat_ids=TASK["first"], resume_ids=TASK["resume"], answer_ids=TASK["answer"])


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def model(request):
    return tiny_model("llama", kv_heads=request.param)


@pytest.mark.parametrize("ranking,normalise,window_weight", [("global", "rank", 1.0), ("cake", "rank", 1.0),
                                                             ("global", "max", 0.5), ("cake", "max", 2.0)])
def test_matches_the_reference(model, ranking, normalise, window_weight):
    ids = prompt(150, seed=3)
    kept, budgets, scores = R.spanzip_reference(model, ids, BUDGET, WINDOW, 48, ranking=ranking, normalise=normalise,
                                                window_weight=window_weight, **TASK)
    out, _ = prefill(model, ids, "spanzip", ranking=ranking, normalise=normalise, window_weight=window_weight,
                     **OPTIONS)
    layers = cache_of(out).layers
    assert [layer.head_prefix[0] for layer in layers] == budgets
    assert sum(map(sum, budgets)) == (BUDGET - WINDOW) * len(layers) * model.config.num_key_value_heads
    for i, layer in enumerate(layers):
        for h, got in enumerate(kept_prefix(layer)):
            assert_same_selection(got, kept[i][h], scores[i][h])
            assert set(range(4)) <= set(got)  # the sinks


def test_without_window_it_keeps_what_kvzip_keeps(model):
    ids = prompt(150, seed=5)
    out, _ = prefill(model, ids, "spanzip", window_weight=0.0, **OPTIONS)
    want, _ = prefill(model, ids, "kvzip", **OPTIONS)
    for got_layer, want_layer in zip(cache_of(out).layers, cache_of(want).layers):
        assert kept_prefix(got_layer) == kept_prefix(want_layer)


def test_continuation_sees_only_the_kept_context_at_its_positions(model):
    ids, cont = prompt(130, seed=7), prompt(5, seed=8)
    out, _ = prefill(model, ids, "spanzip", chunk_size=40, decode_evict=False)
    cache = cache_of(out)
    for layer in cache.layers:
        assert layer.seen == 130 and layer.next_pos.tolist() == [130]
    with cakekv.compress(model, "spanzip", budget=BUDGET, window=WINDOW, decode_evict=False), torch.no_grad():
        got = model(input_ids=cont, use_cache=True, **cache_kwargs(model, cache)).logits
    torch.testing.assert_close(got, masked_full_cache_logits(model, ids, cont, cache), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("ranking", ["global", "cake"])
def test_left_padded_batch_equals_each_row_alone(model, ranking):
    assert_batch_rows_alone(model, "spanzip", 40, ranking=ranking, **OPTIONS)


@pytest.mark.parametrize("name,value,error", [("ranking", "layer", ValueError), ("normalise", "mean", ValueError),
                                              ("window_weight", -1.0, ValueError), ("span_weight", 2.0, ValueError),
                                              ("chunk_size", 0, ValueError), ("cascading", True, TypeError)])
def test_bad_options_name_the_argument(model, name, value, error):
    with pytest.raises(error, match=f"^{name}: "):
        cakekv.compress(model, "spanzip", budget=BUDGET, window=WINDOW, **{name: value})
