"""The contract of cakekv.compress (docs/methods.md#the-common-frame) for every registered method: each test
is parametrised over `cakekv.available_methods()`, so a new method is covered without editing this file.

Contracts: identity when the budget covers the prompt; a continuation over the compressed cache equals the
uncompressed model with exactly the evicted entries hidden, chunked or token by token; a left-padded batch
equals each row alone; the memory is really freed and the stats add up; decode-time eviction holds every
row at its caps (methods that evict; `full` keeps everything); bad arguments and options raise errors
naming them; the model is never left patched, also after an exception. Per-family runs of the contracts:
tests/test_families.py; each method's selection against its plain-PyTorch reference: tests/methods/test_core.py
(CAKE, SnapKV) and tests/methods/test_methods.py (the others)."""
from __future__ import annotations

import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of
from helpers import (BUDGET, WINDOW, continuation_nll, is_unpatched, left_padded, masked_full_cache_logits,
                     method_compresses, prefill, prompt, tiny_model)

METHODS = cakekv.available_methods()  # every registered method, `full` included


def test_available_methods():
    assert {"full", "cake", "snapkv", "streamingllm", "h2o", "pyramidkv", "adakv", "defensivekv",
            "layer_defensivekv", "lava"} <= set(METHODS)
    assert cakekv.method_options("cake")["gamma"] == 200.0


def test_every_method_module_is_listed_and_loads_by_name():
    """Methods load lazily by name (cakekv/methods/<name>.py): every module that registers a method is listed, each
    listed name loads its class, and an unlisted or misplaced method is refused at registration."""
    import pathlib
    from cakekv.methods import Method, get_method, registry
    folder = pathlib.Path(registry.__file__).parent
    defining = sorted(p.stem for p in folder.glob("*.py") if "@register" in p.read_text())
    assert defining == sorted(registry.METHOD_NAMES) == METHODS
    assert all(get_method(name).name == name for name in METHODS)
    with pytest.raises(TypeError, match="METHOD_NAMES"):
        registry.register(type("Extra", (Method,), {"name": "extra"}))


# ---- identity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_short_prompt_is_identical_to_no_compression(method, attn):
    model = tiny_model("llama", attn=attn)
    ids = prompt(BUDGET, seed=2)
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
    ref = model.generate(ids, max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True)
    # budget above prompt + generated tokens, so that decode eviction has nothing to do either
    with cakekv.compress(model, method=method, budget=BUDGET + 30, window=WINDOW):
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        out = model.generate(ids, max_new_tokens=20, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-4)
    assert is_unpatched(model, attn)


# ---- continuation --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_chunked_continuation_equals_token_by_token(method):
    model = tiny_model("llama")
    ids, cont = prompt(130, seed=4), prompt(24, seed=9)
    chunked, _ = continuation_nll(model, ids, cont, method, chunked=True)
    stepwise, _ = continuation_nll(model, ids, cont, method, chunked=False)
    assert abs(chunked - stepwise) < 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_continuation_equals_full_cache_with_evicted_entries_hidden(method):
    """Positions and causality after compression: the compressed continuation must equal running the
    uncompressed model with exactly the evicted entries masked out, per layer and per KV head (the
    plain-PyTorch reference, helpers.masked_full_cache_logits)."""
    model = tiny_model("qwen2", kv_heads=2)
    ids, cont = prompt(110, seed=11), prompt(12, seed=12)
    out, _ = prefill(model, ids, method, decode_evict=False)
    cache = cache_of(out)
    kept = [sum(layer.head_counts[0]) for layer in cache.layers]
    if method_compresses(method):
        assert all(k < 110 * 2 for k in kept)  # something was evicted, so the reference hides entries
    else:
        assert kept == [110 * 2] * len(kept)
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, decode_evict=False):
        with torch.no_grad():
            got = model(input_ids=cont, **cache_kwargs(model, cache), use_cache=True).logits
    torch.testing.assert_close(got, masked_full_cache_logits(model, ids, cont, cache), rtol=1e-4, atol=1e-4)


# ---- batches -------------------------------------------------------------------------------------
BATCH_CASES = [(m, "qwen2") for m in METHODS] + [("cake", "llama"), ("cake", "mistral"), ("snapkv", "qwen3"),
                                                 ("full", "llama")]


