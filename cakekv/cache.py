"""The compressed KV cache (docs/cache.md): a transformers Cache whose layers hold different numbers of entries.

Every stored entry carries its logical position (`pos`, -1 = empty slot). Visibility is one rule,
`0 <= key position <= query position`, so padding, causality after compression and free slots need
no other bookkeeping. A layer's entries live in its `storage` (storage.py), padded or ragged, one interface;
the layer does the rest:
  * prefill, on the padded storage: the prompt is stored, the method's cuts keep, per (row, KV head),
    [left padding | kept prefix in position order | window] (`keep_top`), and a layer whose KV heads end
    with different numbers of entries switches to the ragged storage once (`to_ragged`); a chunked prefill stores
    each later chunk after the entries kept so far (`_store_chunk`) and cuts again, before that switch;
  * decoding: the host side of a step (`prepare_step`: room, reallocation, how many entries to evict;
    `finish_step`: counters) runs outside the step; the device side (`_append`, `attend`, `evict_to_caps`)
    writes new entries into free slots and frees evicted ones (pos = -1) in place, so a layer stays at a
    fixed capacity and the step can be captured as a CUDA graph.
Host-side counters (`head_counts`, `head_caps`) are plain ints, so the decode step never syncs with the device.

Sliding-window layers are not compressed by the method (its budgets cover the global layers): such a
layer holds what its queries can still attend to, in the padded storage. At the end of prefill it keeps its
last `sliding_window - 1` tokens; a step first frees the entries out of the window of its first query, then
appends, so the layer stores at most `sliding_window - 1 + q` entries.
"""
from __future__ import annotations

import copy
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import _ops
from .eviction import Eviction
from .methods.base import Method
from .storage import PaddedStorage, RaggedStorage, cloned, trailing_causal_attention

_GROW_MIN, _GROW_MAX = 16, 256  # spare slots a full layer without a cap gets: 1/8 of its size, clamped


def grown_capacity(needed: int) -> int:
    """Capacity of an uncapped layer (or segment) that needs `needed` slots: spare room for the next
    appends so that growing copies the cache rarely, while the spare stays a small fraction of it."""
    return needed + min(_GROW_MAX, max(_GROW_MIN, needed // 8))


class CompressedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "CompressedCache", layer_idx: int, sliding_window: int | None = None):
        # not CacheLayerMixin.__init__: `keys` and `values` are the storage's (read-only properties)
        self.is_initialized = False
        self._cache = weakref.ref(cache)  # the cache owns its layers: no cycle, freed when its last user lets go
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window                # attention span of a sliding-window layer
        self.storage: PaddedStorage | RaggedStorage | None = None  # the entries (storage.py)
        self.next_pos: torch.Tensor | None = None     # [B] position of the next token of each row
        self.query_pos: torch.Tensor | None = None    # [B, q] positions of the current forward's queries
        self.indicator: torch.Tensor | None = None    # prefill scores aligned with the storage's slots
        # Per (row, KV head): heads of a layer may hold different numbers of entries (per-head budgets);
        # the padded storage pads them to the longest head with empty slots (pos = -1).
        self.head_counts: list[list[int]] = []        # stored entries
        self.head_prefix: list[list[int]] = []        # of which before the window (prefill only)
        self.head_caps: list[list[int]] | None = None  # decode-time cap (None: no eviction)
        self.head_budgets: list[list[int] | None] = []  # entries given (None: row not compressed)
        self.over_t: torch.Tensor | None = None       # device mirror of head_counts - head_caps (decode)
        self.step_evict = 0                           # entries the current step evicts per head (host)
        self.step_weights: torch.Tensor | None = None  # attention weights of an evicting step, attend -> evict
        self.seen = 0                                 # logical length (padded prompt + appended)
        self.prefilling = False

    @property
    def keys(self) -> torch.Tensor | None:
        """The stored keys, in the storage's layout ([B, Hkv, M, D] padded, [C, D] ragged)."""
        return None if self.storage is None else self.storage.keys

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.storage is None else self.storage.values

    @property
    def ragged(self) -> bool:
        """Whether the layer holds the ragged storage (switched after prefill, see `to_ragged`)."""
        return isinstance(self.storage, RaggedStorage)

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
        if self.prefilling:
            return self._store_chunk(key_states, value_states)
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
        twin = cloned(self)
        twin._cache = weakref.ref(cache)
        return twin

    # ---- prefill: the padded storage ------------------------------------------------------------
    def _store_prompt(self, keys, values):
        self.lazy_initialization(keys, values)
        prompt = self.cache.prompt
        b, h, n, _ = keys.shape
        pos = prompt.positions.to(keys.device)[:, None, :].expand(b, h, n).contiguous()
        self.storage = PaddedStorage(keys.contiguous(), values.contiguous(), pos)
        self.query_pos = pos[:, 0, :]
        self.next_pos = prompt.lengths.to(keys.device).clone()
        self.head_counts = [[c] * h for c in prompt.host_lengths]
        self.head_prefix = [[max(c - self.cache.held_window, 0)] * h for c in prompt.host_lengths]
        self.head_budgets = [None] * b
        self.seen = n
        self.prefilling = True
        return self.keys, self.values

    def _store_chunk(self, keys, values):
        """A later chunk of a chunked prefill (no padding: `CompressedCache.begin_chunk`), stored after what the layer
        kept so far, at the rows' next positions. Everything held before becomes a candidate again, the chunk's last
        `window` tokens are the new window: the layer is then scored and cut as a prompt is."""
        b, h, q, _ = keys.shape
        self.query_pos = self.next_pos[:, None] + torch.arange(q, device=self.next_pos.device)
        held = self.storage
        pos = torch.cat([held.pos, self.query_pos[:, None, :].expand(b, h, q)], 2)
        self.storage = PaddedStorage(torch.cat([held.keys, keys], 2), torch.cat([held.values, values], 2), pos)
        self.next_pos = self.next_pos + q
        self.head_counts = [[c + q for c in row] for row in self.head_counts]
        self.head_prefix = [[c - self.cache.held_window for c in row] for row in self.head_counts]
        self.seen += q
        return self.keys, self.values

    def hold_window(self):
        """End of prefill on a sliding layer: keep only its last `sliding_window - 1` slots, all that the
        next query can attend to (the method does not compress it)."""
        kept = self.storage
        size = kept.pos.shape[-1]
        keep = min(size, self.sliding_window - 1 + self.cache.probes)  # the probes leave after the chunk
        if keep < size:  # copies, so that the prompt's storage is released
            self.storage = PaddedStorage(kept.keys[:, :, size - keep:].clone(), kept.values[:, :, size - keep:].clone(),
                                         kept.pos[:, :, size - keep:].clone())
        self.query_pos = None
        self.head_counts = [[min(c, keep) for c in row] for row in self.head_counts]
        self.head_prefix = [[max(c - self.cache.window, 0) for c in row] for row in self.head_counts]

    def drop_window_probes(self, probes: int) -> None:
        """End of a chunk that a chunked prefill's probes scored: the last `probes` slots of every head (the window
        after `keep_top` or `hold_window`) leave, and the layer continues from the chunk's end."""
        if probes == 0:
            return
        held = self.storage
        self.storage = PaddedStorage(held.keys[:, :, :-probes], held.values[:, :, :-probes], held.pos[:, :, :-probes])
        self.next_pos = self.next_pos - probes
        self.seen -= probes
        self.head_counts = [[c - probes for c in row] for row in self.head_counts]
        self.head_prefix = [[min(p, c) for p, c in zip(ps, cs)] for ps, cs in zip(self.head_prefix, self.head_counts)]
        self.query_pos = None

    def keep_top(self, prefix_budgets):
        """Keep, per row, the `prefix_budgets[b]` candidates with the highest indicator plus the window (the last
        `CompressedCache.held_window` slots). A row's budget is an int (every head) or a list of per-head ints.
        Nested: a budget above what a head holds keeps what it holds."""
        pos = self.storage.pos
        heads = pos.shape[1]
        wanted = [[w] * heads if isinstance(w, int) else list(w) for w in prefix_budgets]
        new = [[min(w, h) for w, h in zip(ws, hs)] for ws, hs in zip(wanted, self.head_prefix)]
        self.head_budgets = [[n + (c - p) for n, c, p in zip(ns, cs, ps)]
                             for ns, cs, ps in zip(new, self.head_counts, self.head_prefix)]
        if new == self.head_prefix:
            return
        b, h, size = pos.shape
        window = min(self.cache.held_window, size)
        kmax = max(max(row) for row in new)
        device = pos.device
        # Stable sort: ties (common after max pooling) go to the earlier position, so a row's choice
        # does not depend on its padding within a batch.
        top = torch.sort(self.indicator[..., : size - window], dim=-1, descending=True, stable=True).indices[..., :kmax]
        keep = torch.arange(kmax, device=device) < torch.tensor(new, device=device)[:, :, None]
        chosen = torch.where(keep, top, -1).sort(-1).values  # empty (-1) first, then position order
        win = torch.arange(size - window, size, device=device).expand(b, h, window)
        idx = torch.cat([chosen, win], -1)
        safe = idx.clamp(min=0)
        keys, values = _ops.gather_kept(self.keys, self.values, safe)
        self.storage = PaddedStorage(keys, values, torch.where(idx >= 0, pos.gather(-1, safe), -1))
        self.indicator = torch.where(idx >= 0, self.indicator.gather(-1, safe), float("-inf"))
        self.head_counts = [[c - p + n for c, p, n in zip(cs, ps, ns)]
                            for cs, ps, ns in zip(self.head_counts, self.head_prefix, new)]
        self.head_prefix = new

    def to_ragged(self):
        """Switch from the padded storage to the ragged one, each segment holding exactly its entries (the
        prefill scores, kept for an official CAKE eviction order only, follow them)."""
        counts = [c for row in self.head_counts for c in row]
        self.storage, slots = RaggedStorage.from_padded(self.storage, counts)
        if self.indicator is not None:
            self.indicator = self.indicator.view(len(counts), -1)[slots]

    def start_eviction_order(self):
        """Decode-time eviction reads each segment's entries in position order: built once here, then kept
        by the decode ops. While the layer still holds prefill scores (`indicator`, the official CAKE order),
        the entries with a finite score come first by descending score, then the rest by position, as the
        official storage is."""
        ranks = None
        if self.indicator is not None:
            _, _, pos, _ = self.storage.segments()
            indicator = self.indicator.reshape(-1)
            ranks = torch.where(torch.isfinite(indicator) & (pos >= 0), -indicator, float("nan"))
        self.storage.start_order(ranks)

    # ---- a decode step on the device (capturable: no host reads) ---------------------------------
    def _append(self, keys, values):
        """Write the step's tokens into free slots, on the device only: the room was made and the host
        counters are kept by `prepare_step` / `finish_step`, so a step can be captured as a CUDA graph."""
        self._advance_positions(keys.shape[2])
        if self.sliding_window is not None:
            self._free_out_of_window()
        self.storage.append(keys, values, self.query_pos)
        return self.keys, self.values

    def _advance_positions(self, q: int):
        """The step's query positions (written in place) and the rows' next positions."""
        self.query_pos.copy_(self.next_pos[:, None] + torch.arange(q, device=self.next_pos.device))
        self.next_pos += q
        if self.over_t is not None:
            self.over_t += q

    def _free_out_of_window(self):
        """Free (pos = -1) the entries the step's first query can no longer attend to, nor any later one:
        a sliding layer (padded storage) keeps its last `sliding_window - 1` entries, and its freed slots
        take the step."""
        oldest_hidden = self.query_pos[:, :1, None] - self.sliding_window
        pos = self.storage.pos
        pos.masked_fill_(pos <= oldest_hidden, -1)

    def attend(self, query: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
        """Decode attention [B, q, H, D] of the step's queries over the stored entries. A step that evicts
        (decided on the host by `prepare_step`) runs the segment kernel for both layouts and keeps the attention
        weights of its ranking queries (`ranking_queries`) for `evict_to_caps`, so that the keys are read once for
        a decode step; otherwise the storage attends
        (padded: SDPA with a visibility mask; ragged: the segment kernel). `softcap`: the model's logit
        soft-capping, applied by all."""
        if self.step_evict > 0:
            ranked = self.ranking_queries(query.shape[2])
            if ranked == query.shape[2]:
                out, self.step_weights = self.storage.attend_with_weights(query, self.query_pos, scale, softcap)
                return out
            _, self.step_weights = self.storage.attend_with_weights(query[:, :, -ranked:], self.query_pos[:, -ranked:],
                                                                    scale, softcap)
        return self.storage.attend(query, self.query_pos, scale, softcap, self.sliding_window)

    def attend_chunk(self, query: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
        """Attention [B, q, H, D] of a later chunk of a chunked prefill over what the layer kept and the chunk itself
        (stored last by `_store_chunk`). Every kept entry precedes the chunk, so where every head of every row holds
        as many entries (no empty slot) and there is neither a sliding window nor soft-capping, that is SDPA's
        lower-right causal bias, without a mask (flash attention on the GPU); otherwise `attend`'s masked one."""
        width = self.storage.pos.shape[-1]
        if self.sliding_window is None and softcap is None and all(c == width for row in self.head_counts for c in row):
            return trailing_causal_attention(query, self.keys, self.values, scale)
        return self.attend(query, scale, softcap)

    def ranking_queries(self, q: int) -> int:
        """How many of a step's last queries rank its eviction: all of a decode step or a short chunk, the last
        `window` of a longer chunk (its observation window, as at prefill). Their attention weights are [queries x
        every entry]: ranking by all of a 40K-token chunk's queries would ask for hundreds of GiB."""
        return min(q, self.cache.window)

    def evict_to_caps(self, method: Method):
        """Decode-time eviction after `attend`: rows above their cap drop their lowest-scoring entries (the
        last `window` positions are protected), in place; the freed slots take the next tokens."""
        if self.step_evict <= 0:
            return
        kernel_size, pooling = method.pooling
        weights, self.step_weights = self.step_weights, None
        ranked = self.ranking_queries(self.query_pos.shape[1])
        self.storage.evict(weights, self.query_pos[:, -ranked:], self.over_t, method.decode_variance_weight,
                           self.cache.window, kernel_size, pooling, self.step_evict, method.decode_score_order)

    # ---- host side of a step (outside any captured graph) ---------------------------------------
    @property
    def grows(self) -> bool:
        """Whether the storage grows with the sequence: no decode-time cap and no sliding window."""
        return self.head_caps is None and self.sliding_window is None

    def room(self) -> int:
        """Free slots of the fullest (row, head) of this layer (host counters)."""
        counts = [c for row in self.head_counts for c in row]
        return min(cap - c for cap, c in zip(self.storage.capacities, counts))

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
                self.storage.grow([max(cap, c + reserve) for cap, c in zip(self.storage.capacities, counts)])
        if self.query_pos is None or self.query_pos.shape[1] != q or self.query_pos._base is not None:
            self.query_pos = self.next_pos.new_empty(self.next_pos.shape[0], q)
        self.step_evict = 0
        if self.head_caps is not None:
            caps = [c for row in self.head_caps for c in row]
            self.step_evict = max(c + q - cap for c, cap in zip(counts, caps))
        return (self.ragged, tuple(self.keys.shape), self.step_evict, *self.step_addresses())

    def step_addresses(self) -> tuple[int, ...]:
        """Device addresses of every tensor of this layer a decode step reads or writes (storage, positions,
        eviction counters): part of a captured step's key, so that a step never replays over a tensor that was
        reallocated (the step's query positions are, whenever a chunk of another length ran in between)."""
        own = (self.query_pos, self.next_pos, self.over_t)
        return self.storage.addresses() + tuple(t.data_ptr() for t in own if t is not None)

    def _make_sliding_room(self, q: int, counts: list[int]):
        """A sliding layer's step frees all but its last `sliding_window - 1` entries before it appends, so
        `sliding_window - 1 + q` slots always suffice: it grows with spare room up to that, never past it."""
        held = max(min(c, self.sliding_window - 1) for c in counts)
        if min(self.storage.capacities) < held + q:
            self.storage.grow([min(grown_capacity(held + q), self.sliding_window - 1 + q)] * len(counts))

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

    def extend(self, q: int) -> None:
        """The next chunk of a chunked prefill: `q` more real tokens in every row."""
        self.lengths = self.lengths + q
        self.host_lengths = [n + q for n in self.host_lengths]


class CompressedCache(Cache):
    """One CompressedLayer per decoder layer; the attention hook (patch.py) calls it after each layer's
    attention, and it carries out the decisions of its `Eviction` (eviction.py)."""

    ragged_layers = True  # switch layers with per-head counts to the ragged storage after prefill
    ragged_devices = ("cpu", "cuda")  # devices with gather_ragged / ragged_attention kernels

    def __init__(self, method: Method, window: int, sliding_windows: list[int | None]):
        super().__init__(layers=[CompressedLayer(self, i, sw) for i, sw in enumerate(sliding_windows)])
        # Its own copy of the method: methods may keep per-prefill state (the official modes' scores), and
        # several generations of one handle may run at once (threads).
        self.method = method = copy.copy(method)
        method.num_layers = len(self.global_layers)  # the method's budgets cover the layers it compresses
        self.window = window
        self.eviction = Eviction(method, window)
        self.prompt: PromptInfo | None = None
        self.more_chunks = False  # a chunked prefill has chunks after the one in progress
        self.probes = 0  # the chunk in progress ends with that many tokens of the prompt's end (chunked prefill)
        self.step_graph = None  # the captured decode step (step_graph.StepGraph), on CUDA
        self.step_tokens: int | None = None  # tokens of the step prepared by `prepare_step` (None: no step)
        self.reread = None  # the re-read in progress (reconstruction.Reread)

    @property
    def global_layers(self) -> list[CompressedLayer]:
        """The layers the method scores, budgets and compresses: those without a sliding window (a sliding
        layer holds its window, see `CompressedLayer.hold_window`)."""
        return [layer for layer in self.layers if layer.sliding_window is None]

    @property
    def held_window(self) -> int:
        """The last slots of every layer that a cut keeps and does not rank: the window; in a chunk followed by more,
        its probes and before them the chunk's own last `window` tokens, ranked by the next chunk, where the tokens
        after them are (a fact cut in two by a chunk's end keeps both halves)."""
        return self.window + self.probes

    @property
    def is_fresh(self) -> bool:
        return not self.layers[0].is_initialized

    def begin_prefill(self, attention_mask, batch: int, length: int, device, more_chunks: bool = False,
                      probes: int = 0):
        """The prompt, or the first chunk of a chunked prefill (`more_chunks`: the cut prefill is continued by
        `begin_chunk` instead of finished). `probes`: a chunk followed by more ends with that many tokens of the
        prompt's end (the window that scores it), dropped once it is cut (`_end_chunk`)."""
        self.prompt = PromptInfo(attention_mask, batch, length, device)
        self.more_chunks = more_chunks
        self.probes = probes

    def begin_chunk(self, q: int, more_chunks: bool, probes: int = 0) -> None:
        """A later chunk of a chunked prefill, `q` real tokens in every row (its `probes` included, as for
        `begin_prefill`): each layer stores it after its cut entries (`CompressedLayer._store_chunk`), the chunk
        attends over both, and the layers are scored and cut again by `after_prefill`, as for a prompt."""
        self.prompt.extend(q)
        self.more_chunks = more_chunks
        self.probes = probes
        for layer in self.layers:
            layer.prefilling = True

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.reread is not None:  # a chunk of the prompt's re-read: attends, never stored
            return key_states, value_states
        layer = self.layers[layer_idx]
        if layer.is_initialized and not layer.prefilling and self.step_tokens is None:
            raise RuntimeError("cache: this CompressedCache is continued outside cakekv.compress(): the compression "
                               "it belongs to has ended (or the model's forward was called without it); continue "
                               "it inside an active `with cakekv.compress(model, ...)` of the same model")
        return self.layers[layer_idx].update(key_states, value_states)

    def prepare_step(self, q: int) -> tuple:
        """Host side of a step of `q` tokens over the compressed layers, before it runs; the result keys
        a captured step (it changes when storage is reallocated or eviction counts change). When one
        growing layer is full, every growing layer short of the same spare grows with it, so that they
        fill up together again and a captured step is re-captured rarely (sliding and capped layers are
        bounded: they do not take part)."""
        self.step_tokens = q
        spare = 0  # nobody must grow: nobody does
        growing = [layer for layer in self.layers if layer.grows]
        if any(layer.room() < q for layer in growing):
            largest = max(max(c for row in layer.head_counts for c in row) for layer in growing)
            spare = grown_capacity(largest + q) - largest - q
        return tuple(layer.prepare_step(q, spare) for layer in self.layers)

    def finish_step(self, q: int) -> None:
        for layer in self.layers:
            layer.finish_step(q)
        self.step_tokens = None

    # ---- called by the attention hook; the decisions are eviction.py's --------------------------
    def after_prefill(self, layer_idx: int, query: torch.Tensor, scale: float, module,
                      softcap: float | None = None) -> None:
        """After layer `layer_idx`'s prefill attention: a global layer is scored and the global layers seen so
        far re-cut (`Eviction.score_and_recut`), or for a re-reading method kept whole, its window scores kept for
        after the re-read where the method `scores_window`; a sliding layer is not scored: it drops what its window
        no longer reaches. After the last layer the prefill is finished, or the chunk ended if more chunks follow."""
        layer = self.layers[layer_idx]
        layer.prefilling = False
        compress_rows = self.compress_rows()
        compressing = self.method.compresses and any(compress_rows)
        rereads = self.rereads()  # scored and cut by the re-read
        if layer.sliding_window is not None:
            layer.hold_window()
        elif compressing and not rereads:
            self.eviction.score_and_recut(self, layer, query, scale, module, softcap, compress_rows)
        elif rereads and self.method.scores_window:
            self.eviction.score_window(self, layer, query, scale, module, softcap)
        if layer_idx == len(self.layers) - 1 and not rereads:  # a re-read finishes after its last layer
            if self.more_chunks:
                self._end_chunk()
            else:
                self._finish_prefill(compress_rows)

    def compress_rows(self) -> list[bool]:
        """Per row of the prompt in progress: whether the method compresses it (long enough)."""
        return [self.method.compresses_prompt(n) for n in self.prompt.host_lengths]

    def rereads(self) -> bool:
        """Whether the prompt in progress is scored by re-reading it (the method's `repeat_task`)."""
        method = self.method
        return method.repeat_task is not None and method.compresses and any(self.compress_rows())

    def _end_chunk(self) -> None:
        """After a chunk of a chunked prefill that is not the last: the probes are dropped (the window, last in every
        layer after its cut) and the layers stay in the padded storage, as cut, for the next chunk; their scores and
        the layer preferences are recomputed by it."""
        for layer in self.layers:
            layer.drop_window_probes(self.probes)
            layer.indicator = None
        self.prompt.extend(-self.probes)
        self.eviction.reset()

    def finish_reread(self) -> None:
        """After the prompt's re-read (patch.RereadAlongPrefill) scored and cut every global layer: the prefill
        finished."""
        self._finish_prefill(self.compress_rows())

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
        self.eviction.reset()

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
            b, h = layer.storage.batch_heads
            d = layer.keys.shape[-1]
            entry_bytes = 2 * d * layer.keys.element_size()
            out.append({
                "layer": layer.layer_idx,
                "budget": layer._mean_per_row(layer.head_budgets),
                "kept": layer._mean_per_row(layer.head_counts),
                "budget_per_head": [None if b is None else list(b) for b in layer.head_budgets],
                "kept_per_head": [list(c) for c in layer.head_counts],
                "bytes_before": b * h * layer.seen * entry_bytes,
                "bytes_after": layer.storage.nbytes,
                "bytes_kept": sum(map(sum, layer.head_counts)) * entry_bytes,
                "tokens": layer.next_pos.tolist(),  # per row: tokens seen, padding excluded
                "entry_bytes": entry_bytes,         # K and V of one entry of one KV head
                "ragged": layer.ragged,
            })
        return out
