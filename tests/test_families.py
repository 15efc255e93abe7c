"""Model families: every family of helpers.FAMILIES passes the same contracts on tiny random
models; sliding-window layers, logit soft-capping, fused projections and untested-but-standard decoders
behave as README's "Supported models" says; what cakekv cannot hold is refused with the reason;
`transformers.pipeline("text-generation")` works inside `cakekv.compress`.

README's "Supported models" table is generated from the lists below (`python tests/test_families.py`
rewrites it; a test checks that it is current)."""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import cakekv
from cakekv import cache_kwargs, cache_of
from cakekv.patch import (SUPPORTED_ATTENTION, TESTED_MODEL_TYPES, TESTED_TRANSFORMERS, attention_modules,
                          decoder_config, sliding_windows)
from helpers import COMPOSITE, FAMILIES, NO_SDPA, capture_qk, kept_prefix, prefill, tiny_model
from reference import assert_same_selection, snapkv_reference

ROOT = Path(__file__).resolve().parents[1]
BUDGET, WINDOW = 40, 8
# Families whose config takes a sliding window, and how their tiny models lay it out (Mistral and Phi-3: every
# layer, as Mistral-7B-v0.1 and Phi-3-mini-4k; Gemma: alternating with global layers).
SLIDING = ("mistral", "phi3", "gemma2", "gemma3_text", "gemma3")
SOFTCAP = ("gemma2",)  # families whose real configs soft-cap attention logits


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompt(n, seed=0, batch=1, vocab=128):
    return torch.randint(1, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# ---- reference: the uncompressed model with exactly the evicted entries hidden ----------------------------
_MASKS: dict[int, torch.Tensor] = {}


def _masked_eager(module, query, key, value, attention_mask, **kwargs):
    """The family's own eager kernel (scaling, soft-capping as the model computes them) under _MASKS."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, _MASKS[module.layer_idx].to(query.dtype), **kwargs)


ALL_ATTENTION_FUNCTIONS.register("test_masked_eager", _masked_eager)
ALL_MASK_ATTENTION_FUNCTIONS.register("test_masked_eager", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def reference_logits(model, ids, cont, cache):
    """Logits of `cont` after `ids` (one row) from the uncompressed model run on both at once: the prompt's
    queries see what the model's own mask gives them (causal, sliding windows), the continuation's see,
    per layer and KV head, only the prompt entries `cache` holds and the continuation itself (causal and
    within the layer's window)."""
    n, q = ids.shape[1], cont.shape[1]
    cfg = decoder_config(model)
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    qpos, kpos = torch.arange(n + q)[:, None], torch.arange(n + q)[None, :]
    _MASKS.clear()
    for i, layer in enumerate(cache.layers):
        seen = (kpos <= qpos) if layer.sliding_window is None else (kpos <= qpos) & (kpos > qpos - layer.sliding_window)
        pos = layer.storage.padded_pos()[0]
        kept = torch.zeros(pos.shape[0], n + q, dtype=torch.bool)
        for h in range(pos.shape[0]):
            kept[h, [p for p in pos[h].tolist() if 0 <= p < n]] = True
        kept[:, n:] = True
        allowed = seen[None].repeat(pos.shape[0], 1, 1)
        allowed[:, n:] &= kept[:, None, :]
        allowed = allowed.repeat_interleave(groups, 0)[None]
        _MASKS[i] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    original = cfg._attn_implementation
    cfg._attn_implementation = "test_masked_eager"
    try:
        with torch.no_grad():
            return model(input_ids=torch.cat([ids, cont], 1), use_cache=False).logits[:, n:]
    finally:
        cfg._attn_implementation = original


def compressed_continuation(model, ids, cont, method="cake", budget=BUDGET, window=WINDOW, **options):
    """(logits of `cont` continuing the compressed prefill of `ids`, the cache), without decode eviction."""
    with cakekv.compress(model, method=method, budget=budget, window=window, decode_evict=False, **options), \
            torch.no_grad():
        cache = cache_of(model(input_ids=ids, use_cache=True))
        logits = model(input_ids=cont, use_cache=True, **cache_kwargs(model, cache)).logits
    return logits, cache


def window_overrides(family: str, window: int) -> dict:
    return dict(sliding_window=window) if family in SLIDING else {}


# ---- the contracts, on every family --------------------------------------------------------------------
ALL = list(FAMILIES) + list(COMPOSITE)


def test_tested_families_are_the_package_list():
    types = [config_cls.model_type for config_cls, _, _ in [*FAMILIES.values(), *COMPOSITE.values()]]
    assert types == ALL and sorted(types) == sorted(TESTED_MODEL_TYPES)


@pytest.mark.parametrize("family", ALL)
def test_identity_when_budget_covers_the_length(family):
    """Nothing is evicted: logits and greedy generation equal the model's own, also past a sliding window."""
    model = tiny_model(family, **window_overrides(family, 16))
    ids = prompt(40, seed=2)
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=0)
    with cakekv.compress(model, method="cake", budget=60, window=WINDOW):
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        out = model.generate(ids, max_new_tokens=12, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ALL)
def test_continuation_equals_full_cache_with_evicted_entries_hidden(family):
    """Positions, causality and sliding windows after compression: the prompt (44) is longer than the window
    of the sliding layers (32), which hold its last 31 tokens, and the continuation (12 more) slides on."""
    model = tiny_model(family, **window_overrides(family, 32))
    ids, cont = prompt(44, seed=11), prompt(12, seed=12)
    got, cache = compressed_continuation(model, ids, cont, budget=24)
    assert any(s < 44 for layer in cache.layers for s in layer.head_counts[0])  # something was evicted
    torch.testing.assert_close(got, reference_logits(model, ids, cont, cache), rtol=1e-4, atol=1e-4)


def left_padded(prompts):
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - p.shape[1]:], mask[r, width - p.shape[1]:] = p[0], 1
    return ids, mask


