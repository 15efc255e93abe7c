"""The contract of cakekv.compress (docs/methods.md#the-common-frame) on tiny models of every supported family."""
from __future__ import annotations

import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of
from cakekv.patch import _HANDLE_OF_MODULE
from helpers import (BUDGET, WINDOW, FAMILIES, capture_qk, continuation_nll, kept_prefix, left_padded,
                     masked_full_cache_logits, prefill, prompt, tiny_model)
from reference import assert_same_selection, cake_reference, snapkv_reference


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cake_matches_reference(family, kv_heads, dtype):
    model = tiny_model(family, kv_heads=kv_heads, dtype=dtype)
    ids = prompt(120, seed=3)
    layers_qk = capture_qk(model, ids)
    scale = model.model.layers[0].self_attn.scaling
    kept, budgets, scores = cake_reference(layers_qk, scale, BUDGET, WINDOW, tau1=1.0, tau2=1.0)
    out, _ = prefill(model, ids, "cake")
    cache = cache_of(out)
    assert [layer.prefix_counts[0] for layer in cache.layers] == budgets
    assert sum(budgets) == (BUDGET - WINDOW) * len(budgets)
    for i, layer in enumerate(cache.layers):
        for h, got in enumerate(kept_prefix(layer)):
            assert_same_selection(got, kept[i][h], scores[i][h], rel_tol=1e-3 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("cascading", [True, False])
def test_cake_options_reach_the_math(cascading):
    model = tiny_model("llama")
    ids = prompt(150, seed=5)
    layers_qk = capture_qk(model, ids)
    scale = model.model.layers[0].self_attn.scaling
    kept, budgets, scores = cake_reference(layers_qk, scale, 48, WINDOW, tau1=1.6, tau2=0.6, gamma=50.0,
                                           kernel=3, cascading=cascading)
    out, _ = prefill(model, ids, "cake", budget=48, tau1=1.6, tau2=0.6, gamma=50.0, kernel_size=3,
                     cascading=cascading)
    layers = cache_of(out).layers
    assert [layer.prefix_counts[0] for layer in layers] == budgets
    for i, layer in enumerate(layers):
        for h, got in enumerate(kept_prefix(layer)):
            assert_same_selection(got, kept[i][h], scores[i][h])


def test_cake_budgets_differ_across_layers_on_structured_model():
    # Layers with different attention sharpness must get different budgets (layer preferences at work).
    model = tiny_model("llama", layers=4)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.weight.mul_(0.2 + 1.5 * i)
    out, _ = prefill(model, prompt(200, seed=1), "cake")
    budgets = [layer.prefix_counts[0] for layer in cache_of(out).layers]
    assert len(set(budgets)) > 1 and sum(budgets) == (BUDGET - WINDOW) * 4


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_snapkv_matches_reference(family):
    model = tiny_model(family, kv_heads=2)
    ids = prompt(100, seed=7)
    layers_qk = capture_qk(model, ids)
    scale = model.model.layers[0].self_attn.scaling
    kept, budgets, scores = snapkv_reference(layers_qk, scale, BUDGET, WINDOW)
    out, _ = prefill(model, ids, "snapkv")
    for i, layer in enumerate(cache_of(out).layers):
        assert layer.prefix_counts[0] == budgets[i]
        for h, got in enumerate(kept_prefix(layer)):
            assert_same_selection(got, kept[i][h], scores[i][h])


@pytest.mark.parametrize("method", ["cake", "snapkv", "full"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_short_prompt_is_identical_to_no_compression(method, attn):
    model = tiny_model("llama", attn=attn)
    ids = prompt(BUDGET, seed=2)
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
    ref = model.generate(ids, max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with cakekv.compress(model, method=method, budget=BUDGET + 30, window=WINDOW):
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        out = model.generate(ids, max_new_tokens=20, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["cake", "snapkv"])
def test_chunked_continuation_equals_token_by_token(method):
    model = tiny_model("llama")
    ids, cont = prompt(130, seed=4), prompt(24, seed=9)
    chunked, _ = continuation_nll(model, ids, cont, method, chunked=True)
    stepwise, _ = continuation_nll(model, ids, cont, method, chunked=False)
    assert abs(chunked - stepwise) < 1e-3


def test_continuation_equals_full_cache_with_evicted_entries_hidden():
    """Positions and causality after compression: the compressed continuation must equal running the
    uncompressed model with exactly the evicted entries masked out, per layer and per head."""
    model = tiny_model("qwen2", kv_heads=2)
    ids, cont = prompt(110, seed=11), prompt(12, seed=12)
    out, _ = prefill(model, ids, "cake", decode_evict=False)
    cache = cache_of(out)
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW, decode_evict=False):
        with torch.no_grad():
            got = model(input_ids=cont, **cache_kwargs(model, cache), use_cache=True).logits
    torch.testing.assert_close(got, masked_full_cache_logits(model, ids, cont, cache), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,family", [("cake", "llama"), ("cake", "mistral"), ("snapkv", "qwen3"),
                                           ("full", "llama")])
def test_batch_equals_each_row_alone(method, family):
    model = tiny_model(family, kv_heads=2)
    prompts = [prompt(n, seed=20 + n) for n in (33, 95, 140)]  # one short prompt stays uncompressed
    ids, mask = left_padded(prompts)
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW) as handle:
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                               pad_token_id=0)
        batch_stats = handle.stats
        alone = [model.generate(input_ids=p, max_new_tokens=30, do_sample=False, pad_token_id=0)
                 for p in prompts]
    for r, single in enumerate(alone):
        assert torch.equal(batch[r, ids.shape[1]:], single[0, p_len(prompts[r]):]), f"row {r} differs"
    if method != "full":
        assert batch_stats[0]["budget"][0] is None  # the 33-token row was not compressed


