"""CUDA kernels of the cakekv ops against their CPU kernels on the same inputs, plus torch.library.opcheck.

Every test needs a CUDA device (skipped otherwise). The CPU kernels are the reference: both compute in fp32
from the same inputs, so only summation order differs.
"""
from __future__ import annotations

import pytest
import torch

import cakekv._ops  # noqa: F401  (loads the ops library and registers the fake kernels)
import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ops = torch.ops.cakekv
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """assert_close with atol 1e-5 relative to the largest |expected| (capped at 1), so that statistics that
    are all tiny (long N: A ~ 1/N) are still compared meaningfully. fp32 inputs: rtol 1e-5 (plain fp32 FMAs
    on both sides); fp16/bf16 inputs may take the tensor-core path (exact products, fp32 accumulation in
    another order): rtol 1e-4."""
    amax = expected.abs().max().item() if expected.numel() else 0.0
    rtol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(actual.cpu(), expected, rtol=rtol, atol=1e-5 * min(1.0, amax) + 1e-12,
                               msg=lambda m: f"{name}: {m}")


def _window_inputs(B, H, Hkv, Q, N, D, dtype, seed=0):
    """Random q/k on the CPU with positions covering the visibility cases.

    Batch 0: a plain prefix, key slot j at position j, the window = the last Q positions.
    Batch 1: left padding (N // 5 slots at -1), then positions 0.., with ~10% of the slots freed (-1) at
    random per kv head; the window = the last Q positions of that shorter sequence.
    Whenever Q exceeds the sequence, the first window queries get negative positions: they see no key and
    must give all-zero rows. Keys after a query's position (the later window tokens) are invisible to it.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    k_pos = torch.arange(N).expand(B, Hkv, N).clone()
    q_pos = torch.arange(N - Q, N).expand(B, Q).clone()
    if B > 1:
        pad = N // 5
        k_pos[1, :, :pad] = -1
        k_pos[1, :, pad:] = torch.arange(N - pad)
        free = torch.rand(Hkv, N, generator=g) < 0.1
        k_pos[1][free] = -1
        q_pos[1] = torch.arange(N - pad - Q, N - pad)
    return q, k, q_pos, k_pos


def _check_window_stats(q, k, q_pos, k_pos, scale, dtype):
    ref = ops.window_stats(q, k, q_pos, k_pos, scale)
    out = ops.window_stats(q.cuda(), k.cuda(), q_pos.cuda(), k_pos.cuda(), scale)
    for name, o, r in zip(("mean", "var", "entropy"), out, ref):
        assert o.is_cuda and o.dtype == torch.float32 and o.shape == r.shape, name
        _assert_close_scaled(o, r, dtype, name)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N", [1, 100, 5000])
@pytest.mark.parametrize("Q", [1, 8, 32])
@pytest.mark.parametrize("H,Hkv", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_stats_matches_cpu(dtype, H, Hkv, Q, N, D):
    q, k, q_pos, k_pos = _window_inputs(2, H, Hkv, Q, N, D, dtype)
    _check_window_stats(q, k, q_pos, k_pos, D ** -0.5, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_stats_long_window_matches_cpu(dtype):
    """More queries than one block's shared memory holds (H2O scores every prompt query): the CUDA op
    runs them in pieces and merges mean, variance and entropy exactly."""
    q, k, q_pos, k_pos = _window_inputs(2, 4, 2, 2100, 2600, 64, dtype)
    _check_window_stats(q, k, q_pos, k_pos, 0.125, dtype)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N", [100, 5000])
@pytest.mark.parametrize("Q", [8, 32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_window_stats_simt_path_matches_cpu(monkeypatch, dtype, Q, N, D):
    # fp16/bf16 normally take the tensor-core GEMM; this forces the fp32 FMA one for the same inputs.
    monkeypatch.setenv("CAKEKV_WINDOW_STATS_SIMT", "1")
    q, k, q_pos, k_pos = _window_inputs(2, 8, 2, Q, N, D, dtype)
    _check_window_stats(q, k, q_pos, k_pos, D ** -0.5, dtype)


# Shapes off the common path: several 64-row sub-tiles per head (Q > 64), many heads per row group,
# a partial last row group, D not a multiple of the staging chunk (or of 8: SIMT fallback for fp16/bf16),
# D = 256, N at tile edges, and a long N that gives several key tiles per pass-1 block.
ODD_SHAPES = [
    # B, H, Hkv, Q, N, D
    (1, 4, 2, 64, 300, 64),
    (1, 4, 2, 65, 300, 64),
    (2, 2, 1, 100, 257, 64),
    (1, 2, 2, 128, 200, 128),
    (2, 16, 2, 8, 150, 64),
    (1, 16, 1, 5, 130, 32),
    (1, 12, 1, 24, 64, 64),
    (1, 4, 2, 16, 65, 80),
    (1, 4, 1, 16, 90, 36),
    (1, 4, 2, 8, 70, 256),
    (2, 2, 1, 3, 127, 8),
    (1, 2, 1, 4, 100_000, 64),
]


@pytest.mark.parametrize("B,H,Hkv,Q,N,D", ODD_SHAPES, ids=[str(s) for s in ODD_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_stats_odd_shapes(dtype, B, H, Hkv, Q, N, D):
    q, k, q_pos, k_pos = _window_inputs(B, H, Hkv, Q, N, D, dtype, seed=1)
    _check_window_stats(q, k, q_pos, k_pos, 0.7 * D ** -0.5, dtype)


def test_window_stats_noncontiguous_inputs():
    g = torch.Generator().manual_seed(2)
    B, H, Hkv, Q, N, D = 2, 8, 2, 16, 300, 64
    q = torch.randn(B, Q, H, D, generator=g).transpose(1, 2)  # [B, H, Q, D] view
    k = torch.randn(B, N, Hkv, D, generator=g).transpose(1, 2)  # [B, Hkv, N, D] view
    q_pos = torch.arange(N - Q, N).expand(B, Q)
    k_pos = torch.arange(N).expand(B, Hkv, N)  # stride-0 view
    ref = ops.window_stats(q, k, q_pos, k_pos, D ** -0.5)
    out = ops.window_stats(q.cuda(), k.cuda(), q_pos.cuda(), k_pos.cuda(), D ** -0.5)
    for name, o, r in zip(("mean", "var", "entropy"), out, ref):
        _assert_close_scaled(o, r, torch.float32, name)


def test_window_stats_all_invisible_and_empty():
    B, H, Hkv, Q, N, D = 1, 4, 2, 4, 50, 64
    q, k, _, k_pos = _window_inputs(B, H, Hkv, Q, N, D, torch.float32)
    q_pos = torch.full((B, Q), -1)  # no query sees any key: all statistics are exactly zero
    for t in ops.window_stats(q.cuda(), k.cuda(), q_pos.cuda(), k_pos.cuda(), 0.125):
        assert t.abs().max().item() == 0.0
    for n, qn in [(0, 4), (50, 0)]:
        q, k, q_pos, k_pos = _window_inputs(B, H, Hkv, qn, n, D, torch.float32)
        out = ops.window_stats(q.cuda(), k.cuda(), q_pos.cuda(), k_pos.cuda(), 0.125)
        for t in out:
            assert t.shape == (B, H, n) and t.is_cuda and (t == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_stats_opcheck(dtype):
    q, k, q_pos, k_pos = _window_inputs(2, 8, 2, 8, 100, 64, dtype)
    torch.library.opcheck(ops.window_stats.default, (q.cuda(), k.cuda(), q_pos.cuda(), k_pos.cuda(), 0.125))


# ---------------------------------------------------------------------------------------------
def _budget_inputs(R, L, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(R, L, generator=g, dtype=torch.float64)
    scores[torch.rand(R, L, generator=g) < 0.2] = 0.0  # some zero scores
    if R > 2:
        scores[1] = 0.0  # a row with no score at all: uniform shares
    caps = torch.randint(0, 60, (R, L), generator=g)
    caps[torch.rand(R, L, generator=g) < 0.1] = 0
    cap_sum = caps.sum(1)
    total = (torch.rand(R, generator=g, dtype=torch.float64) * (cap_sum + 40).to(torch.float64)).long()
    if R > 3:
        total[2] = cap_sum[2] + 1000  # more than everything: each entry gets its cap
        total[3] = 0
    return scores.to(dtype), caps, total


@pytest.mark.parametrize("R,L", [(1, 1), (7, 32), (1000, 40), (4, 0), (0, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_allocate_budgets_matches_cpu(dtype, R, L):
    scores, caps, total = _budget_inputs(R, L, dtype)
    ref = ops.allocate_budgets(scores, caps, total)
    out = ops.allocate_budgets(scores.cuda(), caps.cuda(), total.cuda())
    assert out.is_cuda and out.dtype == torch.int64
    assert torch.equal(out.cpu(), ref)
    out = out.cpu()
    assert (out >= 0).all() and (out <= caps).all()
    assert torch.equal(out.sum(1), torch.minimum(total, caps.sum(1)))


def test_allocate_budgets_opcheck():
    scores, caps, total = _budget_inputs(16, 8, torch.float32)
    torch.library.opcheck(ops.allocate_budgets.default, (scores.cuda(), caps.cuda(), total.cuda()))


# ---------------------------------------------------------------------------------------------
def _gather_inputs(B, Hkv, N, D, M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    idx = torch.rand(B, Hkv, N, generator=g).argsort(-1)[..., :M].sort(-1).values
    return k, v, idx


def _misaligned_cuda(t):
    """A contiguous CUDA copy of t whose data starts one element into its storage (narrower vectors only)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
    return buf[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("D", [3, 64, 128])
@pytest.mark.parametrize("M", [0, 1, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gather_kept_matches_cpu(dtype, M, D):
    k, v, idx = _gather_inputs(2, 3, 100, D, M, dtype)
    ref_k, ref_v = ops.gather_kept(k, v, idx)
    out_k, out_v = ops.gather_kept(k.cuda(), v.cuda(), idx.cuda())
    assert out_k.is_cuda and out_k.dtype == dtype and out_k.shape == (2, 3, M, D)
    assert torch.equal(out_k.cpu(), ref_k) and torch.equal(out_v.cpu(), ref_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gather_kept_misaligned_and_noncontiguous(dtype):
    k, v, idx = _gather_inputs(2, 2, 50, 64, 20, dtype)
    ref = ops.gather_kept(k, v, idx)
    out = ops.gather_kept(_misaligned_cuda(k), _misaligned_cuda(v), idx.cuda())
    assert all(torch.equal(o.cpu(), r) for o, r in zip(out, ref))
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hkv, N, D] view with permuted strides
    ref = ops.gather_kept(kt, v, idx)
    out = ops.gather_kept(kt.cuda(), v.cuda(), idx.cuda())
    assert all(torch.equal(o.cpu(), r) for o, r in zip(out, ref))


def test_gather_kept_opcheck():
    k, v, idx = _gather_inputs(2, 2, 50, 64, 20, torch.bfloat16)
    torch.library.opcheck(ops.gather_kept.default, (k.cuda(), v.cuda(), idx.cuda()))


def _long_chunk_inputs(Hkv, G, Q, kept, appended, D, dtype, seed=0):
    """One row continuing a compressed 8K prompt with a Q-token chunk, on the GPU: per kv head `kept` prompt
    entries (positions below 8192) and the chunk's first `appended` tokens (positions 8192..), storage shuffled,
    2% of the slots free; the queries at positions 8192 + i."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    per_seg = [torch.cat([torch.randperm(8192, generator=g, device="cuda")[:kept],
                          8192 + torch.arange(appended, device="cuda")]) for _ in range(Hkv)]
    pos = torch.cat([p[torch.randperm(p.numel(), generator=g, device="cuda")] for p in per_seg])
    pos[torch.rand(pos.shape, generator=g, device="cuda") < 0.02] = -1
    offsets = torch.arange(Hkv + 1, device="cuda") * (kept + appended)
    q = torch.randn(1, Hkv * G, Q, D, generator=g, device="cuda").to(dtype)
    k, v = (torch.randn(pos.numel(), D, generator=g, device="cuda").to(dtype) for _ in range(2))
    return q, k, v, pos, offsets, 8192 + torch.arange(Q, device="cuda")[None]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_attention_32k_token_chunk_matches_chunked_reference(dtype):
    """A 32K-token continuation chunk at 8 query heads per kv head: 262144 query rows per kv head, past the
    65535 x 4 rows of one grid, whose partial results once took gigabytes. The op goes through the rows in tiles of
    bounded workspace and matches the reference computed 2048 queries at a time."""
    q, k, v, pos, offsets, q_pos = _long_chunk_inputs(Hkv=2, G=8, Q=32768, kept=1024, appended=32768, D=64,
                                                      dtype=dtype)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = torch.ops.cakekv.ragged_attention(q, k, v, pos, offsets, q_pos, 0.125)[0]
    workspace = torch.cuda.max_memory_allocated() - before - got.nbytes
    assert workspace <= 64 * 2**20, f"{workspace / 2**20:.0f} MiB of workspace beyond the output"
    want, _ = ref.ragged_attention(q, k, v, pos, offsets, q_pos, 0.125, weights=False, query_chunk=2048)
    rtol = 1e-4 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=1e-4)


def test_ragged_attention_with_weights_past_the_grid_limit_matches_chunked_reference():
    """The weights variant (what decode eviction scores) over 262208 query rows per kv head: a short cache, so
    that the [rows, T] weights themselves stay small."""
    q, k, v, pos, offsets, q_pos = _long_chunk_inputs(Hkv=1, G=8, Q=32776, kept=600, appended=0, D=32,
                                                      dtype=torch.float32, seed=1)
    got, weights = torch.ops.cakekv.ragged_attention(q, k, v, pos, offsets, q_pos, 0.2, 0.0, True)
    want, want_weights = ref.ragged_attention(q, k, v, pos, offsets, q_pos, 0.2, query_chunk=4096)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)


def _reread_inputs(B, H, Hkv, Q, N, D, dtype, seed=0):
    """A re-read chunk's scoring inputs: keys = N - Q prompt entries (sinks and span, all visible) then the chunk's
    own Q keys (causal); row 1 left-padded (its first queries and keys at -1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    q_pos = (N - Q + torch.arange(Q)).expand(B, Q).clone()
    k_pos = torch.arange(N).expand(B, Hkv, N).clone()
    if B > 1:
        q_pos[1, : Q // 7] = -1
        k_pos[1, :, N - Q: N - Q + Q // 7] = -1
    return q, k, q_pos, k_pos


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("simt", [False, True], ids=["auto", "simt"])
@pytest.mark.parametrize("B,H,Hkv,Q,N,D", [(2, 32, 8, 300, 1100, 128), (1, 4, 4, 1, 7, 64), (2, 6, 2, 130, 257, 80),
                                           (1, 8, 1, 2100, 4200, 128)])
def test_attention_max_matches_cpu(monkeypatch, dtype, simt, B, H, Hkv, Q, N, D):
    if simt:
        monkeypatch.setenv("CAKEKV_WINDOW_STATS_SIMT", "1")
    q, k, q_pos, k_pos = _reread_inputs(B, H, Hkv, Q, N, D, dtype)
    for softcap in (0.0, 30.0):
        want = ops.attention_max(q, k, q_pos, k_pos, D ** -0.5, softcap)
        got = ops.attention_max(q.cuda(), k.cuda(), q_pos.cuda(), k_pos.cuda(), D ** -0.5, softcap)
        assert got.is_cuda and got.dtype == torch.float32 and got.shape == (B, Hkv, N)
        _assert_close_scaled(got, want, dtype, f"attention_max softcap={softcap}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_max_opcheck(dtype):
    q, k, q_pos, k_pos = _reread_inputs(2, 8, 2, 40, 100, 64, dtype)
    torch.library.opcheck(ops.attention_max.default, (q.cuda(), k.cuda(), q_pos.cuda(), k_pos.cuda(), 0.125))