@pytest.mark.parametrize("family", ALL)
def test_batch_equals_each_row_alone(family):
    """Left-padded rows (one too short to compress) generate what each generates alone, decode eviction on;
    the longer rows pass the window of the sliding layers (48)."""
    model = tiny_model(family, **window_overrides(family, 48))
    prompts = [prompt(n, seed=20 + n) for n in (30, 70, 100)]
    ids, mask = left_padded(prompts)
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW):
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        alone = [model.generate(input_ids=p, max_new_tokens=10, do_sample=False, pad_token_id=0) for p in prompts]
    for r, (p, single) in enumerate(zip(prompts, alone)):
        assert torch.equal(batch[r, ids.shape[1]:], single[0, p.shape[1]:]), f"row {r} differs"


@pytest.mark.parametrize("family", ALL)
def test_memory_is_freed(family):
    """The storage holds the kept entries only: `budget` per global layer on average, the last `window - 1`
    tokens in a sliding layer (window 100)."""
    model = tiny_model(family, **window_overrides(family, 100))
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW) as handle, torch.no_grad():
        cache = cache_of(model(input_ids=prompt(150, seed=1), use_cache=True))
    config = decoder_config(model)
    entry = 2 * config.num_key_value_heads * 16 * 4  # K and V, heads, head_dim 16, fp32
    for layer, s in zip(cache.layers, handle.stats):
        assert layer.keys.shape[2] == s["kept"][0] < 150
        assert s["bytes_before"] == 150 * entry
        assert s["bytes_kept"] == s["kept"][0] * entry
        if layer.sliding_window is not None:
            assert s["kept"][0] == 99 and s["budget"] == [None]
    glob = [s for layer, s in zip(cache.layers, handle.stats) if layer.sliding_window is None]
    assert sum(s["kept"][0] for s in glob) == BUDGET * len(glob)


@pytest.mark.parametrize("family", list(COMPOSITE))
def test_composite_generates_and_continues(family):
    """The text decoder of a multimodal model through its own generate / forward (what
    test_transformers_compat checks for FAMILIES), text prompts only; images are refused."""
    model = tiny_model(family)
    ids = prompt(90, seed=11, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW) as handle, torch.no_grad():
        assert model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=0).shape == (2, 96)
        assert handle.stats[0]["tokens"] == [95, 75]
        cache = cache_of(model(input_ids=ids, attention_mask=mask, use_cache=True))
        mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
        out = model(input_ids=prompt(3, seed=12, batch=2), attention_mask=mask, use_cache=True,
                    **cache_kwargs(model, cache))
        assert cache_of(out) is cache and cache.layers[0].seen == 93
        with pytest.raises(ValueError, match="^pixel_values: cakekv compresses text prompts"):
            model(input_ids=ids, pixel_values=torch.zeros(2, 3, 28, 28), use_cache=True)
    assert decoder_config(model)._attn_implementation == "sdpa"
    assert "forward" not in model.model.__dict__


