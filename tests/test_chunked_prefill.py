"""Chunked prefill (`compress(prefill_chunk=...)`): a prompt read chunk by chunk, the cache cut back to the budget
after each chunk. A chunk no shorter than the prompt is the one-shot prefill exactly; with smaller chunks, every
logit and generated token is the plain model's (SDPA over the full K/V) with each query seeing exactly the entries
the cache held when its chunk attended, causally and at true positions; each layer never holds more than what the
previous chunk left it plus one chunk, and each chunk ends within the budget; bad values and methods that cannot
score a chunk are refused, naming the argument, with the model left unpatched."""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cakekv
from cakekv import cache_kwargs, cache_of
from cakekv.cache import CompressedCache
from cakekv.methods import get_method
from cakekv.patch import prefill_chunks, sliding_windows
from helpers import BUDGET, WINDOW, is_unpatched, left_padded, per_layer_masks, prompt, tiny_model

CHUNK = 48
NEW = 6


def refusal(method: str, **options) -> str | None:
    config = SimpleNamespace(num_hidden_layers=2, _name_or_path="")
    return get_method(method)(config, BUDGET, WINDOW, **options).chunked_prefill_refusal()


CHUNKED_METHODS = [m for m in cakekv.available_methods() if refusal(m) is None]
UNIFORM_HEADS = ("cake", "snapkv", "pyramidkv", "streamingllm", "spancake")  # every KV head of a layer keeps as many


