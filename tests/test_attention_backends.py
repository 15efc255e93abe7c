"""Every attention implementation cakekv supports goes through `compress`: the prompt attends with the model's own
backend (flash attention loads its kernels by the implementation's name, which is cakekv's wrapper's while
compressed), the compressed cache continues with cakekv's decode attention.

Where the flash-attn package is absent (CPU CI), transformers' flash integration is given a stand-in: torch
functions with flash-attn's signatures, loaded only under the names transformers knows ("flash_attention_2",
"flash_attention_3"), any other name failing as the real loader does (it then looks for a hub kernel of that
name). Where the package is installed, the same tests run on it for real."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers.modeling_flash_attention_utils as fa_utils

import cakekv
from helpers import is_unpatched, left_padded, prompt, tiny_model

FLASH = ("flash_attention_2", "flash_attention_3")
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _attend(q, k, v, scale, causal, window, softcap):
    """[Lq, H, D] over [Lk, Hkv, D] (flash-attn's layout of one sequence), causal aligned bottom-right as
    flash-attn >= 2.1, within `window` = (left, right) when left >= 0."""
    lq, lk = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    qi = torch.arange(lq)[:, None] + (lk - lq)
    ki = torch.arange(lk)[None, :]
    visible = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        visible &= ki <= qi
    if window is not None and window[0] >= 0:
        visible &= ki >= qi - window[0]
    weights = torch.softmax(logits.masked_fill(~visible.to(logits.device), float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", weights, v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False):
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return torch.stack([_attend(q[b], k[b], v[b], scale, causal, window_size, softcap) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           deterministic=False):
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for i in range(cu_seqlens_q.shape[0] - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        out[qs:qe] = _attend(q[qs:qe], k[ks:ke], v[ks:ke], scale, causal, window_size, softcap)
    return out


def _stand_in_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
    """transformers' `_lazy_imports` with the stand-in kernels: the known flash names load, any other name
    fails as the real loader does when no hub kernel has that name."""
    if implementation not in FLASH:
        raise ValueError(f"Could not find a kernel repository '{implementation}' compatible with your device")
    return flash_attn_func, flash_attn_varlen_func, None, fa_utils._pad_input, fa_utils._unpad_input


@pytest.fixture
def flash_kernels(monkeypatch):
    """The flash integration as on a machine with flash-attn: the real package where installed, else the
    stand-in (the loader's memo is reset either way, so each test loads by the name it is given)."""
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
    if not HAS_FLASH_ATTN:
        monkeypatch.setattr(fa_utils, "_lazy_imports", _stand_in_imports)


def flash_model(implementation: str, **kw):
    """A tiny Llama built with sdpa, switched to a flash implementation (`from_pretrained` would refuse one
    whose package is missing)."""
    model = tiny_model("llama", **kw)
    model.config._attn_implementation = implementation
    device = "cuda" if HAS_FLASH_ATTN else "cpu"
    dtype = torch.bfloat16 if HAS_FLASH_ATTN else torch.float32
    return model.to(device=device, dtype=dtype)


def generate(model, ids, mask, method, budget=40, window=8, steps=6):
    with cakekv.compress(model, method=method, budget=budget, window=window) as handle, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out, handle


@pytest.mark.parametrize("implementation", FLASH)
@pytest.mark.parametrize("method", ["cake", "snapkv"])
def test_flash_attention_models_compress_like_sdpa(flash_kernels, implementation, method):
    """A model loaded with flash attention compresses and decodes as the same model under sdpa: same tokens,
    logits within float tolerance, the prompt really compressed, the model restored after."""
    model = flash_model(implementation)
    device = next(model.parameters()).device
    ids = prompt(120, seed=3).to(device)
    mask = torch.ones_like(ids)
    got, handle = generate(model, ids, mask, method)
    assert model.config._attn_implementation == implementation and is_unpatched(model, implementation)
    assert all(row["kept"][0] < 120 for row in handle.stats)
    model.config._attn_implementation = "sdpa"
    want, _ = generate(model, ids, mask, method)
    assert torch.equal(got.sequences, want.sequences)
    tol = 1e-2 if HAS_FLASH_ATTN else 1e-4
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=tol, atol=tol)


def test_flash_attention_left_padded_batch(flash_kernels):
    """A left-padded batch under flash attention (transformers unpads it through the varlen kernel): each row
    decodes as it does alone."""
    model = flash_model("flash_attention_2")
    device = next(model.parameters()).device
    rows = [prompt(100, seed=5), prompt(70, seed=6)]
    ids, mask = left_padded(rows)
    batch, _ = generate(model, ids.to(device), mask.to(device), "cake")
    for r, row in enumerate(rows):
        alone, _ = generate(model, row.to(device), torch.ones_like(row).to(device), "cake")
        assert torch.equal(batch.sequences[r, ids.shape[1]:], alone.sequences[0, row.shape[1]:])


def test_unknown_flash_name_fails_like_transformers(flash_kernels):
    """The stand-in refuses names transformers does not know (what `cakekv_flash_attention_2` hit before the
    fix), so the tests above would fail if cakekv passed its wrapper's name."""
    if HAS_FLASH_ATTN:
        pytest.skip("checks the stand-in loader; the real package is installed")
    with pytest.raises(ValueError, match="cakekv_flash_attention_2"):
        fa_utils.lazy_import_flash_attention("cakekv_flash_attention_2")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_eager_and_sdpa_compress(attn):
    """The two implementations every machine has: compress, decode a few tokens, restored after."""
    model = tiny_model("llama", attn=attn)
    ids = prompt(120, seed=4)
    out, handle = generate(model, ids, torch.ones_like(ids), "cake")
    assert out.sequences.shape[1] == 126 and is_unpatched(model, attn)
    assert all(row["kept"][0] < 120 for row in handle.stats)


def test_attention_name_helper_reads_through_to_the_module():
    """The view a flash backend sees names the backend and reads every other attribute from the module."""
    from cakekv.patch import _ModuleAs
    model = tiny_model("llama")
    module = model.model.layers[0].self_attn
    view = _ModuleAs(module, "flash_attention_2")
    assert view.config._attn_implementation == "flash_attention_2"
    assert view.layer_idx == 0 and view.is_causal and view.config.hidden_size == model.config.hidden_size
    assert model.config._attn_implementation == "sdpa"
