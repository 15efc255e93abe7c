"""Loads the compiled cakekv ops library, registers fake kernels, and gives typed wrappers.

The ops are the implementation: there is no Python fallback. Shape contracts are with the schemas in csrc/register.cpp.
"""
from __future__ import annotations

import glob
import os
import sys

import torch


def _load_library() -> None:
    # A regular install puts the library next to this file; an editable install (scikit-build-core's
    # redirect mode) puts it in site-packages/cakekv while the sources stay here.
    dirs = [os.path.dirname(__file__)] + [os.path.join(p, "cakekv") for p in sys.path if p]
    found = [f for d in dirs for f in sorted(glob.glob(os.path.join(d, "libcakekv_ops*.so")))]
    if not found:
        raise ImportError(
            "cakekv: the compiled ops library (libcakekv_ops.so) is missing next to cakekv/_ops.py; "
            "build the package with `pip install --no-build-isolation .` (or `-e .`)")
    check_built_torch(found[0], torch.__version__)
    torch.ops.load_library(found[0])


def check_built_torch(library: str, running: str) -> None:
    """Refuse a library built against another torch than the one running (its ABI may differ: a crash or wrong
    results, not an error). The build records its torch beside the library; a library without the record
    (copied by hand) is loaded as it is."""
    record = os.path.join(os.path.dirname(library), "libcakekv_ops.torch_version")
    if not os.path.exists(record):
        return
    with open(record) as f:
        built = f.read().strip()
    if built and built != running:
        raise ImportError(
            f"cakekv: the ops library was built against torch {built}, but torch {running} is running; rebuild it "
            "against this torch: `pip install --no-build-isolation --no-deps --force-reinstall .` in the cakekv "
            "source tree (without --no-build-isolation, pip builds against a torch it downloads)")


_load_library()
_ops = torch.ops.cakekv


@torch.library.register_fake("cakekv::window_stats")
def _window_stats_fake(q, k, q_pos, k_pos, scale, softcap=0.0):
    shape = (q.shape[0], q.shape[1], k.shape[2])
    return tuple(q.new_empty(shape, dtype=torch.float32) for _ in range(3))


@torch.library.register_fake("cakekv::attention_max")
def _attention_max_fake(q, k, q_pos, k_pos, scale, softcap=0.0):
    return q.new_empty(k.shape[:3], dtype=torch.float32)


@torch.library.register_fake("cakekv::allocate_budgets")
def _allocate_budgets_fake(scores, caps, total):
    return caps.new_empty(caps.shape)


@torch.library.register_fake("cakekv::gather_kept")
def _gather_kept_fake(k, v, idx):
    shape = (k.shape[0], k.shape[1], idx.shape[2], k.shape[3])
    return k.new_empty(shape), v.new_empty(shape)


@torch.library.register_fake("cakekv::gather_ragged")
def _gather_ragged_fake(k, v, idx, offsets):
    shape = (idx.shape[0], k.shape[3])
    return k.new_empty(shape), v.new_empty(shape)


@torch.library.register_fake("cakekv::ragged_attention")
def _ragged_attention_fake(q, k, v, pos, offsets, q_pos, scale, softcap=0.0, return_weights=False):
    rows = q.shape[1] // ((offsets.shape[0] - 1) // q.shape[0]) * q.shape[2] if return_weights else 0
    return q.new_empty(q.shape), q.new_empty((rows, k.shape[0]), dtype=torch.float32)


@torch.library.register_fake("cakekv::append_entries")
def _append_entries_fake(k, v, pos, offsets, new_k, new_v, q_pos, order):
    return None


@torch.library.register_fake("cakekv::evict_lowest")
def _evict_lowest_fake(weights, pos, order, offsets, q_pos, over, var_weight, protect, kernel_size, max_pool, n_evict,
                       by_score=False):
    return None


