"""StreamingLLM (Xiao et al., ICLR 2024) as a one-shot prefill policy (KVCache-Factory / AdaKV ports):
keep the first `sinks` tokens (attention sinks) and the most recent tokens.

Options: sinks = 4 (the official scripts' 4 sinks). Under our budget contract the layer keeps `budget`
entries per KV head: the window, the first `sinks` prompt tokens, and the most recent prefix tokens up
to the budget (the official setting W = C - 4 is the special case window = budget - sinks). No eviction
during decoding, as in the ports (with decode_evict=True the generic attention-based decode evictor
runs; it is not part of StreamingLLM)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerView, Method
from .options import Options, option
from .registry import register


@dataclass(frozen=True, kw_only=True)
class StreamingLLMOptions(Options):
    sinks: int = option(4, "first prompt tokens always kept (attention sinks)", ge=0)


@register
class StreamingLLM(Method):
    name = "streamingllm"
    Options = StreamingLLMOptions

    def score_layer(self, view: LayerView):
        # Sinks rank above everything, then the most recent first (positions are per row, so padding
        # does not change the choice).
        pos = view.k_pos.float()
        big = float(view.k_pos.shape[-1] + 1) * 2
        score = torch.where(view.k_pos < self.options.sinks, big - pos, pos)
        return torch.where(view.candidates, score, float("-inf")), None
