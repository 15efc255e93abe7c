"""Where a compressed cache layer's entries live (docs/cache.md): two layouts behind one interface, so that
`CompressedLayer` (cache.py) appends, attends, evicts and grows without knowing which one it holds.

  * `PaddedStorage`: keys, values [B, Hkv, M, D] and positions [B, Hkv, M], every (row, KV head) padded to the
    same M slots. The model's own shape: what a prompt is stored in, what the methods score and `keep_top`
    compacts, and what sliding-window layers and layers whose heads hold equal numbers of entries keep while
    decoding; a step attends with SDPA and a per-KV-head visibility mask.
  * `RaggedStorage`: the segments of all (row, KV head) pairs back to back, keys, values [C, D] and positions
    [C], each segment with its own capacity. A layer whose heads hold different numbers of entries (per-head
    budgets) switches to it once after prefill (`from_padded`), so that it stores only what it keeps; a step
    attends with the ragged_attention op.

Every slot carries its logical position (-1 = free slot). Both layouts are segments, one per (row, KV head): the
padded one viewed flat is a ragged one whose segments are all M long, so the decode ops (append_entries,
evict_lowest, and ragged_attention on a step that evicts) read either through `segments` and one kernel serves
both. What a decode step calls (`append`, `attend`, `attend_with_weights`, `evict`) runs on the device only and
never reads a value back, so the step can be captured as a CUDA graph; reallocation (`grow`) is decided on the
host before a step.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import _ops


def cloned(obj):
    """A copy of `obj` that shares no tensor with it: tensors cloned, lists deep-copied, storage copied alike."""
    twin = copy.copy(obj)
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            setattr(twin, name, value.clone())
        elif isinstance(value, list):
            setattr(twin, name, copy.deepcopy(value))
        elif isinstance(value, Storage):
            setattr(twin, name, cloned(value))
    return twin


def soft_capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Scaled attention logits soft-capped as transformers' eager kernels do (Gemma 2): softcap * tanh(logits /
    softcap); as they are without a cap (None or 0)."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def visible_entries(pos: torch.Tensor, query_pos: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """[B, G, q, M] bool: entry j (positions `pos` [B, G, M]) is visible to query i (positions `query_pos` [B, q]) iff
    0 <= pos[j] <= query_pos[i], and pos[j] > query_pos[i] - sliding_window on a sliding layer."""
    pos, query_pos = pos[:, :, None, :], query_pos[:, None, :, None]
    visible = (pos >= 0) & (pos <= query_pos)
    if sliding_window is not None:
        visible &= pos > query_pos - sliding_window
    return visible


_MASK_ELEMENTS = 1 << 28  # visibility-mask elements one padded attention call holds (256 MiB of bool)


def trailing_causal_attention(query, keys, values, scale) -> torch.Tensor:
    """Attention [B, q, H, D] of the last q of `keys` (their queries `query` [B, H, q, D]) over every key before them
    and themselves causally: SDPA's lower-right causal bias, no mask (flash attention on the GPU), GQA by SDPA."""
    out = F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True,
                                         attn_mask=causal_lower_right(query.shape[2], keys.shape[2]))
    return out.transpose(1, 2).contiguous()


def masked_attention(query, keys, values, visible, scale, softcap=None):
    """Attention [B, q, H, D] of queries [B, H, q, D] over keys and values [B, Hkv, M, D] with a visibility mask
    [B, Hkv, q, M] (or [B, 1, q, M]: the same for every KV head); with `softcap`, the logits are soft-capped first
    (Gemma 2). The query heads of a KV head are folded into its rows ([B, Hkv, G * q, D]), so that SDPA needs no GQA
    (with a mask and GQA it takes its math kernel, which holds every head's logits)."""
    b, h, q, d = query.shape
    hkv, m = keys.shape[1], keys.shape[2]
    groups = h // hkv
    rows = query.reshape(b, hkv, groups * q, d)
    # expand + reshape, not repeat_interleave (which reads its output size back from the device)
    mask = visible[:, :, None].expand(b, visible.shape[1], groups, q, m).reshape(b, visible.shape[1], groups * q, m)
    if softcap is None:
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=scale)
    else:
        out = softcapped_attention(rows, keys, values, mask, scale, softcap)
    return out.view(b, hkv, groups, q, -1).permute(0, 3, 1, 2, 4).reshape(b, q, h, -1)


def softcapped_attention(rows, keys, values, mask, scale, softcap):
    """Attention with logit soft-capping in the order of transformers' eager kernel: logits = softcap *
    tanh(scale * q.k / softcap), masked, softmax in fp32 cast back to the query dtype, times the values (`rows`
    [B, Hkv, r, D]: a KV head's queries)."""
    logits = soft_capped(torch.matmul(rows, keys.transpose(2, 3)) * scale, softcap)
    logits = logits.masked_fill(~mask, float("-inf"))  # every query sees itself: no row is fully masked
    weights = F.softmax(logits, dim=-1, dtype=torch.float32).to(rows.dtype)
    return torch.matmul(weights, values)


