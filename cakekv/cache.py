"""The compressed KV cache (docs/cache.md): a transformers Cache whose layers hold different numbers of entries.

Every stored entry carries its logical position (`pos`, -1 = empty slot). Visibility is one rule,
`0 <= key position <= query position`, so padding, causality after compression and free slots need
no other bookkeeping. Layouts:
  * after prefill compression, each layer is [left padding | kept prefix in position order | window];
  * during decoding new entries are written into free slots (no concatenation per step); decode-time
    eviction frees a slot by setting its position to -1, so a layer stays at a fixed capacity.
Host-side counters (`counts`, `caps`) are plain ints, so the decode step never syncs with the device.

Sliding-window layers are not compressed by the method (its budgets cover the global layers): such a
layer holds what its queries can still attend to. At the end of prefill it keeps its last
`sliding_window - 1` tokens; a step first frees the entries out of the window of its first query, then
appends, so the layer stores at most `sliding_window - 1 + q` entries.

Ragged layers: after prefill, a layer whose KV heads hold different numbers of entries (per-head budgets)
switches from the padded [B, Hkv, M, D] storage to a ragged one, so that it stores only what it keeps:
  * `keys`, `values` [C, D] and `pos_flat` [C] hold the segments of every (row, KV head) pair back to back,
    segment s = b * Hkv + g in slots `offsets[s] .. offsets[s+1] - 1` (`seg_caps[s]` slots; slots past
    the kept entries are free, pos = -1). Right after prefill every segment is exactly its kept entries.
  * a decode step writes the new token of every segment into the segment's first free slot (found on the
    device from `pos_flat`, then one index_copy_: no host sync, no concatenation); when a segment has no
    free slot left (known on the host from the counters) the layer is re-packed once with room to grow.
  * decode-time eviction marks entries free (pos = -1) in place; the next append of that segment reuses
    the slot. Attention runs over the segments with the ragged_attention op.
"""
from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from . import _ops
from .eviction import Eviction
from .methods.base import Method, soft_capped

_GROW_MIN, _GROW_MAX = 16, 256  # spare slots a full layer without a cap gets: 1/8 of its size, clamped


