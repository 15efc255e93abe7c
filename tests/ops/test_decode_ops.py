"""The decode-time ops over a layer's segments (append_entries, evict_lowest on ragged_attention's weights) against the plain-PyTorch
references in reference.py: random cases in both layouts (padded: equal segments; ragged: unequal ones),
storage order shuffled so that slot order is not position order, free slots inside segments, several
queries (the variance term), both poolings; attention of the shipped trained model; the position order the
ops keep (exact after every append and eviction of a long run); opcheck; errors."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import cakekv._ops as ops
import reference as ref
from helpers import assert_exact_order, assert_same_eviction, capture_qk

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]
TINY = os.path.join(os.path.dirname(ops.__file__), "assets", "tiny-llama")


def segment_case(B=2, Hkv=2, G=2, Q=1, D=16, ragged=True, free=3, dtype=torch.float32, seed=0, length=40):
    """Segments of shuffled storage: segment s holds positions 0..n_s-1 (n_s random when ragged) in random
    slots plus `free` free slots; queries at the next Q positions of each row."""
    g = torch.Generator().manual_seed(seed)
    segs = B * Hkv
    counts = (torch.randint(length // 2, length, (segs,), generator=g) if ragged
              else torch.full((segs,), length))
    pos = []
    for s in range(segs):
        n = int(counts[s])
        p = torch.cat([torch.arange(n), torch.full((free,), -1)])
        pos.append(p[torch.randperm(n + free, generator=g)])
    offsets = F.pad((counts + free).cumsum(0), (1, 0))
    pos = torch.cat(pos)
    k = torch.randn(pos.shape[0], D, generator=g).to(dtype)
    v = torch.randn(pos.shape[0], D, generator=g).to(dtype)
    q = (3 * torch.randn(B, Hkv * G, Q, D, generator=g)).to(dtype)  # sharp attention: scores far apart
    newest = torch.stack([counts.view(B, Hkv)[b].max() for b in range(B)])
    q_pos = newest[:, None] + torch.arange(Q)
    return q, k, v, pos, offsets, q_pos


def on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def evict(device, q, k, v, pos, order, offsets, q_pos, over, scale, var_weight, protect, kernel, pooling, n_evict):
    """The decode step's eviction as the cache runs it: attention with weights, then evict_lowest on them."""
    offsets, q_pos = on(device, offsets, q_pos)
    _, weights = ops.ragged_attention_with_weights(*on(device, q, k, v), pos, offsets, q_pos, scale)
    ops.evict_lowest(weights, pos, order, offsets, q_pos, over, var_weight, protect, kernel, pooling, n_evict)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("q_len", [1, 3])
def test_append_entries_matches_reference(device, dtype, ragged, q_len):
    q, k, v, pos, offsets, q_pos = segment_case(Q=q_len, ragged=ragged, dtype=dtype, seed=q_len)
    new_k = torch.randn(2, 2, q_len, 16).to(dtype)
    new_v = torch.randn(2, 2, q_len, 16).to(dtype)
    want = [k.clone(), v.clone(), pos.clone()]
    ref.append_entries(*want, offsets, new_k, new_v, q_pos)
    got = list(on(device, k, v, pos))
    order = on(device, ops.position_order(pos, offsets))[0]
    ops.append_entries(*got, *on(device, offsets, new_k, new_v, q_pos), order)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    assert_exact_order(order, got[2], offsets)


def test_append_entries_refuses_a_full_segment():
    q, k, v, pos, offsets, q_pos = segment_case(Q=4, free=3)
    with pytest.raises(RuntimeError, match="append_entries: segment 0 has 3 free slots for 4 tokens"):
        ops.append_entries(k, v, pos, offsets, torch.zeros(2, 2, 4, 16), torch.zeros(2, 2, 4, 16), q_pos)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("q_len,var_weight", [(1, 0.0), (4, 200.0)])