class Storage:
    """What both layouts share: the decode ops over the layer as segments, and the position order. A layout gives
    `capacities` (slots per segment, host), `grow`, `attend`, `padded_pos` and `batch_heads`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, offsets: torch.Tensor):
        self.keys, self.values = keys, values
        self.pos = pos              # int64 per slot, -1 = free slot
        self.offsets = offsets      # [B * Hkv + 1] int64 segment starts (device)
        # Per segment, the slots of the stored entries by position (int32, shaped as `pos`; see
        # _ops.position_order); kept by the decode ops while decode-time eviction needs it, else None.
        self.order: torch.Tensor | None = None

    def segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [T, D], values [T, D], positions [T], offsets [B*Hkv + 1]): the storage as segments, one per
        (row, KV head), for the decode ops (the padded layout viewed flat, the ragged one as it is)."""
        d = self.keys.shape[-1]
        return self.keys.view(-1, d), self.values.view(-1, d), self.pos.view(-1), self.offsets

    def addresses(self) -> tuple[int, ...]:
        """Device addresses of every tensor a decode step reads or writes here: a captured step is valid only
        while they stay (a reallocation anywhere moves one)."""
        return tuple(t.data_ptr() for t in vars(self).values() if isinstance(t, torch.Tensor))

    def _flat_order(self) -> torch.Tensor | None:
        return None if self.order is None else self.order.view(-1)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored slots: keys, values, positions and the position order."""
        order = 0 if self.order is None else self.order.nbytes
        return self.keys.nbytes + self.values.nbytes + self.pos.nbytes + order

    def start_order(self, ranks: torch.Tensor | None = None):
        """Build `order`, then kept by the decode ops; `ranks` (float per slot, NaN = none) list the entries
        with a rank first (see _ops.position_order)."""
        _, _, pos, offsets = self.segments()
        self.order = _ops.position_order(pos, offsets, ranks).view(self.pos.shape)

    def append(self, keys: torch.Tensor, values: torch.Tensor, query_pos: torch.Tensor):
        """Token i of segment b * Hkv + g (`keys[b, g, i]`) into the segment's i-th free slot, at position
        `query_pos[b, i]`; the room was made by `grow`."""
        _ops.append_entries(*self.segments(), keys, values, query_pos, self._flat_order())

    def attend_with_weights(self, query, query_pos, scale, softcap=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention [B, q, H, D], fp32 attention weights for `evict`) of a step that evicts, over the
        segments: the keys are read once for both."""
        keys, values, pos, offsets = self.segments()
        out, weights = _ops.ragged_attention_with_weights(query, keys, values, pos, offsets, query_pos, scale,
                                                          softcap)
        return out.transpose(1, 2).contiguous(), weights

    def evict(self, weights, query_pos, over, var_weight: float, protect: int, kernel_size: int, pooling: str,
              n_evict: int, by_score: bool):
        """Free, in each segment over its cap (`over`), its lowest-scoring entries under `weights` (see
        _ops.evict_lowest), in place; they leave the position order."""
        _, _, pos, offsets = self.segments()
        _ops.evict_lowest(weights, pos, self._flat_order(), offsets, query_pos, over, var_weight, protect,
                          kernel_size, pooling, n_evict, by_score)


