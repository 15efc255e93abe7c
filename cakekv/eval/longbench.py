"""LongBench (v1) predictions and scores, following the official THUDM LongBench protocol.

Per example (``pred.py`` of LongBench, and the CAKE / SnapKV / AdaKV / LAVa scripts that reuse it):

1. fill the dataset's prompt template (:data:`DATASET2PROMPT`) with the example's ``context`` and
   ``input``;
2. tokenize it; when longer than ``max_length`` tokens keep the first and the last
   ``int(max_length / 2)`` tokens, each half decoded with ``skip_special_tokens=True`` and the two
   strings joined (middle truncation); ``max_length`` is one value per model, the official table's
   (:data:`OFFICIAL_MODELS`, the model named by ``--model-name`` or recognised from its path), else
   :func:`max_length_rule` of its ``max_position_embeddings``;
3. wrap it in the model's chat format (``--chat``: the official string, :func:`resolve_chat`), except
   for the few-shot and code datasets in :data:`NO_CHAT_DATASETS`;
4. decode greedily ``DATASET2MAXLEN[name]`` new tokens (samsum: at least one new token, and ``"\\n"``
   is an extra EOS), decode the new tokens with ``skip_special_tokens=True``.

Under ``--protocol context-only``, the examples of a dataset with the same context ids (after
truncation) share one compressed prefill of it (:func:`.generation.generate_batch`); the report
counts prefills against examples.

Scores (:mod:`cakekv.eval.metrics`): the dataset's metric, max over the gold answers, the first line
only for trec/triviaqa/samsum/lsht; dataset score ``round(100 * mean, 2)``; ``avg`` = mean of the
rounded dataset scores, rounded.

LongBench-E (``--datasets {name}_e``, ``e`` for all 13): ``{data_dir}/{name}_e.jsonl``, predicted and scored as
``{name}``, plus the official ``scorer_e``'s score of each length interval (0-4k / 4-8k / 8k+ by the ``length``
field), also written as the official ``pred/{run}/result.json``.

LongBench v2 (``--version 2``; the official v2 ``pred.py`` and ``result.py``): the questions of
``{data_dir}/data.json`` in the official 0-shot prompt (``--cot``: the chain of thought, then the answer prompt
holding it), middle-truncated to ``max_length`` (v2's split and single decode; 120000 for the models of v2's
table), wrapped in the chat template (the official runs go through vLLM's chat API), 128 new tokens (1024 for the
chain of thought); the official regexes find the letter; accuracy overall, by difficulty and by length, also
written as the official ``result.txt``. On purpose: greedy decoding (official: temperature 0.1), and an empty
answer is kept and judged wrong (the official script drops it: its empty answer is a failed API call).

Data: ``{data_dir}/{name}.jsonl`` in LongBench's format (one JSON object per line with ``input``,
``context``, ``answers``, ``length``, ``dataset``, ``language``, ``all_classes``, ``_id``), e.g. the
files of LongBench's ``data.zip`` unpacked into one folder. Nothing is downloaded.

Outputs under ``--out``: ``settings.json`` (what decides the predictions, each setting as resolved, the
runs' method options included, written before the predictions), ``pred/{run}/{dataset}.jsonl`` and the
report (``results.json`` with the settings, ``results.md``, ``results.png``). A folder holding an
earlier run is refused unless ``--resume`` (its recorded settings must match) or ``--overwrite``.

Differences from the official scripts, on purpose (the intended behaviour by default, the
official quirk as an option): with a chat template that writes the BOS token as text, BOS is not added a
second time (``--double-bos`` restores the doubling of the official Llama-3 / Mistral scripts).
A model outside the official tables is wrapped in its tokenizer's chat template (``--chat off``: none).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import warnings
from typing import Any, Callable, Sequence

from . import metrics, report
from .args import add_common_arguments, script_main, setup_from_args, split_list
from .parallel import PredictionFile, merge_predictions
from .plots import plot_scores_vs_budget
from .prompts import Encoded, Prompt, chat_wrap, context_groups, has_chat_template, make_prompt
from .runs import Run, Setup, progress_bar

DATASETS_EN = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
               "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum", "passage_count",
               "passage_retrieval_en", "lcc", "repobench-p")
DATASETS_ZH = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
DATASETS = DATASETS_EN + DATASETS_ZH

# Few-shot and code-completion datasets: never chat-wrapped.
NO_CHAT_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})

_QA_MULTI = ("Answer the question based on the given passages. Only give me the answer and do not output "
             "any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based "
             "on the given passages. Only give me the answer and do not output any other words.\n\n"
             "Question: {input}\nAnswer:")
_QASPER_RULE = ("as concisely as you can, using a single phrase or sentence if possible. If the question "
                "cannot be answered based on the information in the article, write \"unanswerable\". If the "
                "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide "
                "any explanation.")
# "asconcisely" (sic) is in the templates every KV-cache paper used; it is kept to match their prompts.
_NARRATIVE_RULE = ("asconcisely as you can, using a single phrase if possible. Do not provide any "
                   "explanation.")

# The official prompt templates (LongBench config/dataset2prompt.json), retyped.
DATASET2PROMPT: dict[str, str] = {
    "narrativeqa": ("You are given a story, which can be either a novel or a movie script, and a question. "
                    "Answer the question " + _NARRATIVE_RULE + "\n\nStory: {context}\n\nNow, answer the "
                    "question based on the story " + _NARRATIVE_RULE + "\n\nQuestion: {input}\n\nAnswer:"),
    "qasper": ("You are given a scientific article and a question. Answer the question " + _QASPER_RULE
               + "\n\nArticle: {context}\n\n Answer the question based on the above article " + _QASPER_RULE
               + "\n\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                        "question based on the above text, only give me the answer and do not output any "
                        "other words.\n\nQuestion: {input}\nAnswer:"),
    "multifieldqa_zh": ("阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，"
                        "只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答："),
    "hotpotqa": _QA_MULTI,
    "2wikimqa": _QA_MULTI,
    "musique": _QA_MULTI,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": ("You are given a report by a government agency. Write a one-page summary of the report."
                   "\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": ("You are given a meeting transcript and a query containing a question or instruction. Answer "
              "the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based "
              "on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": ("You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                   "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": ("Please determine the type of the question below. Here are some examples of questions.\n\n"
             "{context}\n{input}"),
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and do not output "
                 "any other words. The following are some examples.\n\n{context}\n\n{input}"),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": ("There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
                      "Please carefully read these paragraphs and determine how many unique paragraphs there "
                      "are after removing duplicates. In other words, how many non-repeating paragraphs are "
                      "there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after "
                      "removing duplicates. The output format should only contain the number, such as 1, 2, 3, "
                      "and so on.\n\nThe final answer is: "),
    "passage_retrieval_en": ("Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
                             "which paragraph the abstract is from.\n\n{context}\n\nThe following is an "
                             "abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the "
                             "abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
                             "etc.\n\nThe answer is: "),
    "passage_retrieval_zh": ("以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n"
                             "下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式"
                             "\n\n答案是："),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# max_new_tokens per dataset (LongBench config/dataset2maxlen.json).
DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}



@dataclasses.dataclass(frozen=True)
class OfficialModel:
    """A model of the official runs: the name their scripts take (``--model-name``), its Hugging Face id
    (``config/model2path.json``), its prompt budget in tokens (``config/model2maxlen.json``) and its chat format
    in their ``build_chat``: a string around ``{prompt}``, or the tokenizer's chat template with a system message
    (None and None: the tokenizer's own methods, which only remote code has)."""
    name: str
    hub_id: str
    max_length: int
    chat: str | None = None
    system: str | None = None

    @property
    def pattern(self) -> str:
        return hub_pattern(self.hub_id)

    def post_process(self, answer: str) -> str:
        """The official pred.py's ``post_process`` of this model's answers, before they are saved: XGen's stripped
        and without "Assistant:", InternLM's cut at its end-of-answer marker "<eoa>", others as generated."""
        if "xgen" in self.name:
            return answer.strip().replace("Assistant:", "")
        if "internlm" in self.name:
            return answer.split("<eoa>")[0]
        return answer


def hub_pattern(hub_id: str) -> str:
    """What a model's path contains when it is the model ``hub_id``: the id's last part, lowercased, without "-hf"
    (how CAKE's tau table names the same models)."""
    return hub_id.rsplit("/", 1)[-1].lower().removesuffix("-hf")


_LLAMA2_CHAT = "[INST]{prompt}[/INST]"
# fastchat's "vicuna" conversation (vicuna_v1.1), which pred.py uses for LongChat and Vicuna
_VICUNA_CHAT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the user's questions. USER: {prompt} ASSISTANT:")

# LongBench's table (THUDM/LongBench config/, pred.py), then the models CAKE's scripts add (pred_cake.py).
OFFICIAL_MODELS = (
    OfficialModel("llama2-7b-chat-4k", "meta-llama/Llama-2-7b-chat-hf", 3500, _LLAMA2_CHAT),
    OfficialModel("longchat-v1.5-7b-32k", "lmsys/longchat-7b-v1.5-32k", 31500, _VICUNA_CHAT),
    OfficialModel("xgen-7b-8k", "Salesforce/xgen-7b-8k-inst", 7500,
                  "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the human's questions.\n\n ### Human: {prompt}\n###"),
    OfficialModel("internlm-7b-8k", "internlm/internlm-chat-7b-8k", 7500, "<|User|>:{prompt}<eoh>\n<|Bot|>:"),
    OfficialModel("chatglm2-6b", "THUDM/chatglm2-6b", 31500),
    OfficialModel("chatglm2-6b-32k", "THUDM/chatglm2-6b-32k", 31500),
    OfficialModel("chatglm3-6b-32k", "THUDM/chatglm3-6b-32k", 31500),
    OfficialModel("vicuna-v1.5-7b-16k", "lmsys/vicuna-7b-v1.5-16k", 15500, _VICUNA_CHAT),
    OfficialModel("llama2-13b-chat-4k", "meta-llama/Llama-2-13b-chat-hf", 3500, _LLAMA2_CHAT),
    OfficialModel("llama3.1-8b-128k", "meta-llama/Llama-3.1-8B-Instruct", 127500,
                  "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    OfficialModel("mistral-0.3-7b-32k", "mistralai/Mistral-7B-Instruct-v0.3", 31500, "<s>[INST] {prompt} [/INST]"),
    OfficialModel("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", 31500,
                  system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
)
CHAT_FORMATS = ("official", "template", "off")
OFFICIAL_NAMES = tuple(m.name for m in OFFICIAL_MODELS)

# LongBench-E: the datasets the official pred.py --e runs, each as {name}_e (its data file {name}_e.jsonl, its
# examples spread evenly over the 0-4k / 4-8k / 8k+ length intervals); prompts, lengths and metrics are {name}'s.
DATASETS_E = tuple(f"{name}_e" for name in (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p"))
DATASET_GROUPS = {"en": DATASETS_EN, "zh": DATASETS_ZH, "all": DATASETS, "e": DATASETS_E}

# LongBench v2 (the official v2 pred.py, result.py): 503 multiple-choice questions in one file, answered 0-shot
# (V2), with a chain of thought then an answer step (V2_COT), or without the text (V2_NO_CONTEXT: what the model
# knows by heart); their predictions files are named so.
V2, V2_COT, V2_NO_CONTEXT = "v2", "v2_cot", "v2_no_context"
V2_FILE = "data.json"  # the release's data.json: a JSON array of objects with these fields
V2_FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question", "choice_A", "choice_B", "choice_C",
             "choice_D", "answer", "context")
_V2_QUESTION = ("What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
                "(D) $C_D$\n\n")
_V2_FORMAT = "Format your response as follows: \"The correct answer is (insert answer here)\"."
# The official prompts (prompts/0shot.txt, 0shot_cot.txt, 0shot_no_context.txt; 0shot_cot_ans.txt below), retyped;
# "questions" and the curly apostrophe are theirs.
V2_PROMPTS = {
    V2: ("Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
         + _V2_QUESTION + _V2_FORMAT),
    V2_COT: ("Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n</text>\n\n"
             + _V2_QUESTION + "Let\u2019s think step by step:"),
    V2_NO_CONTEXT: _V2_QUESTION + "What is the single, most likely answer choice? " + _V2_FORMAT,
}
# the answer step of V2_COT: the chain of thought in place of the text
V2_COT_ANSWER_PROMPT = ("Please read the following text and answer the questions below.\n\nThe text is too long and "
                        "omitted here.\n\n" + _V2_QUESTION + "Let\u2019s think step by step: $COT$\n\nBased on the "
                        "above, what is the single, most likely answer choice? " + _V2_FORMAT)
V2_MAXLEN = {V2: 128, V2_COT: 1024, V2_NO_CONTEXT: 128}  # max_new_tokens; the answer step of V2_COT takes V2's
# The official v2 prompt budget (config/model2maxlen.json) of the open models of its config/model2path.json.
V2_MODEL2MAXLEN = dict.fromkeys((
    "THUDM/glm-4-9b-chat", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct",
    "meta-llama/Llama-3.3-70B-Instruct", "nvidia/Llama-3.1-Nemotron-70B-Instruct-HF", "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen2.5-72B-Instruct", "mistralai/Mistral-Large-Instruct-2407", "mistralai/Mistral-Large-Instruct-2411",
    "CohereForAI/c4ai-command-r-plus-08-2024"), 120000)
ALL_NAMES = DATASETS + DATASETS_E + (V2, V2_COT, V2_NO_CONTEXT)  # every predictions file name, in the report's order

PRED_DIR = "pred"
SETTINGS = "settings.json"  # what decides the predictions, written before them (--resume checks it)
OFFICIAL_RESULT = "result.json"  # pred/{run}/result.json: the scores in the shape of the official eval.py's
V2_RESULT = "result.txt"  # the v2 accuracies in the shape of the official result.py's
REPORT = ("results.json", "results.md", "results.png", V2_RESULT)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def is_v2(name: str) -> bool:
    return name in (V2, V2_COT, V2_NO_CONTEXT)


def base_name(name: str) -> str:
    """The v1 dataset whose prompt, answer length and metric a dataset takes (``hotpotqa`` for ``hotpotqa_e``)."""
    return name.removesuffix("_e") if name in DATASETS_E else name


def data_path(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, V2_FILE if is_v2(name) else f"{name}.jsonl")


def check_data_files(data_dir: str, names: Sequence[str]) -> None:
    """One error naming every missing data file, so that one look at the folder fixes them all."""
    missing = list(dict.fromkeys(data_path(data_dir, n) for n in names if not os.path.isfile(data_path(data_dir, n))))
    if missing:
        raise FileNotFoundError(
            f"--data-dir: no LongBench data for {len(missing)} dataset{'s' * (len(missing) > 1)}: "
            f"{', '.join(missing)}. cakekv never downloads data: put LongBench's {{name}}.jsonl and {{name}}_e.jsonl "
            "files (from the LongBench release's data.zip) or LongBench v2's data.json in one folder and pass it "
            "as --data-dir")


def load_data(data_dir: str, name: str, limit: int | None = None) -> list[dict]:
    """The examples of the dataset's file in ``data_dir`` (first ``limit`` ones)."""
    if name not in ALL_NAMES:
        raise ValueError(f"datasets: unknown LongBench dataset {name!r}; known: {', '.join(ALL_NAMES)}")
    check_data_files(data_dir, [name])
    if is_v2(name):
        return load_v2(data_path(data_dir, name), limit)
    fields = ("context", "input", "answers") + ("length",) * (name in DATASETS_E)  # E's scores need the length
    return read_jsonl(data_path(data_dir, name), fields, limit)


def load_v2(path: str, limit: int | None = None) -> list[dict]:
    """The questions of LongBench v2's ``data.json`` (first ``limit`` ones), each with :data:`V2_FIELDS`."""
    with open(path, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected LongBench v2's data.json, a JSON array of questions")
    items = items[:limit]
    for i, item in enumerate(items):
        missing = [k for k in V2_FIELDS if k not in item] if isinstance(item, dict) else list(V2_FIELDS)
        if missing:
            raise ValueError(f"{path}: question {i}: missing field(s) {missing}")
    return [{k: item[k] for k in V2_FIELDS} for item in items]


def resolve_datasets(names: Sequence[str], version: int = 1, cot: bool = False, no_context: bool = False) -> list[str]:
    """The predictions files of a run: LongBench v2's one (``--cot``: its chain-of-thought variant; ``--no-context``:
    the questions without the text), or v1's datasets and LongBench-E's ({name}_e), the groups ('en', 'zh', 'all',
    'e') expanded (default: 'en')."""
    for flag, given in (("--cot", cot), ("--no-context", no_context)):
        if given and version != 2:
            raise ValueError(f"{flag}: a mode of LongBench v2's prompts; pass --version 2 with it")
    if version == 2:
        if names:
            raise ValueError("--datasets: LongBench v2 is one set of questions (data.json); leave --datasets out "
                             "with --version 2")
        if cot and no_context:
            raise ValueError("--no-context: the official runs take --cot or --no-context, not both")
        return [V2_COT if cot else V2_NO_CONTEXT if no_context else V2]
    out: list[str] = []
    for n in names or ["en"]:
        if n in DATASET_GROUPS:
            out.extend(DATASET_GROUPS[n])
        elif n in DATASET2PROMPT or n in DATASETS_E:
            out.append(n)
        else:
            raise ValueError(f"--datasets: unknown LongBench dataset {n!r}; known: {', '.join(DATASETS + DATASETS_E)} "
                             "(or en, zh, all, e)")
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------------
# the model's official settings
# ----------------------------------------------------------------------------------------------
def official_model(name: str | None, model_path: str | None) -> OfficialModel | None:
    """The official model named by ``--model-name``, else the one whose pattern the model's path contains (the
    longest: chatglm2-6b-32k before chatglm2-6b), else None."""
    if name is not None:
        return next(m for m in OFFICIAL_MODELS if m.name == name)
    path = (model_path or "").lower()
    found = [m for m in OFFICIAL_MODELS if m.pattern in path]
    return max(found, key=lambda m: len(m.pattern)) if found else None


def max_length_rule(max_position_embeddings: int) -> int:
    """The prompt budget of a model the official tables lack, by the rule their entries follow: the context in
    thousands (``max_position_embeddings // 1024``) times 1000, minus 500 (4K: 3500, 32K: 31500, 128K: 127500),
    which leaves room for the longest answer (512 tokens) and the chat wrapping."""
    return 1000 * (max_position_embeddings // 1024) - 500


def v2_official_model(official: OfficialModel | None, model_path: str | None) -> str | None:
    """The id of the model in the official v2 table: the official model's (``--model-name`` or recognised), else
    the one whose pattern the model's path contains (the longest), else None."""
    if official is not None and official.hub_id in V2_MODEL2MAXLEN:
        return official.hub_id
    path = (model_path or "").lower()
    found = [hub_id for hub_id in V2_MODEL2MAXLEN if hub_pattern(hub_id) in path]
    return max(found, key=lambda h: len(hub_pattern(h))) if found else None


def resolve_max_length(given: int | None, official: OfficialModel | None, config, *, version: int = 1,
                       model_path: str | None = None) -> tuple[int, str]:
    """(max_length, where it comes from): ``--max-length``, else the official value of the model (v1's table, or
    v2's for ``version`` 2), else the rule's. One value for every dataset of a run, as in the official scripts."""
    if given is not None:
        return given, "--max-length"
    if version == 2:
        hub_id = v2_official_model(official, model_path)
        if hub_id is not None:
            return V2_MODEL2MAXLEN[hub_id], f"official v2 ({hub_id})"
    elif official is not None:
        return official.max_length, f"official ({official.name})"
    positions = getattr(config, "max_position_embeddings", None)
    if not positions or positions < 1024:
        raise ValueError(f"--max-length: the model's max_position_embeddings {positions} gives no prompt budget "
                         "(the rule needs 1024 or more); pass --max-length")
    return max_length_rule(positions), f"rule (max_position_embeddings {positions})"


def resolve_chat(chat: str | None, official: OfficialModel | None, tokenizer,
                 model_name: str) -> tuple[str, bool | Callable[[str], str]]:
    """(the chat format, :func:`build_prompt`'s ``chat``) of ``--chat``; by default the official format where the
    official runs have one for the model, else the tokenizer's chat template where it has one, else none. A
    template that writes today's date (``strftime_now``) would make the prompts depend on the day: refused by
    default, a warning when ``--chat`` names it."""
    has_official = official is not None and (official.chat or official.system) is not None
    chosen = chat is not None
    if chat is None:
        chat = "official" if has_official else "template" if has_chat_template(tokenizer) else "off"
    if chat == "off":
        return chat, False
    if chat == "official" and not has_official:
        whose = f"the official model {official.name}" if official else f"{model_name} (no --model-name)"
        raise ValueError(f"--chat official: the official runs give no chat string for {whose}; pass --chat template "
                         "or --chat off")
    if chat == "official" and official.chat:
        return chat, lambda text: official.chat.replace("{prompt}", text)
    if not has_chat_template(tokenizer):
        raise ValueError(f"--chat {chat}: the tokenizer of {model_name} has no chat template; pass --chat off")
    if "strftime_now" in str(tokenizer.chat_template):
        dated = (f"the chat template of {model_name} writes today's date into every prompt, so the predictions "
                 "depend on the day they are made")
        if not chosen:
            raise ValueError(f"--chat: {dated}; pass --chat {chat} to use it anyway, or --chat off")
        warnings.warn(f"--chat {chat}: {dated}", UserWarning, stacklevel=2)
    system = official.system if chat == "official" else None
    return chat, True if system is None else lambda text: chat_wrap(tokenizer, text, system)


def run_options(setup: Setup, run: Run, official: OfficialModel | None) -> dict[str, Any]:
    """``--option``'s values for ``run``, plus CAKE's (tau1, tau2) where the method reads CAKE's tau table and
    ``--option`` does not set both: the row of the official model (named or recognised), else the row the
    model's path names; a model the table lacks gets 1.0 (the official fallback) and a warning."""
    from ..methods import method_options
    from ..methods.cake import default_taus, tau_entry
    options = dict(setup.options)
    if run.budget is None or "tau1" not in method_options(run.method) or {"tau1", "tau2"} <= options.keys():
        return options
    source = official.hub_id if official else setup.model_name
    if tau_entry(source) is None:
        names = ", ".join(m.name for m in OFFICIAL_MODELS if tau_entry(m.hub_id))
        warnings.warn(f"{run.method}: CAKE's tau table has no entry for {setup.model_name!r}, so tau1 = tau2 = 1.0 "
                      f"(the official fallback); name the model with --model-name ({names}) or set "
                      "--option tau1=... --option tau2=...", UserWarning, stacklevel=2)
    tau1, tau2 = default_taus(source, run.budget)
    return {"tau1": tau1, "tau2": tau2, **options}


def resolved_options(setup: Setup, run: Run, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``run``'s method as the method resolves it for this model and budget (defaults included)."""
    from ..api import checked_method
    from ..reconstruction import with_repeat_prompt
    from .generation import run_budget
    method = checked_method(setup.model, run.method, run_budget(run.budget, setup.window), setup.window,
                            with_repeat_prompt(run.method, options, setup.tokenizer))
    return dataclasses.asdict(method.options)


def prediction_settings(setup: Setup, *, version: int, official: OfficialModel | None, max_length: int, chat: str,
                        double_bos: bool, max_new_tokens: int | None,
                        options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What decides the predictions (written to settings.json before them; --resume refuses to add to
    predictions made under others), each as resolved: the runs' method options are the methods' own."""
    import torch
    import transformers
    return {"version": version, "model": setup.model_name, "official_model": official.name if official else None,
            "dtype": str(next(setup.model.parameters()).dtype).removeprefix("torch."),
            "attn_implementation": getattr(setup.model.config, "_attn_implementation", None),
            "max_length": max_length, "chat": chat, "double_bos": double_bos, "protocol": setup.protocol,
            "window": setup.window, "max_new_tokens": max_new_tokens or "official",
            "transformers": transformers.__version__, "torch": torch.__version__,
            "runs": {run.label: resolved_options(setup, run, options[run.label]) for run in setup.runs}}


# ----------------------------------------------------------------------------------------------
# the output folder
# ----------------------------------------------------------------------------------------------
def earlier_outputs(out: str) -> list[str]:
    """The outputs of an earlier run found in ``out``."""
    return [name for name in (SETTINGS, PRED_DIR, *REPORT) if os.path.exists(os.path.join(out, name))]


def check_out(out: str, *, resume: bool, overwrite: bool) -> None:
    """Refuse to write into an earlier run's folder unless told to continue it or to replace it (before the model
    loads)."""
    if resume and overwrite:
        raise ValueError("--resume, --overwrite: pass one of them (continue the earlier run, or replace it)")
    found = earlier_outputs(out)
    if found and not (resume or overwrite):
        raise ValueError(f"--out: {out} holds an earlier run ({', '.join(found)}); pass --resume to continue it or "
                         "--overwrite to replace it")


def remove_outputs(out: str) -> None:
    """--overwrite: the earlier run's outputs go (nothing else in ``out``)."""
    for name in earlier_outputs(out):
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _differences(recorded: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(recorded, dict) and isinstance(now, dict):
        return [d for key in recorded if key in now for d in _differences(recorded[key], now[key], f"{prefix}{key}.")]
    return [] if recorded == now else [f"{prefix[:-1]} (recorded {recorded!r}, now {now!r})"]


def resumed_settings(out: str, settings: dict[str, Any]) -> dict[str, Any]:
    """--resume: the earlier run's settings must be these (its runs' where both have them); returns both runs'
    settings together."""
    path = os.path.join(out, SETTINGS)
    if not os.path.isfile(path):
        if earlier_outputs(out):
            raise ValueError(f"--resume: {path} is missing, so the predictions in {out} cannot be checked against "
                             "these settings; pass --overwrite to start again")
        return settings
    with open(path, encoding="utf-8") as f:
        recorded = json.load(f)
    now = json.loads(json.dumps(settings, default=str))  # as JSON holds it (tuples as lists)
    differ = _differences(recorded, now)
    if differ:
        raise ValueError(f"--resume: the settings differ from the earlier run in {out}: {', '.join(differ)}; rerun "
                         "with the recorded settings, or pass --overwrite to start again")
    return {**now, "runs": {**recorded.get("runs", {}), **now["runs"]}}


# ----------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------
def truncate_middle(tokenizer, text: str, max_length: int | None, version: int = 1) -> tuple[str, bool]:
    """LongBench's middle truncation of a prompt to ``max_length`` tokens; (text, truncated?). v1 keeps
    ``int(max_length / 2)`` tokens at each end and decodes each half apart; v2 keeps the first ``max_length // 2``
    and the last ``-(-max_length // 2)`` and decodes them together (their pred.py's)."""
    if not max_length:
        return text, False
    ids = tokenizer(text, truncation=False)["input_ids"]
    if len(ids) <= max_length:
        return text, False
    if version == 2:
        return tokenizer.decode(ids[:max_length // 2] + ids[-max_length // 2:], skip_special_tokens=True), True
    half = int(max_length / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, True


def _split_after_context(prompt: str, question_tail: str) -> int:
    """Where the question part starts in a (possibly truncated) prompt: the start of the longest
    common suffix of the prompt and ``question_tail`` (all of the tail unless the truncation cut
    into it)."""
    n = 0
    limit = min(len(prompt), len(question_tail))
    while n < limit and prompt[-1 - n] == question_tail[-1 - n]:
        n += 1
    return len(prompt) - n


def fill_v2(template: str, example: dict, cot: str | None = None) -> str:
    """A LongBench v2 prompt: the placeholders replaced one after the other, in the official order, by the
    stripped fields (and ``$COT$`` by the chain of thought)."""
    text = template.replace("$DOC$", example["context"].strip()).replace("$Q$", example["question"].strip())
    for c in "ABCD":
        text = text.replace(f"$C_{c}$", example[f"choice_{c}"].strip())
    return text if cot is None else text.replace("$COT$", cot)


def build_prompt(tokenizer, example: dict, dataset: str, *, max_length: int | None,
                 chat: bool | Callable[[str], str], double_bos: bool = False,
                 cot: str | None = None) -> tuple[Prompt, bool]:
    """The LongBench prompt of one example, split where its context ends; (prompt, truncated?). ``chat``: the
    tokenizer's chat template (True), a wrapping of the text (:func:`chat_wrapper`) or none (False). ``cot``: the
    answer step of LongBench v2's chain of thought, whose prompt holds ``cot`` where the others hold the context."""
    if is_v2(dataset):
        template, marker = (V2_COT_ANSWER_PROMPT, "$COT$") if cot is not None else (V2_PROMPTS[dataset], "$DOC$")
        text = fill_v2(template, example, cot)
        tail = fill_v2(template.split(marker, 1)[-1], example, cot)  # no text (V2_NO_CONTEXT): all of it
        text, truncated = truncate_middle(tokenizer, text, max_length, version=2)
        wrap = chat
    else:
        name = base_name(dataset)
        template = DATASET2PROMPT[name]
        text, truncated = truncate_middle(tokenizer, template.format(**example), max_length)
        tail = template.split("{context}", 1)[1].format(**example)
        wrap = chat if name not in NO_CHAT_DATASETS else False
    # the question part: what the template puts after the context, filled in
    at = _split_after_context(text, tail)
    return make_prompt(tokenizer, "", text[:at], text[at:], chat=wrap, double_bos=double_bos), truncated


def official_max_new_tokens(dataset: str) -> int:
    return V2_MAXLEN[dataset] if is_v2(dataset) else DATASET2MAXLEN[base_name(dataset)]


# ----------------------------------------------------------------------------------------------
# predictions
# ----------------------------------------------------------------------------------------------
def pred_path(out: str, run: Run, dataset: str) -> str:
    return os.path.join(out, PRED_DIR, run.label, f"{dataset}.jsonl")


def read_jsonl(path: str, fields: Sequence[str] = ("pred", "answers"), limit: int | None = None) -> list[dict]:
    """The objects of a JSON-lines file (the first ``limit`` ones), each with ``fields``; a bad line (one cut
    short by an interrupted run) is an error naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object")
            missing = [k for k in fields if k not in record]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
            records.append(record)
    return records


def predict(setup: Setup, data_dir: str, datasets: Sequence[str], *, max_length: int | None,
            limit: int | None = None, max_new_tokens: int | None = None, double_bos: bool = False,
            resume: bool = False, options: dict[str, dict] | None = None,
            chat: bool | Callable[[str], str] | None = None,
            official: OfficialModel | None = None) -> dict[tuple[str, str], str]:
    """Write ``{out}/pred/{run}/{dataset}.jsonl`` for every run and dataset (method options per run label, default
    ``setup.options``; ``chat`` as :func:`build_prompt` takes it, default ``setup.chat``; the answers of an
    ``official`` model post-processed as the official runs do theirs); returns their paths."""
    from . import generation
    data = {name: load_data(data_dir, name, limit) for name in datasets}  # fail early on missing files
    tok = setup.tokenizer
    newline = generation.newline_token_id(tok)
    paths: dict[tuple[str, str], str] = {}
    files: dict[tuple[str, str], PredictionFile] = {}
    for run in setup.runs:
        for name in datasets:
            path = paths[(run.label, name)] = pred_path(setup.out, run, name)
            done = len(read_jsonl(path, record_fields(name))) if resume and os.path.exists(path) else 0
            files[(run.label, name)] = PredictionFile(path, len(data[name]), setup.group, min(done, len(data[name])))
    bar = progress_bar(total=sum(f.share for f in files.values()), desc="longbench", disable=not setup.progress)
    try:
        for run in setup.runs:
            for name in datasets:
                out = files[(run.label, name)]
                bar.update(out.share - len(out.todo))
                samsum = base_name(name) == "samsum"
                examples = [data[name][i] for i in out.todo]
                prompt_options = dict(max_length=max_length, chat=setup.chat if chat is None else chat,
                                      double_bos=double_bos)
                prompts = [build_prompt(tok, ex, name, **prompt_options) for ex in examples]
                encoded = [setup.encode(p) for p, _ in prompts]

                def generate(rows: list[Encoded], official_new_tokens: int) -> list:
                    return generation.generate_batch(
                        setup.model, tok, rows, method=run.method, budget=run.budget, window=setup.window,
                        protocol=setup.protocol, options=(options or {}).get(run.label, setup.options),
                        max_new_tokens=max_new_tokens or official_new_tokens,
                        extra_eos=[newline] if samsum and newline is not None else (),
                        min_new_tokens=1 if samsum else 0)

                with out:
                    for batch in example_batches(encoded, setup):
                        bar.set_postfix_str(f"{run.label} {name}", refresh=False)
                        gens = generate([encoded[i] for i in batch], official_max_new_tokens(name))
                        answers: list = [None] * len(batch)
                        if name == V2_COT:  # the answer step: the chain of thought in a prompt of its own
                            steps = [build_prompt(tok, examples[i], name, cot=gen.text.strip(), **prompt_options)[0]
                                     for i, gen in zip(batch, gens)]
                            answers = generate([setup.encode(p) for p in steps], V2_MAXLEN[V2])
                        for i, gen, answer in zip(batch, gens, answers):
                            out.add(i, prediction_record(name, examples[i], prompts[i][1], gen, answer, official))
                            bar.update(1)
    finally:
        bar.close()
    merge_predictions(setup.group, files.values())
    return paths


def prediction_record(dataset: str, example: dict, truncated: bool, gen, answer=None,
                      official: OfficialModel | None = None) -> dict:
    """One line of a predictions file: the answer (v1: post-processed as the ``official`` model's are), what scores
    it, and what it cost (the cache of the first
    step, the tokens and time of both). LongBench v2's is the official line without the context: the question's
    fields, ``response`` (stripped; ``response_cot``, the chain of thought, before the ``answer`` step), ``pred``
    (the letter found in it, or None) and ``judge``."""
    cost = {"prompt_tokens": gen.prompt_tokens, "truncated": truncated,
            "new_tokens": len(gen.tokens) + (len(answer.tokens) if answer else 0),
            "time_s": round(gen.seconds + (answer.seconds if answer else 0), 4),
            "questions_per_prefill": gen.questions_per_prefill, "kv_bytes_before": gen.bytes_before,
            "kv_bytes_after": gen.bytes_after, "kv_bytes_kept": gen.bytes_kept}
    if not is_v2(dataset):
        pred = official.post_process(gen.text) if official is not None else gen.text
        return {"pred": pred, "answers": example["answers"], "all_classes": example.get("all_classes"),
                "length": example.get("length"), "_id": example.get("_id"), **cost}
    record = {k: v for k, v in example.items() if k != "context"}
    if answer is not None:
        record["response_cot"] = gen.text.strip()
    record["response"] = (answer or gen).text.strip()
    record["pred"] = metrics.extract_choice(record["response"])
    return {**record, "judge": record["pred"] == example["answer"], **cost}


def example_batches(encoded: Sequence[Encoded], setup: Setup) -> list[list[int]]:
    """Indices of a dataset's prompts per ``generate_batch`` call. Question-aware: ``batch_size``
    consecutive examples (not sorted by length: a batch's predictions are written at once, and the
    file grows in the data's order). Context-only: the examples of one context, wherever they are in
    the file (they share its compressed prefill)."""
    if setup.protocol == "context-only":
        return context_groups(encoded)
    return [list(range(start, min(start + setup.batch_size, len(encoded))))
            for start in range(0, len(encoded), setup.batch_size)]


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------
def record_fields(dataset: str) -> tuple[str, ...]:
    """What scoring reads from each line of the dataset's predictions file."""
    if is_v2(dataset):
        return "judge", "difficulty", "length"
    return ("pred", "answers") + ("length",) * (dataset in DATASETS_E)


def score_file(path: str, dataset: str, **options) -> dict[str, Any]:
    """Score one predictions file: {'score', 'n', 'prefills', 'time_s', 'kv_fraction'}, plus 'buckets' (the score
    of each length interval) for LongBench-E and 'accuracy' (overall, by difficulty, by length) for v2, whose
    score is the overall accuracy."""
    records = read_jsonl(path, record_fields(dataset))
    extra: dict[str, Any] = {}
    if is_v2(dataset):
        extra["accuracy"] = metrics.v2_accuracy(records)
        score = extra["accuracy"]["overall"]
    else:
        name, preds, answers = base_name(dataset), [r["pred"] for r in records], [r["answers"] for r in records]
        classes = [r.get("all_classes") for r in records]
        score = metrics.dataset_score(name, preds, answers, classes, **options)
        if dataset in DATASETS_E:
            extra["buckets"] = metrics.length_bucket_scores(name, preds, answers, [r["length"] for r in records],
                                                            classes, **options)
    before = sum(r.get("kv_bytes_before") or 0 for r in records)
    kept = sum(r.get("kv_bytes_kept") or 0 for r in records)
    times = [r["time_s"] for r in records if r.get("time_s") is not None]
    return {"score": score, **extra, "n": len(records),
            "prefills": report.prefill_count(r.get("questions_per_prefill", 1) for r in records),
            "time_s": round(sum(times) / len(times), 4) if times else None,
            "kv_fraction": round(kept / before, 4) if before else None}


def score_predictions(out: str, runs: Sequence[str] | None = None, datasets: Sequence[str] | None = None,
                      **options) -> dict[str, Any]:
    """Scores of the ``{out}/pred/{run}/{dataset}.jsonl`` files (all found, or those of ``runs`` x
    ``datasets``): {run: {'datasets': {dataset: {...}}, 'avg': x}}, plus 'buckets_avg' (each length interval's
    mean over the LongBench-E datasets, rounded as 'avg') where the run has LongBench-E scores."""
    root = os.path.join(out, PRED_DIR)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no predictions under {root}")
    table: dict[str, Any] = {}
    for run in runs if runs is not None else sorted(os.listdir(root)):
        folder = os.path.join(root, run)
        per = {}
        for name in datasets if datasets is not None else ALL_NAMES:
            path = os.path.join(folder, f"{name}.jsonl")
            if os.path.isfile(path):
                per[name] = score_file(path, name, **options)
        if per:
            table[run] = {"datasets": per, "avg": metrics.average_score(v["score"] for v in per.values())}
            buckets = [v["buckets"] for v in per.values() if "buckets" in v]
            if buckets:
                table[run]["buckets_avg"] = {
                    b: metrics.average_score(x[b] for x in buckets if x[b] is not None) if any(
                        x[b] is not None for x in buckets) else None for b in metrics.LENGTH_BUCKETS}
    return table


def write_official_results(out: str, table: dict[str, Any], runs: Sequence[str]) -> None:
    """The scores in the official files' shapes: ``pred/{run}/result.json`` as eval.py writes it (v1: {dataset:
    score}; LongBench-E: {dataset: {interval: score}}), and ``result.txt`` as v2's result.py writes it (a row per
    run and v2 predictions file: Model, Overall, Easy, Hard, Short, Medium, Long)."""
    rows = ["Model\tOverall\tEasy\tHard\tShort\tMedium\tLong"]
    for r in runs:
        per = table[r]["datasets"]
        v1 = {d: e.get("buckets", e["score"]) for d, e in per.items() if not is_v2(d)}
        if v1:
            report.write_json(os.path.join(out, PRED_DIR, r, OFFICIAL_RESULT), v1)
        rows += ["\t".join([r + d.removeprefix(V2), *(str(e["accuracy"][g]) for g in metrics.V2_GROUPS)])
                 for d, e in per.items() if is_v2(d)]
    if len(rows) > 1:
        report.write_text(os.path.join(out, V2_RESULT), "\n".join(rows))


def breakdown_tables(table: dict[str, Any], runs: Sequence[str]) -> list[str]:
    """The markdown of the LongBench-E scores by length interval and of the v2 accuracies by difficulty and
    length (nothing where the runs have none)."""
    e_rows, v2_rows = [], []
    for r in runs:
        run, per = Run.from_label(r), table[r]["datasets"]
        e_rows += [[run.method, run.budget, d, *e["buckets"].values()] for d, e in per.items() if "buckets" in e]
        if "buckets_avg" in table[r]:
            e_rows.append([run.method, run.budget, "average", *table[r]["buckets_avg"].values()])
        v2_rows += [[run.method, run.budget, d, e["n"], *e["accuracy"].values()] for d, e in per.items()
                    if "accuracy" in e]
    md = []
    if e_rows:
        md += ["## LongBench-E by length", "", "each interval's score as the official scorer_e (by the examples' "
               "`length` field); average: the mean over the datasets", "",
               report.markdown_table(["method", "budget", "dataset", *metrics.LENGTH_BUCKETS], e_rows), ""]
    if v2_rows:
        md += ["## LongBench v2 accuracy", "", "% of the questions answered right, as the official result.py", "",
               report.markdown_table(["method", "budget", "set", "questions", *metrics.V2_GROUPS], v2_rows), ""]
    return md


def write_report(out: str, table: dict[str, Any], info: dict[str, Any]) -> dict[str, str]:
    """results.json, results.md and results.png (average score against budget) under ``out``."""
    datasets = [d for d in ALL_NAMES if any(d in v["datasets"] for v in table.values())]
    runs = sorted(table, key=lambda r: Run.from_label(r).order)
    write_official_results(out, table, runs)
    rows = []
    for r in runs:
        run = Run.from_label(r)
        per = table[r]["datasets"]
        rows.append([run.method, run.budget]
                    + [per[d]["score"] if d in per else None for d in datasets] + [table[r]["avg"]])
    paths = {"json": os.path.join(out, "results.json"), "markdown": os.path.join(out, "results.md"),
             "png": os.path.join(out, "results.png")}
    report.write_json(paths["json"], {"task": "longbench", "info": info, "datasets": datasets,
                                      "results": table})
    title = "LongBench v2" if info.get("version") == 2 else "LongBench"
    md = [f"# {title} ({info.get('protocol', '?')} protocol)", "",
          f"model: `{info.get('model', '?')}`, window {info.get('window', '?')}, "
          f"max_length {info.get('max_length', '?')}; avg = mean of the {len(datasets)} dataset scores shown", "",
          report.markdown_table(["method", "budget", *datasets, "avg"], rows), ""]
    md += breakdown_tables(table, runs)
    cost = []
    for r in runs:
        for d in datasets:
            entry = table[r]["datasets"].get(d)
            if entry:
                kept = entry["kv_fraction"]
                cost.append([*dataclasses.astuple(Run.from_label(r)), d, entry["n"], entry["prefills"],
                             entry["time_s"], f"{100 * kept:.1f}%" if kept is not None else None])
    examples, prefills = sum(row[3] for row in cost), sum(row[4] for row in cost)
    md += ["## Cost per dataset", "",
           f"{prefills} prefills for {examples} examples ({examples / max(prefills, 1):.2f} examples per prefill: "
           "under context-only, the examples of one context share its compressed prefill). Mean time per "
           "example, its share of a shared prefill included. KV bytes kept: cache bytes after the run / bytes "
           "of a full cache of the same tokens (cache stats)", "",
           report.markdown_table(["method", "budget", "dataset", "examples", "prefills", "mean time (s)",
                                  "KV bytes kept"], cost),
           ""]
    report.write_text(paths["markdown"], "\n".join(md))
    plot_scores_vs_budget({Run.from_label(r): table[r]["avg"] for r in runs}, paths["png"],
                          title=f"LongBench average ({len(datasets)} datasets)", ylabel="average score")
    return paths


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="folder with LongBench's {dataset}.jsonl (LongBench-E: {dataset}_e.jsonl) files, or "
                             "LongBench v2's data.json (required unless --score-only)")
    parser.add_argument("--version", type=int, choices=(1, 2), default=1,
                        help="1: LongBench and LongBench-E (--datasets); 2: LongBench v2's 503 multiple-choice "
                             "questions (default: %(default)s)")
    parser.add_argument("--cot", action="store_true",
                        help="--version 2: chain of thought (1024 new tokens), then the official answer step")
    parser.add_argument("--no-context", action="store_true",
                        help="--version 2: the questions without the text (the official --no_context: what the "
                             "model knows by heart, a baseline)")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="dataset names (LongBench-E's: {dataset}_e, e.g. hotpotqa_e), or en (the 16 English), "
                             "zh (the 5 Chinese), all (the 21), e (the 13 of LongBench-E) (default: en; none with "
                             "--version 2)")
    parser.add_argument("--model-name", choices=OFFICIAL_NAMES, default=None,
                        help="the official runs' name of the model (their max length, CAKE's tau row); default: "
                             "recognised from --model's path (e.g. .../Llama-3.1-8B-Instruct: llama3.1-8b-128k)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="prompt budget in tokens, middle truncation beyond it; default: the official value "
                             "of the model (3500 for Llama-2, 127500 for Llama-3.1-8B, 31500 for Mistral-0.3 / "
                             "Qwen2.5), else 1000 * (max_position_embeddings // 1024) - 500, the rule of the "
                             "official values")
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each dataset")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="override the official per-dataset max_new_tokens (smoke tests only)")
    parser.add_argument("--double-bos", action="store_true",
                        help="add BOS even when the chat template wrote it (the official scripts' quirk)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out: keep its predictions (its recorded settings must match)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out (its outputs are removed)")
    parser.add_argument("--score-only", action="store_true", help="only score the predictions under --out")
    parser.add_argument("--zh-tokenizer", choices=("jieba", "char"), default="jieba",
                        help="Chinese word segmentation for qa_f1_zh / rouge_zh (official: jieba)")
    parser.add_argument("--fuzz-backend", choices=metrics.FUZZ_BACKENDS, default="difflib",
                        help="code_sim ratio (lcc, repobench-p): difflib (LongBench's environment: fuzzywuzzy "
                             "without python-Levenshtein) or indel (fuzzywuzzy with python-Levenshtein, "
                             "thefuzz; computed with rapidfuzz)")
    parser.add_argument("--chat", dest="chat_format", choices=CHAT_FORMATS, default=None,
                        help="chat format of the prompts but the few-shot and code datasets: official (the official "
                             "runs' string for the model: LongBench's build_chat, CAKE's for the models it adds; v2: "
                             "the chat template, as its runs through vLLM's chat API), template (the tokenizer's chat "
                             "template) or off; default: official where the model has one, else template where the "
                             "tokenizer has one, else off")
    add_common_arguments(parser, default_out="results/longbench", chat=False)


def metric_options(args) -> dict[str, Any]:
    return {"zh_tokenizer": args.zh_tokenizer, "fuzz_backend": args.fuzz_backend}


def run(args: argparse.Namespace, model=None, tokenizer=None) -> dict[str, str]:
    """Predict (unless --score-only), score, write the report; returns the report's paths."""
    if args.score_only:
        table = score_predictions(args.out, **metric_options(args))
        info_path = os.path.join(args.out, "results.json")
        info = {}
        if os.path.isfile(info_path):
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f).get("info", {})
        paths = write_report(args.out, table, info)
        report.print_file(paths["markdown"])
        return paths
    if not args.data_dir:
        raise ValueError("--data-dir is required (a folder with LongBench's {dataset}.jsonl files or v2's data.json)")
    datasets = resolve_datasets(split_list(args.datasets), args.version, args.cot, args.no_context)
    # the data, the scorers and the output folder are checked before the model loads
    check_data_files(args.data_dir, datasets)
    for name in datasets:
        if not is_v2(name):
            metrics.check_scorer(base_name(name), **metric_options(args))
    check_out(args.out, resume=args.resume, overwrite=args.overwrite)
    official = official_model(args.model_name, args.model)
    setup = setup_from_args(args, model, tokenizer)
    from ..patch import decoder_config
    max_length, max_length_source = resolve_max_length(args.max_length, official, decoder_config(setup.model),
                                                       version=args.version, model_path=args.model)
    if args.version == 2:  # the official v2 runs chat through vLLM: the model's chat template, no system message
        chat_format, chat = resolve_chat("template" if args.chat_format == "official" else args.chat_format, None,
                                         setup.tokenizer, setup.model_name)
    else:
        chat_format, chat = resolve_chat(args.chat_format, official, setup.tokenizer, setup.model_name)
    setup.chat = chat is not False
    options = {run.label: run_options(setup, run, official) for run in setup.runs}
    settings = prediction_settings(setup, version=args.version, official=official, max_length=max_length,
                                   chat=chat_format, double_bos=args.double_bos, max_new_tokens=args.max_new_tokens,
                                   options=options)
    if args.resume:
        settings = resumed_settings(args.out, settings)

    def start() -> None:
        if args.overwrite:
            remove_outputs(args.out)
        report.write_json(os.path.join(args.out, SETTINGS), settings)
    setup.group.on_main(start)
    predict(setup, args.data_dir, datasets, max_length=max_length, limit=args.limit,
            max_new_tokens=args.max_new_tokens, double_bos=args.double_bos, resume=args.resume, options=options,
            chat=chat, official=official)
    if not setup.group.main:
        return {}  # the main process merged every shard's predictions: it scores them
    table = score_predictions(args.out, [r.label for r in setup.runs], datasets, **metric_options(args))
    info = report.environment_info(setup, **settings, max_length_source=max_length_source, limit=args.limit,
                                   datasets=datasets, metric_options=metric_options(args))
    paths = write_report(args.out, table, info)
    report.print_file(paths["markdown"])
    return paths


main = script_main("cakekv eval longbench", __doc__, add_arguments, run)
