"""One compressed cache used the way a chat uses it: turn after turn of `generate`, each turn the previous sequence
plus a new message. A captured decode step must never replay over a tensor that a chunk in between reallocated
(the step's query positions are remade whenever the step length changes); outputs of replayed steps, nested ones
too, must be the step's own; a continuation chunk with padding is refused; a cache continued after its
compression ended says so."""
from __future__ import annotations

import contextlib
import threading

import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of
from cakekv.cache import CompressedCache
from cakekv.step_graph import ENV_SWITCH
from helpers import BUDGET, WINDOW, is_unpatched, left_padded, prompt, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MESSAGE_LENGTHS = (7, 19, 3, 30)  # a new message per turn, of different lengths


def chat(model, method, device, batch=1, steps=10, **kw):
    """Four turns of `generate` on one cache: (each turn's new tokens, logits of every step, the cache)."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, model.config.vocab_size, (batch, 90), generator=gen).to(device)
    turns, logits = [], []
    compressing = (cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, **kw) if method
                   else contextlib.nullcontext())  # None: transformers' own cache
    with compressing, torch.no_grad():
        cache = None
        for n in MESSAGE_LENGTHS:
            if cache is not None:
                message = torch.randint(3, model.config.vocab_size, (batch, n), generator=gen).to(device)
                ids = torch.cat([ids, message], 1)
            extra = {} if cache is None else cache_kwargs(model, cache)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                 min_new_tokens=steps, do_sample=False, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True, **extra)
            cache = cache_of(out)
            turns.append(out.sequences[:, ids.shape[1]:])
            logits.append(torch.stack(out.logits, 1).float())
            ids = out.sequences
    return turns, logits, cache


def test_step_key_changes_whenever_a_step_tensor_moves(monkeypatch):
    """The key of a step (what a captured graph is replayed under) holds every address the step touches: across
    one-token steps, a multi-token chunk (the query positions are remade) and one-token steps again, two steps
    have equal keys only if their tensors sit where they sat."""
    seen = []
    original = CompressedCache.prepare_step

    def recording(self, q):
        key = original(self, q)
        addresses = [(layer.query_pos.data_ptr(), layer.next_pos.data_ptr(), layer.keys.data_ptr(),
                      layer.values.data_ptr(), layer.storage.pos.data_ptr()) for layer in self.layers]
        seen.append((q, key, addresses))
        return key

    monkeypatch.setattr(CompressedCache, "prepare_step", recording)
    model = tiny_model("llama")
    with cakekv.compress(model, method="snapkv", budget=BUDGET, window=WINDOW), torch.no_grad():
        cache = cache_of(model(input_ids=prompt(120), use_cache=True))
        for q in (1, 1, 5, 1, 1, 9, 1):
            model(input_ids=prompt(q, seed=q), use_cache=True, **cache_kwargs(model, cache))
    ones = [(key, addresses) for q, key, addresses in seen if q == 1]
    assert any(a != b for (_, a), (_, b) in zip(ones, ones[1:])), "no step tensor moved: the test shows nothing"
    for (key_a, addr_a), (key_b, addr_b) in zip(ones, ones[1:]):
        assert (key_a == key_b) == (addr_a == addr_b)


@pytest.mark.parametrize("method", ["full", "cake"])
def test_chat_turns_on_one_cache(method):
    """Turns on one cache through `generate`: with `full` every turn's tokens and logits are plain transformers'
    on its own cache (positions and causality exact across turns); with eviction the cache holds its budget and
    counts every token."""
    model = tiny_model("llama")
    turns, logits, cache = chat(model, method, "cpu")
    total = 90 + sum(MESSAGE_LENGTHS[1:]) + 10 * len(MESSAGE_LENGTHS) - 1  # the last token is never fed back
    assert all(layer.next_pos.tolist() == [total] and layer.seen == total for layer in cache.layers)
    if method == "full":
        want, want_logits, _ = chat(model, None, "cpu")
        for a, b in zip(turns, want):
            assert torch.equal(a, b)
        for a, b in zip(logits, want_logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    else:
        held = sum(sum(layer.head_counts[0]) / len(layer.head_counts[0]) for layer in cache.layers)
        assert held <= BUDGET * len(cache.layers)


@cuda
@pytest.mark.parametrize("method,kw", [("snapkv", {}), ("cake", {}), ("adakv", {}), ("cake", {"decode_evict": False}),
                                       ("full", {})],
                         ids=["snapkv", "cake", "adakv-ragged", "cake-growing", "full"])
def test_chat_turns_captured_equal_eager(method, kw, monkeypatch):
    """Four turns with captured steps give the eager turns' tokens and logits, bit for bit (fp32), padded and
    ragged layouts, with and without decode eviction (the issue's case: the fourth turn emitted an id outside
    the vocabulary, then the next step lost the CUDA context)."""
    model = tiny_model("llama").cuda()
    runs = {}
    for graphs in (False, True):
        monkeypatch.setenv(ENV_SWITCH, "1" if graphs else "0")
        runs[graphs] = chat(model, method, "cuda", batch=2, **kw)
    (want, want_logits, _), (got, got_logits, cache) = runs[False], runs[True]
    assert cache.step_graph is not None and cache.step_graph.failed is None and cache.step_graph.replays > 10
    if method == "adakv":
        assert any(layer.ragged for layer in cache.layers)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for a, b in zip(got_logits, want_logits):
        assert torch.equal(a, b)


@cuda
def test_nested_outputs_of_replayed_steps_are_their_own(monkeypatch):
    """`output_hidden_states` / `output_attentions` through `generate`: every step's hidden states are its own
    (captured steps returned the last replay's tensors for each step), equal to the eager steps'."""
    model = tiny_model("llama").cuda()
    ids = prompt(100, seed=2).cuda()
    outs = {}
    for graphs in (False, True):
        monkeypatch.setenv(ENV_SWITCH, "1" if graphs else "0")
        with cakekv.compress(model, method="snapkv", budget=BUDGET, window=WINDOW) as handle, torch.no_grad():
            outs[graphs] = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                                          output_hidden_states=True, return_dict_in_generate=True)
        if graphs:
            assert handle.last_cache.step_graph.replays > 3
    want, got = outs[False].hidden_states, outs[True].hidden_states
    last = [step[-1] for step in got[1:]]
    assert all(not torch.equal(a, b) for a, b in zip(last, last[1:]))
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@cuda
def test_flags_changing_between_steps_are_not_replayed_under_one_graph(monkeypatch):
    """A step asking for hidden states after steps that did not gets them (the flags key the graph)."""
    monkeypatch.setenv(ENV_SWITCH, "1")
    model = tiny_model("llama").cuda()
    with cakekv.compress(model, method="snapkv", budget=BUDGET, window=WINDOW), torch.no_grad():
        out = model(input_ids=prompt(100).cuda(), use_cache=True)
        cache = cache_of(out)
        for _ in range(4):
            out = model(input_ids=prompt(1, seed=4).cuda(), use_cache=True, **cache_kwargs(model, cache))
        assert out.hidden_states is None
        out = model(input_ids=prompt(1, seed=5).cuda(), use_cache=True, output_hidden_states=True,
                    **cache_kwargs(model, cache))
    assert out.hidden_states is not None and len(out.hidden_states) == model.config.num_hidden_layers + 1


@cuda
def test_two_threads_capture_at_once():
    """Two threads generating under one handle capture their steps at the same time: both captures succeed and
    each thread gets the tokens it gets alone."""
    model = tiny_model("llama").cuda()
    prompts = [prompt(80, seed=30).cuda(), prompt(95, seed=31).cuda()]
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW), torch.no_grad():
        want = [model.generate(p, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
                for p in prompts]
        got, graphs, errors = [None, None], [None, None], []
        start = threading.Barrier(2)

        def work(i):
            try:
                start.wait(10)
                got[i] = model.generate(prompts[i], max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                        pad_token_id=0, return_dict_in_generate=True)
                graphs[i] = cache_of(got[i]).step_graph
            except Exception as error:  # noqa: BLE001  (reported below)
                errors.append(error)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i in range(2):
        assert graphs[i] is not None and graphs[i].failed is None and graphs[i].captures > 0, graphs[i].failed
        assert torch.equal(got[i].sequences, want[i])


def test_padded_continuation_chunk_is_refused():
    """A chunk whose rows hold padding (questions of different lengths, left padded) would store the pads as
    entries: refused with an error naming the mask; the cache is unchanged and continues with unpadded chunks."""
    model = tiny_model("llama")
    ids, mask = left_padded([prompt(100, seed=1), prompt(80, seed=2)])
    chunk = prompt(5, seed=3, batch=2)
    chunk_mask = torch.ones_like(chunk)
    chunk_mask[1, :2] = 0
    with cakekv.compress(model, method="snapkv", budget=BUDGET, window=WINDOW), torch.no_grad():
        cache = cache_of(model(input_ids=ids, attention_mask=mask, use_cache=True))
        before = [layer.next_pos.tolist() for layer in cache.layers]
        with pytest.raises(ValueError, match=r"attention_mask: rows \[1\] .*padding"):
            model(input_ids=chunk, attention_mask=torch.cat([mask, chunk_mask], 1), use_cache=True,
                  **cache_kwargs(model, cache))
        assert [layer.next_pos.tolist() for layer in cache.layers] == before
        model(input_ids=chunk, attention_mask=torch.cat([mask, torch.ones_like(chunk)], 1), use_cache=True,
              **cache_kwargs(model, cache))
    assert [layer.next_pos.tolist() for layer in cache.layers] == [[r + 5 for r in row] for row in before]
    assert is_unpatched(model)


def test_cache_continued_after_its_compression_ended_says_so():
    """The compression a cache belongs to has ended: continuing the cache raises an error that says so (not one
    from inside an op); under a new compress() of the model it continues."""
    model = tiny_model("llama")
    with cakekv.compress(model, method="snapkv", budget=BUDGET, window=WINDOW), torch.no_grad():
        cache = cache_of(model(input_ids=prompt(100), use_cache=True))
    with torch.no_grad(), pytest.raises(RuntimeError, match="compression it belongs to has ended"):
        model(input_ids=prompt(3, seed=1), use_cache=True, **cache_kwargs(model, cache))
    with cakekv.compress(model, method="snapkv", budget=BUDGET, window=WINDOW), torch.no_grad():
        out = model(input_ids=prompt(3, seed=1), use_cache=True, **cache_kwargs(model, cache))
    assert out.logits.shape[1] == 3 and cache.layers[0].next_pos.tolist() == [103]
