"""Helpers shared by the test modules: tiny models of each supported family (built in code), a capture
backend that records every layer's query/key states, prompts and compressed prefills, reference logits
of a full cache with evicted entries hidden, and an offline byte tokenizer + tiny LM for the eval tests."""
from __future__ import annotations

import argparse
import contextlib
import math
import sys

import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3Config, Gemma3ForCausalLM,
                          Gemma3ForConditionalGeneration, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                          Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import cakekv
from cakekv import cache_kwargs, cache_of

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


_CAPTURED: dict = {}
_CAPTURE_MASK: list = [None]  # a boolean mask [q, k] the captured forward attends with (None: causal)


def _capture(module, query, key, value):
    _CAPTURED[module.layer_idx] = (query[0].detach().clone(), key[0].detach().clone(),
                                   value[0].detach().clone(), module.o_proj.weight.detach())


def _capture_sdpa(module, query, key, value, attention_mask, **kwargs):
    _capture(module, query, key, value)
    if _CAPTURE_MASK[0] is not None:
        groups = query.shape[1] // key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
            attn_mask=_CAPTURE_MASK[0].to(query.device), scale=kwargs.get("scaling"))
        return out.transpose(1, 2).contiguous(), None
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _capture_eager(module, query, key, value, attention_mask, **kwargs):
    """For models whose attention SDPA cannot compute (soft-capping): the family's own eager kernel and mask."""
    _capture(module, query, key, value)
    return sys.modules[type(module).__module__].eager_attention_forward(module, query, key, value, attention_mask,
                                                                        **kwargs)


for _name, _fn, _mask in (("test_capture", _capture_sdpa, "sdpa"), ("test_capture_eager", _capture_eager, "eager")):
    ALL_ATTENTION_FUNCTIONS.register(_name, _fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_name, ALL_MASK_ATTENTION_FUNCTIONS[_mask])


def capture_qkv(model, input_ids, mask: torch.Tensor | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (q [H, n, D], k [Hkv, n, D], v [Hkv, n, D], o_proj weight) of a single unpadded
    prompt, after RoPE; with `mask` [n, n] (bool, SDPA models only), every layer attends under it instead of
    causally."""
    original = model.config._attn_implementation
    model.config._attn_implementation = "test_capture_eager" if original == "eager" else "test_capture"
    _CAPTURE_MASK[0] = mask
    try:
        _CAPTURED.clear()
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
        return [_CAPTURED[i] for i in range(model.config.num_hidden_layers)]
    finally:
        model.config._attn_implementation = original
        _CAPTURE_MASK[0] = None


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


BUDGET, WINDOW = 40, 8


def prompt(n, seed=0, vocab=128, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, n), generator=gen)


def prefill(model, ids, method, **kw):
    with cakekv.compress(model, method=method, budget=kw.pop("budget", BUDGET), window=kw.pop("window", WINDOW),
                         **kw) as handle:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
    return out, handle


def kept_prefix(layer, row=0, window=WINDOW):
    """Per KV head: sorted positions of the kept entries before the window."""
    window_start = layer.next_pos[row].item() - window
    pos = layer.storage.padded_pos()
    return [sorted(p for p in pos[row, h].tolist() if 0 <= p < window_start)
            for h in range(pos.shape[1])]


def continuation_nll(model, ids, cont, method, chunked, **kw):
    out, _ = prefill(model, ids, method, decode_evict=False, **kw)
    cache = cache_of(out)
    with cakekv.compress(model, method=method, budget=BUDGET, window=WINDOW, decode_evict=False, **kw):
        with torch.no_grad():
            if chunked:
                logits = model(input_ids=cont, **cache_kwargs(model, cache), use_cache=True).logits
            else:
                logits = torch.cat([model(input_ids=cont[:, t:t + 1], **cache_kwargs(model, cache), use_cache=True).logits
                                    for t in range(cont.shape[1])], 1)
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -logp.gather(-1, cont[:, 1:, None]).mean().item(), out.logits


def masked_full_cache_logits(model, ids, cont, cache):
    """Reference for a compressed continuation: the uncompressed model run on `cont` after `ids`, with
    exactly the entries `cache` evicted hidden, per layer and per KV head."""
    n, q = ids.shape[1], cont.shape[1]
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    causal = torch.arange(n + q)[None, :] <= torch.arange(n, n + q)[:, None]
    masks = {}
    for i, layer in enumerate(cache.layers):
        pos = layer.storage.padded_pos()
        kept = torch.zeros(pos.shape[1], n + q, dtype=torch.bool)
        for h in range(pos.shape[1]):
            kept[h, [p for p in pos[0, h].tolist() if p >= 0]] = True
        kept[:, n:] = True
        masks[i] = (kept[:, None, :] & causal[None]).repeat_interleave(groups, 0)[None]
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=True)
        with per_layer_masks(model, masks):
            return model(input_ids=cont, **cache_kwargs(model, cache_of(full)), use_cache=True).logits


def left_padded(prompts, pad_id=0):
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - p.shape[1]:] = p[0]
        mask[r, width - p.shape[1]:] = 1
    return ids, mask


def is_unpatched(model, attn: str = "sdpa") -> bool:
    """Whether `model` is back to itself after compress(): its attention implementation (`attn`, what it
    was built with), no wrapped decoder forward, no attention module registered with a handle."""
    from cakekv.patch import _HANDLE_OF_MODULE
    return (model.config._attn_implementation == attn and "forward" not in model.model.__dict__
            and not any(m in _HANDLE_OF_MODULE for m in model.modules()))


def method_compresses(method: str) -> bool:
    """Whether `method` evicts anything (prompt or decode-time); `full` does not."""
    from cakekv.methods import get_method
    from types import SimpleNamespace
    return get_method(method)(SimpleNamespace(num_hidden_layers=2, _name_or_path=""), BUDGET, WINDOW).compresses


# ------------------------------------------------------------------------------------------------
# the eval tests: an offline byte-level tokenizer and a tiny random Llama
# ------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def byte_tokenizer(chat_template: str | None = None):
    """A byte-level tokenizer (one token per UTF-8 byte, exact round trip) with <pad>=0, <s>=1, </s>=2;
    BOS is added in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 clean_up_tokenization_spaces=False)
    if chat_template:
        hf.chat_template = chat_template
    return hf