@pytest.mark.parametrize("kernel,pooling", [(1, "avg"), (5, "avg"), (7, "max")])
def test_evict_lowest_matches_reference(device, dtype, ragged, q_len, var_weight, kernel, pooling):
    q, k, v, pos, offsets, q_pos = segment_case(Q=q_len, ragged=ragged, dtype=dtype, seed=kernel + q_len)
    over = torch.tensor([[2, 0], [5, -1]])  # one segment evicts n_evict, one over its cap by less, two none
    n_evict = 3
    want_pos, want_over = pos.clone(), over.clone()
    pooled = ref.evict_lowest(q, k, want_pos, offsets, q_pos, want_over, 0.25, var_weight, 4, kernel, pooling,
                              n_evict)
    got_pos, got_over = on(device, pos.clone(), over.clone())
    order = on(device, ops.position_order(pos, offsets))[0]
    evict(device, q, k, v, got_pos, order, offsets, q_pos, got_over, 0.25, var_weight, 4, kernel, pooling, n_evict)
    assert torch.equal(got_over.cpu(), want_over) and want_over.tolist() == [[0, 0], [2, -1]]
    assert_same_eviction(got_pos, want_pos, pooled, offsets)
    assert_exact_order(order, got_pos, offsets)


def test_append_entries_that_fails_writes_nothing():
    """The last segment lacks room: the error comes before the segments that had room are written."""
    q, k, v, pos, offsets, q_pos = segment_case(Q=2, free=3)
    last = torch.nonzero(pos[int(offsets[-2]):] < 0).flatten()[:2] + int(offsets[-2])
    pos[last] = 1000 + torch.arange(2)  # the last segment keeps one free slot
    order = ops.position_order(pos, offsets)
    before = [t.clone() for t in (k, v, pos, order)]
    with pytest.raises(RuntimeError, match="append_entries: segment 3 has 1 free slots for 2 tokens"):
        ops.append_entries(k, v, pos, offsets, torch.ones(2, 2, 2, 16), torch.ones(2, 2, 2, 16), q_pos, order)
    for got, want in zip((k, v, pos, order), before):
        assert torch.equal(got, want)


