"""Short form of benchmarks/soak.py: a long-lived process must not accumulate caches, a long decode with
decode eviction must keep the cache at a constant size, and the same generation twice gives the same tokens."""
from __future__ import annotations

import gc
import os
import sys
import weakref

import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import soak  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(soak.TINY).eval()


def test_repeated_generate_leaves_no_cache_alive(model):
    samples = soak.repeated_generate(model, calls=6, prompt_len=64, method="cake", budget=24, every=2)
    assert [s["live_caches"] for s in samples] == [0] * len(samples)


@pytest.mark.parametrize("method", ["cake", "adakv"])  # padded and ragged layouts
def test_long_decode_with_eviction_keeps_the_cache_size_and_is_deterministic(model, method):
    tokens, stored = soak.long_generation(model, new_tokens=80, prompt_len=64, method=method, budget=24,
                                          decode_evict=True)
    again, _ = soak.long_generation(model, new_tokens=80, prompt_len=64, method=method, budget=24, decode_evict=True)
    assert tokens == again
    assert len(set(stored[1:])) == 1, f"cache bytes changed during decoding: {sorted(set(stored))}"


@pytest.mark.parametrize("method", ["cake", "adakv"])
def test_a_cache_is_freed_by_reference_counting(model, method):
    """No reference cycle through a cache: it goes when its last user lets go, not at a later garbage collection
    (on CUDA, a collection falling inside another cache's graph capture would destroy a graph mid-capture)."""
    caches = []
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad(), cakekv.compress(model, method=method, budget=24, window=8):
            out = model(input_ids=torch.arange(5, 69)[None], use_cache=True)
            cache = cache_of(out)
            out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **cache_kwargs(model, cache))
            caches.append(weakref.ref(cache))
            del out, cache
            model.generate(torch.arange(5, 69)[None], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert caches[0]() is None, "the cache outlived its last reference (a cycle keeps it)"
    finally:
        gc.enable()