# ---- family specifics -------------------------------------------------------------------------------------
def test_fused_qkv_projection_is_found():
    model = tiny_model("phi3")
    modules = attention_modules(model)
    assert len(modules) == 4 and all(hasattr(m, "qkv_proj") and not hasattr(m, "q_proj") for m in modules)


@pytest.mark.parametrize("family,expected", [
    ("gemma2", [160, None, 160, None]), ("gemma3_text", [160, 160, 160, None]), ("mistral", [None] * 4),
    ("llama", [None] * 4)])
def test_sliding_windows_per_layer(family, expected):
    model = tiny_model(family)
    assert sliding_windows(model.config) == expected
    # the windows the attention layers themselves declare (checked again at every prefill)
    assert [getattr(m, "sliding_window", None) for m in attention_modules(model)] == (
        expected if family.startswith("gemma") else [None] * 4)


def test_qwen2_moe_window_zero_means_none():
    from transformers import Qwen2MoeConfig
    assert sliding_windows(Qwen2MoeConfig(num_hidden_layers=2, use_sliding_window=False)) == [None, None]


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_sliding_layers_slide_while_generating(family):
    """Generating past the window with decode-time eviction: a sliding layer frees what leaves its window
    before each step, so it stays in `window` slots holding the last `window` tokens; the global layers hold
    their budget. With a window on every layer (Mistral) nothing is left to compress: the model's own output."""
    model = tiny_model(family, sliding_window=16)
    ids = prompt(60, seed=9)
    ref = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    with cakekv.compress(model, method="cake", budget=24, window=WINDOW) as handle:
        out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    cache = handle.last_cache
    glob = [layer for layer in cache.layers if layer.sliding_window is None]
    for layer in cache.layers:
        if layer.sliding_window is not None:
            end = int(layer.next_pos[0])
            pos = layer.storage.pos
            assert pos.shape[-1] == 16 and layer.head_counts[0] == [16] * pos.shape[1]
            for h in range(pos.shape[1]):
                assert sorted(p for p in pos[0, h].tolist() if p >= 0) == list(range(end - 16, end))
    assert sum(sum(layer.head_counts[0]) for layer in glob) == 24 * len(glob) * 2  # 2 KV heads
    if not glob:
        assert torch.equal(out, ref)


def test_sliding_layers_hold_their_window_and_global_layers_the_budget():
    """The decision, as a test: a sliding layer is not compressed but holds its last `window - 1` tokens
    (what the next query can see) and a step's tokens; the global layers keep `budget` entries per KV head
    on average; the continuation is the model's with exactly the held entries visible."""
    model = tiny_model("gemma3_text", sliding_window=48)
    ids, cont = prompt(100, seed=7), prompt(6, seed=8)
    got, cache = compressed_continuation(model, ids, cont, budget=24)
    glob = [layer for layer in cache.layers if layer.sliding_window is None]
    for layer in cache.layers:
        if layer.sliding_window is not None:
            pos = layer.storage.padded_pos()
            for h in range(pos.shape[1]):  # after the 6 continuation tokens, one step
                assert sorted(p for p in pos[0, h].tolist() if p >= 0) == list(range(100 - 47, 106))
    assert sum(sum(layer.head_counts[0]) for layer in glob) == (24 + 6) * len(glob) * len(glob[0].head_counts[0])
    torch.testing.assert_close(got, reference_logits(model, ids, cont, cache), rtol=1e-4, atol=1e-4)


def test_layer_whose_window_differs_from_the_config_is_refused():
    model = tiny_model("gemma3_text")
    model.config.layer_types = ["sliding_attention"] * 4  # the modules keep their own (layer 3 global)
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW):
        with pytest.raises(ValueError, match=r"Gemma3Attention \(layer 3\) attends over a sliding window of None, "
                                             r"but its config gives 160"):
            model(input_ids=prompt(50), use_cache=True)


def softcapped_gemma2(**overrides):
    # a cap of 1 bends the tiny model's attention logits (|scale * q.k| reaches ~10), so that ignoring it shows
    return tiny_model("gemma2", attn_logit_softcapping=1.0, **overrides)


def test_softcapping_matters_in_the_tiny_model():
    ids = prompt(30)
    with torch.no_grad():
        capped = softcapped_gemma2()(input_ids=ids).logits
        plain = tiny_model("gemma2")(input_ids=ids).logits
    assert (capped - plain).abs().max() > 1e-3  # 10x the tolerance of the tests that compare with the model


