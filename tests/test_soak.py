"""Short form of benchmarks/soak.py: a long-lived process must not accumulate caches, a long decode with
decode eviction must keep the cache at a constant size, and the same generation twice gives the same tokens."""
from __future__ import annotations

import os
import sys

import pytest

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
