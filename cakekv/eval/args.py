"""The command line of the evaluations: the arguments they share, their parsing (lists, method
options), the range checks the ``cakekv`` command applies too, the loaded :class:`~.runs.Setup`, and
the ``main()`` of an evaluation script.

Imports nothing heavy at module level (``cakekv --help`` builds every parser): the model and torch
are loaded by :func:`setup_from_args`."""
from __future__ import annotations

import argparse
import ast
import re
from typing import Any, Callable, Iterable, Sequence

from .errors import report_user_errors
from .plots import figure_class
from .prompts import PROTOCOLS, use_chat
from .runs import DEFAULT_METHODS, Setup, expand_runs


# ----------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------
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


def parse_lengths(values, kind: str) -> list[int]:
    """``--lengths``: at least one length, each of at least 16 tokens (``kind``: "prompt" or "context")."""
    lengths = parse_int_list(values, "lengths")
    if not lengths or min(lengths) < 16:
        raise ValueError(f"lengths: give {kind} lengths of at least 16 tokens")
    return lengths


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


def split_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--option``) to a dict, without checking them against any method (no torch): a
    malformed item or a key given twice is a ValueError naming ``--option``."""
    options: dict[str, Any] = {}
    given: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--option: expected KEY=VALUE, got {item!r}")
        if key in given:
            raise ValueError(f"--option: {key} given twice ({given[key]!r} and {item!r}); give it once")
        given[key], options[key] = item, parse_value(value)
    return options


def parse_options(items: Sequence[str] | None, methods: Sequence[str] = ()) -> dict[str, Any]:
    """`split_options`, then checked against the declared options of each of ``methods`` (before any model is
    loaded); errors are ValueErrors naming ``--option``."""
    from ..methods import get_method
    options = split_options(items)
    for method in methods:
        declared = get_method(method).Options
        try:
            declared.build(method, options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--option {e}") from None
    return options


def compress_options(items: Sequence[str] | None, methods: Sequence[str], prefill_chunk: int | None,
                     window: int) -> dict[str, Any]:
    """The keyword arguments for `cakekv.compress` beside method, budget and window: ``--option``'s method options
    (`parse_options`) and ``--prefill-chunk`` (checked; None: none)."""
    from ..arguments import check_prefill_chunk
    options = parse_options(items, methods)
    if prefill_chunk is not None:
        options["prefill_chunk"] = check_prefill_chunk(prefill_chunk, window)
    return options


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placements by name


def add_common_arguments(parser: argparse.ArgumentParser, *, default_out: str,
                         default_budgets: str = "128,256,512", chat: bool = True) -> None:
    """The arguments every evaluation takes (``--chat`` only where ``chat``: LongBench has chat formats of its own)."""
    g = parser.add_argument_group("model and compression")
    g.add_argument("--model", default=None,
                   help="local model folder or cached Hugging Face id (offline); default: the shipped tiny model")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available; under "
                                                    "torchrun / accelerate launch: cuda:LOCAL_RANK)")
    g.add_argument("--device-map", choices=DEVICE_MAPS, default=None,
                   help="spread a model too large for one GPU over the visible GPUs (and CPU), as accelerate's "
                        "device_map places its layers (needs accelerate; one process)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (auto: bf16/fp16 as the "
                                                   "model's config says on GPU, float32 on CPU)")
    g.add_argument("--attn-implementation", default=None, help="sdpa (default), eager or flash_attention_2")
    g.add_argument("--methods", nargs="+", default=None,
                   help="methods to compare, comma or space separated (default: "
                        + "; ".join(f"{','.join(m)} under {p}" for p, m in DEFAULT_METHODS.items()) + ")")
    g.add_argument("--budgets", nargs="+", default=default_budgets,
                   help="KV budgets (entries per layer per KV head, window included) (default: %(default)s)")
    g.add_argument("--window", type=int, default=32, help="observation window (default: %(default)s)")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option passed to cakekv.compress (repeatable), e.g. --option gamma=200")
    g.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                   help="read a longer prompt (context-only: context) this many tokens at a time, the cache cut "
                        "back to the budget after each chunk (default: one forward)")
    g.add_argument("--protocol", choices=PROTOCOLS, default="question-aware",
                   help="question-aware: compress the whole prompt; context-only: compress the context "
                        "once, then append each of its questions to a copy (default: %(default)s)")
    if chat:
        g.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                       help="wrap prompts with the tokenizer's chat template (auto: when it has one)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="prompts generated together, left-padded (question-aware protocol; context-only "
                        "answers the prompts of one context together, from one prefill of it) "
                        "(default: %(default)s)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=default_out, help="results folder (default: %(default)s)")
    g.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")


# integer flags of any command (cakekv or an evaluation script) that must be >= 1
_POSITIVE = ("window", "max_new_tokens", "samples", "limit", "max_length", "facts", "threads")


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Range checks of parsed flags, reported as argparse reports its own errors (usage, exit code 2)."""
    for name in _POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "depth", None) is not None and not 0.0 <= args.depth <= 1.0:
        parser.error("--depth must be between 0 and 1")


def setup_from_args(args: argparse.Namespace, model=None, tokenizer=None) -> Setup:
    """Validate the common arguments (before loading anything heavy), then load the model."""
    methods = split_list(args.methods) if args.methods else list(DEFAULT_METHODS[args.protocol])
    budgets = parse_int_list(args.budgets, "budgets")
    runs = expand_runs(methods, budgets, args.window)
    options = compress_options(args.option, methods, getattr(args, "prefill_chunk", None), args.window)
    batch_size = getattr(args, "batch_size", 1)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    figure_class()  # every report has a plot: a missing matplotlib fails now, not after the run
    from .parallel import launched_group, process_group
    device_map = getattr(args, "device_map", None)
    if device_map and launched_group().size > 1:
        raise ValueError(f"--device-map: one process spreads the model over the GPUs; {launched_group().size} were "
                         "launched (launch one, or drop --device-map to run one model per GPU)")
    group, device = process_group(args.device)
    import torch

    from .models import load_model
    if model is None:
        model, tokenizer = load_model(args.model, device, args.dtype, args.attn_implementation, device_map=device_map)
    torch.manual_seed(args.seed)
    name = args.model or "cakekv/tiny-llama"
    chat = use_chat(tokenizer, getattr(args, "chat", "off"))  # without --chat (LongBench) the evaluation sets it
    return Setup(model, tokenizer, name, runs, args.window, options, args.protocol, chat, args.out, args.seed,
                 not args.no_progress and group.main, batch_size, group)


def script_main(prog: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace], Any]) -> Callable[[list[str] | None], int]:
    """The ``main(argv=None) -> int`` of an evaluation script: what ``cakekv eval NAME`` does (parse
    with ``add_arguments``, the same range checks and error handler), then ``run``."""
    @report_user_errors
    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
        add_arguments(parser)
        args = parser.parse_args(argv)
        check_ranges(parser, args)
        run(args)
        return 0
    return main