def test_softcapped_decode_attention_is_the_models():
    """Decode steps over the compressed cache soft-cap the logits as the model does: `full` generates what
    the model generates, and streamingllm's continuation equals the masked reference (eager kernel)."""
    model = softcapped_gemma2(sliding_window=48)
    ids = prompt(44, seed=3)
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=0)
    with cakekv.compress(model, method="full", budget=BUDGET, window=WINDOW):
        out = model.generate(ids, max_new_tokens=10, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-4)
    cont = prompt(12, seed=4)
    got, cache = compressed_continuation(model, ids, cont, method="streamingllm", budget=24)
    torch.testing.assert_close(got, reference_logits(model, ids, cont, cache), rtol=1e-4, atol=1e-4)


def test_softcapping_under_sdpa_is_refused():
    """transformers' SDPA path ignores soft-capping (5.17 lets Gemma 2 load with it): refused, not mixed."""
    model = softcapped_gemma2()
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="^model: attention implementation 'sdpa' drops the attention logit "
                                         "soft-capping"):
        cakekv.compress(model, method="full", budget=BUDGET)


@pytest.mark.parametrize("method", ["cake", "snapkv", "adakv", "defensivekv", "h2o", "lava"])
def test_softcapped_models_are_scored_on_their_own_logits(method):
    """Attention-ranked methods score the soft-capped logits the model computes: a layer keeps what the method
    keeps when the window statistics are taken with the cap (and not what it would keep without it), and the
    continuation over the kept entries is the model's own with exactly those entries visible."""
    model = softcapped_gemma2()
    ids, cont = prompt(60, seed=5), prompt(8, seed=6)
    got, cache = compressed_continuation(model, ids, cont, method=method, budget=24)
    torch.testing.assert_close(got, reference_logits(model, ids, cont, cache), rtol=1e-4, atol=1e-4)
    if method != "snapkv":
        return
    # SnapKV's selection on the global layers is the reference's over the soft-capped attention, not over the
    # uncapped one
    layers_qk = capture_qk(model, ids)
    scale = model.model.layers[0].self_attn.scaling
    global_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    qk = [layers_qk[i] for i in global_layers]
    kept, _, scores = snapkv_reference(qk, scale, 24, WINDOW, softcap=1.0)
    plain, _, _ = snapkv_reference(qk, scale, 24, WINDOW)
    out, _ = prefill(model, ids, "snapkv", budget=24)
    for j, i in enumerate(global_layers):
        for h, got in enumerate(kept_prefix(cache_of(out).layers[i])):
            assert_same_selection(got, kept[j][h], scores[j][h])
    assert kept != plain  # the cap changes what is kept here


@pytest.mark.parametrize("method,options", [("cake", {}), ("adakv", {}), ("streamingllm", dict(decode_evict=True))])
def test_softcapped_generation_with_decode_eviction(method, options):
    """Decode eviction ranks by the soft-capped attention of the step (the weights of the decode kernel):
    generation runs past the caps and the model is unpatched after."""
    model = softcapped_gemma2()
    ids = prompt(60, seed=7)
    with cakekv.compress(model, method=method, budget=24, window=WINDOW, **options) as handle:
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 72)
    global_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    kept = [max(row) for layer in handle.stats if layer["layer"] in global_layers for row in layer["kept_per_head"]]
    assert global_layers and max(kept) < 60  # the compressed layers held their caps past the prompt
    assert model.config._attn_implementation == "eager"


def test_standard_decoder_of_an_untested_family_works_with_a_warning():
    """Granite (attention_multiplier as the softmax scale) is not in FAMILIES: accepted with a warning and
    exact like the tested families."""
    from transformers import GraniteConfig, GraniteForCausalLM
    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             attention_multiplier=0.5, pad_token_id=0)).eval()
    ids, cont = prompt(60, seed=5), prompt(8, seed=6)
    with pytest.warns(UserWarning, match="model type 'granite' is not among the tested families"):
        got, cache = compressed_continuation(model, ids, cont)
    torch.testing.assert_close(got, reference_logits(model, ids, cont, cache), rtol=1e-4, atol=1e-4)


# ---- what cannot work: refused with the reason ---------------------------------------------------------------
def test_bidirectional_attention_is_refused():
    model = tiny_model("gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="^model: unsupported architecture 'gemma3_text': bidirectional attention"):
        cakekv.compress(model, method="cake", budget=BUDGET)


def test_attention_sinks_are_refused():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))  # as gpt-oss has them
    with pytest.raises(ValueError, match="^model: unsupported architecture 'llama': LlamaAttention has attention sinks"):
        cakekv.compress(model, method="cake", budget=BUDGET)


