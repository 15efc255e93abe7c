"""LongBench metrics: the official THUDM LongBench scorer (``metrics.py``, ``eval.py``), with the
packages it uses for ROUGE-L and word segmentation.

Every function takes ``(prediction, ground_truth, **kwargs)`` and returns a float in [0, 1], like the
official ``metrics.py``; :func:`score_example` applies the per-dataset rules (first-line rule, max over
the gold answers) and :func:`dataset_score` the ``round(100 * mean, 2)`` aggregation.
``tests/eval/data/longbench_official_*.json`` holds scores computed by LongBench's own code, which the
tests compare with.

* **ROUGE-L** (:func:`rouge_l`; gov_report, qmsum, multi_news, samsum, dureader, vcsum) is the
  ``rouge`` package's, as LongBench calls it: ``Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]``,
  0 whenever the package raises (an empty text; a sentence pair whose LCS backtrack is deeper than
  Python's recursion limit, which long Chinese summaries without a ``"."`` reach: the package recurses,
  and where exactly it gives up depends on the caller's stack depth, in LongBench as here).
  ``rouge-score`` is not a substitute: it tokenises differently and gives other numbers.
* **fuzz ratio** (:func:`fuzz_ratio`; lcc, repobench-p) is ``fuzzywuzzy.fuzz.ratio``: 0 when an argument is
  ``None``, 100 when both strings are equal, 0 when one is empty, else ``int(round(100 * r))``. LongBench
  lists ``fuzzywuzzy`` without ``python-Levenshtein`` (its requirements.txt), so its published numbers take
  ``r = difflib.SequenceMatcher(None, a, b).ratio()`` (backend ``"difflib"``, the default; the standard
  library's, which fuzzywuzzy falls back to). With ``python-Levenshtein`` installed, fuzzywuzzy (and
  thefuzz, its successor, always) takes the InDel ratio ``1 - indel_distance / (len(a) + len(b))``
  instead: backend ``"indel"``, from ``rapidfuzz``. The two differ on some lines (difflib's matcher is a
  heuristic, with a "popular character" junk rule from 200 characters on).
* **Chinese word segmentation** (``qa_f1_zh``, ``rouge_zh``) is ``jieba.cut(text, cut_all=False)``, like
  the official scorer; ``zh_tokenizer="char"`` segments CJK text into single characters instead (scores
  are then not comparable with published numbers).

The packages are imported when a metric needs them; a missing one raises an ImportError saying what
to install (``pip install 'cakekv[eval]'`` brings them all).

LongBench-E (:func:`length_bucket_scores`) scores each length interval of a dataset as the official
``scorer_e``; LongBench v2 (:func:`extract_choice`, :func:`v2_accuracy`) extracts the chosen letter as the
official v2 ``pred.py`` and reports accuracy as its ``result.py``.
"""
from __future__ import annotations

import difflib
import importlib
import re
import string
from collections import Counter
from typing import Callable, Iterable, Sequence

__all__ = [
    "normalize_answer", "normalize_zh_answer", "token_f1", "qa_f1_score", "qa_f1_zh_score",
    "rouge_l", "rouge_score", "rouge_zh_score", "classification_score", "retrieval_score",
    "retrieval_zh_score", "count_score", "FUZZ_BACKENDS", "fuzz_ratio", "code_sim_score", "first_code_line",
    "zh_segment", "METRICS", "DATASET2METRIC", "FIRST_LINE_DATASETS", "check_scorer", "score_example",
    "dataset_score", "average_score", "LENGTH_BUCKETS", "length_bucket", "length_bucket_scores",
    "extract_choice", "V2_GROUPS", "v2_accuracy",
]

_EN_PUNCT = frozenset(string.punctuation)
# The Chinese (full-width) punctuation removed by the official Chinese normalisation, on top of
# string.punctuation.
_ZH_PUNCT = _EN_PUNCT | frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# --------------------------------------------------------------------------- normalisation
def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, replace the articles a/an/the by a space, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, remove all whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _ZH_PUNCT)
    return "".join(s.split())


# --------------------------------------------------------------------------- Chinese segmentation
_CJK_CHAR = r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]"
_CHAR_SEGMENT = re.compile(_CJK_CHAR + r"|[A-Za-z0-9_]+|\s+|\S")


def _package(module: str, pip_name: str, needed_for: str):
    """Import an optional package, or raise an ImportError saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{needed_for} uses the {pip_name} package, like LongBench's scorer: "
                          f"`pip install {pip_name}` (or `pip install 'cakekv[eval]'`)") from e


def zh_segment(text: str, zh_tokenizer: str = "jieba") -> list[str]:
    """Segment Chinese text into words: ``jieba.cut(text, cut_all=False)`` (official) or by character."""
    if zh_tokenizer == "char":
        return _CHAR_SEGMENT.findall(text)
    if zh_tokenizer != "jieba":
        raise ValueError(f"zh_tokenizer must be 'jieba' or 'char', got {zh_tokenizer!r}")
    jieba = _package("jieba", "jieba", "the Chinese LongBench metrics (qa_f1_zh for multifieldqa_zh, rouge_zh "
                                      "for dureader/vcsum; or --zh-tokenizer char, not comparable with "
                                      "published numbers)")
    import logging
    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text, cut_all=False))


# --------------------------------------------------------------------------- QA F1
def token_f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Token-level F1 on multisets (0 when nothing is shared)."""
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, zh_tokenizer: str = "jieba", **kwargs) -> float:
    def tokens(text):
        normed = (normalize_zh_answer(t) for t in zh_segment(text, zh_tokenizer))
        return [t for t in normed if t]
    return token_f1(tokens(prediction), tokens(ground_truth))