@pytest.fixture
def record(monkeypatch):
    """Per chunk read (a prompt is one): `attended[layer]`, the positions [B, Hkv, slots] the layer held when the
    chunk attended (its cut entries and the chunk, before it is cut again); `slots`, at each layer's attention,
    every layer's slots; `end`, every layer's positions once the chunk's last layer has cut them."""
    chunks = []
    original = CompressedCache.after_prefill

    def after_prefill(self, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            chunks.append(SimpleNamespace(attended={}, slots=[], end=None))
        chunk = chunks[-1]
        chunk.attended[layer_idx] = self.layers[layer_idx].storage.padded_pos().clone()
        chunk.slots.append([layer.storage.pos.shape[-1] if layer.is_initialized else 0 for layer in self.layers])
        original(self, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            chunk.end = [layer.storage.padded_pos().clone() for layer in self.layers]

    monkeypatch.setattr(CompressedCache, "after_prefill", after_prefill)
    return chunks


def held(pos: torch.Tensor, row: int, length: int) -> torch.Tensor:
    """[Hkv, length] bool: the positions row `row` of positions [B, Hkv, slots] holds."""
    out = torch.zeros(pos.shape[1], length, dtype=torch.bool)
    for h in range(pos.shape[1]):
        out[h, [p for p in pos[row, h].tolist() if p >= 0]] = True
    return out


def reference_logits(model, ids, chunks, recorded, row=0):
    """The uncompressed model over `ids` [1, N] (a row's real tokens, then what followed its prompt), each layer by
    SDPA under a mask: a query of prompt chunk c (`chunks`: position ranges) sees the positions its layer and KV head
    held when chunk c attended, up to its own; a query past the prompt sees what the cache kept at the end and the
    tokens after the prompt; on a sliding layer only the last `sliding_window` positions."""
    n, prompt_end = ids.shape[1], chunks[-1][1]
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    i = torch.arange(n)
    causal = i[None, :] <= i[:, None]
    masks = {}
    for layer, window in enumerate(sliding_windows(model.config)):
        visible = torch.zeros(model.config.num_key_value_heads, n, n, dtype=torch.bool)
        for (start, end), chunk in zip(chunks, recorded):
            visible[:, start:end] = held(chunk.attended[layer], row, n)[:, None]
        visible[:, prompt_end:] = held(recorded[-1].end[layer], row, n)[:, None] | (i >= prompt_end)
        visible &= causal
        if window is not None:
            visible &= i[None, :] > i[:, None] - window
        masks[layer] = visible.repeat_interleave(groups, 0)[None]
    with per_layer_masks(model, masks), torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0]


def kept_positions(cache: CompressedCache) -> list:
    return [layer.storage.padded_pos().tolist() for layer in cache.layers]


@pytest.mark.parametrize("method", CHUNKED_METHODS)
def test_a_chunk_as_long_as_the_prompt_is_the_one_shot_prefill(llama, method):
    """prefill_chunk >= the prompt's length: the same kept entries, logits and generated tokens, bit for bit."""
    ids = prompt(150, seed=3)
    runs = []
    for chunk in (None, 150, 1000):
        with cakekv.compress(llama, method, budget=BUDGET, window=WINDOW, prefill_chunk=chunk) as handle, \
                torch.no_grad():
            out = llama(input_ids=ids, use_cache=True)
            kept = kept_positions(cache_of(out))
            tokens = llama.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        runs.append((out.logits, kept, tokens, handle.stats))
    for logits, kept, tokens, stats in runs[1:]:
        assert torch.equal(logits, runs[0][0])
        assert kept == runs[0][1]
        assert torch.equal(tokens, runs[0][2])
        assert stats == runs[0][3]


@pytest.mark.parametrize("family,method", [("llama", "cake"), ("llama", "snapkv"), ("llama", "adakv"),
                                           ("llama", "layer_defensivekv"), ("llama", "full"),
                                           ("gemma3_text", "cake"), ("qwen2", "pyramidkv")])
def test_chunks_are_the_model_with_the_evicted_entries_hidden(record, family, method):
    """A plain forward over a 300-token prompt in chunks of 48 returns the last chunk's logits, a continuation and
    `generate` go on from the cache: all are the plain model's with, per layer and KV head, exactly the entries the
    cache did not hold hidden (the reference attends over the full K/V: positions, RoPE and causality exact). The
    cache holds each row's window and nothing past the prompt; rows' positions are exact."""
    model = tiny_model(family)
    n, cont = 300, prompt(9, seed=5)
    ids = prompt(n, seed=4)
    chunks = prefill_chunks(n, CHUNK, None)
    assert [e - s for s, e in chunks] == [12] + [CHUNK] * 6
    with cakekv.compress(model, method, budget=BUDGET, window=WINDOW, prefill_chunk=CHUNK,
                         decode_evict=False) as handle, torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = cache_of(out)
        assert len(record) == len(chunks)
        for layer in cache.layers:
            assert layer.next_pos.tolist() == [n] and layer.seen == n
            pos = layer.storage.padded_pos()[0]
            for head in pos.tolist():
                real = [p for p in head if p >= 0]
                assert len(set(real)) == len(real) and max(real) == n - 1
                assert set(range(n - WINDOW, n)) <= set(real)
        assert [s["tokens"] for s in handle.stats] == [[n]] * len(cache.layers)
        continued = model(input_ids=cont, use_cache=True, **cache_kwargs(model, cache)).logits[0]
        generated = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, n:]
    assert out.logits.shape[1] == CHUNK  # the last chunk's logits
    ref = reference_logits(model, torch.cat([ids, cont], 1), chunks, record[:len(chunks)])
    torch.testing.assert_close(out.logits[0], ref[n - CHUNK:n], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(continued, ref[n:], atol=2e-5, rtol=1e-4)
    ref = reference_logits(model, torch.cat([ids, generated[None, :-1]], 1), chunks, record[-len(chunks):])
    assert torch.equal(ref[n - 1:].argmax(-1), generated)


def test_a_left_padded_batch_is_each_row_with_its_evicted_entries_hidden(llama, record):
    """Rows of 100, 230 and 300 tokens: the first chunk takes every row's padding (each row's first real token is
    in it), later chunks are whole and unpadded; each row generates what its own reference gives."""
    prompts = [prompt(n, seed=n) for n in (100, 230, 300)]
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    columns = prefill_chunks(width, CHUNK, mask)
    assert columns[0] == (0, width - 2 * CHUNK) and all(e - s == CHUNK for s, e in columns[1:])
    with cakekv.compress(llama, "cake", budget=BUDGET, window=WINDOW, prefill_chunk=CHUNK, decode_evict=False), \
            torch.no_grad():
        out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert len(record) == len(columns)
    for row, p in enumerate(prompts):
        pad = width - p.shape[1]
        chunks = [(max(s - pad, 0), e - pad) for s, e in columns]
        generated = out[row, width:]
        ref = reference_logits(llama, torch.cat([p, generated[None, :-1]], 1), chunks, record, row)
        want = ref[p.shape[1] - 1:].argmax(-1)
        stop = (want == llama.generation_config.eos_token_id).nonzero()
        last = int(stop[0]) + 1 if len(stop) else NEW  # generate pads a row after its end of sequence
        assert torch.equal(generated[:last], want[:last]), f"row {row}"


@pytest.mark.parametrize("method", CHUNKED_METHODS)
@pytest.mark.parametrize("length", [400, 800])
def test_memory_is_the_budget_plus_one_chunk(llama, record, method, length):
    """While a chunk is read, each layer holds at most what the previous chunk left it plus the chunk and its probes
    (the prompt's last `window` tokens); each chunk ends within the budget (per KV head on average, over the
    layers); a layer whose heads keep as many holds no more slots than that: the peak does not grow with the
    prompt."""
    with cakekv.compress(llama, method, budget=BUDGET, window=WINDOW, prefill_chunk=CHUNK), torch.no_grad():
        llama(input_ids=prompt(length, seed=6), use_cache=True)
    layers = llama.config.num_hidden_layers
    before = [prefill_chunks(length, CHUNK, None)[0][1]] * layers  # the first chunk: at most its own tokens
    for chunk in record:
        for slots in chunk.slots:
            assert all(s <= b + CHUNK + WINDOW for s, b in zip(slots, before)), (slots, before)
            if method in UNIFORM_HEADS:
                assert sum(slots) <= layers * (BUDGET + CHUNK + WINDOW)
        kept = sum((pos[0] >= 0).sum().item() / pos.shape[1] for pos in chunk.end)
        if method != "full":
            assert kept <= layers * BUDGET
        before = [pos.shape[-1] for pos in chunk.end]


@pytest.mark.parametrize("method", ["cake", "spancake", "snapkv", "adakv"])
def test_each_chunk_is_scored_by_the_prompts_last_tokens(llama, record, monkeypatch, method):
    """A chunk followed by more is read with the prompt's last `window` tokens after it, at their own positions (the
    probes): their queries are those of the plain model over the chunk then those tokens, they rank the chunk but
    its last `window` tokens (kept for the next chunk, which ranks them with what follows them), and they leave the
    cache after the cut."""
    from cakekv.eviction import Eviction
    n, size = 200, 120
    ids = prompt(n, seed=12)
    (start, end), _ = prefill_chunks(n, size, None)
    assert end - start > BUDGET  # the first chunk is cut
    seen = []
    real = Eviction.score

    def score(self, cache, layer, query, *args):
        seen.append((query[:, :, -WINDOW:].clone(), layer.query_pos[:, -WINDOW:].clone(),
                     (layer.next_pos - cache.held_window).tolist()))
        return real(self, cache, layer, query, *args)

    monkeypatch.setattr(Eviction, "score", score)
    with cakekv.compress(llama, method, budget=BUDGET, window=WINDOW, prefill_chunk=size), torch.no_grad():
        llama(input_ids=ids, use_cache=True)
    layers = llama.config.num_hidden_layers
    chunked, first = record[0].end, seen[:layers]
    assert all(int(pos.max()) == end + WINDOW - 1 for pos in record[0].attended.values())  # read with the probes
    assert all(int(pos.max()) == end - 1 for pos in chunked)  # which then left
    assert all(held(pos, 0, end)[:, end - WINDOW:].all() for pos in chunked)  # the chunk's last tokens stay
    assert all(starts == [end - WINDOW] for _, _, starts in first)  # and are not ranked
    assert all(q_pos.tolist() == [list(range(end, end + WINDOW))] for _, q_pos, _ in first)
    seen.clear()
    probed = torch.cat([ids[:, start:end], ids[:, n - WINDOW:]], 1)
    positions = torch.cat([torch.arange(start, end), torch.arange(n - WINDOW, n)])[None]
    with cakekv.compress(llama, method, budget=BUDGET, window=WINDOW), torch.no_grad():
        llama(input_ids=probed, position_ids=positions, use_cache=True)
    for (got, _, _), (want, _, _) in zip(first, seen):
        torch.testing.assert_close(got, want)  # the question's queries at their own positions


def test_inputs_embeds_are_cut_as_input_ids(llama):
    ids = prompt(200, seed=8)
    with cakekv.compress(llama, "cake", budget=BUDGET, window=WINDOW, prefill_chunk=np.int64(50)), torch.no_grad():
        by_ids = llama(input_ids=ids, use_cache=True).logits
        by_embeds = llama(inputs_embeds=llama.get_input_embeddings()(ids), use_cache=True).logits
    assert torch.equal(by_ids, by_embeds)


def test_prefill_chunks():
    assert prefill_chunks(10, 4, None) == [(0, 2), (2, 6), (6, 10)]
    assert prefill_chunks(8, 4, None) == [(0, 4), (4, 8)]
    assert prefill_chunks(4, 4, None) == [(0, 4)]
    mask = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1], [1] * 10])  # the shortest row: 5 tokens
    assert prefill_chunks(10, 4, mask) == [(0, 6), (6, 10)]
    assert prefill_chunks(10, 5, mask) == [(0, 10)]  # a later chunk would be all the shortest row