def test_layers_without_attention_are_refused():
    model = tiny_model("llama")
    model.model.layers[2].self_attn = torch.nn.Identity()  # as a linear-attention / state-space layer
    with pytest.raises(ValueError, match=r"^model: unsupported architecture 'llama': its attention layers have "
                                         r"indices \[0, 1, 3\]"):
        cakekv.compress(model, method="cake", budget=BUDGET)


def test_encoder_decoder_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration
    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                                num_heads=2))
    with pytest.raises(ValueError, match="^model: unsupported architecture 't5': an encoder-decoder model"):
        cakekv.compress(model, method="cake", budget=BUDGET)


def test_attention_outside_the_interface_fails_at_the_first_prefill():
    model = tiny_model("llama")
    module = model.model.layers[1].self_attn
    original = module.forward

    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        saved = model.config._attn_implementation
        model.config._attn_implementation = "sdpa"  # this layer computes attention on its own
        try:
            return original(hidden_states, position_embeddings=position_embeddings, attention_mask=None, **kwargs)
        finally:
            model.config._attn_implementation = saved

    module.forward = forward
    with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW):
        with pytest.raises(ValueError, match=r"^model: layers \[1\] did not run their attention through"):
            model(input_ids=prompt(60), use_cache=True)


def test_method_needing_o_proj_is_refused_without_it():
    from transformers import PhiConfig, PhiForCausalLM  # Phi-1/2: the output projection is `dense`
    model = PhiForCausalLM(PhiConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, pad_token_id=0)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untested family
        with pytest.raises(ValueError, match="^method: 'defensivekv' weighs values through .* `o_proj`"):
            cakekv.compress(model, method="defensivekv", budget=BUDGET)
        with cakekv.compress(model, method="cake", budget=BUDGET, window=WINDOW):
            model.generate(prompt(60), max_new_tokens=3, do_sample=False, pad_token_id=0)


# ---- transformers' text-generation pipeline ---------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = ROOT / "cakekv" / "assets" / "tiny-llama"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def test_text_generation_pipeline_inside_compress(shipped):
    model, tok = shipped
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    fact = "The secret code of Alice Brown is 48213. "
    long, short = fact * 12 + "The secret code of Alice Brown is", fact + "The secret code of Alice Brown is"
    n = len(tok(long).input_ids)
    kw = dict(max_new_tokens=6, do_sample=False)
    ref = pipe(long, **kw)
    with cakekv.compress(model, method="cake", budget=n + 8, window=WINDOW):  # nothing evicted: the same text
        assert pipe(long, **kw) == ref
    with cakekv.compress(model, method="cake", budget=48, window=WINDOW) as handle:
        batch = pipe([long, short], batch_size=2, **kw)
        stats = handle.stats
        alone = [pipe(text, **kw) for text in (long, short)]
        ids = tok(long, return_tensors="pt")
        direct = model.generate(**ids, **kw)
    assert stats[0]["tokens"][0] == n + 5  # the long row, compressed to the budget:
    assert sum(s["kept"][0] for s in stats) == 48 * model.config.num_hidden_layers
    assert batch == alone
    assert alone[0][0]["generated_text"] == tok.decode(direct[0], skip_special_tokens=True)


# ---- README's "Supported models" table, generated from the lists above ----------------------------------------
CONTRACTS = [test_identity_when_budget_covers_the_length, test_continuation_equals_full_cache_with_evicted_entries_hidden,
             test_batch_equals_each_row_alone, test_memory_is_freed]
CONTRACT_NAMES = {
    "test_identity_when_budget_covers_the_length": "identity when budget ≥ length",
    "test_continuation_equals_full_cache_with_evicted_entries_hidden": "continuation = full cache with evicted "
                                                                       "entries hidden",
    "test_batch_equals_each_row_alone": "batch = rows alone",
    "test_memory_is_freed": "memory freed",
}
BEGIN, END = "<!-- supported-models: generated by tests/test_families.py -->", "<!-- end supported-models -->"


def _parametrized_families(test) -> list[str]:
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == "family":
            return list(mark.args[1])
    return []


def _classes(family: str):
    """(model class, default config of its text decoder, text family) of a FAMILIES or COMPOSITE entry."""
    if family in COMPOSITE:
        config_cls, model_cls, text_family = COMPOSITE[family]
        return model_cls, config_cls().get_text_config(decoder=True), text_family
    config_cls, model_cls, _ = FAMILIES[family]
    return model_cls, config_cls(), family


