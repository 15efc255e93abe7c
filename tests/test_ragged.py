"""The ragged layout of layers with per-head budgets: gather_ragged and ragged_attention against dense
references (CPU, and CUDA when a device is present), opcheck, the appends of decoding, the bytes stored,
and end-to-end continuation equal to the padded layout and to a full cache with evicted entries hidden."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cakekv
from cakekv import cache_kwargs, cache_of
import cakekv._ops as ops
from cakekv.cache import CompressedCache, CompressedLayer
from cakekv.storage import PaddedStorage, RaggedStorage
from helpers import BUDGET, WINDOW, left_padded, masked_full_cache_logits, prefill, prompt, tiny_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]


def ragged_case(B=2, Hkv=2, N=30, D=16, dtype=torch.float32, seed=0, empty_segment=False, holes=True):
    """Dense K/V [B, Hkv, N, D] at positions 0..N-1, a random kept subset per (row, head) (the last 3
    positions always kept), and its ragged form. Returns the dense tensors, the kept mask [B, Hkv, N] and
    (idx, offsets) for gather_ragged."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    kept = torch.rand(B, Hkv, N, generator=g) < torch.rand(B, Hkv, 1, generator=g).clamp(0.2, 0.9)
    kept[..., -3:] = True
    if empty_segment:
        kept[-1, -1] = False
    idx = [torch.nonzero(kept[b, h]).flatten() for b in range(B) for h in range(Hkv)]
    if holes:  # a few free slots inside segments, as left by decode-time eviction
        idx = [torch.cat([i, torch.zeros(2, dtype=torch.long)]) if s % 2 else i for s, i in enumerate(idx)]
    counts = torch.tensor([len(i) for i in idx])
    offsets = F.pad(counts.cumsum(0), (1, 0))
    return k, v, kept, torch.cat(idx), offsets, counts


def flat_positions(idx, offsets, counts, holes=True):
    pos = idx.clone()
    if holes:
        for s in range(counts.shape[0]):
            if s % 2:
                pos[offsets[s + 1] - 2: offsets[s + 1]] = -1
    return pos


def dense_masked_attention(q, k, v, kept, q_pos):
    """sdpa over the dense cache (positions 0..N-1) with everything not kept, and the future, masked."""
    groups = q.shape[1] // k.shape[1]
    n = k.shape[2]
    causal = torch.arange(n)[None, None, :] <= q_pos[:, :, None]                      # [B, Q, N]
    mask = (kept[:, :, None, :] & causal[:, None]).repeat_interleave(groups, 1)      # [B, H, Q, N]
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(groups, 1),
                                          v.float().repeat_interleave(groups, 1), attn_mask=mask, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_ragged_matches_reference(device, dtype):
    k, v, kept, idx, offsets, counts = ragged_case(dtype=dtype, empty_segment=True)
    kf, vf = ops.gather_ragged(k.to(device), v.to(device), idx.to(device), offsets.to(device))
    assert kf.shape == (idx.shape[0], k.shape[-1]) and kf.dtype == dtype
    seg = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)
    assert torch.equal(kf.cpu(), k.flatten(0, 1)[seg, idx]) and torch.equal(vf.cpu(), v.flatten(0, 1)[seg, idx])


