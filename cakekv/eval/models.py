"""Loading a causal LM and its tokenizer from local files only (nothing is ever downloaded), with
the device and dtype resolved from the command line's spelling ("auto", "bf16", "cuda:1", ...)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any

import torch

from .errors import ModelLoadError

__all__ = ["ModelLoadError", "load_model", "resolve_device", "resolve_dtype", "resolve_model_path",
           "tiny_model_path"]


def tiny_model_path() -> str:
    """Path of the tiny model shipped in the package (``cakekv/assets/tiny-llama``)."""
    import cakekv
    return os.path.join(os.path.dirname(os.path.abspath(cakekv.__file__)), "assets", "tiny-llama")


def resolve_model_path(model: str | None) -> str:
    """``model`` as given, or the shipped tiny model when None; a clear error if the tiny model is missing."""
    if model:
        return model
    path = tiny_model_path()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(
            f"the shipped tiny model is missing (expected a Hugging Face model folder at {path}); "
            "reinstall cakekv or pass --model PATH")
    return path


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return "auto" if str(device).startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {['auto', *_DTYPES]}, got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str | None) -> str:
    """"auto" -> cuda when available, else cpu; a named device is checked to exist (ValueError naming --device)."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {device!r} (use cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device!r} asked for, but this torch sees no CUDA device")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {device!r} asked for, but only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible")
    return device


def _looks_like_path(name: str) -> bool:
    """A model argument meant as a folder (not a hub id such as "org/name")."""
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


@contextlib.contextmanager
def no_progress_bars():
    """transformers' progress bars off for the block (as they were after it)."""
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_model(model: str | None, device: str | None = None, dtype: str | None = None,
               attn_implementation: str | None = None, trust_remote_code: bool = False,
               device_map: str | dict | None = None):
    """Load a causal LM and its tokenizer from local files only (nothing is ever downloaded).

    ``model`` is a local folder or a Hugging Face id already in the local cache; None loads the
    shipped tiny model. ``device_map`` (accelerate's: "auto", ... or a dict) spreads the layers over the
    devices instead of moving the model to ``device``. Raises :class:`ModelLoadError` with an explanation
    when it cannot.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ValueError("--device-map: needs the accelerate package, which is not installed (pip install accelerate)")
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model_kwargs = dict(kwargs, dtype=torch_dtype)
        if attn_implementation:
            model_kwargs["attn_implementation"] = attn_implementation
        if device_map is not None:
            model_kwargs["device_map"] = device_map
        # the shipped model loads at once: no loading bar on stderr (a user's model keeps it: loads take minutes)
        with contextlib.nullcontext() if model is not None else no_progress_bars():
            lm = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        if _looks_like_path(path) and not os.path.isdir(path):
            raise ModelLoadError(f"--model: no such folder {path!r} (cakekv never downloads: pass a folder with "
                                 "config.json, weights and tokenizer files)") from None
        where = "local folder" if os.path.isdir(path) else "model id (looked up in the local Hugging Face cache only)"
        raise ModelLoadError(
            f"cannot load {path!r} offline as a causal LM ({where}): {e}\n"
            "cakekv never downloads: pass a folder with config.json, weights and tokenizer files, or an id "
            "already in the Hugging Face cache") from e
    if device_map is None:
        lm.to(device)
    lm.eval()
    return lm, tokenizer
