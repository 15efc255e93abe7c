"""The installed transformers release, whatever it names its cache argument: every family compresses,
generates and continues from the returned cache, and a release cakekv cannot hold fails loudly."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import cakekv
from cakekv import cache_kwargs, cache_of
from cakekv.patch import CACHE_NAMES, cache_argument, sliding_windows
from helpers import BUDGET, FAMILIES, WINDOW, prompt, tiny_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_compresses_generates_and_continues(family):
    model = tiny_model(family)
    ids = prompt(90, seed=11, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # left padding
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW) as handle, torch.no_grad():
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert generated.shape == (2, 96)
            # cake holds every global layer at its budget while generating: their total stays the budget's
            # (a sliding layer holds its window)
            glob = [s for s, w in zip(handle.stats, sliding_windows(model.config)) if w is None]
            kept = [sum(sum(s["kept_per_head"][row]) for s in glob) for row in range(2)]
            assert handle.stats[0]["tokens"] == [95, 75]
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = cache_of(out)
            assert isinstance(cache, cakekv.CompressedCache)
            for chunk in (prompt(5, seed=12, batch=2), prompt(1, seed=13, batch=2)):
                mask = torch.cat([mask, torch.ones_like(chunk)], 1)
                out = model(input_ids=chunk, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
                assert cache_of(out) is cache
                assert torch.isfinite(out.logits).all()
    heads = model.config.num_key_value_heads * len(glob)
    assert kept == [BUDGET * heads] * 2
    assert cache.layers[0].seen == 96
    assert cache.layers[0].next_pos.tolist() == [96, 76]


def test_cache_argument_is_the_installed_name():
    model = tiny_model("llama")
    name = cache_argument(model.forward)
    assert name in CACHE_NAMES
    assert name == cache_argument(model.model.forward)
    assert list(cache_kwargs(model, None)) == [name]


def test_legacy_cache_name_reaches_the_decoder():
    """A caller of the decoder itself may still pass the other name (the pre-5.24 one on new releases)."""
    model = tiny_model("llama")
    ids, cont = prompt(80, seed=2), prompt(3, seed=4)
    name = cache_argument(model.model.forward)
    other = next(n for n in CACHE_NAMES if n != name)
    with cakekv.compress(model, method="snapkv", budget=BUDGET, window=WINDOW), torch.no_grad():
        out = model.model(input_ids=ids, use_cache=True)
        cache = cache_of(out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the decoder's own deprecation shim may warn on the old name
            again = model.model(input_ids=cont, use_cache=True, **{other: cache})
    assert cache_of(again) is cache
    assert cache.layers[0].seen == 83


def test_forward_without_a_cache_argument_fails_loudly():
    model = tiny_model("llama")
    model.model.forward = lambda input_ids=None, use_cache=None, **kwargs: None
    with pytest.raises(RuntimeError, match=f"transformers {transformers.__version__}"):
        cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW)
    assert model.config._attn_implementation == "sdpa"


def test_forward_that_drops_the_cache_fails_instead_of_running_uncompressed():
    model = tiny_model("llama")
    name = cache_argument(model.model.forward)
    original = model.model.forward

    def forward(input_ids=None, attention_mask=None, use_cache=None, **kwargs):
        kwargs.pop(name, None)  # a release that would take the cache some other way
        return original(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)

    forward.__signature__ = __import__("inspect").signature(original)
    model.model.forward = forward
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW):
        with pytest.raises(RuntimeError, match=f"did not hand the cache.*transformers {transformers.__version__}"):
            model(input_ids=prompt(60), use_cache=True)
    assert model.config._attn_implementation == "sdpa"


def test_untested_transformers_release_warns(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    with pytest.warns(UserWarning, match="transformers 5.99.0"):
        handle = cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW)
    handle.remove()