def test_gather_ragged_rejects_bad_inputs():
    k = torch.randn(1, 2, 4, 3)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.gather_ragged(k, k, torch.tensor([0, 4]), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="must equal T"):
        ops.gather_ragged(k, k, torch.tensor([0, 1]), torch.tensor([0, 1, 3]))
    with pytest.raises(RuntimeError, match=r"\[B \* Hkv \+ 1\]"):
        ops.gather_ragged(k, k, torch.tensor([0, 1]), torch.tensor([0, 2]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("q_len", [1, 5])
def test_ragged_attention_equals_dense_masked(device, heads, kv_heads, q_len):
    B, N, D = 3, 40, 32
    k, v, kept, idx, offsets, counts = ragged_case(B, kv_heads, N, D, seed=heads + q_len)
    kf, vf = ops.gather_ragged(k, v, idx, offsets)
    pos = flat_positions(idx, offsets, counts)
    q = torch.randn(B, heads, q_len, D, generator=torch.Generator().manual_seed(7))
    q_pos = torch.arange(N - q_len, N).expand(B, q_len).contiguous()
    args = [t.to(device) for t in (q, kf, vf, pos, offsets, q_pos)]
    got = ops.ragged_attention(*args, 0.3)
    assert got.shape == q.shape and got.device.type == device
    want = dense_masked_attention(q, k, v, kept, q_pos)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ragged_attention_half_precision(device, dtype):
    k, v, kept, idx, offsets, counts = ragged_case(2, 2, 50, 64, dtype=dtype, seed=3)
    kf, vf = ops.gather_ragged(k, v, idx, offsets)
    q = torch.randn(2, 4, 3, 64).to(dtype)
    q_pos = torch.tensor([[47, 48, 49], [47, 48, 49]])
    args = [t.to(device) for t in (q, kf, vf, flat_positions(idx, offsets, counts), offsets, q_pos)]
    got = ops.ragged_attention(*args, 0.3)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu().float(), dense_masked_attention(q, k, v, kept, q_pos), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_ragged_attention_empty_segment_and_invisible_queries_give_zeros(device):
    k, v, kept, idx, offsets, counts = ragged_case(2, 2, 20, 8, empty_segment=True, holes=False)
    kf, vf = ops.gather_ragged(k, v, idx, offsets)
    q = torch.randn(2, 4, 2, 8)
    q_pos = torch.tensor([[18, 19], [-1, 19]])  # row 1, query 0 sees nothing at all
    got = ops.ragged_attention(*[t.to(device) for t in (q, kf, vf, idx, offsets, q_pos)], 0.3).cpu()
    assert torch.equal(got[1, 2:], torch.zeros_like(got[1, 2:]))  # heads 2, 3 read the empty segment
    assert torch.equal(got[1, :, 0], torch.zeros_like(got[1, :, 0]))
    want = dense_masked_attention(q, k, v, kept, q_pos)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, :2, 1], want[1, :2, 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    k, v, kept, idx, offsets, counts = ragged_case(2, 2, 12, 8, seed=5)
    kf, vf = ops.gather_ragged(k, v, idx, offsets)
    q, q_pos = torch.randn(2, 4, 3, 8), torch.tensor([[9, 10, 11], [9, 10, 11]])
    pos = flat_positions(idx, offsets, counts)
    d = lambda *ts: tuple(t.to(device) for t in ts)  # noqa: E731
    torch.library.opcheck(torch.ops.cakekv.gather_ragged.default, d(k, v, idx, offsets))
    torch.library.opcheck(torch.ops.cakekv.ragged_attention.default, (*d(q, kf, vf, pos, offsets, q_pos), 0.3))


# ---- the ragged storage of a layer --------------------------------------------------------------
def ragged_layer(counts, extra=(), B=1, Hkv=2, D=4, caps=None, device="cpu"):
    """A CompressedLayer switched to the ragged storage, segment s holding positions 0..counts[s]-1."""
    layer = CompressedLayer(cache=type("C", (), {"window": 2})(), layer_idx=0)
    m = max(counts)
    keys = torch.randn(B, Hkv, m, D, device=device)
    layer.lazy_initialization(keys, keys)
    pos = torch.full((B * Hkv, m), -1, dtype=torch.long)
    for s, c in enumerate(counts):
        pos[s, m - c:] = torch.arange(c)
    layer.storage = PaddedStorage(keys, keys * 2, pos.view(B, Hkv, m).to(device))
    layer.head_counts = [list(counts[b * Hkv:(b + 1) * Hkv]) for b in range(B)]
    layer.head_caps = caps
    layer.next_pos = torch.full((B,), m, dtype=torch.long, device=device)
    layer.seen = m
    dense_k = keys.clone()
    layer.to_ragged()
    return layer, dense_k


def test_to_ragged_keeps_exactly_the_entries():
    layer, dense_k = ragged_layer([5, 2, 3, 7], B=2)
    assert layer.keys.shape == (17, 4) and layer.storage.capacities == [5, 2, 3, 7]
    assert layer.storage.offsets.tolist() == [0, 5, 7, 10, 17]
    assert torch.equal(layer.keys[5:7], dense_k[0, 1, -2:])
    assert layer.storage.pos.tolist() == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    padded = layer.storage.padded_pos()
    assert padded.shape == (2, 2, 7) and padded[0, 1].tolist() == [0, 1, -1, -1, -1, -1, -1]


def append(layer, keys, values):
    """One step as the decoder wrapper runs it: host preparation, device append, host counters."""
    layer.prepare_step(keys.shape[2])
    layer.update(keys, values)
    layer.finish_step(keys.shape[2])


def test_append_grows_once_then_writes_in_place(monkeypatch):
    layer, _ = ragged_layer([5, 2])
    repacks = []
    original = RaggedStorage.grow
    monkeypatch.setattr(RaggedStorage, "grow", lambda self, c: (repacks.append(list(c)), original(self, c)))
    steps = 17
    for step in range(steps):
        new = torch.full((1, 2, 1, 4), float(step))
        append(layer, new, new)
    assert repacks == [[6 + 16, 3 + 16]]  # spare room for 16 more tokens per segment at the first append
    pos = layer.storage.padded_pos()[0]
    assert sorted(p for p in pos[0].tolist() if p >= 0) == list(range(5 + steps))
    assert sorted(p for p in pos[1].tolist() if p >= 0) == [0, 1] + list(range(5, 5 + steps))
    seg1 = layer.keys[layer.storage.offsets[1]:layer.storage.offsets[2]]
    assert seg1[2:2 + steps, 0].tolist() == [float(s) for s in range(steps)]  # appended after the kept entries
    append(layer, new, new)  # segment 0 is full again: grows by 1/8, at least 16
    assert repacks[1] == [23 + 16, 20 + 16]
    # a chunk of several tokens lands in the first free slots of every segment, including freed ones
    layer.storage.pos[1] = -1
    layer.head_counts = [[22, 20]]
    chunk = torch.arange(3.0).view(1, 1, 3, 1).expand(1, 2, 3, 4)
    append(layer, chunk, chunk)
    assert layer.storage.pos[1].item() == 23 and layer.keys[1, 0].item() == 0.0
    assert layer.storage.pos[23:25].tolist() == [24, 25]


def test_append_with_caps_reuses_freed_slots():
    layer, _ = ragged_layer([4, 6], caps=[[4, 6]])
    one = torch.ones(1, 2, 1, 4)
    append(layer, one, one)  # full: re-packed with one free slot per segment
    assert layer.storage.capacities == [5, 7]
    layer.storage.pos[2] = -1  # what evict_to_caps does
    layer.storage.pos[layer.storage.offsets[1] + 3] = -1
    layer.head_counts = [[4, 6]]
    append(layer, one * 2, one * 2)
    assert layer.storage.capacities == [5, 7]  # no growth: the freed slots were reused
    assert layer.storage.pos[2].item() == 7 and layer.storage.pos[layer.storage.offsets[1] + 3].item() == 7


# ---- end to end -----------------------------------------------------------------------------------
def ragged_layers(cache):
    return [layer for layer in cache.layers if layer.ragged]


def test_bytes_stored_are_the_kept_entries():
    model = tiny_model("llama", kv_heads=2)
    ids = prompt(200, seed=1)
    out, handle = prefill(model, ids, "adakv")
    cache = cache_of(out)
    assert ragged_layers(cache), "adakv should give layers with different head counts"
    d, hkv = 16, 2
    for layer, s in zip(cache.layers, handle.stats):
        kept = sum(layer.head_counts[0])
        assert s["bytes_kept"] == kept * 2 * d * 4
        padded = hkv * max(layer.head_counts[0]) * (2 * d * 4 + 8)
        if layer.ragged:
            assert s["bytes_after"] == kept * 2 * d * 4 + kept * 8 + (hkv + 1) * 8
            assert s["bytes_after"] < padded
            assert s["kept_per_head"][0] == layer.storage.capacities
        else:
            assert s["bytes_after"] == padded


@pytest.mark.parametrize("method,kw", [("adakv", {}), ("lava", {}), ("cake", {"head_budgets": True,
                                                                               "decode_evict": False})])
@pytest.mark.parametrize("device", DEVICES)
def test_continuation_equals_padded_layout_and_masked_full_cache(method, kw, device, monkeypatch):
    model = tiny_model("qwen2", kv_heads=2).to(device)
    ids, cont = prompt(110, seed=11).to(device), prompt(12, seed=12).to(device)
    out, _ = prefill(model, ids, method, **kw)
    cache = cache_of(out)
    assert ragged_layers(cache)
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, **kw):
        with torch.no_grad():
            got = model(input_ids=cont, **cache_kwargs(model, cache), use_cache=True).logits
    want = masked_full_cache_logits(model, ids, cont, cache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the padded layout (no ragged switch) gives the same logits
    monkeypatch.setattr(CompressedCache, "ragged_layers", False)
    padded, _ = prefill(model, ids, method, **kw)
    assert not ragged_layers(cache_of(padded))
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, **kw):
        with torch.no_grad():
            dense = model(input_ids=cont, **cache_kwargs(model, cache_of(padded)), use_cache=True).logits
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_generation_matches_padded_layout_with_decode_eviction(device, monkeypatch):
    """CAKE with per-head budgets and decode-time eviction, batched: ragged and padded layouts generate the
    same tokens, each head stays at its budget, and the ragged layers store less."""
    model = tiny_model("llama", kv_heads=2).to(device)
    ids, mask = (t.to(device) for t in left_padded([prompt(n, seed=40 + n) for n in (90, 130)]))
    kw = dict(method="cake", budget=BUDGET, window=WINDOW, head_budgets=True)

    def run():
        with cakekv.compress(model, **kw) as handle:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        return out, handle.stats

    got, stats = run()
    assert ragged_layers(cache_of(got))
    for layer, s in zip(cache_of(got).layers, stats):
        assert s["kept_per_head"] == s["budget_per_head"]
        if layer.ragged:  # one free slot per segment for the next token
            assert layer.storage.capacities == [c + 1 for row in layer.head_counts for c in row]
    monkeypatch.setattr(CompressedCache, "ragged_layers", False)
    want, padded_stats = run()
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=1e-4, atol=1e-4)
    assert sum(s["bytes_after"] for s in stats) < sum(s["bytes_after"] for s in padded_stats)


