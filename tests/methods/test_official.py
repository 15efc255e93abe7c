"""`official=True` reproduces the official repositories' selection rules, each against a
plain-PyTorch re-statement of the official formula (reference_methods.py), on real attention patterns of
tiny models, with sizes that reach each quirk (a layer at its cap, n between budget and budget + window,
a negative protected-set cap, PyramidKV's integer step on a shallow model). The default (official=False)
is covered, unchanged, by test_methods.py."""
from __future__ import annotations

import random

import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of
from cakekv.methods import get_method
from cakekv.methods.base import LayerView, official_head_budgets
from cakekv.methods.cake import official_cake_budgets
from cakekv.methods.defensivekv import defensive_scores
from cakekv.methods.layer_defensivekv import official_global_counts
import reference_methods as R
from helpers import BUDGET, WINDOW, capture_qk, capture_qkv, kept_prefix, left_padded, prefill, prompt, tiny_model
from reference import assert_same_selection

OFFICIAL_METHODS = ["adakv", "cake", "defensivekv", "lava", "layer_defensivekv", "pyramidkv"]


def view_of(model, layers, i, window):
    """The LayerView the cache builds for layer i of one unpadded prompt."""
    q, k, v, _ = layers[i]
    hkv, n = k.shape[0], k.shape[1]
    pos = torch.arange(n)
    return LayerView(q[None, :, -window:], k[None], v[None], pos.expand(1, hkv, n).contiguous(),
                     pos[None, -window:], torch.tensor([n - window]), model.model.layers[i].self_attn.scaling,
                     i, model.model.layers[i].self_attn)


def structured_model(kv_heads, dtype=torch.float32):
    """Layers with different attention sharpness, so that CAKE's preferences (and budgets) differ."""
    model = tiny_model("llama", kv_heads=kv_heads, dtype=dtype)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.weight.mul_(0.2 + 1.5 * i)
    return model


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def captured(request):
    model = tiny_model("llama", kv_heads=request.param)
    ids = prompt(150, seed=3)
    return model, ids, capture_qkv(model, ids), model.model.layers[0].self_attn.scaling


def check_selection(cache, kept, budgets, scores):
    for i, layer in enumerate(cache.layers):
        assert layer.head_prefix[0] == list(budgets[i]), f"layer {i}"
        for h, got in enumerate(kept_prefix(layer)):
            assert_same_selection(got, kept[i][h], scores[i][h], rel_tol=1e-3)


def test_official_is_a_bool_option_off_by_default():
    for method in OFFICIAL_METHODS:
        assert cakekv.method_options(method)["official"] is False
        with pytest.raises(TypeError, match="^official: must be True or False"):
            get_method(method)(tiny_model().config, 64, 8, official="yes")


# ---- head budgets (AdaKV, LAVa, cake head_budgets=True) ----------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.3, 0.5, 0.7, 1.0])
def test_official_head_budgets_match_the_formula(alpha):
    gen = torch.Generator().manual_seed(int(alpha * 10))
    scores = torch.rand(3, 4, 60, generator=gen) ** 3
    scores[1, 2, :25] = float("-inf")                      # a head holding fewer entries
    scores[2, :, 50:] = float("-inf")
    for budget in (1, 7, 13, 33, 50):
        got = official_head_budgets(scores, torch.full((3,), budget), alpha).tolist()
        assert got == [R.official_flat_heads(s, budget, alpha) for s in scores], budget
        fixed = official_head_budgets(scores, torch.full((3,), budget), alpha, floor=9).tolist()
        assert fixed == [R.official_flat_heads(s, budget, alpha, floor=9) for s in scores], budget


def test_official_head_budgets_shrink_toward_the_floor():
    # Heads win 20, 10, 6, 4 of the top 40 (B = 10): ours keeps exactly those (every head won >= F = 2),
    # the official rule pulls every head toward the floor: round(0.8 * c_h + 2).
    scores = torch.rand(1, 4, 40) * 0.01
    for h, wins in enumerate((20, 10, 6, 4)):
        scores[0, h, :wins] += 1.0 + torch.rand(wins)
    got = official_head_budgets(scores, torch.tensor([10]), 0.2)[0].tolist()
    assert got == [18, 10, 7, 5] and R.official_flat_heads(scores[0], 10, 0.2) == got
    assert R.flat_heads(scores[0], 10, 0.2) == [20, 10, 6, 4]


