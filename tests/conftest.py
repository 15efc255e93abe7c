"""Tiny models of each supported family (random weights, built in code) and a capture helper that
records every layer's query/key states through a test-only attention backend."""
from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3Config, Gemma3ForCausalLM,
                          Gemma3ForConditionalGeneration, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                          Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# Every supported family: (config class, model class, what its tiny config sets beyond the common sizes).
# The contract tests run on each; README's "Supported models" table is generated from this list
# (tests/test_families.py). The model types must stay equal to cakekv.patch.TESTED_MODEL_TYPES.
SLIDING_WINDOW = 160  # tiny sliding-window families: longer than the contract tests' compressed prompts
MOE = dict(num_experts_per_tok=2)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    # fused qkv_proj
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(bos_token_id=1, eos_token_id=2)),
    # alternating sliding / global layers, query pre-attention scalar != head_dim (scale != 1/sqrt(head_dim));
    # the tiny configs leave logit soft-capping off (tests/test_families.py covers it)
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(query_pre_attn_scalar=32, sliding_window=SLIDING_WINDOW,
                                                     attn_logit_softcapping=None)),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, dict(query_pre_attn_scalar=32,
                                                              sliding_window=SLIDING_WINDOW)),
    # mixture-of-experts MLPs, attention as their dense siblings
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=4, sliding_window=None, **MOE)),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(num_experts=4, moe_intermediate_size=64,
                                                             shared_expert_intermediate_size=64, **MOE)),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(num_experts=4, moe_intermediate_size=64, **MOE)),
}
# Composite (multimodal) models: (config class, model class, the FAMILIES entry of their text decoder).
COMPOSITE = {
    "gemma3": (Gemma3Config, Gemma3ForConditionalGeneration, "gemma3_text"),  # SigLIP vision tower
}
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                   patch_size=14)
# Families whose transformers classes have no SDPA path (logit soft-capping): tiny_model gives them eager.
NO_SDPA = ("gemma2",)


def layer_types(family: str, layers: int) -> list[str] | None:
    """Gemma's pattern at tiny size: Gemma 2 alternates sliding and global layers, Gemma 3 has three
    sliding layers per global one (five in the real models)."""
    if family == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if family == "gemma3_text":
        return ["full_attention" if i % 4 == 3 else "sliding_attention" for i in range(layers)]
    return None


def tiny_model(family: str = "llama", kv_heads: int = 2, dtype=torch.float32, layers: int = 4,
               attn: str = "sdpa", seed: int = 0, vocab: int = 128, **overrides):
    """A tiny random model of `family` (FAMILIES or COMPOSITE); `overrides` replace fields of its (text)
    config, e.g. sliding_window."""
    composite = COMPOSITE.get(family)
    text_family = composite[2] if composite else family
    config_cls, model_cls, extra = FAMILIES[text_family]
    if attn == "sdpa" and text_family in NO_SDPA:
        attn = "eager"
    kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                  head_dim=16, pad_token_id=0, **extra)
    if layer_types(text_family, layers) is not None:
        kwargs["layer_types"] = layer_types(text_family, layers)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    if composite:
        config_cls, model_cls, _ = composite
        config = config_cls(text_config=kwargs, vision_config=TINY_VISION, mm_tokens_per_image=4)
        config._attn_implementation = attn
    else:
        config = config_cls(attn_implementation=attn, **kwargs)
    model = model_cls(config).eval()
    # Sharper-than-random attention so that scores are far from ties.
    text = config.get_text_config(decoder=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            elif name.endswith("qkv_proj.weight"):  # Phi-3: the query and key rows of the fused projection
                p[: (text.num_attention_heads + text.num_key_value_heads) * text.head_dim].mul_(4.0)
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
