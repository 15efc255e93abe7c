"""CAKE and SnapKV against their plain-PyTorch references (tests/reference.py): the kept entries and layer
budgets, on tiny models of every supported family. The compress() contract, for every registered method:
tests/methods/test_contract.py."""
from __future__ import annotations

import pytest
import torch

from cakekv import cache_of
from helpers import BUDGET, WINDOW, FAMILIES, capture_qk, kept_prefix, prefill, prompt, tiny_model
from reference import assert_same_selection, cake_reference, snapkv_reference


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cake_matches_reference(family, kv_heads, dtype):
    model = tiny_model(family, kv_heads=kv_heads, dtype=dtype)
    ids = prompt(120, seed=3)
    layers_qk = capture_qk(model, ids)
    scale = model.model.layers[0].self_attn.scaling
    out, _ = prefill(model, ids, "cake")
    cache = cache_of(out)
    # The method compresses the global layers; a sliding-window layer holds its last window - 1 tokens
    # (all of this prompt: the tiny sliding windows are longer), docs/cache.md.
    sliding = [layer for layer in cache.layers if layer.sliding_window is not None]
    assert all(layer.prefix_counts[0] == min(120, layer.sliding_window - 1) - WINDOW for layer in sliding)
    layers = [layer for layer in cache.layers if layer.sliding_window is None]
    layers_qk = [qk for qk, layer in zip(layers_qk, cache.layers) if layer.sliding_window is None]
    kept, budgets, scores = cake_reference(layers_qk, scale, BUDGET, WINDOW, tau1=1.0, tau2=1.0)
    assert [layer.prefix_counts[0] for layer in layers] == budgets
    assert sum(budgets) == (BUDGET - WINDOW) * len(budgets)
    # bf16: near-ties within half a bf16 ulp (2**-8) of the cut-off may go either way
    rel_tol = 2 ** -8 if dtype == torch.bfloat16 else 1e-4
    for i, layer in enumerate(layers):
        for h, got in enumerate(kept_prefix(layer)):
            assert_same_selection(got, kept[i][h], scores[i][h], rel_tol=rel_tol)


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