def test_adakv_official_matches_reference(captured):
    model, ids, layers, scale = captured
    kept, budgets, scores = R.adakv_official_reference(layers, scale, BUDGET, WINDOW)
    out, _ = prefill(model, ids, "adakv", official=True)
    check_selection(cache_of(out), kept, budgets, scores)


def test_adakv_official_compresses_a_prompt_of_exactly_budget_tokens():
    model = tiny_model("llama", kv_heads=2)
    budget = 41                       # P = 33, floor int(0.2 * 33) = 6: round(0.8 * 33 + 6) = 32 < 33
    ids = prompt(budget, seed=4)
    layers = capture_qkv(model, ids)
    scale = model.model.layers[0].self_attn.scaling
    kept, budgets, scores = R.adakv_official_reference(layers, scale, budget, WINDOW)
    out, handle = prefill(model, ids, "adakv", budget=budget, official=True)
    check_selection(cache_of(out), kept, budgets, scores)
    assert all(b == [32, 32] for b in budgets)
    out, handle = prefill(model, ids, "adakv", budget=budget)
    assert all(s["budget"] == [None] for s in handle.stats)


def test_lava_official_matches_reference(captured):
    model, ids, layers, scale = captured
    for budget in (BUDGET, 70):
        kept, budgets, scores = R.lava_official_reference(layers, scale, budget, WINDOW)
        out, _ = prefill(model, ids, "lava", budget=budget, official=True)
        check_selection(cache_of(out), kept, budgets, scores)


def test_lava_official_floor_includes_the_window():
    model, ids = tiny_model("llama", kv_heads=4), prompt(150, seed=3)
    out, _ = prefill(model, ids, "lava", budget=BUDGET, official=True)
    floor = int(0.2 * BUDGET)                                   # 8, not int(0.2 * (BUDGET - WINDOW)) = 6
    assert min(min(layer.head_prefix[0]) for layer in cache_of(out).layers) >= floor


def test_cake_head_budgets_official(captured):
    model, ids, _, _ = captured
    kept, budgets, scores = R.cake_official_reference(capture_qk(model, ids), BUDGET, WINDOW, cascading=False)
    heads = [R.official_flat_heads(s, b, 0.2) for s, b in zip(scores, budgets)]
    kept = [[R.top_set(s[h], list(range(s.shape[1])), hb[h]) for h in range(s.shape[0])]
            for s, hb in zip(scores, heads)]
    out, _ = prefill(model, ids, "cake", head_budgets=True, cascading=False, official=True)
    check_selection(cache_of(out), kept, heads, scores)


# ---- CAKE ----------------------------------------------------------------------------------------