def grown_capacity(needed: int) -> int:
    """Capacity of an uncapped layer (or segment) that needs `needed` slots: spare room for the next
    appends so that growing copies the cache rarely, while the spare stays a small fraction of it."""
    return needed + min(_GROW_MAX, max(_GROW_MIN, needed // 8))


def masked_attention(query, keys, values, visible, scale, softcap=None):
    """Attention [B, q, H, D] of the current queries over padded storage with a per-KV-head visibility mask
    [B, Hkv, q, M]; with `softcap`, the logits are soft-capped first (Gemma 2)."""
    b, hkv, q, m = visible.shape
    groups = query.shape[1] // hkv
    # expand + reshape, not repeat_interleave (which reads its output size back from the device)
    mask = visible[:, :, None].expand(b, hkv, groups, q, m).reshape(b, hkv * groups, q, m)
    if softcap is None:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        out = softcapped_attention(query, keys, values, mask, scale, softcap)
    return out.transpose(1, 2).contiguous()


def softcapped_attention(query, keys, values, mask, scale, softcap):
    """Attention with logit soft-capping in the order of transformers' eager kernel: logits = softcap *
    tanh(scale * q.k / softcap), masked, softmax in fp32 cast back to the query dtype, times the values."""
    b, hkv, m, d = keys.shape
    groups = query.shape[1] // hkv
    keys = keys[:, :, None].expand(b, hkv, groups, m, d).reshape(b, hkv * groups, m, d)
    values = values[:, :, None].expand(b, hkv, groups, m, values.shape[-1]).reshape(b, hkv * groups, m, -1)
    logits = soft_capped(torch.matmul(query, keys.transpose(2, 3)) * scale, softcap)
    logits = logits.masked_fill(~mask, float("-inf"))  # every query sees itself: no row is fully masked
    weights = F.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, values)


class CompressedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "CompressedCache", layer_idx: int, sliding_window: int | None = None):
        super().__init__()
        self._cache = weakref.ref(cache)  # the cache owns its layers: no cycle, freed when its last user lets go
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window                # attention span of a sliding-window layer
        self.pos: torch.Tensor | None = None          # [B, Hkv, M] int64, -1 = empty slot
        self.next_pos: torch.Tensor | None = None     # [B] position of the next token of each row
        self.query_pos: torch.Tensor | None = None    # [B, q] positions of the current forward's queries
        self.indicator: torch.Tensor | None = None    # [B, Hkv, M] prefill scores aligned with slots
        # Per (row, KV head): heads of a layer may hold different numbers of entries (per-head budgets);
        # the storage is then padded to the longest head with empty slots (pos = -1).
        self.head_counts: list[list[int]] = []        # stored entries
        self.head_prefix: list[list[int]] = []        # of which before the window (prefill only)
        self.head_caps: list[list[int]] | None = None  # decode-time cap (None: no eviction)
        self.head_budgets: list[list[int] | None] = []  # entries given (None: row not compressed)
        self.over_t: torch.Tensor | None = None       # device mirror of head_counts - head_caps (decode)
        # Per segment, the slots of the stored entries by position (int32, the storage's shape; see
        # _ops.position_order); kept by the decode ops while decode-time eviction needs it, else None.
        self.order: torch.Tensor | None = None
        self.step_evict = 0                           # entries the current step evicts per head (host)
        self.step_weights: torch.Tensor | None = None  # attention weights of an evicting step, attend -> evict
        self.seen = 0                                 # logical length (padded prompt + appended)
        self.prefilling = False
        # Ragged storage (see the module docstring); `keys`/`values` are then [C, D].
        self.ragged = False
        self.pos_flat: torch.Tensor | None = None     # [C] int64, -1 = free slot
        self.offsets: torch.Tensor | None = None      # [B * Hkv + 1] int64 segment starts (device, both layouts)
        self._padded_slots = 0                        # M of the padded storage `offsets` describes
        self.seg_caps: list[int] = []                 # slots of each segment (host)
        self.seg_caps_t: torch.Tensor | None = None   # the same on the device
        self.batch_heads: tuple[int, int] | None = None  # (B, Hkv) of the ragged storage

    @staticmethod
    def _mean_per_row(values) -> list[float | None]:
        """Per row: the mean over KV heads (None for a row without values)."""
        return [None if v is None else sum(v) / len(v) for v in values]

    @property
    def prefix_counts(self) -> list[float]:
        """Per row: entries kept before the window, mean over KV heads."""
        return self._mean_per_row(self.head_prefix)

    # ---- CacheLayerMixin -----------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            return self._store_prompt(key_states, value_states)
        return self._append(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def cache(self) -> "CompressedCache":
        return self._cache()

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("cakekv: beam search is not supported (use greedy or sampling)")

    def _cloned(self, cache: "CompressedCache") -> "CompressedLayer":
        """This layer's state copied for `cache`: tensors cloned, per-head lists copied."""
        twin = copy.copy(self)
        twin._cache = weakref.ref(cache)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(twin, name, value.clone())
            elif isinstance(value, list):
                setattr(twin, name, copy.deepcopy(value))
        return twin

    # ---- storage -------------------------------------------------------------------------------
    def _store_prompt(self, keys, values):
        self.lazy_initialization(keys, values)
        prompt = self.cache.prompt
        b, h, n, _ = keys.shape
        self.keys, self.values = keys.contiguous(), values.contiguous()
        self.pos = prompt.positions.to(keys.device)[:, None, :].expand(b, h, n).contiguous()
        self.query_pos = self.pos[:, 0, :]
        self.next_pos = prompt.lengths.to(keys.device).clone()
        self.head_counts = [[c] * h for c in prompt.host_lengths]
        self.head_prefix = [[max(c - self.cache.window, 0)] * h for c in prompt.host_lengths]
        self.head_budgets = [None] * b
        self.seen = n
        self.prefilling = True
        return self.keys, self.values

    def _append(self, keys, values):
        """Write the step's tokens into free slots, on the device only: the room was made and the host
        counters are kept by `prepare_step` / `finish_step`, so a step can be captured as a CUDA graph."""
        self._advance_positions(keys.shape[2])
        if self.sliding_window is not None:
            self._free_out_of_window()
        _ops.append_entries(*self._segments(), keys, values, self.query_pos, self._flat_order())
        return self.keys, self.values

    def _free_out_of_window(self):
        """Free (pos = -1) the entries the step's first query can no longer attend to, nor any later one:
        a sliding layer keeps its last `sliding_window - 1` entries, and its freed slots take the step."""
        oldest_hidden = self.query_pos[:, :1, None] - self.sliding_window
        self.pos.masked_fill_(self.pos <= oldest_hidden, -1)

    def hold_window(self):
        """End of prefill on a sliding layer: keep only its last `sliding_window - 1` slots, all that the
        next query can attend to (the method does not compress it)."""
        size = self.pos.shape[-1]
        keep = min(size, self.sliding_window - 1)
        if keep < size:  # copies, so that the prompt's storage is released
            self.keys = self.keys[:, :, size - keep:].clone()
            self.values = self.values[:, :, size - keep:].clone()
            self.pos = self.pos[:, :, size - keep:].clone()
        self.query_pos = None
        self.head_counts = [[min(c, keep) for c in row] for row in self.head_counts]
        self.head_prefix = [[max(c - self.cache.window, 0) for c in row] for row in self.head_counts]

    def _segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [T, D], values [T, D], positions [T], offsets [B*Hkv + 1]): the layer as segments, one per
        (row, KV head), for the decode ops; the padded storage viewed flat, the ragged one as it is."""
        if self.ragged:
            return self.keys, self.values, self.pos_flat, self.offsets
        d = self.keys.shape[-1]
        return self.keys.view(-1, d), self.values.view(-1, d), self.pos.view(-1), self.offsets

    def _flat_order(self) -> torch.Tensor | None:
        return None if self.order is None else self.order.view(-1)

    def _padded_offsets(self) -> torch.Tensor:
        """Segment starts of the padded storage viewed flat (rebuilt only when its shape changes)."""
        b, h, m = self.pos.shape
        if self.offsets is None or self.offsets.shape[0] != b * h + 1 or self._padded_slots != m:
            self.offsets = torch.arange(b * h + 1, device=self.pos.device) * m
            self._padded_slots = m
        return self.offsets

    def start_eviction_order(self):
        """Decode-time eviction reads each segment's entries in position order: built once here, then kept
        by the decode ops. While the layer still holds prefill scores (`indicator`, the official CAKE order),
        the entries with a finite score come first by descending score, then the rest by position, as the
        official storage is."""
        if not self.ragged:
            self._padded_offsets()
        _, _, pos, offsets = self._segments()
        ranks = None
        if self.indicator is not None:
            indicator = self.indicator.reshape(-1)
            ranks = torch.where(torch.isfinite(indicator) & (pos >= 0), -indicator, float("nan"))
        order = _ops.position_order(pos, offsets, ranks)
        self.order = order if self.ragged else order.view(self.pos.shape)

    def _advance_positions(self, q: int):
        """The step's query positions (written in place) and the rows' next positions."""
        self.query_pos.copy_(self.next_pos[:, None] + torch.arange(q, device=self.next_pos.device))
        self.next_pos += q
        if self.over_t is not None:
            self.over_t += q

    # ---- host side of a step (outside any captured graph) ---------------------------------------
    @property
    def grows(self) -> bool:
        """Whether the storage grows with the sequence: no decode-time cap and no sliding window."""
        return self.head_caps is None and self.sliding_window is None

    def room(self) -> int:
        """Free slots of the fullest (row, head) of this layer (host counters)."""
        counts = [c for row in self.head_counts for c in row]
        caps = self.seg_caps if self.ragged else [self.pos.shape[-1]] * len(counts)
        return min(cap - c for cap, c in zip(caps, counts))

    def prepare_step(self, q: int, spare: int | None = None) -> tuple:
        """Before a step of `q` tokens: make room for them (the only reallocation), size the query
        positions and decide how many entries eviction drops. A layer without decode caps grows when it
        cannot hold the step, by `spare` more slots (default: 1/8 of its size, see `grown_capacity`); given
        `spare` by the cache, it also grows when it could not hold `spare` more. A sliding layer is
        bounded by its window instead (`_make_sliding_room`). Returns what a captured step depends on."""
        counts = [c for row in self.head_counts for c in row]
        if self.sliding_window is not None:
            self._make_sliding_room(q, counts)
        else:
            needed = q  # free slots below which this layer grows
            if spare is None:
                spare = grown_capacity(max(counts) + q) - max(counts) - q
            elif self.head_caps is None:
                needed = q + spare  # the cache grows its layers together
            reserve = q if self.head_caps is not None else q + spare  # capped layers evict a slot per token
            if self.room() < needed:
                if self.ragged:
                    self._repack([max(cap, c + reserve) for cap, c in zip(self.seg_caps, counts)])
                else:
                    self._ensure_room(max(counts) + reserve)
        if not self.ragged:
            self._padded_offsets()
        if self.query_pos is None or self.query_pos.shape[1] != q or self.query_pos._base is not None:
            self.query_pos = self.next_pos.new_empty(self.next_pos.shape[0], q)
        self.step_evict = 0
        if self.head_caps is not None:
            caps = [c for row in self.head_caps for c in row]
            self.step_evict = max(c + q - cap for c, cap in zip(counts, caps))
        return (self.ragged, self.keys.data_ptr(), tuple(self.keys.shape), self.step_evict)

    def _make_sliding_room(self, q: int, counts: list[int]):
        """A sliding layer's step frees all but its last `sliding_window - 1` entries before it appends, so
        `sliding_window - 1 + q` slots always suffice: it grows with spare room up to that, never past it."""
        held = max(min(c, self.sliding_window - 1) for c in counts)
        if self.pos.shape[-1] < held + q:
            self._ensure_room(min(grown_capacity(held + q), self.sliding_window - 1 + q))

    def finish_step(self, q: int):
        """After a step: the host counters follow what the device did (a sliding layer kept its last
        `sliding_window - 1` entries, then appended: its entries are always the row's latest tokens)."""
        if self.sliding_window is not None:
            self.head_counts = [[min(c, self.sliding_window - 1) + q for c in row] for row in self.head_counts]
        else:
            self.head_counts = [[c + q for c in row] for row in self.head_counts]
        if self.step_evict > 0:
            self.head_counts = [[min(c, cap) for c, cap in zip(cs, caps)]
                                for cs, caps in zip(self.head_counts, self.head_caps)]
        self.seen += q

    def _ensure_room(self, needed: int):
        """At least `needed` slots per (row, head) of the padded storage."""
        size = self.pos.shape[-1]
        if needed <= size:
            return
        grow = needed - size
        b, h, _, d = self.keys.shape
        self.keys = torch.cat([self.keys, self.keys.new_zeros(b, h, grow, d)], 2)
        self.values = torch.cat([self.values, self.values.new_zeros(b, h, grow, d)], 2)
        self.pos = torch.cat([self.pos, self.pos.new_full((b, h, grow), -1)], 2)
        if self.order is not None:  # slots keep their numbers: the order stays exact
            self.order = torch.cat([self.order, self.order.new_zeros(b, h, grow)], 2)

    # ---- ragged storage ------------------------------------------------------------------------
    def _segment_ids(self, caps_t: torch.Tensor, total: int) -> torch.Tensor:
        """[total] segment of each slot of a layout with capacities `caps_t` (no host sync)."""
        return torch.repeat_interleave(torch.arange(caps_t.shape[0], device=caps_t.device), caps_t,
                                       output_size=total)

    def _set_layout(self, seg_caps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        self.seg_caps = list(seg_caps)
        caps_t = torch.tensor(seg_caps, dtype=torch.long, device=self.device)
        self.seg_caps_t = caps_t
        self.offsets = torch.nn.functional.pad(caps_t.cumsum(0), (1, 0))
        return caps_t, self._segment_ids(caps_t, sum(seg_caps))

    def to_ragged(self):
        """Switch from the padded storage to the ragged one, each segment holding exactly its entries."""
        b, h, m, _ = self.keys.shape
        counts = [c for row in self.head_counts for c in row]
        caps_t, seg = self._set_layout(counts)
        # Stored entries of each (row, head) first, in slot order (empty slots are pos = -1).
        order = torch.sort((self.pos < 0).to(torch.int8).view(b * h, m), dim=-1, stable=True).indices
        within = torch.arange(seg.shape[0], device=self.device) - self.offsets[seg]
        idx = order[seg, within]
        self.keys, self.values = _ops.gather_ragged(self.keys, self.values, idx, self.offsets)
        self.pos_flat = self.pos.view(b * h, m)[seg, idx]
        if self.indicator is not None:  # kept for an official CAKE eviction order only
            self.indicator = self.indicator.view(b * h, m)[seg, idx]
        self.batch_heads = (b, h)
        self.pos = None
        self.ragged = True

    def _repack(self, seg_caps: list[int]):
        """New capacities per segment (each >= the old one); one copy of the stored slots."""
        old_offsets, old_caps = self.offsets, self.seg_caps_t
        _, seg = self._set_layout(seg_caps)
        within = torch.arange(seg.shape[0], device=self.device) - self.offsets[seg]
        valid = within < old_caps[seg]
        src = torch.where(valid, old_offsets[seg] + within, 0)
        self.keys = self.keys.index_select(0, src)
        self.values = self.values.index_select(0, src)
        self.pos_flat = torch.where(valid, self.pos_flat.index_select(0, src), -1)
        if self.order is not None:  # slots keep their numbers within their segment
            self.order = torch.where(valid, self.order.index_select(0, src), 0)

    def padded_pos(self) -> torch.Tensor:
        """[B, Hkv, M] positions of the stored slots (-1 = empty), whatever the storage."""
        if not self.ragged:
            return self.pos
        b, h = self.batch_heads
        cmax = max(self.seg_caps)
        ar = torch.arange(cmax, device=self.device)
        valid = ar < self.seg_caps_t[:, None]
        idx = torch.where(valid, self.offsets[:-1, None] + ar, 0)
        return torch.where(valid, self.pos_flat[idx], -1).view(b, h, cmax)

    def stored_bytes(self) -> int:
        order = 0 if self.order is None else self.order.nbytes
        if self.ragged:
            return self.keys.nbytes + self.values.nbytes + self.pos_flat.nbytes + self.offsets.nbytes + order
        return self.keys.nbytes + self.values.nbytes + self.pos.nbytes + order

    def visibility(self) -> torch.Tensor:
        """[B, Hkv, q, M] bool: which stored entries each current query may attend to."""
        pos, query_pos = self.pos[:, :, None, :], self.query_pos[:, None, :, None]
        visible = (pos >= 0) & (pos <= query_pos)
        if self.sliding_window is not None:
            visible &= pos > query_pos - self.sliding_window
        return visible

    # ---- eviction ------------------------------------------------------------------------------
    def keep_top(self, prefix_budgets):
        """Keep, per row, the `prefix_budgets[b]` candidates with the highest indicator plus the window
        (the last `window` slots). A row's budget is an int (every head) or a list of per-head ints.
        Nested: a budget above what a head holds keeps what it holds."""
        heads = self.pos.shape[1]
        wanted = [[w] * heads if isinstance(w, int) else list(w) for w in prefix_budgets]
        new = [[min(w, h) for w, h in zip(ws, hs)] for ws, hs in zip(wanted, self.head_prefix)]
        self.head_budgets = [[n + (c - p) for n, c, p in zip(ns, cs, ps)]
                             for ns, cs, ps in zip(new, self.head_counts, self.head_prefix)]
        if new == self.head_prefix:
            return
        b, h, size = self.pos.shape
        window = min(self.cache.window, size)
        kmax = max(max(row) for row in new)
        device = self.pos.device
        # Stable sort: ties (common after max pooling) go to the earlier position, so a row's choice
        # does not depend on its padding within a batch.
        top = torch.sort(self.indicator[..., : size - window], dim=-1, descending=True, stable=True).indices[..., :kmax]
        keep = torch.arange(kmax, device=device) < torch.tensor(new, device=device)[:, :, None]
        chosen = torch.where(keep, top, -1).sort(-1).values  # empty (-1) first, then position order
        win = torch.arange(size - window, size, device=device).expand(b, h, window)
        idx = torch.cat([chosen, win], -1)
        safe = idx.clamp(min=0)
        self.keys, self.values = _ops.gather_kept(self.keys, self.values, safe)
        self.pos = torch.where(idx >= 0, self.pos.gather(-1, safe), -1)
        self.indicator = torch.where(idx >= 0, self.indicator.gather(-1, safe), float("-inf"))
        self.head_counts = [[c - p + n for c, p, n in zip(cs, ps, ns)]
                            for cs, ps, ns in zip(self.head_counts, self.head_prefix, new)]
        self.head_prefix = new

    def attend(self, query: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
        """Decode attention [B, q, H, D] of the step's queries over the stored entries. A step that evicts
        (decided on the host by `prepare_step`) runs the segment kernel for both layouts and keeps its
        attention weights for `evict_to_caps`, so that the keys are read once; a padded layer that does not
        evict uses SDPA with a visibility mask. `softcap`: the model's logit soft-capping, applied by both."""
        if self.ragged or self.step_evict > 0:
            keys, values, pos, offsets = self._segments()
            if self.step_evict > 0:
                out, self.step_weights = _ops.ragged_attention_with_weights(query, keys, values, pos, offsets,
                                                                            self.query_pos, scale, softcap)
            else:
                out = _ops.ragged_attention(query, keys, values, pos, offsets, self.query_pos, scale, softcap)
            return out.transpose(1, 2).contiguous()
        return masked_attention(query, self.keys, self.values, self.visibility(), scale, softcap)

    def evict_to_caps(self, method: Method):
        """Decode-time eviction after `attend`: rows above their cap drop their lowest-scoring entries (the
        last `window` positions are protected), in place; the freed slots take the next tokens."""
        if self.step_evict <= 0:
            return
        _, _, pos, offsets = self._segments()
        kernel_size, pooling = method.pooling
        weights, self.step_weights = self.step_weights, None
        _ops.evict_lowest(weights, pos, self._flat_order(), offsets, self.query_pos, self.over_t,
                          method.decode_variance_weight, self.cache.window, kernel_size, pooling, self.step_evict,
                          method.decode_score_order)


class PromptInfo:
    """Padding of the prompt of a prefill: real-token positions (-1 on padding) and lengths."""

    def __init__(self, attention_mask: torch.Tensor | None, batch: int, length: int, device):
        if attention_mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask: cakekv needs the 2-D padding mask [batch, length], "
                                 f"got shape {tuple(attention_mask.shape)}")
            mask = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
            if length > 0 and not bool(mask[:, -1].all()):
                raise ValueError("attention_mask: rows end with padding; cakekv needs left padding "
                                 "(tokenizer.padding_side = 'left')")
        self.positions = torch.where(mask, mask.long().cumsum(-1) - 1, -1)
        self.lengths = mask.sum(-1)
        self.host_lengths = self.lengths.tolist()


class CompressedCache(Cache):
    """One CompressedLayer per decoder layer; the attention hook (patch.py) calls it after each layer's
    attention, and it carries out the decisions of its `Eviction` (eviction.py)."""

    ragged_layers = True  # switch layers with per-head counts to the ragged storage after prefill
    ragged_devices = ("cpu", "cuda")  # devices with gather_ragged / ragged_attention kernels

    def __init__(self, method: Method, window: int, sliding_windows: list[int | None]):
        super().__init__(layers=[CompressedLayer(self, i, sw) for i, sw in enumerate(sliding_windows)])
        self.method = method
        method.num_layers = len(self.global_layers)  # the method's budgets cover the layers it compresses
        self.window = window
        self.eviction = Eviction(method, window)
        self.prompt: PromptInfo | None = None
        self.step_graph = None  # the captured decode step (step_graph.StepGraph), on CUDA

    @property
    def global_layers(self) -> list[CompressedLayer]:
        """The layers the method scores, budgets and compresses: those without a sliding window (a sliding
        layer holds its window, see `CompressedLayer.hold_window`)."""
        return [layer for layer in self.layers if layer.sliding_window is None]

    @property
    def is_fresh(self) -> bool:
        return not self.layers[0].is_initialized

    def begin_prefill(self, attention_mask, batch: int, length: int, device):
        self.prompt = PromptInfo(attention_mask, batch, length, device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def prepare_step(self, q: int) -> tuple:
        """Host side of a step of `q` tokens over the compressed layers, before it runs; the result keys
        a captured step (it changes when storage is reallocated or eviction counts change). When one
        growing layer is full, every growing layer short of the same spare grows with it, so that they
        fill up together again and a captured step is re-captured rarely (sliding and capped layers are
        bounded: they do not take part)."""
        spare = 0  # nobody must grow: nobody does
        growing = [layer for layer in self.layers if layer.grows]
        if any(layer.room() < q for layer in growing):
            largest = max(max(c for row in layer.head_counts for c in row) for layer in growing)
            spare = grown_capacity(largest + q) - largest - q
        return tuple(layer.prepare_step(q, spare) for layer in self.layers)

    def finish_step(self, q: int) -> None:
        for layer in self.layers:
            layer.finish_step(q)

    # ---- called by the attention hook; the decisions are eviction.py's --------------------------
    def after_prefill(self, layer_idx: int, query: torch.Tensor, scale: float, module,
                      softcap: float | None = None) -> None:
        """After layer `layer_idx`'s prefill attention: a global layer is scored and the global layers seen so
        far re-cut (`Eviction.score_and_recut`); a sliding layer is not scored: it drops what its window no
        longer reaches. After the last layer the prefill is finished."""
        layer = self.layers[layer_idx]
        layer.prefilling = False
        method = self.method
        compress_rows = [method.compresses_prompt(n) for n in self.prompt.host_lengths]
        if layer.sliding_window is not None:
            layer.hold_window()
        elif method.compresses and any(compress_rows):
            self.eviction.score_and_recut(self, layer, query, scale, module, softcap, compress_rows)
        if layer_idx == len(self.layers) - 1:
            self._finish_prefill(compress_rows)

    def _finish_prefill(self, compress_rows: list[bool]):
        """Decode caps set, layers with per-head counts switched to the ragged storage, and the order decode
        eviction reads started."""
        by_score = self.method.decode_score_order
        for layer in self.layers:
            self.eviction.set_decode_caps(layer, compress_rows)
            if layer.head_caps is not None and by_score and layer.indicator is not None:
                # the official order ranks the kept prefix of the rows compressed at prefill
                rows = torch.tensor(compress_rows, device=layer.indicator.device)[:, None, None]
                layer.indicator = torch.where(rows, layer.indicator, float("-inf"))
            else:
                layer.indicator = None  # prefill scores are done with
            if (self.ragged_layers and layer.sliding_window is None
                    and layer.keys.device.type in self.ragged_devices
                    and any(len(set(row)) > 1 for row in layer.head_counts)):
                layer.to_ragged()
            if layer.head_caps is not None:
                layer.start_eviction_order()
            layer.indicator = None
        self.eviction.preferences = []

    def after_decode(self, layer_idx: int) -> None:
        self.eviction.decode_layer(self.layers[layer_idx])

    def clone(self) -> "CompressedCache":
        """An independent copy (no tensor shared): several questions can continue from one compressed
        context, each from its own copy, without re-reading the context. The copy captures its own decode
        step (a captured step is tied to its cache's tensors)."""
        if any(layer.prefilling for layer in self.layers):
            raise RuntimeError("cache: cannot clone a cache in the middle of its prefill")
        twin = copy.copy(self)
        twin.layers = [layer._cloned(twin) for layer in self.layers]
        twin.eviction = Eviction(self.method, self.window)
        twin.step_graph = None
        return twin

    # ---- reporting -----------------------------------------------------------------------------
    def layer_stats(self) -> list[dict]:
        out = []
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            b, h = layer.batch_heads if layer.ragged else layer.keys.shape[:2]
            d = layer.keys.shape[-1]
            entry_bytes = 2 * d * layer.keys.element_size()
            out.append({
                "layer": layer.layer_idx,
                "budget": layer._mean_per_row(layer.head_budgets),
                "kept": layer._mean_per_row(layer.head_counts),
                "budget_per_head": [None if b is None else list(b) for b in layer.head_budgets],
                "kept_per_head": [list(c) for c in layer.head_counts],
                "bytes_before": b * h * layer.seen * entry_bytes,
                "bytes_after": layer.stored_bytes(),
                "bytes_kept": sum(map(sum, layer.head_counts)) * entry_bytes,
                "tokens": layer.next_pos.tolist(),  # per row: tokens seen, padding excluded
                "entry_bytes": entry_bytes,         # K and V of one entry of one KV head
                "ragged": layer.ragged,
            })
        return out
