"""Eviction decisions over a compressed cache (docs/cache.md): what each layer keeps at prefill and what it may
hold while decoding. The cache (cache.py) stores entries and carries the decisions out; the method (methods/)
scores; this module drives the method over the layers:

  * at prefill, after each global layer's attention: the method scores the layer from its window queries, the
    layer preferences seen so far are turned into layer budgets (re-cut after every layer when the method
    cascades, so memory never holds more than the total), per-head budgets where the method has them, and every
    layer seen so far keeps its top entries (`CompressedLayer.keep_top`);
  * a chunked prefill (`compress(prefill_chunk=...)`) does the same for each later chunk, over what each layer kept
    of the chunks before and the chunk itself, with the chunk's own window and preferences;
  * at the end of prefill: the caps decode-time eviction holds (the layer's budget per head);
  * at each decode step: a layer over its caps frees its lowest-scoring entries (`CompressedLayer.evict_to_caps`).
"""
from __future__ import annotations

import torch

from .methods.base import LayerView, Method


class Eviction:
    """The decisions of one compressed generation (one per cache); `preferences` and `caps` are the global layers'
    layer preferences and evictable lengths of the prefill (or chunk) in progress."""

    def __init__(self, method: Method, window: int):
        self.method = method
        self.window = window
        self.preferences: list[torch.Tensor] = []
        self.caps: list[torch.Tensor] = []
        self.window_scores: list[torch.Tensor] = []  # a re-reading method's window indicators, until its re-read

    def reset(self) -> None:
        """The end of a prefill or of a chunk of one: the next is scored afresh."""
        self.preferences, self.caps = [], []

    def score(self, cache, layer, query: torch.Tensor, scale: float, module, softcap: float | None) -> torch.Tensor:
        """The method's indicator of global `layer` from its window queries (over logits soft-capped by `softcap`,
        as the model's); its layer preference joins `preferences`, its evictable length per row (the mean over KV
        heads of its candidates: `n - window` for a prompt, less for a later chunk of a chunked prefill) `caps`.
        The method sees the global layers only, numbered in order (its budgets and `LayerView.layer_idx` count
        them)."""
        window = self.window
        window_start = (layer.next_pos - cache.held_window).clamp(min=0)  # the candidates end there
        stored = layer.storage  # padded while prefilling
        view = LayerView(query[:, :, -window:], stored.keys, stored.values, stored.pos, layer.query_pos[:, -window:],
                         window_start, scale, cache.global_layers.index(layer), module, queries=query,
                         query_positions=layer.query_pos, softcap=softcap or 0.0)
        indicator, preference = self.method.score_layer(view)
        if preference is None:
            preference = torch.zeros(query.shape[0], dtype=torch.float64, device=query.device)
        self.preferences.append(preference.to(torch.float64))
        self.caps.append(torch.tensor([sum(row) // len(row) for row in layer.head_prefix], device=query.device))
        return indicator

    def stacked_preferences(self, device) -> torch.Tensor:
        """[B, l] the preferences of the layers scored so far. Layers may live on different devices (accelerate
        device_map): on `device`, the one budgets are allocated on."""
        return torch.stack([p.to(device) for p in self.preferences], 1)

    def score_and_recut(self, cache, layer, query: torch.Tensor, scale: float, module, softcap: float | None,
                        compress_rows: list[bool]) -> None:
        """Score global `layer` (`score`) and re-cut the global layers seen so far."""
        layer.indicator = self.score(cache, layer, query, scale, module, softcap)
        budgeted = cache.global_layers
        prefs = self.stacked_preferences(query.device)
        caps = torch.stack([c.to(query.device) for c in self.caps], 1)
        self.recut(budgeted[:prefs.shape[1]], prefs, caps, prefs.shape[1] == len(budgeted), compress_rows)

    def score_window(self, cache, layer, query: torch.Tensor, scale: float, module, softcap: float | None) -> None:
        """A re-reading method's window indicator of global `layer` (`score`), kept until its re-read."""
        self.window_scores.append(self.score(cache, layer, query, scale, module, softcap))

    def recut(self, seen: list, preferences: torch.Tensor, caps: torch.Tensor, is_last: bool,
              compress_rows: list[bool]) -> None:
        """Cut the global layers `seen` so far, scored (their `indicator`), to the method's budgets; `preferences`
        [B, l] their layer preferences, `caps` [B, l] their evictable lengths."""
        method = self.method
        indicators = [scored.indicator for scored in seen]
        budgets = method.layer_budgets(preferences, caps, is_last, indicators=indicators)
        if budgets is None:
            return
        rows = torch.tensor(compress_rows, device=caps.device)[:, None]
        if budgets.dim() == 3:  # per (row, layer, head)
            budgets = torch.where(rows[..., None], budgets, caps[..., None])
        else:
            budgets = torch.where(rows, budgets, caps)
        for i, scored in enumerate(seen):
            per_head = budgets[:, i] if budgets.dim() == 3 else method.head_budgets(indicators[i], budgets[:, i])
            if per_head is None:
                scored.keep_top(budgets[:, i].tolist())
            else:
                scored.keep_top(torch.where(rows, per_head.to(caps.device), caps[:, i, None]).tolist())

    def recut_reread(self, cache, layer, reread: torch.Tensor, compress_rows: list[bool]) -> None:
        """After every chunk of a re-reading method's re-read (reconstruction.py) went through global `layer`: its
        indicator becomes the method's `reread_indicator` of its re-read scores `reread` (with its window indicator
        where the method scored one), and the global layers re-read so far are cut, with the window's layer
        preferences (zero where it scored no window). Budgets that rank every layer's entries together cut as a
        cascade, exactly: an entry outside the top of the layers seen so far is outside the top of all of them;
        budgets per layer cut each layer once; preference budgets wait for the last layer."""
        layers = cache.global_layers
        i = layers.index(layer)
        window = self.window_scores[i] if self.window_scores else None
        layer.indicator = self.method.reread_indicator(reread, window)
        window_start = (layer.next_pos - self.window).clamp(min=0)
        if self.preferences:
            preferences = self.stacked_preferences(window_start.device)[:, :i + 1]
        else:
            preferences = torch.zeros(window_start.shape[0], i + 1, dtype=torch.float64, device=window_start.device)
        caps = window_start[:, None].expand_as(preferences).contiguous()
        self.recut(layers[:i + 1], preferences, caps, i == len(layers) - 1, compress_rows)
        if i == len(layers) - 1:
            self.window_scores = []

    def set_decode_caps(self, layer, compress_rows: list[bool]) -> None:
        """End of prefill: the budgets the layer's rows were given, and the caps decode-time eviction holds
        (a row left uncompressed is held at the method's budget)."""
        method = self.method
        heads = layer.storage.pos.shape[1]
        layer.head_budgets = [b if c and method.compresses else None
                              for b, c in zip(layer.head_budgets, compress_rows)]
        if method.decode_evict and method.compresses and layer.sliding_window is None:
            layer.head_caps = [b if b is not None else [method.budget] * heads for b in layer.head_budgets]
            layer.over_t = torch.tensor([[c - cap for c, cap in zip(cs, caps)] for cs, caps
                                         in zip(layer.head_counts, layer.head_caps)], device=layer.keys.device)

    def decode_layer(self, layer) -> None:
        """After a decode step's attention: a layer with caps frees what its rows hold above them."""
        if layer.head_caps is not None:
            layer.evict_to_caps(self.method)
