"""Shared evaluation machinery: model loading, prompts split for the two protocols, compressed
generation (one prompt or a left-padded batch), the methods x budgets loop, and result writing
(JSON, markdown, PNG).

Protocols (methods.md §4.6):

* ``question-aware`` -- the whole prompt (context and question) is prefilled and compressed at once,
  then decoded greedily with ``model.generate`` (what CAKE, SnapKV, AdaKV, LAVa and KVCache-Factory
  do: the observation window is the tail of the prompt, i.e. the question).
* ``context-only`` -- the context alone is prefilled under ``cakekv.compress`` (one forward), then
  the question is appended to the compressed cache in one forward and the answer is decoded
  greedily token by token from that cache (what DefensiveKV / kvpress do: the compression does not
  know the question).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import struct
import sys
import time
import warnings
import zlib
from typing import Any, Callable, Iterable, Sequence

import torch

PROTOCOLS = ("question-aware", "context-only")
DEFAULT_METHODS = ("full", "cake", "snapkv")
FULL = "full"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded from local files."""


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
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


def load_model(model: str | None, device: str | None = None, dtype: str | None = None,
               attn_implementation: str | None = None, trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer from local files only (nothing is ever downloaded).

    ``model`` is a local folder or a Hugging Face id already in the local cache; None loads the
    shipped tiny model. Raises :class:`ModelLoadError` with an explanation when it cannot.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model_kwargs = dict(kwargs, dtype=torch_dtype)
        if attn_implementation:
            model_kwargs["attn_implementation"] = attn_implementation
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
    lm.to(device)
    lm.eval()
    return lm, tokenizer


# ----------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------
_SPLIT = "\x00cakekv-split\x00"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat(tokenizer, chat: str | bool) -> bool:
    """``chat`` is 'auto' (use the tokenizer's chat template when it has one), True/'on' or False/'off'."""
    if chat in (True, "on", "yes"):
        if not has_chat_template(tokenizer):
            raise ValueError("chat: the tokenizer has no chat template")
        return True
    if chat in (False, "off", "no", None):
        return False
    if chat == "auto":
        return has_chat_template(tokenizer)
    raise ValueError(f"chat: expected auto/on/off, got {chat!r}")


def chat_wrap(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


@dataclasses.dataclass
class Prompt:
    """A prompt as text, split where the context ends: ``context + question == full text``.

    ``add_special_tokens`` says whether tokenizing ``context`` adds the tokenizer's special tokens
    (False when the chat template already wrote the BOS token as text).
    """
    context: str
    question: str
    add_special_tokens: bool = True

    @property
    def text(self) -> str:
        return self.context + self.question


def make_prompt(tokenizer, before: str, context: str, after: str, *, chat: bool,
                answer_prefix: str = "", double_bos: bool = False) -> Prompt:
    """The prompt ``before + context + after`` (chat-wrapped when ``chat``) + ``answer_prefix``,
    split right after ``context``.

    With a chat template whose text starts with the BOS token, the BOS is not added a second time
    when tokenizing unless ``double_bos`` (the official LongBench/CAKE scripts double it for
    Llama-3 and Mistral [quirk])."""
    if chat:
        wrapped = chat_wrap(tokenizer, before + context + _SPLIT + after)
        if wrapped.count(_SPLIT) != 1:
            raise ValueError("the chat template altered the prompt so that the context cannot be located; "
                             "use --chat off")
        head, tail = wrapped.split(_SPLIT)
        bos = getattr(tokenizer, "bos_token", None)
        add_special = double_bos or not (bos and head.startswith(bos))
        return Prompt(head, tail + answer_prefix, add_special)
    return Prompt(before + context, after + answer_prefix, True)


@dataclasses.dataclass
class Encoded:
    """Token ids of a prompt: ``full`` (tokenized at once: question-aware) and ``context`` /
    ``question`` (tokenized separately: context-only)."""
    full: torch.Tensor
    context: torch.Tensor
    question: torch.Tensor


def encode_prompt(tokenizer, prompt: Prompt, protocol: str) -> Encoded:
    def ids(text, special):
        out = tokenizer(text, add_special_tokens=special, return_tensors="pt")["input_ids"]
        return out[0]

    if protocol == "question-aware":
        full = ids(prompt.text, prompt.add_special_tokens)
        return Encoded(full, full, full[:0])
    if protocol == "context-only":
        ctx = ids(prompt.context, prompt.add_special_tokens)
        q = ids(prompt.question, False)
        if q.numel() == 0:
            raise ValueError("context-only protocol: the question part of the prompt is empty")
        return Encoded(torch.cat([ctx, q]), ctx, q)
    raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")


# ----------------------------------------------------------------------------------------------
# one generation
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    seconds: float
    bytes_before: int | None
    bytes_after: int | None   # memory held by the cache (spare slots and positions included)
    bytes_kept: int | None    # K/V bytes of the entries kept
    kept_per_layer: list[float] | None

    @property
    def kv_fraction(self) -> float | None:
        """Fraction of the full cache's K/V entries kept."""
        if not self.bytes_before:
            return None
        return self.bytes_kept / self.bytes_before


def summarize_stats(stats: list[dict], rows: int = 1) -> list[tuple]:
    """Per row of a batch: (bytes of a full cache of the row's tokens, bytes held, bytes kept, kept
    entries per layer) from ``handle.stats``.

    Bytes held are the batch's allocation shared equally by its rows; the others are the row's own.
    A row that ended early is fed (and stores) tokens until the batch's last row ends: they count in
    its tokens and kept entries alike."""
    if not stats:
        return [(None, None, None, None)] * rows
    after = sum(int(layer["bytes_after"]) for layer in stats) // rows

    out = []
    for row in range(rows):
        before = sum(layer["tokens"][row] * len(layer["kept_per_head"][row]) * layer["entry_bytes"] for layer in stats)
        kept = sum(sum(layer["kept_per_head"][row]) * layer["entry_bytes"] for layer in stats)
        out.append((before, after, kept, [float(layer["kept"][row]) for layer in stats]))
    return out


def _eos_ids(tokenizer, model, extra: Sequence[int] = ()) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.extend(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.extend(extra)
    return list(dict.fromkeys(int(i) for i in ids))


def newline_token_id(tokenizer) -> int | None:
    """The id LongBench adds as an extra EOS for samsum: the last token of ``"\\n"`` without specials."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    return ids[-1] if ids else None


def compress_context(model, method: str, budget: int | None, window: int, options: dict | None = None):
    """``cakekv.compress`` for one run; ``full`` (budget None) gets the smallest valid budget, which
    it ignores."""
    import cakekv
    if budget is None:
        budget = window + 1
    return cakekv.compress(model, method=method, budget=int(budget), window=int(window), **(options or {}))


def generate(model, tokenizer, encoded: Encoded, **kwargs) -> Generation:
    """Greedy answer to one prompt: :func:`generate_batch` with one row (same keyword arguments)."""
    return generate_batch(model, tokenizer, [encoded], **kwargs)[0]


@torch.no_grad()
def generate_batch(model, tokenizer, encoded_list: Sequence[Encoded], *, method: str, budget: int | None,
                   window: int, protocol: str, max_new_tokens: int, options: dict | None = None,
                   extra_eos: Sequence[int] = (), min_new_tokens: int = 0) -> list[Generation]:
    """Greedy answers to several prompts with ``method``/``budget`` under ``protocol``, one per prompt.

    ``question-aware``: one left-padded batch, one ``model.generate`` under one ``cakekv.compress``;
    each row's answer is what that row alone would give. ``context-only``: one prompt at a time,
    because cakekv's cache takes padding only at the left of the prefill: the questions (of
    different lengths) appended to a batch of contexts would need padding between a row's context
    and its question, which the cache would store and attend to as real tokens.

    A row's ``seconds`` is the batch's wall time divided by its rows (rows share every forward);
    bytes are per row as :func:`summarize_stats` says."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "context-only" and len(encoded_list) > 1:
        one = dict(method=method, budget=budget, window=window, protocol=protocol, max_new_tokens=max_new_tokens,
                   options=options, extra_eos=extra_eos, min_new_tokens=min_new_tokens)
        return [generate(model, tokenizer, encoded, **one) for encoded in encoded_list]
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = _eos_ids(tokenizer, model, extra_eos)
    start = time.perf_counter()
    with compress_context(model, method, budget, window, options) as handle:
        if protocol == "question-aware":
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
            ids, mask = left_pad([e.full for e in encoded_list], pad, device)
            config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      eos_token_id=eos or None, pad_token_id=pad,
                                      min_new_tokens=min_new_tokens or None)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            answers = [cut_at_eos(row, eos) for row in out[:, ids.shape[1]:].tolist()]
        else:
            (encoded,) = encoded_list
            answers = [_greedy_continue(model, encoded.context.to(device)[None], encoded.question.to(device)[None],
                                        max_new_tokens, eos, min_new_tokens)]
        stats = handle.stats
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / len(encoded_list)
    return [Generation(tokenizer.decode(tokens, skip_special_tokens=True), tokens, int(encoded.full.numel()),
                       seconds, *row_stats)
            for encoded, tokens, row_stats in zip(encoded_list, answers, summarize_stats(stats, len(answers)))]


def left_pad(rows: Sequence[torch.Tensor], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, longest], attention mask) of 1-D id tensors padded on the left, as cakekv requires."""
    longest = max(row.numel() for row in rows)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - row.numel():] = row
        mask[i, longest - row.numel():] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(tokens: list[int], eos: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first EOS: what ``generate`` returns for a row alone (in a
    batch, rows that ended early are filled with padding until the last one ends)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return tokens


def _greedy_continue(model, context_ids, question_ids, max_new_tokens, eos, min_new_tokens):
    """Prefill the context (compressed by the active handle), append the question, decode greedily."""
    from ..patch import cache_kwargs, cache_of
    # logits of the last position only: a long context's full logits would not fit in memory
    out = model(input_ids=context_ids, use_cache=True, logits_to_keep=1)
    out = model(input_ids=question_ids, **cache_kwargs(model, cache_of(out)), use_cache=True, logits_to_keep=1)
    tokens: list[int] = []
    eos_set = set(eos)
    for step in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        if step < min_new_tokens and eos:
            logits[list(eos_set)] = -math.inf
        nxt = int(torch.argmax(logits))
        tokens.append(nxt)
        if nxt in eos_set or step + 1 == max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]], device=context_ids.device),
                    **cache_kwargs(model, cache_of(out)), use_cache=True)
    return tokens


# ----------------------------------------------------------------------------------------------
# methods x budgets
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    method: str
    budget: int | None  # None: full cache

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}-{self.budget}"

    @classmethod
    def from_label(cls, label: str) -> "Run":
        method, _, budget = label.rpartition("-")
        return cls(method, int(budget)) if method and budget.isdigit() else cls(label, None)

    @property
    def order(self) -> tuple:
        """Sort key: the full cache first, then by method and budget."""
        return (self.budget is not None, self.method, self.budget or 0)


def expand_runs(methods: Sequence[str], budgets: Sequence[int], window: int) -> list[Run]:
    """methods x budgets; ``full`` once (budget None). Checks names and budgets up front."""
    import cakekv
    known = cakekv.available_methods()
    runs: list[Run] = []
    for m in methods:
        if m not in known:
            raise ValueError(f"methods: unknown method {m!r}; available: {known}")
    if any(m != FULL for m in methods) and not budgets:
        raise ValueError("budgets: at least one budget is needed for compressing methods")
    for b in budgets:
        if b < window + 1:
            raise ValueError(f"budgets: each budget must be >= window + 1 = {window + 1}, got {b}")
    for m in dict.fromkeys(methods):
        if m == FULL:
            runs.append(Run(FULL, None))
        else:
            runs.extend(Run(m, int(b)) for b in dict.fromkeys(budgets))
    return runs


def split_list(values: Iterable[str] | str | None) -> list[str]:
    """Accept "a,b c" or ["a,b", "c"]."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        out.extend(x for x in re.split(r"[,\s]+", v) if x)
    return out