@pytest.mark.parametrize("method,family", BATCH_CASES)
def test_batch_equals_each_row_alone(method, family):
    """Left-padded rows generate what each row generates alone, and get the per-head budgets it gets alone
    (the default options: decode eviction on where the method's default says so)."""
    model = tiny_model(family, kv_heads=2)
    prompts = [prompt(n, seed=20 + n) for n in (33, 95, 140)]  # one short prompt stays uncompressed
    ids, mask = left_padded(prompts)
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW) as handle:
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                               pad_token_id=0)
        stats = handle.stats
        alone, alone_heads = [], []
        for p in prompts:
            alone.append(model.generate(input_ids=p, max_new_tokens=30, do_sample=False, pad_token_id=0))
            alone_heads.append([s["budget_per_head"][0] for s in handle.stats])  # set at prefill
    for r, single in enumerate(alone):
        new = single[0, prompts[r].shape[1]:]  # a row alone stops at EOS, a batch row pads after it
        assert torch.equal(batch[r, ids.shape[1]:ids.shape[1] + len(new)], new), f"row {r} differs"
        assert (batch[r, ids.shape[1] + len(new):] == 0).all(), f"row {r} differs"
    assert stats[0]["budget"][0] is None  # the 33-token row was not compressed
    for r in (1, 2):  # per-head budgets equal those of the row alone
        assert [s["budget_per_head"][r] for s in stats] == alone_heads[r]
        assert all((b is not None) == method_compresses(method) for b in alone_heads[r])
    assert is_unpatched(model)


# ---- memory and stats ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_memory_is_freed_and_stats_add_up(method):
    model = tiny_model("llama", kv_heads=2)
    layers, hkv, n = model.config.num_hidden_layers, 2, 300
    entry = 2 * 16 * 4  # K and V x D x fp32
    ids = prompt(n, seed=1)
    out, handle = prefill(model, ids, method)
    stats = handle.stats
    compresses = method_compresses(method)
    assert len(stats) == layers
    for layer, s in zip(cache_of(out).layers, stats):
        counts = layer.head_counts[0]
        assert s["kept_per_head"][0] == counts and s["kept"][0] == sum(counts) / hkv
        assert s["entry_bytes"] == entry
        assert s["bytes_before"] == hkv * n * entry
        assert s["bytes_kept"] == sum(counts) * entry == hkv * s["kept"][0] * entry
        assert s["bytes_after"] == layer.storage.nbytes
        # what is stored: K, V, positions, the position order decode-time eviction keeps (int32 per slot,
        # only while it evicts) and, ragged, the segment offsets; nothing else
        stored = layer.storage
        order = 0 if stored.order is None else stored.order.nbytes
        assert (stored.order is not None) == (layer.head_caps is not None)
        if stored.order is not None:
            assert stored.order.shape == stored.pos.shape and stored.order.dtype == torch.int32
        if layer.ragged:
            assert stored.keys.shape[0] == sum(counts)  # exactly the kept entries
            assert s["bytes_after"] == (stored.keys.nbytes + stored.values.nbytes + stored.pos.nbytes
                                        + stored.offsets.nbytes + order)
        else:
            assert stored.keys.shape[2] == max(counts)
            assert s["bytes_after"] == stored.keys.nbytes + stored.values.nbytes + stored.pos.nbytes + order
        if compresses:
            assert s["kept"][0] == s["budget"][0] and s["budget_per_head"][0] == counts
            if len(set(counts)) == 1:
                assert layer.keys.shape[2] == s["kept"][0] == s["budget"][0]
            assert s["bytes_after"] < s["bytes_before"] / 3
        else:
            assert counts == [n] * hkv and s["budget"][0] is None
            assert s["bytes_kept"] == s["bytes_before"] <= s["bytes_after"]
    if compresses:
        assert sum(s["kept"][0] for s in stats) == BUDGET * layers
    # one type per field
    for s in stats:
        assert all(type(x) is float for x in s["kept"])
        assert all(type(x) is float if compresses else x is None for x in s["budget"])
        assert all(type(x) is int for x in [s["layer"], s["bytes_before"], s["bytes_after"], s["bytes_kept"],
                                            s["entry_bytes"], *s["tokens"], *sum(s["kept_per_head"], [])])
    # after generated tokens the stats still add up
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW) as handle:
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    for layer, s in zip(cache_of(out).layers, handle.stats):
        assert s["bytes_before"] == hkv * (n + 2) * entry and s["tokens"] == [n + 2]
        assert s["bytes_kept"] == sum(s["kept_per_head"][0]) * entry and s["bytes_after"] == layer.storage.nbytes
        if compresses:
            assert s["bytes_after"] < s["bytes_before"] / 3
        else:
            assert s["bytes_kept"] == s["bytes_before"] <= s["bytes_after"]


# ---- decode-time eviction ------------------------------------------------------------------------
DECODE_STEPS = 500
DECODE_CASES = [(m, {}) for m in METHODS] + [("cake", {"head_budgets": True})]


@pytest.mark.parametrize("method,kw", DECODE_CASES, ids=METHODS + ["cake-head_budgets"])
def test_decode_eviction_holds_the_budget_over_500_tokens(method, kw):
    """Long generations stay within memory: with decode_evict=True every KV head of every layer keeps at
    most its budget after each of 500 generated tokens (uniform and ragged layouts), the newest token is
    always kept, and the storage stops growing after the first appends. A method that evicts nothing
    (`full`) keeps every token."""
    model = tiny_model("llama", kv_heads=2, layers=2)
    n = 100
    compresses = method_compresses(method)
    steps = DECODE_STEPS if compresses else 50
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, decode_evict=True, **kw):
        with torch.no_grad():
            out = model(input_ids=prompt(n, seed=5), use_cache=True)
            cache = cache_of(out)
            budgets = [layer.head_budgets[0] for layer in cache.layers]
            if compresses:
                assert all(sum(b) < 2 * (n - 1) for b in budgets)  # the prompt was compressed
            else:
                assert budgets == [None] * len(budgets)
            uneven = any(len(set(layer.head_counts[0])) > 1 for layer in cache.layers)
            stored = []
            for step in range(steps):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache), use_cache=True)
                for layer, budget in zip(cache.layers, budgets):
                    counts = layer.head_counts[0]
                    if compresses:
                        assert all(c <= b for c, b in zip(counts, budget)), f"step {step}: {counts} > {budget}"
                    else:
                        assert counts == [n + step + 1] * 2
                    assert int(layer.storage.padded_pos()[0].max()) == n + step
                stored.append(sum(layer.storage.nbytes for layer in cache.layers))
    if compresses:
        assert len(set(stored[2:])) == 1, "the cache kept growing"
        assert [layer.head_counts[0] for layer in cache.layers] == budgets  # held at, not below, the budget
    else:
        assert stored[-1] > stored[0]
    if method in ("adakv", "lava") or kw:
        assert any(layer.ragged for layer in cache.layers)
    if uneven:  # heads of unequal lengths are stored ragged (CPU), without padding
        assert any(layer.ragged for layer in cache.layers)


@pytest.mark.parametrize("method", METHODS)
def test_generate_keeps_each_layer_at_its_budget(method):
    """Through model.generate: decode eviction holds each layer at its budget (the layer budgets still sum
    to budget x layers); without it the cache grows by the generated tokens."""
    model = tiny_model("llama", kv_heads=2)
    ids = prompt(100, seed=3)
    compresses = method_compresses(method)
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, decode_evict=True) as handle:
        out = model.generate(ids, max_new_tokens=120, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(out)
    for layer, s in zip(cache.layers, handle.stats):
        assert layer.seen == 100 + 119
        if compresses:
            assert s["kept"][0] == s["budget"][0]  # held at the budget after 120 new tokens
            if layer.ragged:
                assert layer.keys.shape[0] <= sum(s["budget_per_head"][0]) + 2
            else:
                assert layer.keys.shape[2] <= s["budget"][0] + 1
        else:
            assert s["kept"][0] == 100 + 119
    if compresses:
        assert sum(s["budget"][0] for s in handle.stats) == BUDGET * model.config.num_hidden_layers
    # without decode eviction the cache grows by the generated tokens
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, decode_evict=False) as handle:
        model.generate(ids, max_new_tokens=20, do_sample=False)
    if compresses:
        assert all(s["kept"][0] == s["budget"][0] + 19 for s in handle.stats)
    else:
        assert all(s["kept"][0] == 100 + 19 for s in handle.stats)
    assert is_unpatched(model)


# ---- arguments and options -----------------------------------------------------------------------
BAD_ARGUMENTS = [(dict(budget=8, window=8), ValueError, "budget"), (dict(window=0), ValueError, "window"),
                 (dict(budget=64.0), TypeError, "budget"), (dict(bogus=1), TypeError, "bogus")]
# Per declared option type, a value of the wrong type (every value of every type: tests/methods/test_options.py).
WRONG_TYPE = {"int": "7", "float": "high", "bool": "yes"}
WRONG_CHOICE = 3
BAD_OPTIONS = {  # values of the right type a method refuses (ValueError), names it does not take (TypeError)
    "streamingllm": [("sinks", -1, ValueError)], "h2o": [], "pyramidkv": [("beta", 0, ValueError)],
    "adakv": [("head_floor", 1.5, ValueError)], "defensivekv": [("threshold", 2.0, ValueError)],
    "layer_defensivekv": [("cascading", "yes", TypeError)], "lava": [("head_floor", -0.1, ValueError)],
    "cake": [("head_floor", 2.0, ValueError), ("tau3", 1.0, TypeError), ("tau1", -1.0, ValueError)],
    "snapkv": [("kernel_size", 4, ValueError), ("pooling", "median", ValueError), ("gamma", 1.0, TypeError)],
}


def test_unknown_method_is_named():
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match="^method"):
        cakekv.compress(model, method="nope", budget=64, window=8)
    assert is_unpatched(model)


@pytest.mark.parametrize("method", METHODS)
def test_bad_arguments_and_options_raise_named_errors(method):
    model = tiny_model("llama", layers=1)
    cases = [(kw, error, name) for kw, error, name in BAD_ARGUMENTS]
    for info in cakekv.describe_options(method):
        cases.append(({info.name: WRONG_TYPE.get(info.type, WRONG_CHOICE)}, TypeError, info.name))
    cases += [({name: value}, error, name) for name, value, error in BAD_OPTIONS.get(method, [])]
    for kw, error, name in cases:
        args = dict(method=method, budget=64, window=8) | kw
        with pytest.raises(error, match=f"^{name}"):
            cakekv.compress(model, **args)
        assert is_unpatched(model), kw


# ---- the model is restored -----------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_model_restored_after_exception_and_remove(method):
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW):
            assert not is_unpatched(model)
            with torch.no_grad():
                model(input_ids=prompt(60), use_cache=True)
            raise RuntimeError("boom")
    assert is_unpatched(model)
    handle = cakekv.compress(model, method=method, budget=BUDGET)
    assert not is_unpatched(model)
    handle.remove()
    handle.remove()
    assert is_unpatched(model)


@pytest.mark.parametrize("method", METHODS)
def test_right_padding_is_rejected(method):
    model = tiny_model("llama")
    ids = prompt(60, batch=2)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW):
        with pytest.raises(ValueError, match="^attention_mask"):
            model(input_ids=ids, attention_mask=mask)
    assert is_unpatched(model)


@pytest.mark.parametrize("method", METHODS)
def test_static_cache_request_warns_once_and_compresses(method):
    model = tiny_model("llama", kv_heads=2)
    ids = prompt(300, seed=2)
    with pytest.warns(UserWarning, match="StaticCache given to the model is replaced") as record:
        with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW) as handle:
            model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
            model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert sum("replaced" in str(w.message) for w in record) == 1
    if method_compresses(method):  # compressed (the budget, moved between layers by some methods) + 2 tokens
        assert all(s["kept"][0] <= s["budget"][0] + 3 for s in handle.stats)
        assert sum(s["budget"][0] for s in handle.stats) == BUDGET * model.config.num_hidden_layers
        if method == "snapkv":  # the same budget in every layer
            assert handle.stats[0]["kept"][0] <= BUDGET + 3
    else:
        assert handle.stats[0]["kept"][0] == 300 + 2


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