def test_cake_official_budgets_match_adjust_budgets():
    rng = random.Random(0)
    cases = [([5.0, 1.0, 1.0, 1.0], 100, 60),     # one layer over its cap: excess shared, not re-clamped
             ([9.0, 9.0, 1.0, 0.5], 100, 40),     # two over the cap
             ([1.0, 1.0, 1.0], 10, 100),          # truncation deficit forced back
             ([3.0, 1e-9, 1e-9], 30, 12)]
    for _ in range(200):
        layers = rng.randint(1, 8)
        cases.append(([rng.random() ** 4 for _ in range(layers)], rng.randint(1, 400), rng.randint(1, 300)))
    for prefs, total, prefix in cases:
        p = torch.tensor(prefs, dtype=torch.float32)
        acc = torch.tensor(0.0)
        for x in p:
            acc = acc + x
        shares = [(x / acc * total).item() for x in p]
        want = [max(0, min(b, prefix)) for b in R.official_adjust_budgets(shares, total, prefix)]
        got = official_cake_budgets(p.double()[None], torch.full((1, len(prefs)), prefix), total)
        assert got[0].tolist() == want, (prefs, total, prefix)
    # budget lost: [52, 42, 5] -> clamp [45, 42, 5], excess 7 shared unclamped [45, 46, 8], sum forced
    # [45, 46, 9], clamped again [45, 45, 9]: 99 of 100
    got = official_cake_budgets(torch.tensor([[10.0, 8.0, 1.0]], dtype=torch.float64), torch.full((1, 3), 45), 100)
    assert got.tolist() == [[45, 45, 9]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cake_official_statistics_are_bitwise_the_official_ones(dtype, kv_heads):
    model = structured_model(kv_heads, dtype)
    layers = capture_qkv(model, prompt(120, seed=2))
    cake = get_method("cake")(model.config, BUDGET, WINDOW, official=True, tau1=1.6, tau2=0.6, gamma=50.0)
    for i, (q, k, _, _) in enumerate(layers):
        score, pref = cake.score_layer(view_of(model, layers, i, WINDOW))
        want, want_pref = R.cake_official_layer(q, k, WINDOW, 50.0, 5, 1.6, 0.6)
        p = k.shape[1] - WINDOW
        assert torch.equal(score[0, :, :p], want.float()), f"layer {i}"
        assert torch.isinf(score[0, :, p:]).all()
        assert pref.dtype == torch.float64 and pref[0].item() == want_pref.item()
    if dtype == torch.bfloat16:  # the default statistics (fp32 throughout) are not those
        default = get_method("cake")(model.config, BUDGET, WINDOW, tau1=1.6, tau2=0.6, gamma=50.0)
        score, _ = default.score_layer(view_of(model, layers, 1, WINDOW))
        assert not torch.equal(score[0, :, :p], R.cake_official_layer(*layers[1][:2], WINDOW, 50.0, 5, 1.6, 0.6)[0].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("cascading", [True, False])
@pytest.mark.parametrize("budget", [BUDGET, 100])
def test_cake_official_matches_reference(dtype, kv_heads, cascading, budget):
    # budget 100 at n = 120: P = 112 < the 92 * 4 total, so the cascade's early layers hit their cap
    model = structured_model(kv_heads, dtype)
    ids = prompt(120, seed=2)
    kept, budgets, scores = R.cake_official_reference(capture_qk(model, ids), budget, WINDOW, cascading=cascading)
    out, _ = prefill(model, ids, "cake", budget=budget, official=True, cascading=cascading)
    cache = cache_of(out)
    assert [layer.prefix_counts[0] for layer in cache.layers] == budgets
    for i, layer in enumerate(cache.layers):
        for h, got in enumerate(kept_prefix(layer)):
            assert_same_selection(got, kept[i][h], scores[i][h], rel_tol=1e-2 if dtype == torch.bfloat16 else 1e-4)


def test_cake_official_decode_order_is_the_official_storage_order():
    """After an official prefill, decode-time eviction reads each head's kept prefix as the official storage holds
    it (its top-k by descending score, ties to the earlier position), then the window; our default reads
    positions."""
    model = structured_model(2, torch.float32)
    ids = prompt(120, seed=2)
    kept, _, scores = R.cake_official_reference(capture_qk(model, ids), BUDGET, WINDOW)
    unsorted = 0
    for official in (True, False):
        out, _ = prefill(model, ids, "cake", official=official)
        for i, layer in enumerate(cache_of(out).layers):
            for h in range(layer.storage.pos.shape[1]):
                pos = layer.storage.pos[0, h]
                listed = [int(pos[slot]) for slot in layer.storage.order[0, h][: int((pos >= 0).sum())]]
                prefix, newest = listed[: len(kept[i][h])], listed[len(kept[i][h]):]
                assert newest == list(range(120 - WINDOW, 120))
                if official:  # near-ties of the fp32 scores may swap neighbours: compare the scores along the order
                    along = [scores[i][h][x].item() for x in prefix]
                    assert set(prefix) == set(kept[i][h]) and all(a >= b - 1e-6 for a, b in zip(along, along[1:]))
                    unsorted += prefix != sorted(prefix)
                else:
                    assert prefix == sorted(prefix)
    assert unsorted > 0  # the official order is not the position order here


def test_cake_official_skip_rule_and_first_decode_trim():
    model = tiny_model("llama", kv_heads=2)
    n = BUDGET + WINDOW - 2                     # budget < n <= budget + window
    ids = prompt(n, seed=6)
    assert R.cake_official_reference(capture_qk(model, ids), BUDGET, WINDOW) is None
    with cakekv.compress(model, "cake", budget=BUDGET, window=WINDOW, official=True) as handle:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            cache = cache_of(out)
            assert all(s["budget"] == [None] and s["kept"] == [n] for s in handle.stats)
            nxt = out.logits[:, -1:].argmax(-1)
            model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True)
            assert all(s["kept"] == [BUDGET] for s in handle.stats)   # cut at the first decode step
    out, handle = prefill(model, ids, "cake")
    assert all(s["budget"][0] is not None for s in handle.stats)       # ours compresses at prefill


# ---- DefensiveKV -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,budget,threshold", [(150, BUDGET, 0.9), (150, BUDGET, 0.3), (30, 9, 0.9)],
                         ids=["usual", "under-cap", "negative-cap"])
