"""Prompts for the two evaluation protocols, split where the context ends.

* ``question-aware`` -- the whole prompt (context and question) is prefilled and compressed at once,
  then decoded greedily with ``model.generate`` (what CAKE, SnapKV, AdaKV, LAVa and KVCache-Factory
  do: the observation window is the tail of the prompt, i.e. the question).
* ``context-only`` -- the context alone is prefilled under ``cakekv.compress`` (one forward), then
  the question is appended to the compressed cache in one forward and the answer is decoded
  greedily token by token from that cache (what DefensiveKV / kvpress do: the compression does not
  know the question). Prompts with the same context ids (:func:`context_groups`) share one prefill,
  each question continuing from its own copy of the compressed cache.

Torch is imported only when a prompt is tokenized.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Sequence

if TYPE_CHECKING:
    import torch

PROTOCOLS = ("question-aware", "context-only")

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


def chat_wrap(tokenizer, text: str, system: str | None = None) -> str:
    """``text`` as the user's message (after ``system``'s, if given) in the tokenizer's chat template."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return tokenizer.apply_chat_template(messages + [{"role": "user", "content": text}], tokenize=False,
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


def make_prompt(tokenizer, before: str, context: str, after: str, *, chat: bool | Callable[[str], str],
                answer_prefix: str = "", double_bos: bool = False) -> Prompt:
    """The prompt ``before + context + after`` (chat-wrapped when ``chat``: by the tokenizer's chat
    template, or by ``chat`` itself when it is a function of the text) + ``answer_prefix``, split right
    after ``context``.

    With a chat template whose text starts with the BOS token, the BOS is not added a second time
    when tokenizing unless ``double_bos`` (the official LongBench/CAKE scripts double it for
    Llama-3 and Mistral [quirk])."""
    if chat:
        text = before + context + _SPLIT + after
        wrapped = chat(text) if callable(chat) else chat_wrap(tokenizer, text)
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

    @property
    def context_key(self) -> bytes:
        """A digest of the context ids: prompts with equal keys have the same context (a digest, so
        that grouping many long contexts holds no copy of them)."""
        return hashlib.sha256(self.context.cpu().numpy().tobytes()).digest()


def group_indices(keys: Iterable[Hashable]) -> list[list[int]]:
    """Indices of equal keys grouped, groups in the order of their first index."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def context_groups(encoded_list: Sequence[Encoded]) -> list[list[int]]:
    """Indices of the prompts grouped by context ids: under context-only, the questions of a group
    are answered from one compressed prefill of their context."""
    return group_indices(e.context_key for e in encoded_list)


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")


def encode_prompt(tokenizer, prompt: Prompt, protocol: str) -> Encoded:
    import torch

    def ids(text, special):
        out = tokenizer(text, add_special_tokens=special, return_tensors="pt")["input_ids"]
        return out[0]

    check_protocol(protocol)
    if protocol == "question-aware":
        full = ids(prompt.text, prompt.add_special_tokens)
        return Encoded(full, full, full[:0])
    ctx = ids(prompt.context, prompt.add_special_tokens)
    q = ids(prompt.question, False)
    if q.numel() == 0:
        raise ValueError("context-only protocol: the question part of the prompt is empty")
    return Encoded(torch.cat([ctx, q]), ctx, q)
