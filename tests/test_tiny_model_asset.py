"""The trained tiny Llama shipped in cakekv/assets/tiny-llama (made by experiments/train_tiny_model.py):
it loads offline with AutoModelForCausalLM / AutoTokenizer, is small, has GQA and >= 8 layers, supports
8K positions, and retrieves a needle from a short haystack on CPU."""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# CAKEKV_TINY_MODEL_DIR checks another copy (e.g. a fresh training output) against the same tests.
ASSET = Path(os.environ.get("CAKEKV_TINY_MODEL_DIR") or ROOT / "cakekv" / "assets" / "tiny-llama")

# Skipped only until the trained weights are committed (remove this skip then).
if not ASSET.is_dir():
    pytest.skip(f"{ASSET} does not exist yet", allow_module_level=True)

MAX_WEIGHT_BYTES = 16_000_000


def _tiny_data():
    spec = importlib.util.spec_from_file_location("cakekv_tiny_data", ROOT / "experiments" / "tiny_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def td():
    return _tiny_data()


@pytest.fixture(scope="module")
def loaded():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(ASSET), dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(ASSET), local_files_only=True)
    return model, tok


def test_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (ASSET / name).is_file(), name
    size = (ASSET / "model.safetensors").stat().st_size
    assert size <= MAX_WEIGHT_BYTES, f"weights are {size} bytes"


def test_architecture(loaded):
    model, tok = loaded
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers >= 8
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.max_position_embeddings >= 8192
    assert cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_type"] == "default"
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params * 2 <= MAX_WEIGHT_BYTES
    assert cfg.vocab_size >= len(tok) - 1


def test_tokenizer(loaded):
    model, tok = loaded
    assert tok.pad_token is not None and tok.pad_token_id == model.config.pad_token_id
    assert tok.padding_side == "left"
    ids = tok("The secret code of Alice Brown is 48213.").input_ids
    assert ids[0] == tok.bos_token_id == model.config.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "The secret code of Alice Brown is 48213."
    batch = tok(["short", "a longer text here"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2
    assert batch.attention_mask[0, 0] == 0  # left padding


def test_needle_1k_cpu(loaded, td):
    """A few 1K-token needle prompts (held-out text of this machine's stdlib as haystack) are answered
    exactly with greedy decoding on CPU in a few seconds. One miss out of four is tolerated, since the
    haystack text differs from machine to machine."""
    model, tok = loaded
    filler = td.default_filler_text(200_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: one thread is fast and immune to a busy machine
    try:
        t0 = time.time()
        acc, det = td.evaluate_needle(model, tok, lengths=[1024], depths=[0.1, 0.4, 0.6, 0.9], n_per_cell=1,
                                      filler_text=filler, seed=0, batch_size=4, return_details=True)
        elapsed = time.time() - t0
    finally:
        torch.set_num_threads(threads)
    assert det["n"] == 4
    assert det["correct"] >= 3, det["failures"]
    assert elapsed < 60, elapsed


def test_needle_example_is_deterministic(loaded, td):
    _, tok = loaded
    filler = td.default_filler_text(200_000)
    a = td.make_needle_example(tok, 1024, 0.5, seed=7, filler_text=filler)
    b = td.make_needle_example(tok, 1024, 0.5, seed=7, filler_text=filler)
    assert a == b
    assert len(a["input_ids"]) == 1024
    assert a["input_ids"][0] == tok.bos_token_id
    assert a["answer"].isdigit() and len(a["answer"]) == 5
    needle = tok.decode(a["input_ids"][a["needle_index"]:a["needle_index"] + 30])
    assert needle.startswith(f"The secret code of {a['name']} is {a['answer']}.")