def window_stats(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-key (mean, unbiased variance, entropy) of the window queries' attention, each [B, H, N] fp32; with
    ``softcap``, of the soft-capped logits (Gemma 2)."""
    return _ops.window_stats(q, k, q_pos, k_pos, float(scale), float(softcap or 0.0))


def attention_max(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                  softcap: float | None = None) -> torch.Tensor:
    """[B, Hkv, N] fp32: each key's largest softmax probability over the real queries (q_pos >= 0) of its KV
    head's query heads, each query's softmax over the keys it sees (0 <= k_pos <= q_pos); with ``softcap``, of
    the soft-capped logits. KVzip's scores, streamed: no [Q, N] block. On CUDA the library runs the same math in
    PyTorch, a block of queries at a time (`_attention_max_blocks`), until a GPU run has verified the op's fused
    CUDA kernel (built, and tested by tests/ops on a GPU); the CPU kernel is the op's."""
    if q.device.type == "cuda":
        return _attention_max_blocks(q, k, q_pos, k_pos, float(scale), float(softcap or 0.0))
    return _ops.attention_max(q, k, q_pos, k_pos, float(scale), float(softcap or 0.0))


def _attention_max_blocks(q, k, q_pos, k_pos, scale: float, softcap: float, block: int = 256) -> torch.Tensor:
    """attention_max in fp32 PyTorch, `block` queries at a time ([B, H, block, N] logits at most)."""
    b, h, n_q, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    keys = k.float()[:, :, None].transpose(-1, -2)               # [B, Hkv, 1, D, N]
    best = torch.zeros(b, hkv, n, dtype=torch.float32, device=q.device)
    for start in range(0, n_q, block):
        rows = q[:, :, start:start + block].float().view(b, hkv, h // hkv, -1, d)
        logits = torch.matmul(rows * scale, keys)                   # [B, Hkv, G, t, N]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        key_pos = k_pos[:, :, None, None, :]
        seen = (key_pos >= 0) & (key_pos <= q_pos[:, None, None, start:start + block, None])
        logits = logits.masked_fill(~seen, float("-inf"))
        norm = logits.logsumexp(-1, keepdim=True)
        probs = (logits - norm.masked_fill(norm.isinf(), float("inf"))).exp()  # a query seeing nothing: zeros
        best = torch.maximum(best, probs.amax((2, 3)))
    return best


def allocate_budgets(scores: torch.Tensor, caps: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Integer budgets [R, L] proportional to ``scores``, each <= its cap, summing to min(total, sum(caps))."""
    return _ops.allocate_budgets(scores, caps, total)


def gather_kept(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V compacted to the slots ``idx`` [B, Hkv, M], in one pass."""
    return _ops.gather_kept(k, v, idx)


def gather_ragged(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                  offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [B, Hkv, N, D] compacted to the ragged layout: (k_flat, v_flat) [T, D], where entry t of
    segment s = b * Hkv + g (offsets[s] <= t < offsets[s + 1]) is slot ``idx[t]`` of (b, g)."""
    return _ops.gather_ragged(k, v, idx, offsets)


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, offsets: torch.Tensor,
                     q_pos: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention [B, H, Q, D] of ``q`` over a ragged layer: head h of row b reads segment b * Hkv + h // (H // Hkv);
    entry t is visible to query i iff 0 <= pos[t] <= q_pos[b, i]; with ``softcap``, over soft-capped logits."""
    return _ops.ragged_attention(q, k, v, pos, offsets, q_pos, float(scale), float(softcap or 0.0))[0]


def ragged_attention_with_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                                  offsets: torch.Tensor, q_pos: torch.Tensor, scale: float,
                                  softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`ragged_attention` and its attention weights, fp32 [G * Q, T] (row j * Q + i: query i of the j-th query
    head of the entry's segment), what `evict_lowest` scores: one read of the keys serves both."""
    return _ops.ragged_attention(q, k, v, pos, offsets, q_pos, float(scale), float(softcap or 0.0), True)


def append_entries(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, offsets: torch.Tensor, new_k: torch.Tensor,
                   new_v: torch.Tensor, q_pos: torch.Tensor, order: torch.Tensor | None = None) -> None:
    """In place: token i of segment s = b * Hkv + g (``new_k[b, g, i]``) goes to the i-th free slot
    (pos < 0) of the segment's slots offsets[s] .. offsets[s+1] - 1, with position ``q_pos[b, i]``; given the
    segments' position ``order`` (see `position_order`), the new entries are listed at its end."""
    _ops.append_entries(k, v, pos, offsets, new_k, new_v, q_pos, order)


def evict_lowest(weights: torch.Tensor, pos: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                 q_pos: torch.Tensor, over: torch.Tensor, var_weight: float, protect: int, kernel_size: int,
                 pooling: str, n_evict: int, by_score: bool = False) -> None:
    """In place: each segment over its cap frees (pos = -1) its min(n_evict, over) entries of lowest pooled
    score mean_heads(mean + var_weight * var) of the current queries' attention ``weights`` (from
    `ragged_attention_with_weights`), among entries at least ``protect`` positions older than the newest query;
    they leave the position ``order``, and ``over`` decreases accordingly (contract in csrc/register.cpp). With
    ``by_score``, ``order`` is the official CAKE storage order instead: the remaining candidates are re-listed
    by descending pooled score after each eviction."""
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling: must be 'avg' or 'max', got {pooling!r}")
    _ops.evict_lowest(weights, pos, order, offsets, q_pos, over, float(var_weight), int(protect), int(kernel_size),
                      pooling == "max", int(n_evict), bool(by_score))


def segment_of_slots(sizes: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [total]: the segment of each slot of a layout whose segments hold ``sizes`` [S] slots back to back
    (``total`` = their sum, given by the caller: no read back from the device)."""
    return torch.repeat_interleave(torch.arange(sizes.shape[0], device=sizes.device), sizes, output_size=total)


def position_order(pos: torch.Tensor, offsets: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [T]: per segment, the slots (counted from the segment start) of its stored entries (pos >= 0) by
    position, then its free slots. The decode ops keep it up to date; built once when eviction starts. Given
    ``first`` (float [T], NaN = no rank), entries with a rank come before the others, by ascending rank (ties by
    position): the official CAKE storage order after prefill, its top-k by descending score, then the window."""
    seg = segment_of_slots(offsets.diff(), pos.shape[0])
    key = torch.where(pos < 0, torch.iinfo(torch.int64).max, pos)
    perm = torch.sort(key, stable=True).indices
    if first is not None:  # stable sorts from the least significant key: rank, then ranked entries first
        ranked = first[perm]
        perm = perm[torch.sort(torch.nan_to_num(ranked, nan=0.0), stable=True).indices]
        perm = perm[torch.sort((pos[perm] < 0).int() * 2 + first[perm].isnan().int(), stable=True).indices]
    perm = perm[torch.sort(seg[perm], stable=True).indices]  # grouped by segment
    return (perm - offsets[seg]).to(torch.int32)