def test_defensivekv_official_scores_match_reference(captured, n, budget, threshold):
    model = captured[0]
    layers = capture_qkv(model, prompt(n, seed=7))
    scale = model.model.layers[0].self_attn.scaling
    differs = False
    for i, (q, k, v, wo) in enumerate(layers):
        view = view_of(model, layers, i, WINDOW)
        got = defensive_scores(view, budget, 5, threshold, official=True, protected_set="below")[0, :, : n - WINDOW]
        want = R.defensive_layer_official(q, k, v, wo, scale, WINDOW, budget, threshold=threshold)
        top = want.max()
        assert torch.equal(got == got.max(), want == top), f"layer {i}: protected sets differ"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
        ours = defensive_scores(view, budget, 5, threshold)[0, :, : n - WINDOW]
        differs |= not torch.equal(ours == ours.max(), got == got.max())
    # under the cap, the crossing token; with the negative cap, almost the whole prefix is protected
    assert differs or threshold == 0.9 and n == 150


def test_defensivekv_official_takes_the_official_count_unless_told():
    config = tiny_model().config
    assert get_method("defensivekv")(config, 64, 8).options.protected_set == "reach"
    assert get_method("defensivekv")(config, 64, 8, official=True).options.protected_set == "below"
    assert get_method("layer_defensivekv")(config, 64, 8, official=True).options.protected_set == "below"
    assert get_method("defensivekv")(config, 64, 8, official=True, protected_set="reach").options.protected_set == "reach"


def test_defensivekv_official_selection(captured):
    model, ids, layers, scale = captured
    scores = [R.defensive_layer_official(q, k, v, wo, scale, WINDOW, BUDGET) for q, k, v, wo in layers]
    budgets = [R.flat_heads(s, BUDGET - WINDOW, 0.0) for s in scores]
    kept = [[R.top_set(s[h], list(range(s.shape[1])), b[h]) for h in range(s.shape[0])]
            for s, b in zip(scores, budgets)]
    out, _ = prefill(model, ids, "defensivekv", official=True)
    check_selection(cache_of(out), kept, budgets, scores)


def test_layer_defensivekv_official_windows_compete_in_the_global_top_k():
    # Layer 1 scores far below layer 0: its windows (at its max) lose, and layer 0 wins their room.
    gen = torch.Generator().manual_seed(0)
    high = torch.rand(1, 2, 20, generator=gen) + 1.0
    low = torch.rand(1, 2, 20, generator=gen) * 1e-3
    window, total = 4, 2 * 2 * 12                          # budget 12 per head, 2 layers, 2 heads
    got = official_global_counts([high, low], window, total)

    def reference(layers):
        entries = []
        for i, x in enumerate(layers):
            top = x.max().item()
            for h in range(x.shape[1]):
                entries += [(x[0, h, j].item(), i, h, True) for j in range(x.shape[2])]
                entries += [(top, i, h, False)] * window
        entries.sort(key=lambda t: -t[0])
        counts = [[0, 0], [0, 0]]
        for _, i, h, is_prefix in entries[:total]:
            counts[i][h] += is_prefix
        return counts

    assert got[0].tolist() == reference([high, low])
    assert got[0, 0].sum() == total - 2 * window and got[0, 1].sum() == 0


