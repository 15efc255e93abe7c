"""Prompts at and past the model's maximum position: cakekv does what the model does without it, never fails in
its own ops. At the maximum (the last generated token at position max - 1) and past it (RoPE models extrapolate:
transformers raises nothing), `full` generates the plain model's tokens and every compressing method generates
without error, its cache within budget, the model unpatched afterwards; if the plain model raises, so must the
compressed one, with the model's error."""
from __future__ import annotations

import pytest
import torch

import cakekv
from helpers import is_unpatched, prompt, tiny_model

MAX_POS = 1024
NEW = 6


def generate(model, ids):
    return model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def outcome(run):
    """The tokens a run gives, or the type of the error it raises."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - compared with the plain model's behaviour
        return type(error)


@pytest.mark.parametrize("length", [MAX_POS - NEW, MAX_POS + 100])
@pytest.mark.parametrize("method", ["full", "cake", "snapkv", "adakv"])
def test_long_prompt_behaves_as_the_model(method, length):
    model = tiny_model("llama", max_position_embeddings=MAX_POS)
    ids = prompt(length)
    plain = outcome(lambda: generate(model, ids))
    with cakekv.compress(model, method=method, budget=128, window=16) as handle:
        got = outcome(lambda: generate(model, ids))
    assert is_unpatched(model)
    if isinstance(plain, type):
        assert got is plain, f"plain model raised {plain.__name__}, cakekv gave {got!r}"
        return
    assert isinstance(got, torch.Tensor), f"cakekv raised {got.__name__} where the plain model generated"
    assert got.shape == plain.shape
    if method == "full":
        assert torch.equal(got, plain)
    else:  # the budget contract: B entries per layer and KV head on average, plus what decoding appended
        layers = len(handle.stats)
        kept = sum(sum(row) / len(row) for layer in handle.stats for row in layer["kept_per_head"])
        assert kept <= layers * (128 + NEW), f"{kept} entries kept per KV head over {layers} layers of budget 128"