def p_len(p):
    return p.shape[1]


def test_memory_is_freed_and_stats_add_up():
    model = tiny_model("llama", kv_heads=2)
    ids = prompt(300, seed=1)
    out, handle = prefill(model, ids, "cake")
    stats = handle.stats
    assert len(stats) == model.config.num_hidden_layers
    for layer, s in zip(cache_of(out).layers, stats):
        assert layer.keys.shape[2] == s["kept"][0] == s["budget"][0]
        # K, V, positions and the position order decode-time eviction keeps (int32 per slot)
        assert layer.order.shape == layer.pos.shape and layer.order.dtype == torch.int32
        assert s["bytes_after"] == layer.keys.nbytes + layer.values.nbytes + layer.pos.nbytes + layer.order.nbytes
        assert s["bytes_before"] == 2 * 2 * 300 * 16 * 4
        assert s["bytes_after"] < s["bytes_before"] / 3
        assert s["bytes_kept"] == 2 * s["kept"][0] * 2 * 16 * 4  # kv heads x entries x K and V x D x fp32
    with cakekv.compress(model, method="full", budget=BUDGET, window=WINDOW) as handle:
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert all(s["bytes_kept"] == s["bytes_before"] <= s["bytes_after"] for s in handle.stats)
    total_kept = sum(s["kept"][0] for s in stats)
    assert total_kept == BUDGET * model.config.num_hidden_layers
    # one type per field
    for s in stats:
        assert all(type(x) is float for x in s["kept"] + s["budget"])
        assert all(type(x) is int for x in [s["layer"], s["bytes_before"], s["bytes_after"], s["bytes_kept"],
                                            s["entry_bytes"], *s["tokens"], *sum(s["kept_per_head"], [])])


def test_static_cache_request_warns_once_and_compresses():
    model = tiny_model("llama", kv_heads=2)
    ids = prompt(300, seed=2)
    with pytest.warns(UserWarning, match="StaticCache given to the model is replaced") as record:
        with cakekv.compress(model, method="snapkv", budget=BUDGET, window=WINDOW) as handle:
            model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
            model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert sum("replaced" in str(w.message) for w in record) == 1
    assert handle.stats[0]["kept"][0] <= BUDGET + 3