def test_layer_defensivekv_official_runs(captured):
    model, ids, layers, scale = captured
    out, _ = prefill(model, ids, "layer_defensivekv", official=True)
    total = sum(sum(layer.head_prefix[0]) for layer in cache_of(out).layers)
    assert total <= (BUDGET - WINDOW) * len(layers) * model.config.num_key_value_heads


@pytest.mark.parametrize("method,options", [("cake", {}), ("cake", {"head_budgets": True}), ("adakv", {}),
                                            ("lava", {}), ("defensivekv", {}), ("layer_defensivekv", {})])
def test_official_batch_rows_equal_each_row_alone(method, options):
    """Left-padded rows are scored one real row at a time: the same kept entries and the same greedy
    continuation as each prompt alone (44 tokens: between budget and budget + window for CAKE)."""
    model = tiny_model("llama", kv_heads=2)
    prompts = [prompt(n, seed=30 + n) for n in (44, 95, 140)]
    ids, mask = left_padded(prompts)
    kw = dict(official=True, decode_evict=True, **options)
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, **kw):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        batch_kept = [[kept_prefix(layer, r) for layer in cache_of(out).layers] for r in range(3)]
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=0)
        for r, p in enumerate(prompts):
            with torch.no_grad():
                alone = model(input_ids=p, use_cache=True)
            assert batch_kept[r] == [kept_prefix(layer) for layer in cache_of(alone).layers], f"row {r}"
            single = model.generate(input_ids=p, max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(batch[r, ids.shape[1]:], single[0, p.shape[1]:]), f"row {r} continues differently"


# ---- PyramidKV -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [150, 60, 75], ids=["profile", "uniform-below-2P", "top-clamped"])
def test_pyramidkv_official_matches_reference(captured, n):
    model = captured[0]
    ids = prompt(n, seed=8)
    layers = capture_qkv(model, ids)
    scale = model.model.layers[0].self_attn.scaling
    kept, budgets, scores = R.pyramidkv_official_reference(layers, scale, BUDGET, WINDOW)
    out, handle = prefill(model, ids, "pyramidkv", official=True)
    check_selection(cache_of(out), kept, budgets, scores)
    assert [s["budget"] for s in handle.stats] == [[b[0] + WINDOW] for b in budgets]


def test_pyramidkv_profile_of_a_shallow_model():
    """8 layers (as the shipped model): the official integer step against our exact profile, both shown
    per layer in handle.stats; ours keeps the total NL * P, the official one exceeds it."""
    model = tiny_model("llama", kv_heads=2, layers=8)
    ids = prompt(300, seed=9)
    p = BUDGET - WINDOW
    official = R.pyramidkv_official_budgets(300, 8, BUDGET, WINDOW)
    assert official == [63, 55, 47, 39, 31, 23, 15, 7]                 # steps = (63 - 1) // 7 = 8
    _, handle = prefill(model, ids, "pyramidkv", official=True)
    assert [s["budget"][0] - WINDOW for s in handle.stats] == official
    _, handle = prefill(model, ids, "pyramidkv")
    ours = [s["budget"][0] - WINDOW for s in handle.stats]
    exact = [63 - i * 62 / 7 for i in range(8)]
    assert sum(ours) == 8 * p < sum(official) and all(int(b) <= a <= int(b) + 1 for a, b in zip(ours, exact))
    _, handle = prefill(model, ids, "pyramidkv", beta=1)             # beta = 1: uniform
    assert all(s["budget"] == [BUDGET] for s in handle.stats)
