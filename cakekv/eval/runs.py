"""The methods x budgets loop of an evaluation: runs, their up-front checks, the loaded setup, and
every run over a list of prompts in batches with a progress bar.

Imports nothing heavy at module level: generation (torch) is imported when the runs are evaluated."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from ..arguments import check_arguments
from ..defaults import QUERY_AGNOSTIC_METHOD
from .parallel import SINGLE, Group, merge_interleaved
from .prompts import Encoded, Prompt, encode_prompt, group_indices

# Methods an evaluation compares when none is named, by protocol: a context compressed before its question is
# asked needs a method whose scores do not come from the question.
DEFAULT_METHODS = {"question-aware": ("full", "cake", "snapkv"),
                   "context-only": ("full", QUERY_AGNOSTIC_METHOD, "cake")}
FULL = "full"


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
    """methods x budgets; ``full`` once (budget None, run with the smallest valid budget). Each run
    is checked up front as ``cakekv.compress()`` will check it (``cakekv.arguments.check_arguments``, no torch)."""
    for m in methods:
        check_arguments(m, window + 1, window)
    if any(m != FULL for m in methods) and not budgets:
        raise ValueError("budgets: at least one budget is needed for compressing methods")
    runs: list[Run] = []
    for m in dict.fromkeys(methods):
        if m == FULL:
            runs.append(Run(FULL, None))
        else:
            runs.extend(Run(m, int(b)) for b in dict.fromkeys(budgets))
    for run in runs:
        if run.budget is not None:
            check_arguments(run.method, run.budget, window)
    return runs


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
    group: Group = SINGLE  # the processes of a launched run (.parallel), each predicting its shard

    def encode(self, prompt: Prompt) -> Encoded:
        """``prompt`` tokenized for this setup's protocol."""
        return encode_prompt(self.tokenizer, prompt, self.protocol)


def progress_bar(iterable=None, **kwargs):
    from tqdm.auto import tqdm
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def evaluate_items(setup: Setup, items: Sequence[tuple[Any, int, Any]], *, desc: str,
                   record: Callable[[Run, Any, Any], dict]) -> list[dict]:
    """Every run x item, items being (encoded prompt, max_new_tokens, payload); one
    ``record(run, payload, generation)`` per generation, run by run in the items' order, with a
    progress bar. Items go through :func:`.generation.generate_batch` in the batches of
    :func:`item_batches`. Launched processes (``setup.group``) each take their shard of the items; the
    main process returns every record, in the same order, the others an empty list."""
    from . import generation
    mine = [items[i] for i in setup.group.shard(len(items))]
    per_run: list[list[dict]] = []
    bar = progress_bar(total=len(mine) * len(setup.runs), desc=desc, disable=not setup.progress)
    try:
        for run in setup.runs:
            bar.set_postfix_str(run.label)
            by_item: dict[int, dict] = {}
            for batch in item_batches(mine, setup.batch_size, setup.protocol):
                gens = generation.generate_batch(
                    setup.model, setup.tokenizer, [mine[i][0] for i in batch], method=run.method,
                    budget=run.budget, window=setup.window, protocol=setup.protocol, options=setup.options,
                    max_new_tokens=mine[batch[0]][1])
                for i, gen in zip(batch, gens):
                    by_item[i] = record(run, mine[i][2], gen)
                    bar.update(1)
            per_run.append([by_item[i] for i in range(len(mine))])
    finally:
        bar.close()
    shards = setup.group.gather(per_run)
    if shards is None:
        return []
    return [rec for r in range(len(setup.runs)) for rec in merge_interleaved([shard[r] for shard in shards])]


def item_batches(items: Sequence[tuple[Any, int, Any]], batch_size: int,
                 protocol: str = "question-aware") -> list[list[int]]:
    """Indices of ``items`` in batches sharing one max_new_tokens. Question-aware: at most
    ``batch_size`` prompts of similar lengths (sorted by length) so that little of a batch is padding.
    Context-only: the prompts of one context, whatever their number (they share its prefill)."""
    if protocol == "context-only":
        return group_indices((encoded.context_key, max_new) for encoded, max_new, _ in items)
    order = sorted(range(len(items)), key=lambda i: (items[i][1], items[i][0].full.numel()))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and items[batches[-1][0]][1] == items[i][1]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