def _parse_list(values, name: str, convert, kind: str) -> list:
    out = []
    for x in split_list(values):
        try:
            out.append(convert(x))
        except ValueError:
            raise ValueError(f"{name}: expected {kind}, got {x!r}") from None
    return out


def parse_int_list(values, name: str) -> list[int]:
    return _parse_list(values, name, int, "integers")


def parse_float_list(values, name: str) -> list[float]:
    return _parse_list(values, name, float, "numbers")


_WORDS = {"True": True, "true": True, "False": False, "false": False, "None": None, "null": None}


def parse_value(text: str) -> Any:
    """An option value in Python or JSON spelling: True/true, False/false, None/null, numbers and
    quoted strings (any Python literal); anything else is the bare string. Not truthiness: the
    method's declared types check the result, so ``decode_evict=no`` is refused, not read as true."""
    text = text.strip()
    if text in _WORDS:
        return _WORDS[text]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_options(items: Sequence[str] | None, methods: Sequence[str] = ()) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--option``) to method options, checked against the declared options of
    each of ``methods`` (before any model is loaded); errors are ValueErrors naming ``--option``."""
    from ..methods import get_method
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option: expected KEY=VALUE, got {item!r}")
        options[key.strip()] = parse_value(value)
    for method in methods:
        declared = get_method(method).Options
        try:
            declared.build(method, options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--option {e}") from None
    return options


def add_common_arguments(parser: argparse.ArgumentParser, *, default_out: str,
                         default_budgets: str = "128,256,512") -> None:
    """The arguments every evaluation takes."""
    g = parser.add_argument_group("model and compression")
    g.add_argument("--model", default=None,
                   help="local model folder or cached Hugging Face id (offline); default: the shipped tiny model")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (auto: bf16/fp16 as the "
                                                   "model's config says on GPU, float32 on CPU)")
    g.add_argument("--attn-implementation", default=None, help="sdpa (default), eager or flash_attention_2")
    g.add_argument("--methods", nargs="+", default=",".join(DEFAULT_METHODS),
                   help="methods to compare, comma or space separated (default: %(default)s)")
    g.add_argument("--budgets", nargs="+", default=default_budgets,
                   help="KV budgets (entries per layer per KV head, window included) (default: %(default)s)")
    g.add_argument("--window", type=int, default=32, help="observation window (default: %(default)s)")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option passed to cakekv.compress (repeatable), e.g. --option gamma=200")
    g.add_argument("--protocol", choices=PROTOCOLS, default="question-aware",
                   help="question-aware: compress the whole prompt; context-only: compress the context, "
                        "then append the question (default: %(default)s)")
    g.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="wrap prompts with the tokenizer's chat template (auto: when it has one)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="prompts generated together, left-padded (question-aware protocol; context-only "
                        "runs them one at a time) (default: %(default)s)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=default_out, help="results folder (default: %(default)s)")
    g.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")


@dataclasses.dataclass
class Setup:
    model: Any
    tokenizer: Any
    model_name: str
    runs: list[Run]
    window: int
    options: dict[str, Any]
    protocol: str
    chat: bool
    out: str
    seed: int
    progress: bool
    batch_size: int = 1


def setup_from_args(args: argparse.Namespace, model=None, tokenizer=None) -> Setup:
    """Validate the common arguments (before loading anything heavy), then load the model."""
    methods = split_list(args.methods)
    budgets = parse_int_list(args.budgets, "budgets")
    runs = expand_runs(methods, budgets, args.window)
    options = parse_options(args.option, methods)
    batch_size = getattr(args, "batch_size", 1)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if model is None:
        model, tokenizer = load_model(args.model, args.device, args.dtype, args.attn_implementation)
    torch.manual_seed(args.seed)
    name = args.model or "cakekv/tiny-llama"
    return Setup(model, tokenizer, name, runs, args.window, options, args.protocol,
                 use_chat(tokenizer, args.chat), args.out, args.seed, not args.no_progress, batch_size)


def progress_bar(iterable=None, **kwargs):
    from tqdm.auto import tqdm
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def evaluate_items(setup: Setup, items: Sequence[tuple[Encoded, int, Any]], *, desc: str,
                   record: Callable[[Run, Any, Generation], dict]) -> list[dict]:
    """Every run x item, items being (encoded prompt, max_new_tokens, payload); one
    ``record(run, payload, generation)`` per generation, run by run in the items' order, with a
    progress bar. Items go through :func:`generate_batch` ``setup.batch_size`` at a time."""
    records: list[dict] = []
    bar = progress_bar(total=len(items) * len(setup.runs), desc=desc, disable=not setup.progress)
    try:
        for run in setup.runs:
            bar.set_postfix_str(run.label)
            by_item: dict[int, dict] = {}
            for batch in item_batches(items, setup.batch_size):
                gens = generate_batch(setup.model, setup.tokenizer, [items[i][0] for i in batch], method=run.method,
                                      budget=run.budget, window=setup.window, protocol=setup.protocol,
                                      options=setup.options, max_new_tokens=items[batch[0]][1])
                for i, gen in zip(batch, gens):
                    by_item[i] = record(run, items[i][2], gen)
                    bar.update(1)
            records.extend(by_item[i] for i in range(len(items)))
    finally:
        bar.close()
    return records


def item_batches(items: Sequence[tuple[Encoded, int, Any]], batch_size: int) -> list[list[int]]:
    """Indices of ``items`` in batches of at most ``batch_size`` sharing one max_new_tokens, each
    batch of prompts of similar lengths (sorted by length) so that little of it is padding."""
    order = sorted(range(len(items)), key=lambda i: (items[i][1], items[i][0].full.numel()))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and items[batches[-1][0]][1] == items[i][1]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
def environment_info(setup: Setup | None = None) -> dict[str, Any]:
    import transformers
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}
    if setup is not None:
        device = next(setup.model.parameters()).device
        info.update(model=setup.model_name, device=str(device),
                    dtype=str(next(setup.model.parameters()).dtype).replace("torch.", ""),
                    protocol=setup.protocol, window=setup.window, options=setup.options,
                    chat=setup.chat, seed=setup.seed, batch_size=setup.batch_size)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(str, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")


# ---- plots -------------------------------------------------------------------------------------
def _matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _warn_no_matplotlib(path: str) -> None:
    warnings.warn(f"matplotlib is not installed: {path} is a plain colour grid without labels "
                  "(`pip install matplotlib` or `pip install 'cakekv[eval]'` for labelled plots)",
                  stacklevel=3)


def plot_scores_vs_budget(scores: dict[Run, float], path: str, *, title: str, ylabel: str = "score") -> str:
    """One line per method (score against budget), the full cache as a dashed line."""
    series: dict[str, dict[int, float]] = {}
    full = None
    for run in sorted(scores, key=lambda r: r.order):
        if run.budget is None:
            full = scores[run]
        else:
            series.setdefault(run.method, {})[run.budget] = scores[run]
    plt = _matplotlib()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if plt is None:
        budgets = sorted({b for s in series.values() for b in s})
        grid = [[s.get(b, float("nan")) for b in budgets] for s in series.values()] or [[full or 0.0]]
        write_png_grid(grid, path, vmin=0.0, vmax=max([full or 0.0] + [v for r in grid for v in r
                                                                       if v == v]) or 1.0)
        _warn_no_matplotlib(path)
        return path
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    if full is not None:
        ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full cache")
    budgets = sorted({b for s in series.values() for b in s})
    if budgets and min(budgets) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("KV budget (entries per layer per KV head)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


NEEDLE_COLORS = ("#F0496E", "#EBB839", "#0CD79F")  # red (miss) -> yellow -> green (hit)


def plot_heatmaps(grids: dict[str, list[list[float]]], xs: Sequence[Any], ys: Sequence[Any], path: str, *,
                  title: str, xlabel: str, ylabel: str) -> str:
    """Heatmaps (one panel per key) of values in [0, 1]: rows = ys (top to bottom), columns = xs."""
    plt = _matplotlib()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if plt is None:
        # panels side by side, separated by one blank column
        rows = [[] for _ in ys]
        for k, grid in enumerate(grids.values()):
            for i, row in enumerate(grid):
                rows[i].extend(([float("nan")] if k else []) + list(row))
        write_png_grid(rows, path, vmin=0.0, vmax=1.0)
        _warn_no_matplotlib(path)
        return path
    from matplotlib.colors import LinearSegmentedColormap
    cmap = LinearSegmentedColormap.from_list("needle", list(NEEDLE_COLORS))
    n = len(grids)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    panel_w = max(3.2, 0.55 * len(xs) + 1.6)
    panel_h = max(2.4, 0.4 * len(ys) + 1.6)
    fig, axes = plt.subplots(nrows, cols, figsize=(panel_w * cols + 0.8, panel_h * nrows + 0.6), squeeze=False,
                             layout="constrained")
    image = None
    for k, (ax, (name, grid)) in enumerate(zip(axes.flat, grids.items())):
        image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([str(x) for x in xs], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(ys)))
        ax.set_yticklabels([str(y) for y in ys], fontsize=7)
        for i in range(len(ys) + 1):
            ax.axhline(i - 0.5, color="white", linewidth=0.5)
        for j in range(len(xs) + 1):
            ax.axvline(j - 0.5, color="white", linewidth=0.5)
        mean = _nanmean([v for row in grid for v in row])
        ax.set_title(f"{name}  (acc {100 * mean:.1f}%)", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if k % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02, label="fraction found")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]
    return sum(vals) / len(vals) if vals else float("nan")


def write_png_grid(grid: Sequence[Sequence[float]], path: str, *, vmin: float = 0.0, vmax: float = 1.0,
                   cell: int = 24) -> str:
    """A PNG of coloured cells (red -> yellow -> green, NaN = white) with no dependency beyond zlib."""
    stops = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in NEEDLE_COLORS]

    def colour(v):
        if v != v:
            return (255, 255, 255)
        t = 0.0 if vmax <= vmin else min(max((v - vmin) / (vmax - vmin), 0.0), 1.0)
        seg = min(int(t * 2), 1)
        u = t * 2 - seg
        a, b = stops[seg], stops[seg + 1]
        return tuple(round(a[k] + (b[k] - a[k]) * u) for k in range(3))

    nrows = max(len(grid), 1)
    ncols = max((len(r) for r in grid), default=1) or 1
    width, height = ncols * cell, nrows * cell
    raw = bytearray()
    for i in range(nrows):
        row = list(grid[i]) if i < len(grid) else []
        row += [float("nan")] * (ncols - len(row))
        line = bytearray()
        for v in row:
            r, g, b = colour(v)
            line += bytes((r, g, b)) * (cell - 1) + b"\xff\xff\xff"  # 1-pixel white separator
        for y in range(cell):
            raw += b"\x00" + (line if y < cell - 1 else b"\xff" * (3 * width))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b""))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png)
    return path


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def script_main(prog: str, doc: str, add_arguments, run):
    """The `main(argv=None) -> int` of an evaluation script: parse with `add_arguments`, call `run`."""
    @print_and_exit_on_error
    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
        add_arguments(parser)
        run(parser.parse_args(argv))
        return 0
    return main


def print_and_exit_on_error(func):
    """Decorator for script entry points: known errors become one line on stderr and exit code 1."""
    def wrapper(argv=None):
        try:
            return func(argv)
        except (ModelLoadError, FileNotFoundError, ValueError, ImportError) as e:
            print(f"cakekv: error: {e}", file=sys.stderr)
            return 1
    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper
