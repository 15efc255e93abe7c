"""Decode steps replayed as CUDA graphs give the eager steps' tokens and logits, for every method on the
shipped trained model; several threads may generate under one handle (each has its own cache)."""
from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of
from cakekv.step_graph import ENV_SWITCH, _CollectorPause
from helpers import BUDGET, WINDOW, prompt, tiny_model

ASSET = Path(__file__).resolve().parents[1] / "cakekv" / "assets" / "tiny-llama"
METHODS = [m for m in cakekv.available_methods() if m != "full"]
CASES = [(m, {}) for m in METHODS] + [("cake", {"head_budgets": True}), ("cake", {"decode_evict": False}),
                                      ("full", {})]
IDS = [m for m in METHODS] + ["cake-head_budgets", "cake-no_decode_evict", "full"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()


def decode(model, ids, mask, method, kw, steps, graphs: bool, monkeypatch, budget=128):
    monkeypatch.setenv(ENV_SWITCH, "1" if graphs else "0")
    tokens, logits = [], []
    with cakekv.compress(model, method=method, budget=budget, window=16, **kw), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = cache_of(out)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
            logits.append(out.logits[:, -1].float())
    return torch.cat(tokens, 1), torch.stack(logits, 1), cache


@cuda
@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_graph_steps_equal_eager_steps(shipped, method, kw, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shipped.config.vocab_size, (2, 600), generator=gen).cuda()
    mask = torch.ones_like(ids)
    mask[1, :150] = 0
    steps = 40
    want, want_logits, eager_cache = decode(shipped, ids, mask, method, kw, steps, False, monkeypatch)
    got, got_logits, cache = decode(shipped, ids, mask, method, kw, steps, True, monkeypatch)
    assert eager_cache.step_graph is None
    assert cache.step_graph is not None and cache.step_graph.failed is None
    assert cache.step_graph.replays >= steps // 2  # most steps replayed, not re-captured
    assert torch.equal(got, want)
    # bf16 tolerance: two ulps of the largest logit (graph and eager may pick different GEMM algorithms)
    torch.testing.assert_close(got_logits, want_logits, rtol=2 ** -7, atol=2 ** -6 * float(want_logits.abs().max()))
    for a, b in zip(cache.layers, eager_cache.layers):
        assert a.head_counts == b.head_counts and a.seen == b.seen
        assert torch.equal(a.next_pos, b.next_pos)


@cuda
@pytest.mark.parametrize("family", ["gemma3_text", "gemma2"])
def test_graph_steps_of_sliding_and_softcapped_layers(family, monkeypatch):
    """Sliding layers free what left the window of the step's first query inside the captured step, soft-capped
    logits go through the decode kernels: replayed steps give the eager steps' tokens and logits, well past the
    window (24) and with decode eviction (prompt 80, budget 40)."""
    extra = {"attn_logit_softcapping": 1.0} if family == "gemma2" else {}
    model = tiny_model(family, layers=4, sliding_window=24, attn="eager", **extra).cuda()
    ids = prompt(80, seed=9).cuda()
    mask = torch.ones_like(ids)
    want, want_logits, eager_cache = decode(model, ids, mask, "cake", {}, 30, False, monkeypatch, budget=40)
    got, got_logits, cache = decode(model, ids, mask, "cake", {}, 30, True, monkeypatch, budget=40)
    assert cache.step_graph is not None and cache.step_graph.failed is None and cache.step_graph.replays >= 15
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert any(layer.sliding_window for layer in cache.layers)


@cuda
def test_graph_generate_equals_eager_generate(shipped, monkeypatch):
    """`model.generate` itself (its own position ids and growing mask) takes the captured path."""
    ids = torch.randint(3, shipped.config.vocab_size, (1, 700), generator=torch.Generator().manual_seed(1)).cuda()
    outs = []
    for graphs in (False, True):
        monkeypatch.setenv(ENV_SWITCH, "1" if graphs else "0")
        with cakekv.compress(shipped, method="cake", budget=128, window=16) as handle:
            outs.append(shipped.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0))
        graph = handle.last_cache.step_graph
        assert (graph is not None and graph.replays > 10) == graphs
    assert torch.equal(outs[0], outs[1])


