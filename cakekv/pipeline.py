"""A transformers pipeline that compresses a context once and answers several questions from it.

    import cakekv.pipeline  # registers the task
    from transformers import pipeline

    qa = pipeline("cakekv-text-generation", model=model, tokenizer=tok, method="snapkv", budget=256)
    qa(context=document, questions=["Who ...?", "When ...?"], max_new_tokens=32)
    # -> [{"question": "Who ...?", "answer": "..."}, ...]
    qa(context=document, questions="Where ...?", budget=128)  # this call only: snapkv, budget 128

The compression settings (`method`, `budget`, `window`, `prefill_chunk`, and `options`: a dict of the method's
options) given
when the pipeline is built hold for every call; one given at a call replaces the pipeline's for that call
(`options` as a whole); those given nowhere are `compress`'s defaults, except the method: `kvzip`
(`cakekv.defaults.QUERY_AGNOSTIC_METHOD`), whose scores come from the context itself, since the context is
compressed before any question exists (a window-scored method keeps what the context's last tokens attend to,
which says nothing of what will be asked). They are checked, with
`compress`'s errors, when the pipeline is built and at each call, before any work.

The model stays on the device it is on: unlike transformers' pipelines, which move a model to the first
accelerator when no `device` is given, this one moves it only when `device` is passed (`device="cuda"`).

The context is read and compressed by one prefill (`prefill_context`); each question continues from its
own copy of the compressed cache (`question_caches`), so questions neither re-read the context nor see
each other. `cakekv eval --protocol context-only` answers the questions sharing a context the same way.
Questions are answered one after another (a batch would need padding between context and question).
Generation keywords (`max_new_tokens`, `do_sample`, `temperature`, ...) go to `model.generate`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .api import checked_method, compress
from .defaults import QUERY_AGNOSTIC_METHOD
from .patch import cache_kwargs, cache_of
from .reconstruction import with_repeat_prompt

TASK = "cakekv-text-generation"
# compress's defaults, but the method: the context is compressed before its questions exist
SETTINGS = {"method": QUERY_AGNOSTIC_METHOD, "budget": 1024, "window": 32, "options": None, "prefill_chunk": None}


def prefill_context(model, context_ids: torch.Tensor):
    """The compressed cache of ``context_ids`` ([1, n]) after one forward under the active
    ``cakekv.compress``; logits of the last position only (a long context's full logits would not fit
    in memory)."""
    return cache_of(model(input_ids=context_ids, use_cache=True, logits_to_keep=1))


def question_caches(cache, questions: int):
    """One independent cache per question, made as each is taken: clones of ``cache``, then ``cache``
    itself for the last question (nothing reads it afterwards), so a lone question costs no copy."""
    for _ in range(questions - 1):
        yield cache.clone()
    yield cache


def split_settings(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(compression settings, defaults filled in and `options` a dict; generation keywords) of the pipeline's
    forward parameters, which hold both."""
    settings = {name: params.get(name, default) for name, default in SETTINGS.items()}
    options = settings["options"]
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options: must be a dict of the method's options, got {type(options).__name__} {options!r}")
    settings["options"] = dict(options or {})
    return settings, {k: v for k, v in params.items() if k not in SETTINGS}


class CompressedContextPipeline(Pipeline):
    """Context + questions -> one answer per question, the context compressed once (see module docstring)."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, model, *args, device=None, **kwargs):
        # transformers moves a model to the first accelerator when no device is given; keep it where it is
        # (a model sharded by accelerate has no single device and is never moved)
        if device is None and getattr(model, "hf_device_map", None) is None:
            device = model.device
        super().__init__(model, *args, device=device, **kwargs)

    def __call__(self, context: str, questions: str | list[str], **kwargs):
        if not isinstance(context, str):
            raise TypeError(f"context: must be a str, got {type(context).__name__}")
        single = isinstance(questions, str)
        questions = [questions] if single else list(questions)
        if not questions or not all(isinstance(q, str) for q in questions):
            raise TypeError("questions: must be a str or a non-empty list of str")
        return super().__call__({"context": context, "questions": questions}, **kwargs)

    def _sanitize_parameters(self, **params):
        """Every keyword goes to `_forward` (transformers lays a call's over the construction's); the settings
        they make in effect are checked now, so bad ones fail when the pipeline is built or called."""
        built = getattr(self, "_forward_params", {})  # none yet while the pipeline is being built
        settings, _ = split_settings({**built, **params})
        checked_method(self.model, **settings)
        return {}, params, {}

    def preprocess(self, inputs):
        context = self.tokenizer(inputs["context"], return_tensors="pt")["input_ids"]
        questions = [self.tokenizer(q, return_tensors="pt", add_special_tokens=False)["input_ids"]
                     for q in inputs["questions"]]
        return {"context_ids": context, "question_ids": questions, "questions": inputs["questions"]}

    def _forward(self, model_inputs, **params):
        settings, generate_kwargs = split_settings(params)
        options = settings.pop("options")
        model = self.model
        device = model.device
        context = model_inputs["context_ids"].to(device)
        kwargs = {"pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **generate_kwargs}
        questions = model_inputs["question_ids"]
        answers = []
        options = with_repeat_prompt(settings["method"], options, self.tokenizer)
        with torch.no_grad(), compress(model, **settings, **options):
            caches = question_caches(prefill_context(model, context), len(questions))
            for question, cache in zip(questions, caches):
                ids = torch.cat([context, question.to(device)], 1)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     **cache_kwargs(model, cache), **kwargs)
                answers.append(out[0, ids.shape[1]:])
                del cache  # freed before the next copy is made: the context and one copy at a time
        return {"answers": answers, "questions": model_inputs["questions"]}

    def postprocess(self, model_outputs):
        return [{"question": q, "answer": self.tokenizer.decode(a, skip_special_tokens=True)}
                for q, a in zip(model_outputs["questions"], model_outputs["answers"])]


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=CompressedContextPipeline, type="text")