class PaddedStorage(Storage):
    """Keys, values [B, Hkv, M, D] and positions [B, Hkv, M]: every segment has the same M slots."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor):
        super().__init__(keys, values, pos, self._offsets(pos))

    @staticmethod
    def _offsets(pos: torch.Tensor) -> torch.Tensor:
        """Segment starts of positions [B, Hkv, M] viewed flat: M * arange(B * Hkv + 1)."""
        b, h, m = pos.shape
        return torch.arange(b * h + 1, device=pos.device) * m

    @property
    def batch_heads(self) -> tuple[int, int]:
        return tuple(self.pos.shape[:2])

    @property
    def capacities(self) -> list[int]:
        b, h, m = self.pos.shape
        return [m] * (b * h)

    def grow(self, capacities: list[int]):
        """At least the largest of `capacities` slots per segment (the segments share one size), by appending
        free slots: slots keep their numbers, so the order stays exact."""
        b, h, size, d = self.keys.shape
        grow = max(capacities) - size
        if grow <= 0:
            return
        self.keys = torch.cat([self.keys, self.keys.new_zeros(b, h, grow, d)], 2)
        self.values = torch.cat([self.values, self.values.new_zeros(b, h, grow, d)], 2)
        self.pos = torch.cat([self.pos, self.pos.new_full((b, h, grow), -1)], 2)
        self.offsets = self._offsets(self.pos)
        if self.order is not None:
            self.order = torch.cat([self.order, self.order.new_zeros(b, h, grow)], 2)

    def padded_pos(self) -> torch.Tensor:
        return self.pos

    def visibility(self, query_pos: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
        """[B, Hkv, q, M] bool: which stored entries each query (positions [B, q]) may attend to."""
        return visible_entries(self.pos, query_pos, sliding_window)

    def attend(self, query, query_pos, scale, softcap=None, sliding_window=None) -> torch.Tensor:
        """Attention [B, q, H, D] of the step's queries: SDPA with the visibility mask (soft-capped logits
        with `softcap`; within the last `sliding_window` positions of each query on a sliding layer). A long
        chunk attends in tiles of queries, each with its own mask, so that no mask holds more than
        `_MASK_ELEMENTS` (a 40K-token chunk's whole mask would take tens of GiB)."""
        b, h, q, _ = query.shape
        tile = max(1, _MASK_ELEMENTS // (b * h * self.pos.shape[-1]))
        tiles = [masked_attention(query[:, :, s:s + tile], self.keys, self.values,
                                  self.visibility(query_pos[:, s:s + tile], sliding_window), scale, softcap)
                 for s in range(0, q, tile)]
        return tiles[0] if len(tiles) == 1 else torch.cat(tiles, 1)


class RaggedStorage(Storage):
    """Keys, values [C, D] and positions [C]: segment s = b * Hkv + g is slots offsets[s] .. offsets[s+1] - 1,
    `capacities[s]` of them (host; `capacities_t` on the device); its slots past the stored entries are free."""

    def __init__(self, keys, values, pos, offsets, capacities: list[int], capacities_t: torch.Tensor,
                 batch_heads: tuple[int, int]):
        super().__init__(keys, values, pos, offsets)
        self.capacities, self.capacities_t = capacities, capacities_t
        self.batch_heads = batch_heads

    @staticmethod
    def _layout(capacities: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(capacities [S], offsets [S + 1], and for each slot [sum(capacities)] its segment and its index within
        the segment) on the device."""
        capacities_t = torch.tensor(capacities, dtype=torch.long, device=device)
        offsets = F.pad(capacities_t.cumsum(0), (1, 0))
        segment = _ops.segment_of_slots(capacities_t, sum(capacities))
        within = torch.arange(segment.shape[0], device=device) - offsets[segment]
        return capacities_t, offsets, segment, within

    @classmethod
    def from_padded(cls, padded: PaddedStorage,
                    counts: list[int]) -> tuple["RaggedStorage", tuple[torch.Tensor, torch.Tensor]]:
        """The entries of `padded`, segment s holding exactly its `counts[s]` stored entries in slot order (one
        gather_ragged pass); and (segment, slot) in `padded` of each ragged slot, to take other per-slot
        tensors along."""
        b, h, m, _ = padded.keys.shape
        capacities_t, offsets, segment, within = cls._layout(counts, padded.keys.device)
        # Stored entries of each (row, head) first, in slot order (empty slots are pos = -1).
        stored_first = torch.sort((padded.pos < 0).to(torch.int8).view(b * h, m), dim=-1, stable=True).indices
        slots = (segment, stored_first[segment, within])
        keys, values = _ops.gather_ragged(padded.keys, padded.values, slots[1], offsets)
        pos = padded.pos.view(b * h, m)[slots]
        return cls(keys, values, pos, offsets, list(counts), capacities_t, (b, h)), slots

    def grow(self, capacities: list[int]):
        """New capacities per segment (each >= the old one); one copy of the stored slots, which keep their
        numbers within their segment, so the order stays exact."""
        old_offsets, old_capacities = self.offsets, self.capacities_t
        self.capacities = list(capacities)
        self.capacities_t, self.offsets, segment, within = self._layout(capacities, self.keys.device)
        valid = within < old_capacities[segment]
        src = torch.where(valid, old_offsets[segment] + within, 0)
        self.keys = self.keys.index_select(0, src)
        self.values = self.values.index_select(0, src)
        self.pos = torch.where(valid, self.pos.index_select(0, src), -1)
        if self.order is not None:
            self.order = torch.where(valid, self.order.index_select(0, src), 0)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.offsets.nbytes  # the segment starts are part of the layout

    def padded_pos(self) -> torch.Tensor:
        """[B, Hkv, max capacity] positions of the slots (-1 = empty), each segment padded at its end."""
        b, h = self.batch_heads
        cmax = max(self.capacities)
        ar = torch.arange(cmax, device=self.pos.device)
        valid = ar < self.capacities_t[:, None]
        idx = torch.where(valid, self.offsets[:-1, None] + ar, 0)
        return torch.where(valid, self.pos[idx], -1).view(b, h, cmax)

    def attend(self, query, query_pos, scale, softcap=None, sliding_window=None) -> torch.Tensor:
        """Attention [B, q, H, D] of the step's queries over the segments (ragged_attention; soft-capped logits
        with `softcap`). A sliding layer is never ragged (it holds equal heads)."""
        assert sliding_window is None, "a sliding-window layer keeps the padded storage"
        out = _ops.ragged_attention(query, *self.segments(), query_pos, scale, softcap)
        return out.transpose(1, 2).contiguous()