def tiny_lm(vocab: int = 259, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def needs_eval_extra(*modules: str) -> None:
    """Skip the calling test, naming the package, where a package of the optional `eval` extra is not installed
    (CI installs the extra, so there it runs)."""
    for module in modules:
        pytest.importorskip(module, reason=f"needs {module}, of the eval extra: pip install 'cakekv[eval]'")


def eval_args(parser_fn, argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser_fn(parser)
    return parser.parse_args(argv)


def assert_same_eviction(got_pos, want_pos, pooled_by_slot, offsets, rel_tol=1e-4):
    """The same slots are freed, except where a reference pooled score ties the cut-off within tolerance."""
    got_pos, want_pos = got_pos.cpu(), want_pos.cpu()
    for s, pooled in enumerate(pooled_by_slot):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        got = {t for t in range(lo, hi) if got_pos[t] < 0}
        want = {t for t in range(lo, hi) if want_pos[t] < 0}
        assert len(got) == len(want), f"segment {s}: {len(got)} free slots, reference {len(want)}"
        if got == want:
            continue
        dropped = want - {t for t in range(lo, hi) if t not in pooled}  # evicted now, not free before
        cutoff = max(pooled[t] for t in dropped)
        for t in got ^ want:
            assert t in pooled and math.isclose(pooled[t], cutoff, rel_tol=rel_tol, abs_tol=1e-7), (
                f"segment {s}: slot {t} differs from the reference eviction")


def assert_exact_order(order, pos, offsets):
    """`order` lists each segment's stored entries by position (its tail, past them, is unspecified)."""
    order, pos = order.cpu(), pos.cpu()
    for s in range(offsets.numel() - 1):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        stored = sorted((int(pos[t]), t - lo) for t in range(lo, hi) if pos[t] >= 0)
        assert order[lo:lo + len(stored)].tolist() == [slot for _, slot in stored], f"segment {s}: order not exact"


def assert_batch_rows_alone(model, method: str, seed: int, **options):
    """A left-padded batch of prompts of 33, 95 and 140 tokens (the first stays uncompressed) generates, row by
    row, what each prompt generates alone, with the same per-head budgets."""
    prompts = [prompt(n, seed=seed + n) for n in (33, 95, 140)]
    ids, mask = left_padded(prompts)
    with cakekv.compress(model, method, budget=BUDGET, window=WINDOW, **options) as handle, torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        batch_budgets = [s["budget_per_head"] for s in handle.stats]
        for r, p in enumerate(prompts):
            alone = model.generate(input_ids=p, max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(batch[r, ids.shape[1]:], alone[0, p.shape[1]:]), f"row {r}"
            assert [b[r] for b in batch_budgets] == [s["budget_per_head"][0] for s in handle.stats], f"row {r}"
    assert batch_budgets[0][0] is None