# --------------------------------------------------------------------------- ROUGE-L
def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F of the ``rouge`` package, 0 where it raises (see the module docstring)."""
    rouge = _package("rouge", "rouge", "ROUGE-L (gov_report, qmsum, multi_news, samsum, dureader, vcsum)")
    try:
        return float(rouge.Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"])
    except Exception:  # as LongBench: empty text, RecursionError on a long sentence pair, ...
        return 0.0


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return rouge_l(prediction, ground_truth)


def rouge_zh_score(prediction: str, ground_truth: str, zh_tokenizer: str = "jieba", **kwargs) -> float:
    prediction = " ".join(zh_segment(prediction, zh_tokenizer))
    ground_truth = " ".join(zh_segment(ground_truth, zh_tokenizer))
    return rouge_l(prediction, ground_truth)


# --------------------------------------------------------------------------- classification
def classification_score(prediction: str, ground_truth: str, all_classes: Iterable[str] | None = None,
                         classification_quirk: bool = True, **kwargs) -> float:
    """1/#matches if the gold class is among the class names found in the prediction, else 0.

    Class names that occur in the prediction are collected; those that are a substring of the gold
    label (but not the label itself) are dropped. The official scorer drops them with
    ``list.remove`` while iterating over the same list, which skips the element right after each
    removed one; ``classification_quirk=True`` (default) reproduces that, ``False`` drops all.
    """
    if all_classes is None:
        raise ValueError("classification_score needs all_classes (the dataset's list of class names)")
    matches = [c for c in all_classes if c in prediction]
    if classification_quirk:
        idx = 0
        while idx < len(matches):
            term = matches[idx]
            if term in ground_truth and term != ground_truth:
                matches.remove(term)
            idx += 1
    else:
        matches = [t for t in matches if not (t in ground_truth and t != ground_truth)]
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


# --------------------------------------------------------------------------- retrieval / count
_NUMBER = re.compile(r"\d+")


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(1 for x in numbers if x == str(target)) / len(numbers)


def _paragraph_id(ground_truth: str, pattern: str) -> str:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"gold answer {ground_truth!r} does not match {pattern!r}")
    return found[0]


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of the numbers in the prediction equal to N in the gold "Paragraph N"."""
    return _fraction_equal(prediction, _paragraph_id(ground_truth, r"Paragraph (\d+)"))


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of the numbers in the prediction equal to N in the gold "段落N"."""
    return _fraction_equal(prediction, _paragraph_id(ground_truth, r"段落(\d+)"))


def count_score(prediction: str, ground_truth, **kwargs) -> float:
    """Fraction of the numbers in the prediction equal to the gold count."""
    return _fraction_equal(prediction, str(ground_truth))


# --------------------------------------------------------------------------- code similarity
FUZZ_BACKENDS = ("difflib", "indel")


def fuzz_ratio(s1: str | None, s2: str | None, backend: str = "difflib") -> int:
    """``fuzzywuzzy.fuzz.ratio``: an integer similarity in [0, 100]; ``backend`` "difflib" (LongBench's
    environment) or "indel" (fuzzywuzzy with python-Levenshtein), see the module docstring."""
    if backend not in FUZZ_BACKENDS:
        raise ValueError(f"fuzz_backend must be one of {FUZZ_BACKENDS}, got {backend!r}")
    if s1 is None or s2 is None:
        return 0
    if s1 == s2:
        return 100
    if len(s1) == 0 or len(s2) == 0:
        return 0
    if backend == "difflib":
        r = difflib.SequenceMatcher(None, s1, s2).ratio()
    else:
        rapidfuzz = _package("rapidfuzz.distance", "rapidfuzz", "fuzz_backend='indel' (lcc, repobench-p)")
        r = rapidfuzz.Indel.normalized_similarity(s1, s2)
    return int(round(100 * r))


def first_code_line(prediction: str) -> str:
    """First line (leading newlines stripped) containing none of ```` ` ````, ``#``, ``//``; '' if none."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_score(prediction: str, ground_truth: str, fuzz_backend: str = "difflib", **kwargs) -> float:
    return fuzz_ratio(first_code_line(prediction), ground_truth, fuzz_backend) / 100


# --------------------------------------------------------------------------- per dataset
METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}

DATASET2METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_zh",
    "gov_report": "rouge",
    "qmsum": "rouge",
    "multi_news": "rouge",
    "vcsum": "rouge_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge",
    "lsht": "classification",
    "passage_retrieval_en": "retrieval",
    "passage_count": "count",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}

# Few-shot datasets whose prediction is cut to its first line (after stripping leading newlines).
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def check_scorer(dataset: str, zh_tokenizer: str = "jieba", fuzz_backend: str = "difflib") -> None:
    """Import the packages the dataset's metric needs now: a missing one fails before a long run, not
    at its end."""
    metric = DATASET2METRIC[dataset]
    if metric in ("qa_f1_zh", "rouge_zh"):
        zh_segment("测试", zh_tokenizer)
    if metric in ("rouge", "rouge_zh"):
        rouge_l("a", "a")
    if metric == "code_sim":
        fuzz_ratio("ab", "ac", fuzz_backend)


def score_example(dataset: str, prediction: str, answers: Sequence[str],
                  all_classes: Sequence[str] | None = None, **options) -> float:
    """Score of one prediction: the dataset's metric, max over the gold answers.

    ``options`` go to the metric: ``zh_tokenizer``, ``fuzz_backend``, ``classification_quirk``.
    """
    if dataset not in DATASET2METRIC:
        raise ValueError(f"unknown LongBench dataset {dataset!r}; known: {sorted(DATASET2METRIC)}")
    metric = METRICS[DATASET2METRIC[dataset]]
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    if isinstance(answers, str):
        answers = [answers]
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes, **options))
    return float(best)


def dataset_score(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
                  all_classes: Sequence[Sequence[str] | None] | Sequence[str] | None = None,
                  **options) -> float:
    """``round(100 * mean score, 2)`` over the examples of one dataset (0.0 for no example)."""
    if len(predictions) != len(answers):
        raise ValueError("predictions and answers differ in length")
    if not predictions:
        return 0.0
    total = sum(score_example(dataset, p, a, c, **options)
                for p, a, c in zip(predictions, answers, _classes_per_example(all_classes, len(predictions))))
    return round(100 * total / len(predictions), 2)


def _classes_per_example(all_classes, n: int) -> list:
    """``all_classes`` as one entry per example: a list of per-example lists (or Nones) is kept, one class
    list (or None) for the whole dataset is repeated."""
    per_example = (all_classes is not None and len(all_classes) == n
                   and all(c is None or not isinstance(c, str) for c in all_classes))
    return list(all_classes) if per_example else [all_classes] * n


def average_score(scores: Iterable[float]) -> float:
    """``round(mean, 2)`` of (already rounded) dataset scores, as the official ``--eval_avg``."""
    scores = list(scores)
    if not scores:
        return 0.0
    return round(sum(scores) / len(scores), 2)


# --------------------------------------------------------------------------- LongBench-E
LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")


def length_bucket(length: int) -> str:
    """The official ``scorer_e`` interval of an example's ``length`` field (words; characters for Chinese)."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def length_bucket_scores(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
                         lengths: Sequence[int], all_classes=None, **options) -> dict[str, float | None]:
    """The official ``scorer_e``: :func:`dataset_score` over the examples of each length interval, None for an
    interval without examples (where the official ``np.mean`` of nothing gives NaN)."""
    if not len(predictions) == len(answers) == len(lengths):
        raise ValueError("predictions, answers and lengths differ in length")
    classes = _classes_per_example(all_classes, len(predictions))
    out: dict[str, float | None] = {}
    for bucket in LENGTH_BUCKETS:
        idx = [i for i, n in enumerate(lengths) if length_bucket(n) == bucket]
        out[bucket] = dataset_score(dataset, [predictions[i] for i in idx], [answers[i] for i in idx],
                                    [classes[i] for i in idx], **options) if idx else None
    return out


# --------------------------------------------------------------------------- LongBench v2
_CHOICE = (re.compile(r"The correct answer is \(([A-D])\)"), re.compile(r"The correct answer is ([A-D])"))


def extract_choice(response: str) -> str | None:
    """The letter of LongBench v2's official ``extract_answer``: ``*`` removed (markdown bold), then the first
    "The correct answer is (X)", else the first "The correct answer is X", X in A-D; None when neither occurs."""
    response = response.replace("*", "")
    for pattern in _CHOICE:
        match = pattern.search(response)
        if match:
            return match.group(1)
    return None


V2_GROUPS = ("overall", "easy", "hard", "short", "medium", "long")


def v2_accuracy(records: Iterable[dict]) -> dict[str, float | None]:
    """LongBench v2's ``result.py``: accuracy in percent, one decimal, overall, by ``difficulty`` (easy; any other
    value counts as hard) and by ``length`` (short, medium; any other value counts as long), from each record's
    ``judge``; None for a group without questions (where result.py divides by zero)."""
    groups: dict[str, list[int]] = {g: [] for g in V2_GROUPS}
    for r in records:
        correct = int(r["judge"])
        groups["overall"].append(correct)
        groups["easy" if r["difficulty"] == "easy" else "hard"].append(correct)
        groups[r["length"] if r["length"] in ("short", "medium") else "long"].append(correct)
    return {g: round(100 * sum(v) / len(v), 1) if v else None for g, v in groups.items()}