def test_decode_eviction_keeps_each_layer_at_its_budget():
    model = tiny_model("llama", kv_heads=2)
    ids = prompt(100, seed=3)
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW) as handle:
        out = model.generate(ids, max_new_tokens=120, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(out)
    for layer, s in zip(cache.layers, handle.stats):
        assert s["kept"][0] == s["budget"][0]  # held at the budget after 120 new tokens
        assert layer.keys.shape[2] <= s["budget"][0] + 1
        assert layer.seen == 100 + 119
    assert sum(s["budget"][0] for s in handle.stats) == BUDGET * model.config.num_hidden_layers
    # without decode eviction the cache grows by the generated tokens
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW, decode_evict=False) as handle:
        model.generate(ids, max_new_tokens=20, do_sample=False)
    assert all(s["kept"][0] == s["budget"][0] + 19 for s in handle.stats)


def is_unpatched(model):
    return (model.config._attn_implementation == "sdpa" and "forward" not in model.model.__dict__
            and not any(m in _HANDLE_OF_MODULE for m in model.modules()))


def test_model_restored_after_exception_and_remove():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW):
            assert not is_unpatched(model)
            raise RuntimeError("boom")
    assert is_unpatched(model)
    handle = cakekv.compress(model, method="snapkv", budget=BUDGET)
    handle.remove()
    handle.remove()
    assert is_unpatched(model)


def test_two_models_at_once():
    a, b = tiny_model("llama", seed=1), tiny_model("qwen2", seed=2)
    ids = prompt(90)
    ref_b = b.generate(ids, max_new_tokens=5, do_sample=False)
    with cakekv.compress(a, method="cake", budget=BUDGET, window=WINDOW) as ha, \
            cakekv.compress(b, method="full", budget=BUDGET, window=WINDOW):
        a.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(b.generate(ids, max_new_tokens=5, do_sample=False), ref_b)
    assert ha.stats[0]["budget"][0] is not None
    assert is_unpatched(a) and is_unpatched(b)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(method="nope"), ValueError, "method"),
    (dict(budget=8, window=8), ValueError, "budget"),
    (dict(window=0), ValueError, "window"),
    (dict(budget=64.0), TypeError, "budget"),
    (dict(method="cake", tau3=1.0), TypeError, "tau3"),
    (dict(method="cake", tau1=-1.0), ValueError, "tau1"),
    (dict(method="snapkv", pooling="median"), ValueError, "pooling"),
    (dict(method="snapkv", gamma=1.0), TypeError, "gamma"),
])
def test_bad_arguments_raise_named_errors(kwargs, error, name):
    model = tiny_model("llama")
    args = dict(method="cake", budget=64, window=8) | kwargs
    with pytest.raises(error, match=f"^{name}"):
        cakekv.compress(model, **args)
    assert is_unpatched(model)


def test_unsupported_models_and_attention():
    from transformers import T5Config, T5ForConditionalGeneration  # (more cases: test_families.py)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="^model: unsupported architecture"):
        cakekv.compress(t5, method="cake", budget=64)
    model = tiny_model("llama", attn="flex_attention")
    with pytest.raises(ValueError, match="^model: attention implementation"):
        cakekv.compress(model, method="cake", budget=64)
    model = tiny_model("llama")
    with cakekv.compress(model, method="cake", budget=64):
        with pytest.raises(ValueError, match="^model: already compressed"):
            cakekv.compress(model, method="snapkv", budget=64)
    assert is_unpatched(model)


def test_right_padding_is_rejected():
    model = tiny_model("llama")
    ids = prompt(60, batch=2)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW):
        with pytest.raises(ValueError, match="^attention_mask"):
            model(input_ids=ids, attention_mask=mask)
    assert is_unpatched(model)


def test_available_methods():
    assert {"full", "cake", "snapkv"} <= set(cakekv.available_methods())
    assert cakekv.method_options("cake")["gamma"] == 200.0
