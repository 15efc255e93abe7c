"""The names of the evaluation machinery under their former module, so that ``cakekv.eval.common.X``
keeps working. The code lives in modules by concern; new code imports from them:

* :mod:`.models` -- loading a model offline (:func:`load_model`, device and dtype);
* :mod:`.prompts` -- the two protocols' prompts (:class:`Prompt`, :func:`encode_prompt`);
* :mod:`.generation` -- compressed greedy generation (:func:`generate`, :func:`generate_batch`);
* :mod:`.runs` -- methods x budgets (:class:`Run`, :class:`Setup`, :func:`evaluate_items`);
* :mod:`.report`, :mod:`.plots` -- results as JSON, markdown and PNG;
* :mod:`.args` -- the shared arguments, their parsing, a script's ``main``;
* :mod:`.errors` -- the one error handler of the command line and the scripts.

Importing this module imports torch (through :mod:`.generation`); the modules above do not, except
:mod:`.models` and :mod:`.generation`."""
from __future__ import annotations

from .args import (add_common_arguments, parse_float_list, parse_int_list, parse_options, parse_value,
                   script_main, setup_from_args, split_list)
from .errors import ModelLoadError
from .generation import (Generation, compress_context, cut_at_eos, generate, generate_batch, left_pad,
                         newline_token_id, summarize_stats)
from .models import load_model, resolve_device, resolve_dtype, resolve_model_path, tiny_model_path
from .plots import NEEDLE_COLORS, figure_class, plot_heatmaps, plot_scores_vs_budget
from .prompts import PROTOCOLS, Encoded, Prompt, chat_wrap, encode_prompt, has_chat_template, make_prompt, use_chat
from .report import environment_info, fmt_bytes, markdown_table, write_json, write_text
from .runs import DEFAULT_METHODS, FULL, Run, Setup, evaluate_items, expand_runs, item_batches, progress_bar

__all__ = [
    "DEFAULT_METHODS", "FULL", "NEEDLE_COLORS", "PROTOCOLS", "Encoded", "Generation", "ModelLoadError", "Prompt",
    "Run", "Setup", "add_common_arguments", "chat_wrap", "compress_context", "cut_at_eos", "encode_prompt",
    "environment_info", "evaluate_items", "expand_runs", "figure_class", "fmt_bytes", "generate",
    "generate_batch", "has_chat_template", "item_batches", "left_pad", "load_model", "make_prompt",
    "markdown_table", "newline_token_id", "parse_float_list", "parse_int_list", "parse_options", "parse_value",
    "plot_heatmaps", "plot_scores_vs_budget", "progress_bar", "resolve_device", "resolve_dtype",
    "resolve_model_path", "script_main", "setup_from_args", "split_list", "summarize_stats", "tiny_model_path",
    "use_chat", "write_json", "write_text",
]
