"""The ops on CPU against plain-PyTorch references, and torch.library.opcheck."""
from __future__ import annotations

import random

import pytest
import torch

import cakekv._ops as ops
from reference import allocate, masked_window_stats


def positions(batch, kv_heads, n, pad, holes=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(n).expand(batch, kv_heads, n).clone()
    for b in range(batch):
        pos[b, :, : pad * b] = -1
        pos[b] -= pad * b
        pos[b] = pos[b].clamp(min=-1)
    if holes:
        for b in range(batch):
            for g in range(kv_heads):
                hole = torch.randperm(n, generator=gen)[:holes]
                pos[b, g, hole] = -1
    return pos


OP_NAMES = ["window_stats", "attention_max", "allocate_budgets", "gather_kept", "gather_ragged", "ragged_attention", "append_entries",
            "evict_lowest"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_every_op_has_a_kernel_for_the_device(device):
    """Each op of the library has a CPU kernel, and a CUDA kernel in a CUDA build (a kernel file left out of
    the build would otherwise only show as a dispatch error at run time)."""
    key = "CPU" if device == "cpu" else "CUDA"
    declared = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("cakekv::"))
    assert declared == sorted(OP_NAMES)
    missing = [op for op in OP_NAMES if not torch._C._dispatch_has_kernel_for_dispatch_key(f"cakekv::{op}", key)]
    assert not missing, f"no {key} kernel for {missing}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("q_len", [1, 6])
def test_window_stats_matches_reference(dtype, heads, kv_heads, q_len):
    torch.manual_seed(0)
    b, n, d = 3, 37, 16
    q = (torch.randn(b, heads, q_len, d) * 2).to(dtype)
    k = (torch.randn(b, kv_heads, n, d) * 2).to(dtype)
    k_pos = positions(b, kv_heads, n, pad=5, holes=3)
    q_pos = (k_pos.amax((1, 2))[:, None] - q_len + 1 + torch.arange(q_len)).clamp(min=0)
    got = ops.window_stats(q, k, q_pos, k_pos, 0.25)
    want = masked_window_stats(q, k, q_pos, k_pos, 0.25)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == (b, heads, n)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # probabilities: each query's attention sums to one over visible keys
    torch.testing.assert_close(got[0].sum(-1), torch.ones(b, heads), rtol=1e-5, atol=1e-5)


def test_window_stats_long_rows_stream_over_chunks():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 9000, 8)
    k_pos = torch.arange(9000).view(1, 1, -1)
    q_pos = torch.arange(8996, 9000).view(1, -1)
    for g, w in zip(ops.window_stats(q, k, q_pos, k_pos, 0.5), masked_window_stats(q, k, q_pos, k_pos, 0.5)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_window_stats_all_prompt_queries(device):
    """H2O's use: every prompt query (several query tiles merged, causal key chunks skipped), with padding."""
    torch.manual_seed(2)
    n = 700
    q, k = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8)
    pos = torch.arange(n).expand(2, n).clone()
    pos[1, :90] = -1                      # a left-padded row
    pos[1, 90:] -= 90
    k_pos = pos[:, None, :].expand(2, 2, n).contiguous()
    d = lambda *ts: tuple(t.to(device) for t in ts)  # noqa: E731
    got = ops.window_stats(*d(q, k, pos, k_pos), 0.5)
    for g, w in zip(got, masked_window_stats(q, k, pos, k_pos, 0.5)):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-6)


def test_allocate_budgets_matches_reference_and_invariants():
    rng = random.Random(0)
    for _ in range(200):
        layers = rng.randint(1, 12)
        scores = [rng.random() ** 3 * (0 if rng.random() < 0.1 else 1) for _ in range(layers)]
        caps = [rng.randint(0, 300) for _ in range(layers)]
        total = rng.randint(0, 2000)
        got = ops.allocate_budgets(torch.tensor([scores], dtype=torch.float64), torch.tensor([caps]),
                                   torch.tensor([total]))[0].tolist()
        assert got == allocate(scores, caps, total)
        assert sum(got) == min(total, sum(caps))
        assert all(0 <= g <= c for g, c in zip(got, caps))


def test_allocate_budgets_rows_are_independent():
    scores = torch.tensor([[1.0, 1.0, 2.0], [3.0, 0.0, 1.0]])
    caps = torch.tensor([[100, 100, 100], [10, 10, 10]])
    out = ops.allocate_budgets(scores, caps, torch.tensor([40, 25]))
    assert out.tolist() == [[10, 10, 20], [10, 5, 10]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_kept(dtype):
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 20, 8).to(dtype), torch.randn(2, 3, 20, 8).to(dtype)
    idx = torch.randint(0, 20, (2, 3, 7))
    k2, v2 = ops.gather_kept(k, v, idx)
    full = idx[..., None].expand(-1, -1, -1, 8)
    assert torch.equal(k2, k.gather(2, full)) and torch.equal(v2, v.gather(2, full))


def test_gather_kept_rejects_out_of_range():
    k = torch.randn(1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.gather_kept(k, k, torch.tensor([[[4]]]))


def test_ops_reject_bad_shapes():
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        ops.window_stats(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 5, 4), torch.zeros(1, 2, dtype=torch.long),
                         torch.zeros(1, 2, 5, dtype=torch.long), 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        ops.allocate_budgets(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, dtype=torch.long))


def test_opcheck_cpu():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 11, 8)
    k_pos = positions(2, 2, 11, pad=2)
    q_pos = torch.tensor([[8, 9, 10], [6, 7, 8]])
    torch.library.opcheck(torch.ops.cakekv.window_stats.default, (q, k, q_pos, k_pos, 0.3))
    torch.library.opcheck(torch.ops.cakekv.attention_max.default, (q, k, q_pos, k_pos, 0.3, 2.0))
    torch.library.opcheck(torch.ops.cakekv.allocate_budgets.default,
                          (torch.rand(2, 5), torch.randint(0, 50, (2, 5)), torch.tensor([60, 10])))
    torch.library.opcheck(torch.ops.cakekv.gather_kept.default, (k, k * 2, torch.randint(0, 11, (2, 2, 4))))


def test_library_built_against_another_torch_is_refused(tmp_path):
    """The build records its torch beside the library; another torch running refuses to load it, naming both
    versions and how to rebuild; the same torch, or no record, loads."""
    from cakekv._ops import check_built_torch
    library = tmp_path / "libcakekv_ops.so"
    library.write_bytes(b"")
    check_built_torch(str(library), "2.13.0+cpu")  # no record: loaded as it is
    (tmp_path / "libcakekv_ops.torch_version").write_text("2.14.1\n")
    check_built_torch(str(library), "2.14.1")
    with pytest.raises(ImportError, match=r"built against torch 2\.14\.1, but torch 2\.13\.0\+cpu is running.*"
                                          r"--no-build-isolation"):
        check_built_torch(str(library), "2.13.0+cpu")