def continuation_logits(model, ids, cont, piece):
    """Logits of `cont` continuing a compressed (ragged) cache of `ids`, fed `piece` tokens per forward."""
    out, _ = prefill(model, ids, "adakv", decode_evict=False)
    cache = cache_of(out)
    assert ragged_layers(cache)
    with cakekv.compress(model, method="adakv", budget=BUDGET, window=WINDOW, decode_evict=False):
        with torch.no_grad():
            return torch.cat([model(input_ids=part, **cache_kwargs(model, cache), use_cache=True).logits
                              for part in cont.split(piece, 1)], 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_32k_token_continuation_chunk_on_cuda_equals_the_chunk_in_pieces():
    """A 32K-token chunk continuing a compressed cache in one forward, at 8 query heads per kv head (262144 query
    rows per kv head, past one grid's 65535 x 4; the attention failed to launch), gives the logits of the same
    tokens fed 4096 at a time."""
    model = tiny_model("llama", kv_heads=2, layers=2, num_attention_heads=16, max_position_embeddings=40000).cuda()
    ids, cont = prompt(300, seed=21).cuda(), prompt(32768, seed=22).cuda()
    whole = continuation_logits(model, ids, cont, 32768)
    torch.testing.assert_close(whole, continuation_logits(model, ids, cont, 4096), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_append_needs_no_host_sync():
    layer, _ = ragged_layer([5, 2, 9, 1], B=2, device="cuda")
    one = torch.ones(2, 2, 1, 4, device="cuda")
    append(layer, one, one)  # the first append re-packs (allowed to sync)
    for _ in range(3):
        layer.prepare_step(1)  # host only
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer.update(one, one)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        layer.finish_step(1)


def evicting_chunk(model, ids, cont, method, **kw):
    """(logits of `cont` continuing a compressed cache of `ids` in one forward, the cache, per evicting layer the
    shape of the weights its eviction ranked by)."""
    ranked = []
    original = CompressedLayer.evict_to_caps

    def recording(self, method):
        if self.step_evict > 0:
            ranked.append(tuple(self.step_weights.shape))
        return original(self, method)

    CompressedLayer.evict_to_caps = recording
    try:
        with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, **kw), torch.no_grad():
            cache = cache_of(model(input_ids=ids, use_cache=True))
            logits = model(input_ids=cont, use_cache=True, **cache_kwargs(model, cache)).logits
    finally:
        CompressedLayer.evict_to_caps = original
    return logits, cache, ranked


@pytest.mark.parametrize("method", ["cake", "adakv"])
def test_long_evicting_chunk_ranks_by_its_last_window_queries(method):
    """A chunk longer than the window under decode eviction attends with every query but ranks its eviction by its
    last `window` queries (weights of G * window rows, not G * chunk: memory bounded whatever the chunk), holds its
    caps after, and its logits are those without decode eviction (eviction follows the chunk's attention)."""
    model = tiny_model("llama", kv_heads=2, layers=2)
    ids, cont = prompt(120, seed=31), prompt(50, seed=32)
    logits, cache, ranked = evicting_chunk(model, ids, cont, method, decode_evict=True)
    want, _, _ = evicting_chunk(model, ids, cont, method, decode_evict=False)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    assert ranked and all(rows == groups * WINDOW for rows, _ in ranked)
    assert all(c <= cap for layer in cache.layers for cs, caps in zip(layer.head_counts, layer.head_caps)
               for c, cap in zip(cs, caps))
    assert all(layer.next_pos.tolist() == [170] for layer in cache.layers)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_40k_token_evicting_chunk_on_cuda():
    """The issue's case: a 40,000-token chunk after an 8K prompt under `cake` with decode eviction (32 query / 4 KV
    heads, head_dim 32, 2 layers, budget 1024) asked ragged_attention for 195.8 GiB of weights; now it runs with the
    memory of its ranking queries, and its logits equal the same model's with decode eviction off (eviction only
    follows the chunk's attention)."""
    model = tiny_model("llama", kv_heads=4, layers=2, num_attention_heads=32, head_dim=32, hidden_size=256,
                       max_position_embeddings=50000).cuda()
    ids, cont = prompt(8192, seed=41).cuda(), prompt(40000, seed=42).cuda()
    results = []
    for decode_evict in (True, False):
        with cakekv.compress(model, method="cake", budget=1024, window=32, decode_evict=decode_evict), \
                torch.no_grad():
            cache = cache_of(model(input_ids=ids, use_cache=True))
            torch.cuda.reset_peak_memory_stats()  # the chunk's peak, not the prompt's (its own attention's)
            base = torch.cuda.memory_allocated()
            logits = model(input_ids=cont, use_cache=True, logits_to_keep=64, **cache_kwargs(model, cache)).logits
        results.append((logits, torch.cuda.max_memory_allocated() - base, cache))
    (evicting, peak, cache), (growing, _, _) = results
    assert peak < 8 * 2 ** 30, f"{peak / 2 ** 30:.1f} GiB"
    # each head within its layer's cap (CAKE's layer budgets vary around 1024), the layers within the total
    assert all(c <= cap for layer in cache.layers for cs, caps in zip(layer.head_counts, layer.head_caps)
               for c, cap in zip(cs, caps))
    assert sum(sum(layer.head_counts[0]) for layer in cache.layers) <= 1024 * 4 * 2
    torch.testing.assert_close(evicting, growing, rtol=1e-4, atol=1e-4)