@pytest.mark.parametrize("value,error,message", [
    (WINDOW, ValueError, f"prefill_chunk: must be >= window + 1 = {WINDOW + 1}, got {WINDOW}"),
    (0, ValueError, "prefill_chunk: must be >= window + 1"),
    (-5, ValueError, "prefill_chunk: must be >= window + 1"),
    ("64", TypeError, "prefill_chunk: must be an integer"),
    (64.0, TypeError, "prefill_chunk: must be an integer"),
    (True, TypeError, "prefill_chunk: must be an integer"),
])
def test_bad_values_are_refused(llama, value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        cakekv.compress(llama, "cake", budget=BUDGET, window=WINDOW, prefill_chunk=value)
    assert is_unpatched(llama)


@pytest.mark.parametrize("method,options,why", [
    ("h2o", {}, "every prompt query"), ("kvzip", {}, "re-reads the whole prompt"),
    ("spanzip", {}, "re-reads the whole prompt"), ("cake", {"official": True}, "official=True"),
    ("adakv", {"official": True}, "official=True"), ("lava", {"official": True}, "official=True"),
])
def test_methods_that_cannot_score_a_chunk_are_refused(llama, method, options, why):
    with pytest.raises(ValueError, match=f"prefill_chunk: method '{method}' cannot read a prompt in chunks: .*{why}"):
        cakekv.compress(llama, method, budget=BUDGET, window=WINDOW, prefill_chunk=64, **options)
    assert is_unpatched(llama)
    cakekv.compress(llama, method, budget=BUDGET, window=WINDOW, **options).remove()  # without chunks: accepted


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_outputs_of_the_whole_prompt_are_refused(llama, flag):
    """Hidden states and attention weights of a prompt read in chunks would be the last chunk's: refused, by name;
    a prompt no longer than a chunk gives them as always."""
    with cakekv.compress(llama, "cake", budget=BUDGET, window=WINDOW, prefill_chunk=64), torch.no_grad():
        with pytest.raises(ValueError, match=f"{flag}: a prompt read in chunks"):
            llama(input_ids=prompt(100), use_cache=True, **{flag: True})
        llama(input_ids=prompt(64), use_cache=True, **{flag: True})
    assert is_unpatched(llama)