def _architecture(family: str) -> str:
    model_cls, config, text_family = _classes(family)
    notes = []
    if family in COMPOSITE:
        notes.append(f"multimodal; its text decoder as `{text_family}`, text prompts only (images refused)")
    if any(hasattr(m, "qkv_proj") for m in attention_modules(tiny_model(family, layers=1))):
        notes.append("fused `qkv_proj`")
    if any(getattr(config, k, None) for k in ("num_local_experts", "num_experts")):
        notes.append("mixture-of-experts MLP")
    if text_family in ("gemma2", "gemma3_text"):
        notes.append("sliding-window and global layers")
    elif family in SLIDING:
        notes.append("optional sliding window on every layer")
    if getattr(config, "query_pre_attn_scalar", None):
        notes.append("query pre-attention scaling")
    if family in SOFTCAP:
        notes.append(f"attention logit soft-capping ({config.attn_logit_softcapping:g})")
    return ", ".join(notes) or "standard"


def _attention(family: str) -> str:
    _, _, text_family = _classes(family)
    # sdpa drops soft-capping: refused (transformers 5.24 no longer offers it for Gemma 2)
    supported = [impl for impl in SUPPORTED_ATTENTION if not (impl == "sdpa" and text_family in NO_SDPA)]
    tested = ["eager" if text_family in NO_SDPA else "sdpa"]
    return ", ".join(f"**{impl}**" if impl in tested else impl for impl in supported)


EXTRAS = {  # family-specific tests beyond the contracts, by the lists that parametrize them
    "sliding windows exercised (identity, continuation, batch and memory past the window)": SLIDING,
    "soft-capped prefill scores, decode attention and decode eviction": SOFTCAP,
    "fused projection found": ("phi3",),
}


def _tested(family: str) -> list[str]:
    """The contracts run on `family`: this file's (by their parametrization), test_core's CAKE reference
    selection and test_transformers_compat's generate + continue (both over FAMILIES), this file's composite
    generate + continue."""
    contracts = [(CONTRACT_NAMES[t.__name__], _parametrized_families(t)) for t in CONTRACTS]
    contracts += [("cake = reference selection", list(FAMILIES)),
                  ("generate + continue", list(FAMILIES) + _parametrized_families(test_composite_generates_and_continues))]
    return [name for name, families in contracts if family in families]


def supported_models_table() -> str:
    low, high = TESTED_TRANSFORMERS
    everything = _tested("llama")
    rows = ["| family (`model_type`) | class | attention | tested | attention implementations |",
            "|---|---|---|---|---|"]
    for family in ALL:
        done = _tested(family)
        tested = ["all contracts" if done == everything else
                  "contracts but " + ", ".join(c for c in everything if c not in done)]
        tested += [what for what, families in EXTRAS.items() if family in families]
        rows.append(f"| `{family}` | `{_classes(family)[0].__name__}` | {_architecture(family)} | "
                    f"{'; '.join(tested)} | {_attention(family)} |")
    return "\n".join([BEGIN, *rows, "",
                      f"Contracts, on tiny random models of every family with transformers {low[0]}.{low[1]} and "
                      f"{high[0]}.{high[1]} (CI runs both): {'; '.join(everything)}. Attention implementations: "
                      "**bold** the one the tests run (CPU); the others, where transformers offers them for the class, "
                      "take the same path (the prompt: the model's own kernel; steps over the compressed cache: "
                      "cakekv's); flash_attention_2 and flash_attention_3 run through compress in "
                      "tests/test_attention_backends.py (a torch stand-in for the flash-attn kernels where the package "
                      "is absent, the package itself where installed). flex_attention is refused.", END])


def test_readme_table_is_current():
    readme = (ROOT / "README.md").read_text()
    found = re.search(re.escape(BEGIN) + ".*?" + re.escape(END), readme, re.S)
    assert found, "README.md has no generated supported-models table"
    assert found.group(0) == supported_models_table(), "run `python tests/test_families.py` to regenerate it"


if __name__ == "__main__":  # rewrite README's table
    path = ROOT / "README.md"
    text = path.read_text()
    table = supported_models_table()
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: table, text, flags=re.S)
    else:
        raise SystemExit(f"README.md: put the markers {BEGIN} ... {END} where the table goes")
    path.write_text(text)
    print(table)