@cuda
def test_repeated_generates_capture_and_free_their_graphs():
    """A serving loop (benchmarks/soak.py's form, fp32): every generate captures its step, and the cache with its
    graph is gone when the call returns, without waiting for a garbage collection (one that fell inside a later
    capture would destroy a graph mid-capture: CUDA fails that capture and leaks the graph)."""
    model = tiny_model("llama").cuda()
    gc.collect()
    gc.disable()
    try:
        for call in range(12):
            with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW) as handle, torch.no_grad():
                model.generate(prompt(90 + call, seed=call).cuda(), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                               pad_token_id=0)
            graph = handle.last_cache.step_graph
            assert graph is not None and graph.failed is None and graph.captures > 0, (call, graph and graph.failed)
            freed = weakref.ref(handle.last_cache)
            del handle, graph
            assert freed() is None, f"call {call}: the cache outlived the call"
    finally:
        gc.enable()


def test_collector_pause_holds_until_the_last_capture_ends():
    """Overlapping captures (two threads): the collector stays off until the last one ends, then is restored as it
    was before the first (off stays off)."""
    pause = _CollectorPause()
    for enabled_before in (True, False):
        gc.enable() if enabled_before else gc.disable()
        try:
            first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
            seen = []

            def first():
                with pause:
                    first_in.set()
                    second_in.wait(5)
                first_out.set()

            def second():
                first_in.wait(5)
                with pause:
                    second_in.set()
                    first_out.wait(5)
                    seen.append(gc.isenabled())  # the first capture has ended, this one has not

            threads = [threading.Thread(target=first), threading.Thread(target=second)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert seen == [False]
            assert gc.isenabled() == enabled_before
        finally:
            gc.enable()


def test_threads_generate_under_one_handle():
    """Each thread's generate runs on its own cache: the results equal the same prompts run one by one."""
    model = tiny_model("llama")
    prompts = [prompt(70 + 10 * i, seed=20 + i) for i in range(3)]
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW), torch.no_grad():
        want = [model.generate(p, max_new_tokens=8, do_sample=False, pad_token_id=0) for p in prompts]
        got, errors = [None] * 3, []

        def work(i):
            try:
                for _ in range(3):
                    got[i] = model.generate(prompts[i], max_new_tokens=8, do_sample=False, pad_token_id=0)
            except Exception as error:  # noqa: BLE001  (reported below)
                errors.append(error)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_cpu_decodes_eagerly():
    model = tiny_model("llama")
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW), torch.no_grad():
        out = model(input_ids=prompt(80), use_cache=True)
        cache = cache_of(out)
        model(input_ids=prompt(1, seed=3), use_cache=True, **cache_kwargs(model, cache))
    assert cache.step_graph is None  # graphs are a CUDA matter: CPU steps stay eager


def test_growing_layers_grow_together():
    """Layers of different sizes (pyramidkv, no decode caps) reallocate at the same steps, so a captured
    decode step stays valid for many tokens instead of being re-captured whenever one layer fills up."""
    model = tiny_model("llama", layers=4)
    with cakekv.compress(model, method="pyramidkv", budget=BUDGET, window=WINDOW), torch.no_grad():
        out = model(input_ids=prompt(150, seed=4), use_cache=True)
        cache = cache_of(out)
        assert len({layer.head_counts[0][0] for layer in cache.layers}) > 1  # the layers differ in size
        grew = {i: [] for i in range(len(cache.layers))}
        for step in range(80):
            before = [layer.keys.data_ptr() for layer in cache.layers]
            out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **cache_kwargs(model, cache))
            for i, layer in enumerate(cache.layers):
                if layer.keys.data_ptr() != before[i]:
                    grew[i].append(step)
    assert grew[0] and all(steps == grew[0] for steps in grew.values()), grew
    assert len(grew[0]) <= 80 // 16 + 1


@pytest.mark.parametrize("method", ["cake", "lava"])
def test_generations_of_one_handle_keep_their_own_method_state(method):
    """The official modes keep each layer's prefill scores on the method until the cascade ends; two generations
    of one handle (threads) must not share them: a second prefill in between leaves the first cache's intact."""
    model = tiny_model("llama")
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, official=True) as handle, \
            torch.no_grad():
        first, second = handle.new_cache(), handle.new_cache()
        model(input_ids=prompt(70, seed=1), use_cache=True, **cache_kwargs(model, first))
        model(input_ids=prompt(90, seed=2), use_cache=True, **cache_kwargs(model, second))
    assert first.method is not second.method and first.method is not handle.method
    assert first.method._original[0].shape[-1] == 70 and second.method._original[0].shape[-1] == 90