NAN = float("nan")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("by_score", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["nan", "negative-nan"])
@pytest.mark.parametrize("scores,kernel,pooling,n_evict,freed", [
    ([NAN, .5, .1], 1, "avg", 1, [0]),                # a NaN score goes first, whatever its sign bit
    ([.5, .1, NAN], 1, "max", 1, [2]),
    ([NAN, NAN, NAN], 1, "avg", 2, [0, 1]),           # among NaNs, the earlier positions
    ([.4, .3, NAN, .2, .9], 3, "avg", 2, [1, 2]),     # pooled with a NaN is NaN: its neighbours rank with it
    ([.4, .3, NAN, .2, .9], 3, "max", 4, [1, 2, 3, 0]),
])
def test_evict_lowest_evicts_nan_scores_first(device, by_score, sign, scores, kernel, pooling, n_evict, freed):
    """One rule on both backends: a NaN pooled score ranks below every number (decode_score.h)."""
    n = len(scores)
    weights = torch.tensor([scores], dtype=torch.float32)
    weights = torch.where(weights.isnan(), weights * sign, weights)  # the sign bit of NaN is not its rank
    pos, offsets, q_pos = torch.arange(n), torch.tensor([0, n]), torch.tensor([[n + 10]])
    weights, pos, offsets, q_pos, over = on(device, weights, pos, offsets, q_pos, torch.tensor([[n_evict]]))
    order = ops.position_order(pos, offsets)
    ops.evict_lowest(weights, pos, order, offsets, q_pos, over, 0.0, 0, kernel, pooling, n_evict, by_score)
    assert [t for t in range(n) if pos[t] < 0] == sorted(freed)
    if not by_score:
        assert_exact_order(order, pos, offsets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("by_score", [False, True])
@pytest.mark.parametrize("kernel,pooling", [(1, "avg"), (5, "avg"), (7, "max")])
def test_evict_lowest_nan_weights_free_the_same_entries_on_cpu_and_cuda(by_score, kernel, pooling):
    q, k, v, pos, offsets, q_pos = segment_case(Q=3, seed=kernel)
    _, weights = ops.ragged_attention_with_weights(q, k, v, pos, offsets, q_pos, 0.25)
    holes = torch.rand(weights.shape, generator=torch.Generator().manual_seed(kernel)) < 0.02
    weights[holes] = NAN
    weights[:, ::7] *= -1  # NaNs of both signs
    got = {}
    for device in ("cpu", "cuda"):
        p, o, over = on(device, pos.clone(), ops.position_order(pos, offsets), torch.tensor([[4, 2], [6, 1]]))
        ops.evict_lowest(*on(device, weights), p, o, *on(device, offsets, q_pos), over, 200.0, 2, kernel, pooling, 4,
                         by_score)
        got[device] = [t.cpu() for t in (p, o, over)]
    (pos_cpu, order_cpu, over_cpu), (pos_cuda, order_cuda, over_cuda) = got["cpu"], got["cuda"]
    assert torch.equal(pos_cpu, pos_cuda) and torch.equal(over_cpu, over_cuda)
    for s in range(offsets.numel() - 1):  # each segment's order up to its stored entries (the rest is unspecified)
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        stored = lo + int((pos_cpu[lo:hi] >= 0).sum())
        assert torch.equal(order_cpu[lo:stored], order_cuda[lo:stored]), f"segment {s}"


def test_evict_lowest_refuses_an_order_outside_its_segment_before_evicting():
    """The CPU kernel checks the order's slots (the CUDA one asserts them) before it frees anything."""
    q, k, v, pos, offsets, q_pos = segment_case()
    _, weights = ops.ragged_attention_with_weights(q, k, v, pos, offsets, q_pos, 0.25)
    order, over = ops.position_order(pos, offsets), torch.ones(2, 2, dtype=torch.long)
    order[int(offsets[3])] = int(offsets[4] - offsets[3])  # one past the last segment's slots
    before = [t.clone() for t in (pos, order, over)]
    with pytest.raises(RuntimeError, match=rf"evict_lowest: order\[{int(offsets[3])}\] = \d+ is not a slot of "
                                           "segment 3"):
        ops.evict_lowest(weights, pos, order, offsets, q_pos, over, 0.0, 4, 5, "avg", 1)
    for got, want in zip((pos, order, over), before):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_evict_lowest_protects_the_window_and_stops_at_the_candidates(device):
    q, k, v, pos, offsets, q_pos = segment_case(B=1, Hkv=1, ragged=False, length=10, free=0)
    over = torch.tensor([[50]])
    got_pos, got_over = on(device, pos.clone(), over)
    order = on(device, ops.position_order(pos, offsets))[0]
    evict(device, q, k, v, got_pos, order, offsets, q_pos, got_over, 0.25, 0.0, 4, 5, "avg", 50)
    # positions 0..9, queries at 10: candidates are positions <= 6; all go, the last 4 stay
    assert sorted(p for p in got_pos.tolist() if p >= 0) == [7, 8, 9]
    assert got_over.item() == 50 - 7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_len", [1, 8])
def test_evict_lowest_on_trained_model_attention(device, q_len):
    """Real attention patterns: the shipped tiny Llama's queries and keys of a prompt, stored shuffled with
    holes, evicting several entries per segment."""
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    ids = torch.randint(5, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(3))
    scale = model.config.head_dim ** -0.5 if hasattr(model.config, "head_dim") else None
    for layer, (qs, ks) in enumerate(capture_qk(model, ids)[::3]):
        hkv, n, d = ks.shape
        g = torch.Generator().manual_seed(layer)
        perm = [torch.randperm(n - q_len, generator=g) for _ in range(hkv)]  # the queries' own keys: not stored
        k = torch.cat([ks[h, perm[h]] for h in range(hkv)])
        pos = torch.cat([perm[h] for h in range(hkv)])
        pos[::17] = -1
        offsets = torch.arange(hkv + 1) * (n - q_len)
        q = qs[None, :, n - q_len:]
        q_pos = torch.arange(n - q_len, n)[None]
        over = torch.full((1, hkv), 6)
        want_pos, want_over = pos.clone(), over.clone()
        pooled = ref.evict_lowest(q, k, want_pos, offsets, q_pos, want_over, scale, 200.0, 8, 5, "avg", 6)
        got_pos, got_over = on(device, pos.clone(), over.clone())
        order = on(device, ops.position_order(pos, offsets))[0]
        evict(device, q, k, k, got_pos, order, offsets, q_pos, got_over, scale, 200.0, 8, 5, "avg", 6)
        assert torch.equal(got_over.cpu(), want_over)
        assert_same_eviction(got_pos, want_pos, pooled, offsets)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("q_len", [1, 2])
def test_append_and_evict_over_many_steps_match_the_reference(device, ragged, q_len):
    """A decode run: every step appends q_len tokens and evicts down to the cap (segments of 130+ entries, so
    that the CUDA select kernel's chunked scans and the scoring blocks' pieces cross their boundaries). The
    reference reads positions, the ops read the order they keep: the evictions must agree at every step."""
    q, k, v, pos, offsets, q_pos = segment_case(B=2, Hkv=2, Q=q_len, ragged=ragged, length=1200, free=q_len,
                                                seed=11)
    g = torch.Generator().manual_seed(5)
    over = torch.zeros(2, 2, dtype=torch.long)
    want = [k.clone(), v.clone(), pos.clone(), over.clone()]
    got = list(on(device, k, v, pos, over))
    order = on(device, ops.position_order(pos, offsets))[0]
    off_d = on(device, offsets)[0]
    for step in range(12):
        new_k, new_v = torch.randn(2, 2, q_len, 16, generator=g), torch.randn(2, 2, q_len, 16, generator=g)
        q = 3 * torch.randn(2, 4, q_len, 16, generator=g)
        step_pos = q_pos + step * q_len
        ref.append_entries(want[0], want[1], want[2], offsets, new_k, new_v, step_pos)
        ops.append_entries(got[0], got[1], got[2], off_d, *on(device, new_k, new_v, step_pos), order)
        want[3] += q_len
        got[3] += q_len
        pooled = ref.evict_lowest(q, want[0], want[2], offsets, step_pos, want[3], 0.25, 200.0, 3, 5, "avg", q_len)
        evict(device, q, got[0], got[1], got[2], order, offsets, step_pos, got[3], 0.25, 200.0, 3, 5, "avg", q_len)
        assert torch.equal(got[3].cpu(), want[3])
        assert_same_eviction(got[2], want[2], pooled, offsets)
        assert_exact_order(order, got[2], offsets)
        want = [t.cpu().clone() for t in got]  # a tie resolved otherwise within tolerance must not diverge later


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ragged", [False, True])
def test_evict_lowest_by_score_follows_the_official_storage_order(device, ragged):
    """by_score (CAKE's official mode): over a decode run, each step frees what the official evictor frees and
    `order` lists the remaining entries as its storage does (the last top-k by descending score, then the
    newest), starting from a storage order that is not the position order."""
    window, steps = 4, 10
    q, k, v, pos, offsets, q_pos = segment_case(B=1, Hkv=2, G=2, ragged=ragged, length=60, free=1, seed=21)
    g = torch.Generator().manual_seed(8)
    start = torch.randn(pos.shape[0], generator=g)
    ranks = torch.where(pos < int(q_pos.min()) - window, start, float("nan"))  # prefix by a score, then newest
    order = ops.position_order(pos, offsets, ranks)
    storage = [[int(offsets[s]) + int(x) for x in order[int(offsets[s]):int(offsets[s + 1])]
                if pos[int(offsets[s]) + int(x)] >= 0] for s in range(2)]
    got = list(on(device, k, v, pos)) + [on(device, order)[0]]
    over = on(device, torch.zeros(1, 2, dtype=torch.long))[0]
    for step in range(steps):
        new_k, new_v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
        q = 3 * torch.randn(1, 4, 1, 16, generator=g)
        step_pos = q_pos + step
        ops.append_entries(got[0], got[1], got[2], on(device, offsets)[0], *on(device, new_k, new_v, step_pos),
                           got[3])
        over += 1
        k_now, p_now = got[0].cpu(), got[2].cpu()
        for s in range(2):
            new_slot = next(t for t in range(int(offsets[s]), int(offsets[s + 1]))
                            if int(p_now[t]) == int(step_pos[0, 0]))
            storage[s] = storage[s] + [new_slot]
        _, weights = ops.ragged_attention_with_weights(*on(device, q, got[0], got[1], got[2], offsets, step_pos),
                                                       0.25)
        ops.evict_lowest(weights, got[2], got[3], *on(device, offsets, step_pos), over, 0.0, window, 5, "avg", 1,
                         by_score=True)
        for s in range(2):
            storage[s], evicted = ref.official_cake_decode_step(q[0, 2 * s:2 * s + 2], k_now, storage[s],
                                                                step_pos[0], 0.25, window, 5)
            lo = int(offsets[s])
            assert int(got[2][evicted].item()) == -1, f"step {step}, segment {s}: another entry was freed"
            assert got[3][lo:lo + len(storage[s])].cpu().tolist() == [t - lo for t in storage[s]], (
                f"step {step}, segment {s}: order is not the official storage order")
    assert over.cpu().tolist() == [[0, 0]]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k, v, pos, offsets, q_pos = segment_case(Q=2, seed=9)
    new = torch.randn(2, 2, 2, 16)
    order = ops.position_order(pos, offsets)
    torch.library.opcheck(torch.ops.cakekv.append_entries.default,
                          on(device, k, v, pos, offsets, new, new.clone(), q_pos, order))
    torch.library.opcheck(torch.ops.cakekv.append_entries.default,
                          (*on(device, k, v, pos, offsets, new, new.clone(), q_pos), None))
    for flag in (False, True):
        torch.library.opcheck(torch.ops.cakekv.ragged_attention.default,
                              (*on(device, q, k, v, pos, offsets, q_pos), 0.25, flag))
    weights = ops.ragged_attention_with_weights(q, k, v, pos, offsets, q_pos, 0.25)[1]
    torch.library.opcheck(torch.ops.cakekv.evict_lowest.default,
                          (*on(device, weights, pos, order, offsets, q_pos, torch.tensor([[1, 2], [0, 3]])),
                           200.0, 4, 5, False, 2))


def test_evict_lowest_refuses_bad_arguments():
    q, k, v, pos, offsets, q_pos = segment_case()
    over = torch.ones(2, 2, dtype=torch.long)
    order = ops.position_order(pos, offsets)
    weights = ops.ragged_attention_with_weights(q, k, v, pos, offsets, q_pos, 0.25)[1]
    with pytest.raises(RuntimeError, match="evict_lowest: kernel_size must be odd"):
        ops.evict_lowest(weights, pos, order, offsets, q_pos, over, 0.0, 4, 4, "avg", 1)
    with pytest.raises(RuntimeError, match="evict_lowest: over must be contiguous int64"):
        ops.evict_lowest(weights, pos, order, offsets, q_pos, over.int(), 0.0, 4, 5, "avg", 1)
    with pytest.raises(RuntimeError, match=r"evict_lowest: weights must be contiguous fp32 \[G \* Q, T\]"):
        ops.evict_lowest(weights.double(), pos, order, offsets, q_pos, over, 0.0, 4, 5, "avg", 1)
    with pytest.raises(RuntimeError, match=r"evict_lowest: weights must be contiguous fp32 \[G \* Q, T\]"):
        ops.evict_lowest(weights[:, 1:], pos, order, offsets, q_pos, over, 0.0, 4, 5, "avg", 1)
    with pytest.raises(RuntimeError, match="evict_lowest: order must be contiguous int32"):
        ops.evict_lowest(weights, pos, order.long(), offsets, q_pos, over, 0.0, 4, 5, "avg", 1)
    with pytest.raises(RuntimeError, match="append_entries: order must be contiguous int32"):
        ops.append_entries(k, v, pos, offsets, torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), q_pos[:, :1],
                           order[:-1])
    with pytest.raises(ValueError, match="pooling"):
        ops.evict_lowest(weights, pos, order, offsets, q_pos, over, 0.0, 4, 5, "median", 1)
