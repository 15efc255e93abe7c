"""Property tests (Hypothesis) of every cakekv op, on the CPU always and on CUDA when a device is present.

Random shapes (batch 1-8, kv heads 1-8, query heads per kv head 1-8, lengths 1-8K, window 1-64, budgets at
the edges), dtypes fp32/fp16/bf16, checked against the plain-PyTorch references of tests/reference.py and
the invariants of the contracts in csrc/register.cpp; then the invalid inputs each op must refuse with an error
that names it (never a crash, never a silent answer).

Hypothesis draws the shapes and a seed; tensor contents come from a torch.Generator with that seed, so a
failing example prints everything needed to rebuild it. Profiles (CAKEKV_HYPOTHESIS_PROFILE):
  ci        (default) few examples, derandomised, no example database: fast and reproducible on a 2-core box
  thorough  10x the examples, random seeds (e.g. on the GPU machine, or before touching a kernel)
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cakekv._ops as ops
import reference as ref
from helpers import assert_exact_order, assert_same_eviction
from reference import allocate, masked_window_stats, ragged_attention as ragged_attention_ref

settings.register_profile("cakekv-ci", deadline=None, database=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("cakekv-thorough", deadline=None, database=None, derandomize=False, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_PROFILE = os.environ.get("CAKEKV_HYPOTHESIS_PROFILE", "ci")
_FACTOR = {"ci": 1, "thorough": 10}[_PROFILE]


def examples(n: int) -> settings:
    """The selected profile with n examples per test (times 10 under the thorough profile)."""
    return settings(settings.get_profile(f"cakekv-{_PROFILE}"), max_examples=n * _FACTOR)


HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
HALF_DTYPES = DTYPES[1:]

MAX_LEN = 8192        # longest cache drawn (the CPU window_stats streams over 4096-key chunks)
HEAD_DIMS = [1, 2, 3, 5, 8, 16, 32, 64, 80, 128]
LAYOUTS = ["contiguous", "transposed", "strided", "misaligned"]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_layout(t: torch.Tensor, layout: str, device: str) -> torch.Tensor:
    """t on `device`, same values, in another memory layout: dims 1 and 2 swapped in memory, every other element
    of a wider last dim, or contiguous but starting one element into its storage (misaligned rows)."""
    if layout == "transposed" and t.dim() >= 3:
        return t.transpose(1, 2).contiguous().to(device).transpose(1, 2)
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=device)
        wide[..., ::2] = t.to(device)
        return wide[..., ::2]
    if layout == "misaligned":
        buf = torch.zeros(t.numel() + 1, dtype=t.dtype, device=device)
        return buf[1:].view(t.shape).copy_(t.to(device))
    return t.to(device)


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rtol: float, name: str, atol_floor: float = 0.0) -> None:
    """assert_close with atol relative to the largest |want| (capped at 1): statistics of long rows are all
    tiny (A ~ 1/N) and still compared meaningfully. atol_floor: the least error the statistic can show."""
    amax = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=max(1e-5 * min(1.0, amax), atol_floor) + 1e-12,
                               msg=lambda m: f"{name}: {m}")


# ---- window_stats ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WindowCase:
    B: int
    Hkv: int
    G: int          # query heads per kv head
    Q: int          # window queries
    N: int          # key slots
    D: int
    pad: int        # largest left padding of a row (its first slots at -1, positions shifted)
    holes: float    # fraction of slots freed (-1) at random
    tail: bool      # queries at the last positions of each row (prefill window), else anywhere in [-1, N]
    seed: int


@st.composite
def window_cases(draw, max_block: int = 1 << 20) -> WindowCase:
    B, Hkv, G = draw(st.integers(1, 8)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    Q = draw(st.integers(1, 64))
    D = draw(st.sampled_from(HEAD_DIMS))
    # the reference materialises [B, H, Q, N] and [B, H, N, D]: keep them small enough for a fast CI run
    N = draw(st.integers(1, max(1, min(MAX_LEN, max_block // (B * Hkv * G * max(Q, D))))))
    return WindowCase(B, Hkv, G, Q, N, D, draw(st.integers(0, N)),
                      draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])), draw(st.booleans()),
                      draw(st.integers(0, 2**31 - 1)))


def scaled_randn(shape, g: torch.Generator, magnitude: float, dtype: torch.dtype) -> torch.Tensor:
    """randn * magnitude in dtype, clipped to stay finite there (fp16 ends at 65504)."""
    bound = torch.finfo(dtype).max / 2
    return (torch.randn(shape, generator=g) * magnitude).clamp(-bound, bound).to(dtype)


def window_inputs(c: WindowCase, dtype: torch.dtype, magnitude: float = 1.0):
    g = seeded(c.seed)
    H = c.Hkv * c.G
    q = scaled_randn((c.B, H, c.Q, c.D), g, magnitude, dtype)
    k = scaled_randn((c.B, c.Hkv, c.N, c.D), g, magnitude, dtype)
    shift = torch.randint(0, c.pad + 1, (c.B, 1, 1), generator=g)
    k_pos = (torch.arange(c.N) - shift).clamp(min=-1).expand(c.B, c.Hkv, c.N).clone()
    if c.holes:
        k_pos[torch.rand(c.B, c.Hkv, c.N, generator=g) < c.holes] = -1
    if c.tail:
        q_pos = k_pos.amax((1, 2))[:, None] - c.Q + 1 + torch.arange(c.Q)  # early queries may be < 0: see nothing
    else:
        q_pos = torch.randint(-1, c.N + 1, (c.B, c.Q), generator=g)
    return q, k, q_pos, k_pos


# edges drawn rarely at random: keys across the CPU kernel's 4096-key chunks; the most heads and window queries;
# a window longer than the rows (its first queries see nothing)
LONG_WINDOW = WindowCase(B=1, Hkv=1, G=2, Q=3, N=4100, D=8, pad=7, holes=0.1, tail=True, seed=1)
MOST_HEADS = WindowCase(B=8, Hkv=8, G=8, Q=64, N=3, D=16, pad=1, holes=0.0, tail=True, seed=2)
SHORT_ROWS = WindowCase(B=3, Hkv=2, G=3, Q=64, N=9, D=5, pad=9, holes=0.1, tail=True, seed=3)
NEAR_ONE_HOT = WindowCase(B=1, Hkv=1, G=1, Q=1, N=4, D=5, pad=0, holes=0.0, tail=True, seed=1504)  # p = 0.9993
# a re-read chunk's shape: more queries than one CPU query tile (256) and than one CUDA row group (128)
REREAD_CHUNK = WindowCase(B=2, Hkv=2, G=4, Q=300, N=700, D=16, pad=40, holes=0.0, tail=True, seed=4)


def visible_fraction(q_pos: torch.Tensor, k_pos: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H]: fraction of the window queries that see at least one key (each such query's attention sums to 1)."""
    kp = k_pos.repeat_interleave(heads // k_pos.shape[1], 1)[:, :, None, :]
    sees = ((kp >= 0) & (kp <= q_pos[:, None, :, None])).any(-1)          # [B, H, Q]
    return sees.float().mean(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@examples(25)
@given(case=window_cases(), scale_factor=st.sampled_from([0.1, 1.0, 4.0]),
       softcap=st.sampled_from([0.0, 0.5, 5.0]))
@example(case=LONG_WINDOW, scale_factor=1.0, softcap=0.0)
@example(case=MOST_HEADS, scale_factor=4.0, softcap=0.0)
@example(case=SHORT_ROWS, scale_factor=1.0, softcap=0.5)
@example(case=NEAR_ONE_HOT, scale_factor=4.0, softcap=0.0)
def test_window_stats_equals_reference(device, dtype, case, scale_factor, softcap):
    q, k, q_pos, k_pos = window_inputs(case, dtype)
    scale = scale_factor * case.D ** -0.5
    got = ops.window_stats(q.to(device), k.to(device), q_pos.to(device), k_pos.to(device), scale, softcap)
    want = masked_window_stats(q, k, q_pos, k_pos, scale, softcap)
    # fp32 everywhere but on CUDA's tensor-core path for fp16/bf16 (exact products, other summation order)
    rtol = 1e-4 if device == "cuda" and dtype != torch.float32 else 1e-5
    shape = (case.B, case.Hkv * case.G, case.N)
    # entropy near p = 1: -p ln(p) is ill-conditioned (d/dp = -(1 + ln p) ~ -1 while the value ~ 1 - p), so an
    # ulp of p (6e-8) moves a tiny entropy by 6e-8 absolute; e.g. p = 0.9993 on CUDA's fp16 path: 6.99871e-4 for
    # 6.99990e-4 (1.7e-4 relative). Floor: a few ulps of 1 per window query.
    floors = (0.0, 0.0, 4 * case.Q * torch.finfo(torch.float32).eps)
    for name, g, w, floor in zip(("mean", "var", "entropy"), got, want, floors):
        assert g.dtype == torch.float32 and g.shape == shape and g.device.type == device, name
        assert_close_scaled(g, w, rtol, name, floor)
    # free slots (-1 in every head) get exactly zero statistics
    free = (k_pos < 0).repeat_interleave(case.G, 1)
    for name, g in zip(("mean", "var", "entropy"), got):
        assert (g.cpu()[free] == 0).all(), name
    torch.testing.assert_close(got[0].sum(-1).cpu(), visible_fraction(q_pos, k_pos, case.Hkv * case.G),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@examples(15)
@given(case=window_cases(max_block=1 << 18), magnitude=st.sampled_from([30.0, 300.0, 3e3, 3e4]))
@example(case=MOST_HEADS, magnitude=3e4)
def test_window_stats_large_logits_stay_finite(device, dtype, case, magnitude):
    """fp16/bf16 inputs whose logits are far beyond the half-precision range (up to ~1e9 * D): the softmax runs
    in fp32 with its maximum subtracted, so no statistic is NaN or inf and each is in its range."""
    q, k, q_pos, k_pos = window_inputs(case, dtype, magnitude)
    mean, var, ent = (t.cpu() for t in ops.window_stats(q.to(device), k.to(device), q_pos.to(device),
                                                       k_pos.to(device), 1.0))
    for name, t in (("mean", mean), ("var", var), ("entropy", ent)):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"
    assert (mean >= 0).all() and (mean <= 1 + 1e-6).all()
    assert (var >= -1e-6).all() and (ent >= -1e-6).all()
    torch.testing.assert_close(mean.sum(-1), visible_fraction(q_pos, k_pos, case.Hkv * case.G),
                               rtol=1e-4, atol=1e-4)


# ---- attention_max ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@examples(25)
@given(case=window_cases(), scale_factor=st.sampled_from([0.1, 1.0, 4.0]),
       softcap=st.sampled_from([0.0, 0.5, 5.0]))
@example(case=LONG_WINDOW, scale_factor=1.0, softcap=0.0)
@example(case=MOST_HEADS, scale_factor=4.0, softcap=0.0)
@example(case=SHORT_ROWS, scale_factor=1.0, softcap=0.5)
@example(case=NEAR_ONE_HOT, scale_factor=4.0, softcap=0.0)
@example(case=REREAD_CHUNK, scale_factor=1.0, softcap=0.0)
def test_attention_max_equals_reference(device, dtype, case, scale_factor, softcap):
    """Each key's largest probability over its KV head's query heads and real queries (GQA, left padding and free
    slots at -1, queries at -1 or seeing nothing, soft-capping) equals the PyTorch reference's."""
    q, k, q_pos, k_pos = window_inputs(case, dtype)
    scale = scale_factor * case.D ** -0.5
    got = ops.attention_max(q.to(device), k.to(device), q_pos.to(device), k_pos.to(device), scale, softcap)
    want = ref.attention_max(q, k, q_pos, k_pos, scale, softcap)
    assert got.dtype == torch.float32 and got.shape == (case.B, case.Hkv, case.N) and got.device.type == device
    rtol = 1e-4 if device == "cuda" and dtype != torch.float32 else 1e-5
    assert_close_scaled(got, want, rtol, "attention_max")
    assert (got.cpu()[k_pos < 0] == 0).all()  # free slots: no query sees them
    # the PyTorch blocks the library runs on CUDA until the fused kernel is verified: the same math, here on the CPU
    blocks = ops._attention_max_blocks(q, k, q_pos, k_pos, scale, softcap, block=7)
    assert_close_scaled(blocks, want, 1e-5, "attention_max blocks")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@examples(10)
@given(case=window_cases(max_block=1 << 18), magnitude=st.sampled_from([30.0, 3e3, 3e4]))
def test_attention_max_large_logits_stay_probabilities(device, dtype, case, magnitude):
    """Logits far beyond the half-precision range: fp32 softmax with its maximum subtracted, so every score is a
    probability and each real query that sees a key gives some key of each head its largest probability >= 1/N."""
    q, k, q_pos, k_pos = window_inputs(case, dtype, magnitude)
    got = ops.attention_max(q.to(device), k.to(device), q_pos.to(device), k_pos.to(device), 1.0).cpu()
    assert torch.isfinite(got).all() and (got >= 0).all() and (got <= 1 + 1e-6).all()
    sees = (visible_fraction(q_pos, k_pos, case.Hkv) > 0)  # [B, Hkv]: some query sees a key of the head
    assert (got.amax(-1)[sees] >= 1 / case.N - 1e-6).all()


# ---- allocate_budgets -----------------------------------------------------------------------------
SCORE_DTYPES = [pytest.param(torch.float64, id="fp64"), *DTYPES]


@st.composite
def budget_rows(draw, dtype: torch.dtype, max_rows: int = 8):
    """(scores [R, L], caps [R, L], total [R]) with exactly representable scores (integers times a power of
    two per row: every sum is exact in double, so the Python reference sums like the kernel) and totals at
    the edges of the caps: 0, sum - 1, sum, sum + 1, far above, and CAKE-style (budget - window) * L with
    budget = window + 1, = length, > length (caps = length - window)."""
    R, L = draw(st.integers(1, max_rows)), draw(st.integers(1, 48))
    lo_exp, hi_exp = (-14, -5) if dtype == torch.float16 else (-40, 40)  # fp16: no overflow, no subnormals
    scores, caps, totals = [], [], []
    for _ in range(R):
        ints = draw(st.lists(st.one_of(st.just(0), st.integers(0, 2**20)), min_size=L, max_size=L))
        exp = draw(st.integers(lo_exp, hi_exp))
        scores.append([x * 2.0**exp for x in ints])
        window, length = draw(st.integers(1, 64)), draw(st.integers(1, MAX_LEN))
        if draw(st.booleans()):   # every layer may evict all but the window
            row_caps = [max(length - window, 0)] * L
        else:
            row_caps = draw(st.lists(st.integers(0, MAX_LEN), min_size=L, max_size=L))
        s = sum(row_caps)
        budget = draw(st.sampled_from([window + 1, length, length + draw(st.integers(1, 100))]))
        totals.append(draw(st.sampled_from([0, max(s - 1, 0), s, s + 1, 2 * s + 7, 10**12,
                                            max(budget - window, 0) * L, draw(st.integers(0, 2 * s + 10))])))
        caps.append(row_caps)
    return (torch.tensor(scores, dtype=torch.float64).to(dtype), torch.tensor(caps, dtype=torch.long),
            torch.tensor(totals, dtype=torch.long))


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@examples(40)
@given(data=st.data())
def test_allocate_budgets_invariants_and_reference(device, dtype, data):
    scores, caps, total = data.draw(budget_rows(dtype))
    out = ops.allocate_budgets(scores.to(device), caps.to(device), total.to(device))
    assert out.dtype == torch.int64 and out.shape == caps.shape and out.device.type == device
    out = out.cpu()
    assert (out >= 0).all() and (out <= caps).all()
    assert torch.equal(out.sum(1), torch.minimum(total, caps.sum(1)))
    exact = scores.double()  # the values the kernel reads (it computes in double)
    for r in range(out.shape[0]):
        assert out[r].tolist() == allocate(exact[r].tolist(), caps[r].tolist(), int(total[r]))
        # rows are independent: a row alone gets the same budgets
        alone = ops.allocate_budgets(scores[r:r + 1].to(device), caps[r:r + 1].to(device), total[r:r + 1].to(device))
        assert alone.cpu()[0].tolist() == out[r].tolist()


def proportional_share(scores: list[float], caps: list[int], total: int, i: int) -> int:
    """Steps 1-2 of the contract for entry i: min(floor(total * score / sum(score)), cap), in double as the kernel."""
    ssum = sum(max(x, 0.0) for x in scores)
    share = max(scores[i], 0.0) / ssum if ssum > 0 else 1.0 / len(scores)
    return min(max(int(share * total), 0), max(caps[i], 0))


@pytest.mark.parametrize("device", DEVICES)
@examples(150)
@given(data=st.data())
def test_allocate_budgets_preference(device, data):
    """Raising one entry's score, other things equal.

    Monotonicity does NOT hold in general for the algorithm of its contract: the deficit left by capped entries is
    split evenly (not by score) over the entries still below their cap, one extra unit each to the first in
    index order, and raising a score can move units between entries through that split. Example (the contract's
    own result, see test_allocate_budgets_documented_non_monotone_case): scores [6, 1, 2, 4, 6] -> [6, 1, 3, 4, 6],
    caps [0, 7, 11, 2, 4], total 13 gives entry 2 first 4, then 3. What the contract does guarantee:
      (a) the raised entry keeps at least its proportional share at the lower score, min(floor(T*s_i/S), cap_i)
          (step 3 only adds to steps 1-2, whose value for entry i never falls when s_i rises: s_i/S rises, the
          other shares fall; with exact sums, rounding of the double arithmetic is monotone);
      (b) when no cap binds (every cap >= total), exact monotonicity: then out_i = floor_i + [i < d] with the
          deficit d = T - sum(floors) < L; raising s_i raises floor_i by some k >= 0 and lowers no other floor,
          so d can fall by at most k, and i loses at most its one extra unit only when k >= 1.
    """
    L = data.draw(st.integers(1, 16))
    scores = [float(x) for x in data.draw(st.lists(st.integers(0, 1000), min_size=L, max_size=L))]
    total = data.draw(st.integers(0, 5000))
    no_cap_binds = data.draw(st.booleans())
    caps = data.draw(st.lists(st.integers(total, total + 50) if no_cap_binds else st.integers(0, 500),
                              min_size=L, max_size=L))
    i = data.draw(st.integers(0, L - 1))
    raised = list(scores)
    raised[i] += data.draw(st.integers(1, 1000))
    both = ops.allocate_budgets(torch.tensor([scores, raised], dtype=torch.float64, device=device),
                                torch.tensor([caps, caps], device=device),
                                torch.tensor([total, total], device=device)).cpu()
    before, after = both[0].tolist(), both[1].tolist()
    assert after[i] >= proportional_share(scores, caps, total, i)
    if no_cap_binds:
        assert after[i] >= before[i], f"raising score {i} lowered its budget: {before} -> {after}"


@pytest.mark.parametrize("device", DEVICES)
def test_allocate_budgets_documented_non_monotone_case(device):
    """Why test_allocate_budgets_preference asserts no general monotonicity: on this input the documented
    algorithm (the reference, and the op, which follows it) gives the raised entry one unit less."""
    caps, total = [0, 7, 11, 2, 4], 13
    for scores, want in (([6.0, 1.0, 2.0, 4.0, 6.0], [0, 3, 4, 2, 4]), ([6.0, 1.0, 3.0, 4.0, 6.0], [0, 4, 3, 2, 4])):
        assert allocate(scores, caps, total) == want
        got = ops.allocate_budgets(torch.tensor([scores], device=device), torch.tensor([caps], device=device),
                                   torch.tensor([total], device=device))
        assert got.cpu()[0].tolist() == want


# ---- gather_kept / gather_ragged --------------------------------------------------------------------
def kept_count(draw, window: int, length: int) -> int:
    """How many entries to keep: budget at its edges (window + 1, = length, > length: repeated slots) or any."""
    return draw(st.sampled_from([window + 1, length, length + draw(st.integers(1, 64)), draw(st.integers(0, length))]))


@st.composite
def gather_cases(draw, max_elems: int = 1 << 20):
    B, Hkv, D = draw(st.integers(1, 8)), draw(st.integers(1, 8)), draw(st.sampled_from(HEAD_DIMS))
    N = draw(st.integers(1, max(1, min(MAX_LEN, max_elems // (B * Hkv * D)))))
    M = kept_count(draw, draw(st.integers(1, 64)), N)
    return dict(B=B, Hkv=Hkv, N=N, D=D, M=M, layout=draw(st.sampled_from(LAYOUTS)),
                idx_layout=draw(st.sampled_from(["contiguous", "transposed"])), seed=draw(st.integers(0, 2**31 - 1)))


def kept_indices(g: torch.Generator, rows: int, N: int, M: int) -> torch.Tensor:
    """[rows, M] slot indices in [0, N): sorted distinct slots (as eviction keeps them) when M <= N, else any."""
    if M <= N and torch.rand(1, generator=g).item() < 0.5:
        return torch.rand(rows, N, generator=g).argsort(-1)[:, :M].sort(-1).values
    return torch.randint(0, N, (rows, M), generator=g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@examples(25)
@given(c=gather_cases())
@example(c=dict(B=8, Hkv=8, N=16, D=128, M=80, layout="misaligned", idx_layout="transposed", seed=4))
@example(c=dict(B=1, Hkv=2, N=MAX_LEN, D=3, M=MAX_LEN + 7, layout="transposed", idx_layout="contiguous", seed=5))
def test_gather_kept_equals_indexing(device, dtype, c):
    g = seeded(c["seed"])
    B, Hkv, N, D, M = c["B"], c["Hkv"], c["N"], c["D"], c["M"]
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    idx = kept_indices(g, B * Hkv, N, M).view(B, Hkv, M)
    ko, vo = ops.gather_kept(with_layout(k, c["layout"], device), with_layout(v, c["layout"], device),
                             with_layout(idx, c["idx_layout"], device))
    bi, gi = torch.arange(B)[:, None, None], torch.arange(Hkv)[None, :, None]
    for got, src in ((ko, k), (vo, v)):
        assert got.shape == (B, Hkv, M, D) and got.dtype == dtype and got.device.type == device
        assert torch.equal(got.cpu(), src[bi, gi, idx])


@st.composite
def ragged_gather_cases(draw, max_elems: int = 1 << 20):
    B, Hkv, D = draw(st.integers(1, 8)), draw(st.integers(1, 8)), draw(st.sampled_from(HEAD_DIMS))
    N = draw(st.integers(1, max(1, min(MAX_LEN, max_elems // (B * Hkv * D) - 64))))
    window = draw(st.integers(1, 64))
    counts = [kept_count(draw, window, N) for _ in range(B * Hkv)]
    return dict(B=B, Hkv=Hkv, N=N, D=D, counts=counts, layout=draw(st.sampled_from(LAYOUTS)),
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@examples(25)
@given(c=ragged_gather_cases())
@example(c=dict(B=8, Hkv=8, N=16, D=5, counts=[0, 17, 16, 80] * 16, layout="misaligned", seed=6))
def test_gather_ragged_equals_indexing(device, dtype, c):
    g = seeded(c["seed"])
    B, Hkv, N, D = c["B"], c["Hkv"], c["N"], c["D"]
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    counts = torch.tensor(c["counts"])
    idx = torch.cat([kept_indices(g, 1, N, int(n))[0] for n in counts])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    ko, vo = ops.gather_ragged(with_layout(k, c["layout"], device), with_layout(v, c["layout"], device),
                               idx.to(device), offsets.to(device))
    seg = torch.repeat_interleave(torch.arange(B * Hkv), counts)
    T = int(counts.sum())
    for got, src in ((ko, k), (vo, v)):
        assert got.shape == (T, D) and got.dtype == dtype and got.device.type == device
        assert torch.equal(got.cpu(), src.flatten(0, 1)[seg, idx])


# ---- ragged_attention ---------------------------------------------------------------------------------
RAGGED_HEAD_DIMS = [1, 3, 8, 16, 32, 64, 100, 128, 256]   # the CUDA kernel takes D <= 256


@st.composite
def ragged_attention_cases(draw, max_work: int = 1 << 23, max_q: int = 64):
    B, Hkv, G = draw(st.integers(1, 8)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    Q, D = draw(st.integers(1, max_q)), draw(st.sampled_from(RAGGED_HEAD_DIMS))
    # the reference does B * H * Q * (segment length) * D multiply-adds: bound the longest segment
    longest = max(1, min(MAX_LEN, max_work // (B * Hkv * G * Q * D)))
    window = draw(st.integers(1, 64))
    counts = [kept_count(draw, window, draw(st.integers(0, longest))) for _ in range(B * Hkv)]
    counts = [min(n, longest) for n in counts]
    return dict(B=B, Hkv=Hkv, G=G, Q=Q, D=D, counts=counts, holes=draw(st.sampled_from([0.0, 0.1, 0.5])),
                shuffled=draw(st.booleans()), tail=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def ragged_attention_inputs(c, dtype, magnitude: float = 1.0):
    """q [B, H, Q, D]; k, v [T, D]; pos [T] (segment s: distinct positions below P, in order or shuffled, some
    freed to -1); offsets [B*Hkv + 1]; q_pos [B, Q] at the last positions (decode / window) or anywhere."""
    g = seeded(c["seed"])
    B, H, Q, D = c["B"], c["Hkv"] * c["G"], c["Q"], c["D"]
    counts = torch.tensor(c["counts"], dtype=torch.long)
    T, P = int(counts.sum()), int(counts.max()) + 3
    q = scaled_randn((B, H, Q, D), g, magnitude, dtype)
    k = scaled_randn((T, D), g, magnitude, dtype)
    v = torch.randn(T, D, generator=g).to(dtype)
    pos = []
    for n in c["counts"]:
        p = torch.randperm(P, generator=g)[:n]
        pos.append(p if c["shuffled"] else p.sort().values)
    pos = torch.cat(pos)
    if c["holes"]:
        pos[torch.rand(T, generator=g) < c["holes"]] = -1
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    if c["tail"]:
        q_pos = (P - Q + torch.arange(Q)).expand(B, Q).contiguous()
    else:
        q_pos = torch.randint(-1, P + 1, (B, Q), generator=g)
    return q, k, v, pos, offsets, q_pos


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@examples(25)
@given(c=ragged_attention_cases(), scale_factor=st.sampled_from([0.1, 1.0, 4.0]),
       softcap=st.sampled_from([0.0, 0.5, 5.0]))
@example(c=dict(B=8, Hkv=8, G=8, Q=2, D=256, counts=[0, 1, 9, 65] * 16, holes=0.1, shuffled=True, tail=True, seed=7),
         scale_factor=1.0, softcap=0.0)
@example(c=dict(B=1, Hkv=1, G=4, Q=64, D=64, counts=[MAX_LEN], holes=0.0, shuffled=False, tail=True, seed=8),
         scale_factor=1.0, softcap=0.0)
def test_ragged_attention_equals_reference(device, dtype, c, scale_factor, softcap):
    q, k, v, pos, offsets, q_pos = ragged_attention_inputs(c, dtype)
    scale = scale_factor * c["D"] ** -0.5
    inputs = [t.to(device) for t in (q, k, v, pos, offsets, q_pos)]
    got, weights = ops.ragged_attention_with_weights(*inputs, scale, softcap)
    assert got.shape == q.shape and got.dtype == dtype and got.device.type == device
    want, want_weights = ragged_attention_ref(q, k, v, pos, offsets, q_pos, scale, softcap)
    # fp32 math on both sides; fp16/bf16 outputs are rounded once to their dtype (half an ulp, relative)
    rtol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got.cpu().float(), want, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(weights.cpu(), want_weights, rtol=1e-5, atol=1e-6)  # fp32 weights in any dtype
    assert torch.equal(ops.ragged_attention(*inputs, scale, softcap), got)  # asking for the weights changes nothing


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@examples(15)
@given(c=ragged_attention_cases(max_work=1 << 21), magnitude=st.sampled_from([30.0, 300.0, 3e3, 3e4]))
def test_ragged_attention_large_logits_stay_finite(device, dtype, c, magnitude):
    """Logits far beyond the half-precision range: the output stays finite, a convex combination of v rows."""
    q, k, v, pos, offsets, q_pos = ragged_attention_inputs(c, dtype, magnitude)
    got = ops.ragged_attention(*(t.to(device) for t in (q, k, v, pos, offsets, q_pos)), 1.0).cpu().float()
    assert torch.isfinite(got).all()
    bound = v.float().abs().max().item() if v.numel() else 0.0
    assert (got.abs() <= bound * (1 + torch.finfo(dtype).eps)).all()


def tiled_case(B, Hkv, count, D, seed):
    """A long chunk: 8 query heads per kv head, 4096 queries (32768 rows of a kv head), `count` entries per segment."""
    return dict(B=B, Hkv=Hkv, G=8, Q=4096, D=D, counts=[count] * (B * Hkv), holes=0.1, shuffled=True, tail=True,
                seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@examples(6)
@given(c=ragged_attention_cases(max_work=1 << 24, max_q=4096), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       with_weights=st.booleans())
@example(c=tiled_case(1, 1, 300, 8, seed=3), dtype=torch.float32, with_weights=True)  # CPU: logits past 32 MiB
@example(c=tiled_case(8, 8, 4, 8, seed=4), dtype=torch.float32, with_weights=False)   # CUDA: partials past 32 MiB
def test_ragged_attention_long_chunks_equal_reference(device, c, dtype, with_weights):
    """Continuation chunks of up to 4096 queries: the kernels go through the query rows in tiles of bounded
    workspace, and tiles change nothing (the examples cross tile boundaries on each backend)."""
    q, k, v, pos, offsets, q_pos = ragged_attention_inputs(c, dtype)
    scale = c["D"] ** -0.5
    inputs = [t.to(device) for t in (q, k, v, pos, offsets, q_pos)]
    got, weights = torch.ops.cakekv.ragged_attention(*inputs, scale, 0.0, with_weights)
    want, want_weights = ragged_attention_ref(q, k, v, pos, offsets, q_pos, scale, weights=with_weights)
    rtol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got.cpu().float(), want, rtol=rtol, atol=1e-5)
    if with_weights:
        torch.testing.assert_close(weights.cpu(), want_weights, rtol=1e-5, atol=1e-6)


# ---- evict_lowest (on ragged_attention's weights) ----------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@examples(20)
@given(c=ragged_attention_cases(max_work=1 << 16), n_evict=st.integers(0, 6), protect=st.integers(0, 12),
       kernel=st.sampled_from([1, 3, 5, 7]), pooling=st.sampled_from(["avg", "max"]),
       var_weight=st.sampled_from([0.0, 200.0]), over_seed=st.integers(0, 2**31 - 1))
def test_evict_lowest_equals_reference(device, dtype, c, n_evict, protect, kernel, pooling, var_weight, over_seed):
    """Random layers (segments of 0-8K entries with holes, shuffled storage, any query positions), any numbers
    to evict and over the caps (negative: none), any protection, kernel and pooling: the freed entries are the
    reference's (up to ties of the pooled score), `over` drops by what was freed, the order stays exact."""
    q, k, v, pos, offsets, q_pos = ragged_attention_inputs(c, dtype)
    over = torch.randint(-2, 8, (c["B"], c["Hkv"]), generator=seeded(over_seed))
    scale = c["D"] ** -0.5
    want_pos, want_over = pos.clone(), over.clone()
    pooled = ref.evict_lowest(q, k, want_pos, offsets, q_pos, want_over, scale, var_weight, protect, kernel, pooling,
                              n_evict)
    inputs = [t.to(device) for t in (q, k, v, pos, offsets, q_pos)]
    _, weights = ops.ragged_attention_with_weights(*inputs, scale)
    got_pos, got_over, order = inputs[3].clone(), over.to(device), ops.position_order(inputs[3], inputs[4])
    ops.evict_lowest(weights, got_pos, order, inputs[4], inputs[5], got_over, var_weight, protect, kernel, pooling,
                     n_evict)
    assert torch.equal(got_over.cpu(), want_over)
    assert_same_eviction(got_pos, want_pos, pooled, offsets, rel_tol=1e-3)
    assert_exact_order(order, got_pos, offsets)


# ---- invalid inputs ---------------------------------------------------------------------------------
# Each op must refuse these with a RuntimeError/ValueError naming the op (and the argument where given),
# never crash the process, never answer. Small valid arguments per op, one thing broken per case.
def _valid_args(op: str, device: str) -> dict:
    g = seeded(0)
    if op in ("window_stats", "attention_max"):
        return dict(q=torch.randn(2, 4, 3, 8, generator=g), k=torch.randn(2, 2, 5, 8, generator=g),
                    q_pos=torch.tensor([[2, 3, 4], [2, 3, 4]]), k_pos=torch.arange(5).repeat(2, 2, 1),
                    scale=0.3)
    if op == "allocate_budgets":
        return dict(scores=torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 1.0]]),
                    caps=torch.tensor([[10, 10, 10], [3, 4, 5]]), total=torch.tensor([12, 7]))
    if op == "gather_kept":
        return dict(k=torch.randn(2, 2, 5, 4, generator=g), v=torch.randn(2, 2, 5, 4, generator=g),
                    idx=torch.tensor([0, 2, 4]).repeat(2, 2, 1))
    if op == "gather_ragged":
        return dict(k=torch.randn(2, 2, 5, 4, generator=g), v=torch.randn(2, 2, 5, 4, generator=g),
                    idx=torch.tensor([0, 1, 4, 2, 3, 0, 1]), offsets=torch.tensor([0, 3, 3, 5, 7]))
    if op == "ragged_attention":
        return dict(q=torch.randn(2, 4, 3, 8, generator=g), k=torch.randn(7, 8, generator=g),
                    v=torch.randn(7, 8, generator=g), pos=torch.tensor([0, 1, 4, 2, 3, 0, -1]),
                    offsets=torch.tensor([0, 3, 3, 5, 7]), q_pos=torch.tensor([[2, 3, 4], [2, 3, 4]]), scale=0.3)
    if op in ("evict_lowest", "append_entries"):  # the ragged layer above, as the decode ops see it
        layer = _valid_args("ragged_attention", device)
        order = ops.position_order(layer["pos"], layer["offsets"])
        if op == "append_entries":
            return dict(k=layer["k"], v=layer["v"], pos=layer["pos"], offsets=layer["offsets"],
                        new_k=torch.randn(2, 2, 1, 8, generator=g), new_v=torch.randn(2, 2, 1, 8, generator=g),
                        q_pos=torch.tensor([[5], [5]]), order=order)
        return dict(weights=torch.rand(6, 7, generator=g), pos=layer["pos"], order=order, offsets=layer["offsets"],
                    q_pos=layer["q_pos"], over=torch.ones(2, 2, dtype=torch.long), var_weight=0.0, protect=1,
                    kernel_size=3, pooling="avg", n_evict=1)
    raise KeyError(op)


def _set(**changes):
    return lambda a: {**a, **changes}


def _edit(name, fn):
    return lambda a: {**a, name: fn(a[name])}


def _put(name, index, value):
    def change(a):
        t = a[name].clone()
        t[index] = value
        return {**a, name: t}
    return change


def _to_cpu(name):
    return _edit(name, lambda t: t.cpu())


# (op, case id, change to the valid arguments, regex the message must match besides the op's name, kind)
# kind: "shape" checked on the host before any kernel runs; "value" depends on tensor values (on CUDA a kernel
# could read them on the device: run there in a child process, a device-side fault must not take the test
# session's CUDA context with it); "devices" needs two devices (CUDA only).
# window_stats and attention_max take the same arguments and refuse the same inputs
_ATTENTION_CASES = [
    ("q-rank-3", _edit("q", lambda t: t[0]), r"\bq\b", "shape"),
    ("k-rank-5", _edit("k", lambda t: t[None]), r"\bk\b", "shape"),
    ("q-k-dtypes", _edit("k", lambda t: t.half()), "dtype", "shape"),
    ("integer-q-k", lambda a: {**a, "q": a["q"].long(), "k": a["k"].long()}, "floating", "shape"),
    ("q_pos-int32", _edit("q_pos", lambda t: t.int()), "int64", "shape"),
    ("k_pos-int32", _edit("k_pos", lambda t: t.int()), "int64", "shape"),
    ("q_pos-shape", _edit("q_pos", lambda t: t[:, :2]), "q_pos", "shape"),
    ("k_pos-shape", _edit("k_pos", lambda t: t[..., :4]), "k_pos", "shape"),
    ("heads-not-multiple", _edit("q", lambda t: t[:, :3]), "multiple of Hkv", "shape"),
    ("head-dim", _edit("k", lambda t: t[..., :4]), "disagree", "shape"),
    ("batch", _edit("q", lambda t: t[:1]), "disagree", "shape"),
    ("devices", _to_cpu("k_pos"), "device", "devices"),
    ("softcap-negative", _set(softcap=-1.0), "softcap", "shape"),
    ("softcap-nan", _set(softcap=float("nan")), "softcap", "shape"),
]
INVALID = [
    *[(op, *case) for op in ("window_stats", "attention_max") for case in _ATTENTION_CASES],

    ("allocate_budgets", "scores-rank-1", _edit("scores", lambda t: t[0]), "scores", "shape"),
    ("allocate_budgets", "scores-rank-3", _edit("scores", lambda t: t[None]), "scores", "shape"),
    ("allocate_budgets", "integer-scores", _edit("scores", lambda t: t.long()), "scores", "shape"),
    ("allocate_budgets", "caps-int32", _edit("caps", lambda t: t.int()), "caps", "shape"),
    ("allocate_budgets", "caps-shape", _edit("caps", lambda t: t[:, :2]), "caps", "shape"),
    ("allocate_budgets", "total-shape", _edit("total", lambda t: t[:1]), "total", "shape"),
    ("allocate_budgets", "total-rank-2", _edit("total", lambda t: t[:, None]), "total", "shape"),
    ("allocate_budgets", "total-int32", _edit("total", lambda t: t.int()), "total", "shape"),
    ("allocate_budgets", "devices", _to_cpu("total"), "device", "devices"),
    ("allocate_budgets", "negative-cap", _put("caps", (0, 1), -4), "caps", "value"),
    ("allocate_budgets", "negative-total", _put("total", 1, -3), "total", "value"),
    ("allocate_budgets", "nan-score", _put("scores", (0, 2), float("nan")), "scores", "value"),
    ("allocate_budgets", "inf-score", _put("scores", (1, 0), float("inf")), "scores", "value"),

    ("gather_kept", "k-rank-3", lambda a: {**a, "k": a["k"][0], "v": a["v"][0]}, r"\bk\b", "shape"),
    ("gather_kept", "v-shape", _edit("v", lambda t: t[..., :3]), "shape", "shape"),
    ("gather_kept", "v-dtype", _edit("v", lambda t: t.half()), "dtype", "shape"),
    ("gather_kept", "idx-rank-2", _edit("idx", lambda t: t[0]), "idx", "shape"),
    ("gather_kept", "idx-batch", _edit("idx", lambda t: t[:1]), "idx", "shape"),
    ("gather_kept", "idx-int32", _edit("idx", lambda t: t.int()), "idx", "shape"),
    ("gather_kept", "devices", _to_cpu("idx"), "device", "devices"),
    ("gather_kept", "idx-equal-N", _put("idx", (1, 0, 2), 5), "out of range", "value"),
    ("gather_kept", "idx-negative", _put("idx", (0, 1, 0), -1), "out of range", "value"),
    ("gather_kept", "empty-cache", lambda a: {**a, "k": a["k"][:, :, :0], "v": a["v"][:, :, :0]},
     "out of range|empty", "value"),

    ("gather_ragged", "k-rank-3", lambda a: {**a, "k": a["k"][0], "v": a["v"][0]}, r"\bk\b", "shape"),
    ("gather_ragged", "v-shape", _edit("v", lambda t: t[..., :3]), "shape", "shape"),
    ("gather_ragged", "v-dtype", _edit("v", lambda t: t.half()), "dtype", "shape"),
    ("gather_ragged", "idx-rank-2", _edit("idx", lambda t: t[None]), "idx", "shape"),
    ("gather_ragged", "idx-int32", _edit("idx", lambda t: t.int()), "idx", "shape"),
    ("gather_ragged", "offsets-int32", _edit("offsets", lambda t: t.int()), "offsets", "shape"),
    ("gather_ragged", "offsets-length", _edit("offsets", lambda t: t[:-1]), "offsets", "shape"),
    ("gather_ragged", "devices", _to_cpu("offsets"), "device", "devices"),
    ("gather_ragged", "idx-equal-N", _put("idx", 3, 5), "out of range", "value"),
    ("gather_ragged", "idx-negative", _put("idx", 0, -2), "out of range", "value"),
    ("gather_ragged", "offsets-start", _put("offsets", 0, 1), "offsets", "value"),
    ("gather_ragged", "offsets-decreasing", _put("offsets", 2, 2), "offsets", "value"),   # segment 1: size -1
    ("gather_ragged", "offsets-end-short", _put("offsets", 4, 6), "offsets|T", "value"),
    ("gather_ragged", "offsets-end-past-T", _put("offsets", 4, 9), "offsets|T", "value"),

    ("ragged_attention", "q-rank-3", _edit("q", lambda t: t[0]), r"\bq\b", "shape"),
    ("ragged_attention", "integer-q", lambda a: {**a, **{n: a[n].long() for n in ("q", "k", "v")}}, "floating", "shape"),
    ("ragged_attention", "k-rank-1", _edit("k", lambda t: t[:, 0]), r"\bk\b", "shape"),
    ("ragged_attention", "head-dim", lambda a: {**a, "k": a["k"][:, :4], "v": a["v"][:, :4]}, r"\bk\b", "shape"),
    ("ragged_attention", "v-shape", _edit("v", lambda t: t[:-1]), r"\bv\b", "shape"),
    ("ragged_attention", "k-v-dtype", lambda a: {**a, "k": a["k"].half(), "v": a["v"].half()}, "dtype", "shape"),
    ("ragged_attention", "pos-shape", _edit("pos", lambda t: t[:-1]), "pos", "shape"),
    ("ragged_attention", "pos-int32", _edit("pos", lambda t: t.int()), "pos", "shape"),
    ("ragged_attention", "offsets-int32", _edit("offsets", lambda t: t.int()), "offsets", "shape"),
    ("ragged_attention", "offsets-segments", _set(offsets=torch.tensor([0, 3, 5, 7])), "offsets|segments", "shape"),
    ("ragged_attention", "heads-not-multiple", _edit("q", lambda t: t[:, :3]), "multiple of Hkv", "shape"),
    ("ragged_attention", "q_pos-shape", _edit("q_pos", lambda t: t[:, :2]), "q_pos", "shape"),
    ("ragged_attention", "q_pos-int32", _edit("q_pos", lambda t: t.int()), "q_pos", "shape"),
    ("ragged_attention", "devices", _to_cpu("pos"), "device", "devices"),
    ("ragged_attention", "softcap-negative", _set(softcap=-2.0), "softcap", "shape"),
    ("ragged_attention", "softcap-inf", _set(softcap=float("inf")), "softcap", "shape"),
    ("ragged_attention", "offsets-start", _put("offsets", 0, 1), "offsets", "value"),
    ("ragged_attention", "offsets-decreasing", _put("offsets", 2, 2), "offsets", "value"),
    ("ragged_attention", "offsets-end-short", _put("offsets", 4, 6), "offsets|T", "value"),
    ("ragged_attention", "offsets-end-past-T", _put("offsets", 4, 9), "offsets|T", "value"),

    ("evict_lowest", "weights-fp16", _edit("weights", lambda t: t.half()), "weights", "shape"),
    ("evict_lowest", "weights-columns", _edit("weights", lambda t: t[:, :-1]), "weights", "shape"),
    ("evict_lowest", "weights-rows", _edit("weights", lambda t: t[:-1]), "weights", "shape"),
    ("evict_lowest", "weights-strided", _edit("weights", lambda t: t.t().contiguous().t()), "weights", "shape"),
    ("evict_lowest", "pos-int32", _edit("pos", lambda t: t.int()), "pos", "shape"),
    ("evict_lowest", "order-int64", _edit("order", lambda t: t.long()), "order", "shape"),
    ("evict_lowest", "order-short", _edit("order", lambda t: t[:-1]), "order", "shape"),
    ("evict_lowest", "q_pos-rank-1", _edit("q_pos", lambda t: t[0]), "q_pos", "shape"),
    ("evict_lowest", "offsets-segments", _set(offsets=torch.tensor([0, 3, 5, 7])), "offsets|segments", "shape"),
    ("evict_lowest", "over-shape", _edit("over", lambda t: t[:, :1]), "over", "shape"),
    ("evict_lowest", "over-int32", _edit("over", lambda t: t.int()), "over", "shape"),
    ("evict_lowest", "kernel-even", _set(kernel_size=4), "kernel_size", "shape"),
    ("evict_lowest", "n_evict-negative", _set(n_evict=-1), "n_evict", "shape"),
    ("evict_lowest", "devices", _to_cpu("over"), "device", "devices"),

    ("append_entries", "k-rank-3", lambda a: {**a, "k": a["k"][None], "v": a["v"][None]}, r"\bk\b", "shape"),
    ("append_entries", "new_k-dtype", lambda a: {**a, "new_k": a["new_k"].half(), "new_v": a["new_v"].half()},
     "new_k|dtype", "shape"),
    ("append_entries", "new_k-heads", lambda a: {**a, "new_k": a["new_k"][:, :1], "new_v": a["new_v"][:, :1]},
     "new_k|segments|Hkv", "shape"),
    ("append_entries", "q_pos-shape", _edit("q_pos", lambda t: t[:1]), "q_pos", "shape"),
    ("append_entries", "pos-int32", _edit("pos", lambda t: t.int()), "pos", "shape"),
    ("append_entries", "order-int64", _edit("order", lambda t: t.long()), "order", "shape"),
    ("append_entries", "devices", _to_cpu("q_pos"), "device", "devices"),
]
_CASES = {(op, name): (change, match, kind) for op, name, change, match, kind in INVALID}

# Inputs an op accepts today though its contract (csrc/register.cpp) rules them out, or refuses without naming itself.
# strict: the test fails once the op refuses them properly, so that the mark goes with the fix.
_CUDA_OFFSETS_UNCHECKED = ("CUDA op does not check offsets (a decode-time op inside a captured step cannot read "
                           "them on the host): accepted silently")
KNOWN_ACCEPTED = {
    **{("ragged_attention", name, "cuda"): _CUDA_OFFSETS_UNCHECKED
       for name in ("offsets-start", "offsets-decreasing", "offsets-end-short")},
    ("ragged_attention", "offsets-end-past-T", "cuda"):
        _CUDA_OFFSETS_UNCHECKED + "; the last segment then reads k, v and pos past their T rows",
}


def refusal(op: str, name: str, device: str) -> dict:
    """Runs one invalid case; what happened, as plain data (also printed by the child process on CUDA)."""
    change, _, _ = _CASES[(op, name)]
    args = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in _valid_args(op, device).items()}
    args = change(args)
    report = {"raised": None, "message": "", "named_error": False, "cuda_usable_after": None}
    try:
        getattr(ops, op)(*args.values())
        if device == "cuda":
            torch.cuda.synchronize()  # a device-side check (or fault) shows here
    except Exception as e:  # noqa: BLE001  (the type is what is checked)
        report.update(raised=type(e).__name__, message=str(e).splitlines()[0] if str(e) else "",
                      named_error=isinstance(e, (RuntimeError, ValueError)))
    if device == "cuda":
        try:
            report["cuda_usable_after"] = torch.ones(8, device="cuda").sum().item() == 8.0
        except Exception:  # noqa: BLE001
            report["cuda_usable_after"] = False
    return report


def _invalid_params():
    params = []
    for op, name, _, _, kind in INVALID:
        for device in ("cpu", "cuda"):
            if kind == "devices" and device == "cpu":
                continue  # needs a second device
            marks = [NEEDS_CUDA] if device == "cuda" else []
            why = KNOWN_ACCEPTED.get((op, name, device))
            if why:
                marks.append(pytest.mark.xfail(strict=True, reason=why))
            params.append(pytest.param(op, name, device, marks=marks, id=f"{op}-{name}-{device}"))
    return params


_CHILD_REPORTS: dict = {}
_CHILD_CODE = ("import json, os, sys; sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]; "  # + tests/
               "import test_op_properties as t\n"
               "for case in sys.argv[2:]:\n"
               "    op, name = case.split('/', 1)\n"
               "    print(json.dumps([op, name, t.refusal(op, name, 'cuda')]), flush=True)")


def cuda_value_report(op: str, name: str) -> dict:
    """refusal(op, name, 'cuda') run in a child process: a device-side assert or fault would otherwise take this
    process's CUDA context, and every later CUDA test, with it. One child runs the cases in turn (CUDA's start-up
    is paid once, not once per case and test worker); a case that kills its child is recorded with the child's
    exit, and a new child goes on with the rest."""
    if not _CHILD_REPORTS:
        here = os.path.dirname(os.path.abspath(__file__))
        pending = [(o, n) for o, n, _, _, kind in INVALID if kind == "value"]
        while pending:
            child = subprocess.run([sys.executable, "-c", _CHILD_CODE, here, *(f"{o}/{n}" for o, n in pending)],
                                   capture_output=True, text=True, timeout=600)
            for line in child.stdout.splitlines():
                o, n, report = json.loads(line)
                _CHILD_REPORTS[(o, n)] = (0, report, "")
            pending = [key for key in pending if key not in _CHILD_REPORTS]
            if pending:  # the child died on pending[0]
                _CHILD_REPORTS[pending.pop(0)] = (child.returncode or -1, None, child.stderr)
    rc, report, err = _CHILD_REPORTS[(op, name)]
    assert rc == 0, f"the process died (exit {rc}): {err[-2000:]}"
    return report


@pytest.mark.parametrize("op,name,device", _invalid_params())
def test_invalid_input_is_refused(op, name, device):
    _, match, kind = _CASES[(op, name)]
    report = cuda_value_report(op, name) if device == "cuda" and kind == "value" else refusal(op, name, device)
    assert report["raised"] is not None, f"{op} accepted the invalid input ({name}) on {device}: {report}"
    assert report["named_error"], f"{op} raised {report['raised']}, not RuntimeError/ValueError: {report}"
    assert op in report["message"], f"the error does not name {op}: {report}"
    assert re.search(match, report["message"]), f"the error does not name {match!r}: {report}"
    if device == "cuda":
        assert report["cuda_usable_after"], f"{op} left the CUDA context unusable: {report}"
