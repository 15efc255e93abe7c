"""A model too large for one device, spread by accelerate's device_map (``--device-map``): each compressed cache
layer is held on the device its layer runs on, and the answers are the unsplit model's, with and without decode
eviction.

Where the layers go: on two GPUs or more, layer 0 on cuda:0 and layer 1 on cuda:1; on one GPU, layer 1 offloaded to
the CPU (its weights brought to cuda:0 by accelerate's hooks at each forward); on the CPU, layer 1 offloaded to disk
(the same hooks). Only the first case puts cache layers on two devices: it runs on a machine with two GPUs."""
from __future__ import annotations

import json

import pytest
import torch

import cakekv
from helpers import byte_tokenizer, needs_eval_extra, tiny_lm

pytest.importorskip("accelerate", reason="device_map needs accelerate (optional: pip install accelerate)")


def placement() -> tuple[dict, list[torch.device]]:
    """(the device_map of the tiny model, the device each of its 2 layers runs on)."""
    if torch.cuda.device_count() >= 2:
        first, second, run_second = 0, 1, torch.device("cuda:1")
    elif torch.cuda.is_available():
        first, second, run_second = 0, "cpu", torch.device("cuda:0")
    else:
        first, second, run_second = "cpu", "disk", torch.device("cpu")
    main = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
                  "model.layers.1": second, "model.norm": first, "lm_head": first}
    return device_map, [main, run_second]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(the whole model on the main device, the same weights spread by the device_map)."""
    from transformers import AutoModelForCausalLM
    folder = tmp_path_factory.mktemp("tiny")
    tiny_lm().save_pretrained(folder)
    device_map, devices = placement()
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(devices[0]).eval()
    split = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=device_map,
                                                 offload_folder=str(tmp_path_factory.mktemp("offload"))).eval()
    return whole, split, devices


@pytest.mark.parametrize("decode_evict", [True, False])
def test_a_split_model_keeps_each_cache_layer_on_its_device_and_answers_as_a_whole_one(models, decode_evict):
    whole, split, devices = models
    assert len(set(map(str, split.hf_device_map.values()))) == 2
    ids = torch.randint(3, 259, (2, 90), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # a left-padded row
    answers = []
    for model in (whole, split):
        with cakekv.compress(model, method="cake", budget=40, window=8, decode_evict=decode_evict):
            out = model(input_ids=ids.to(devices[0]), attention_mask=mask.to(devices[0]), use_cache=True)
            cache = out.past_key_values
            assert [layer.keys.device for layer in cache.layers] == (
                devices if model is split else [devices[0]] * 2)
            answers.append(model.generate(input_ids=ids.to(devices[0]), attention_mask=mask.to(devices[0]),
                                          max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0))
    assert torch.equal(answers[0].cpu(), answers[1].cpu())


def test_eval_device_map(tmp_path, monkeypatch):
    """``--device-map auto`` loads through accelerate; without it, one line naming the argument."""
    needs_eval_extra("matplotlib")
    from cakekv import cli
    from cakekv.eval import models as eval_models
    folder = tmp_path / "tiny"
    tiny_lm().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    argv = ["eval", "needle", "--model", str(folder), "--lengths", "64", "--depths", "50", "--methods", "cake",
            "--budgets", "40", "--window", "8", "--max-new-tokens", "2", "--device-map", "auto", "--no-progress",
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    info = json.load(open(tmp_path / "out" / "results.json", encoding="utf-8"))["info"]
    where = "cuda" if torch.cuda.is_available() else "cpu"  # "devices": where a model spans several
    assert all(d.startswith(where) for d in info.get("devices", [info["device"]]))
    monkeypatch.setattr(eval_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="^--device-map: needs the accelerate package"):
        eval_models.load_model(str(folder), "cpu", device_map="auto")
