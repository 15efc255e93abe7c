"""Tiny models of each supported family (random weights, built in code) and a capture helper that
records every layer's query/key states through a test-only attention backend."""
from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_model(family: str = "llama", kv_heads: int = 2, dtype=torch.float32, layers: int = 4,
               attn: str = "sdpa", seed: int = 0, vocab: int = 128):
    config_cls, model_cls = FAMILIES[family]
    kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                  head_dim=16, attn_implementation=attn, pad_token_id=0)
    if family == "mistral":
        kwargs["sliding_window"] = None
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    # Sharper-than-random attention so that scores are far from ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model.to(dtype)


@pytest.fixture
def llama():
    return tiny_model("llama")


_CAPTURED: dict = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    _CAPTURED[module.layer_idx] = (query[0].detach().clone(), key[0].detach().clone(),
                                   value[0].detach().clone(), module.o_proj.weight.detach())
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


ALL_ATTENTION_FUNCTIONS.register("test_capture", _capture_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("test_capture", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def capture_qkv(model, input_ids) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (q [H, n, D], k [Hkv, n, D], v [Hkv, n, D], o_proj weight) of a single unpadded
    prompt, after RoPE."""
    original = model.config._attn_implementation
    model.config._attn_implementation = "test_capture"
    try:
        _CAPTURED.clear()
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
        return [_CAPTURED[i] for i in range(model.config.num_hidden_layers)]
    finally:
        model.config._attn_implementation = original


def capture_qk(model, input_ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (q [H, n, D], k [Hkv, n, D]) of a single unpadded prompt, after RoPE."""
    return [(q, k) for q, k, _, _ in capture_qkv(model, input_ids)]


@contextlib.contextmanager
def per_layer_masks(model, masks: dict[int, torch.Tensor]):
    """Run `model` with attention restricted by a per-layer boolean mask [B, H, q, k] (reference for
    compressed continuation: full cache, evicted entries hidden)."""
    def masked(module, query, key, value, attention_mask, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, 1)
        v = value.repeat_interleave(groups, 1)
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=masks[module.layer_idx].to(query.device),
                                                               scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    ALL_ATTENTION_FUNCTIONS.register("test_masked", masked)
    ALL_MASK_ATTENTION_FUNCTIONS.register("test_masked", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    original = model.config._attn_implementation
    model.config._attn_implementation = "test_masked"
    try:
        yield
    finally:
        model.config._attn_implementation = original
