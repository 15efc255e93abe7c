"""Synthetic RULER-style long-context tasks, generated offline from a seed and scored exactly.

Tasks (:data:`TASKS`), each at a target prompt length in tokens:

* ``niah_single`` -- one needle "One of the special magic numbers for KEY is: VALUE." in a haystack;
  asked for KEY's number.
* ``niah_multikey`` -- four needles with different keys; asked for one key's number.
* ``niah_multivalue`` -- four needles with the same key and different numbers; asked for all of them.
* ``niah_multiquery`` -- four needles with different keys; asked for all four keys' numbers.
* ``variable_tracking`` -- a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops) and a distractor
  chain scattered in the haystack; asked for every variable holding the value.
* ``common_words`` -- a numbered list of words where 10 words appear 30 times and the others 3
  times (fewer when the length is short); asked for the 10 most common.

Score of a sample: the fraction of the expected items found in the greedy answer (an item counts
when it occurs as a whole word/number, case-insensitive). Task score: 100 x the mean over samples.

Haystacks: ``noise`` (RULER's repeated "The grass is green. ..." sentences), ``essay`` (sentences
from the docstrings of Python's standard library, shuffled with the seed: natural text that is
always available offline) or a path to a text file.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import json
import os
import random
import re
from typing import Any, Sequence

from . import common

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
         "common_words")

ADJECTIVES = """
able acid aged airy amber ample azure bald bare basic beige bent big bitter black bland blue bold
brave brief bright brisk broad brown busy calm candid cheap chief chilly civic clean clear close
cold cool coral cosy crisp cruel curly damp dark dear deep dense dim dry dull dusty eager early
easy empty equal even exact fair faint false famous fancy fast fat fierce fine firm flat fond
frail free fresh full funny gentle giant glad gold good grand gray great green grim gross happy
hard harsh heavy high hollow huge humble icy ideal idle jolly juicy keen kind large late lazy
lean light little live lone long loud lovely low loyal lucky lush mad magic major mellow mild
minor misty modern moist neat new nice noble odd old olive open pale plain plump polite poor
proud pure quick quiet rapid rare raw ready real red rich rigid ripe rough round royal rural
rusty sad safe salty sandy sharp shiny short shy silent silky silver simple slim slow small smart
smooth snowy soft solid sour spare stark steep stiff still stout strict strong sunny super sweet
swift tall tame tender thick thin tidy tiny tough true ugly vast vivid warm weak wet white whole
wide wild windy wise witty young zany
""".split()

NOUNS = """
acorn anchor apple arch arrow atlas badge bagel ballet bamboo banjo barn basket beach beacon bell
bench berry bicycle blanket blossom boat bonnet boulder bracelet branch bread bridge brook bucket
button cabin cactus camel candle canoe canyon carpet castle cedar cellar chair chalk cherry chess
cliff clock cloud clover coast comet compass copper cottage cotton crane crater crystal cup
curtain daisy desert diamond dolphin donkey door dragon drum eagle easel ember engine falcon
feather fence fern ferry fiddle flag flute forest fountain fox frost garden garnet geyser ginger
glacier goat granite grape guitar hammer harbor harp hawk hazel helmet hill honey horizon horse
island ivory jacket jade jar jasmine jelly jewel kettle kite ladder lagoon lake lantern lemon
lily lion lobster locket magnet mango maple marble meadow melon mirror mitten monkey moon moss
mountain mug needle nest oasis ocean olive onion orchard otter owl oyster paddle palace panda
parrot peach pearl pebble pepper piano pigeon pillow pine planet plum pond poppy pumpkin quartz
quill rabbit radish raven reef ribbon river robin rocket rose saddle sail salmon sand scarf
shell ship shovel silk sleigh snail sparrow spider spoon squirrel star statue stone storm
stream sugar summit swan table teapot temple thistle thunder tiger timber tomato torch tower
trail tulip tunnel turtle umbrella valley velvet violin volcano wagon walnut whale wheat willow
window wolf wreath yacht zebra
""".split()

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")

# Standard-library modules whose docstrings make the default "essay" haystack.
_DOC_MODULES = (
    "argparse", "collections", "json", "textwrap", "difflib", "functools", "random", "string", "unittest",
    "logging", "pathlib", "statistics", "fractions", "decimal", "heapq", "bisect", "calendar", "csv",
    "zipfile", "tarfile", "shutil", "subprocess", "threading", "queue", "socket", "inspect", "typing",
    "dataclasses", "enum", "contextlib", "copy", "pickle", "pprint", "sched", "secrets", "uuid",
    "email.message", "http.client", "urllib.request", "xml.dom.minidom", "asyncio.events", "sqlite3",
    "gettext", "locale", "tempfile", "glob", "fnmatch", "shlex", "cmd", "code", "doctest", "pdb", "timeit",
    "trace", "tracemalloc", "warnings", "weakref", "numbers", "operator", "ast", "dis", "tokenize",
    "imaplib", "smtplib", "ftplib", "poplib", "mailbox", "mimetypes", "base64", "hashlib", "hmac",
    "selectors", "signal", "configparser", "netrc", "plistlib", "optparse", "getopt", "platform",
    "multiprocessing", "sysconfig", "venv", "zipapp", "importlib", "pkgutil", "modulefinder", "ipaddress",
    "html.parser", "wave", "colorsys", "turtle", "tkinter", "idlelib.editor",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_BAD_CHARS = re.compile(r"[0-9_=(){}\[\]<>`|\\@#$*]")


# ----------------------------------------------------------------------------------------------
# haystacks
# ----------------------------------------------------------------------------------------------
def split_sentences(text: str, min_words: int = 1) -> list[str]:
    text = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(text) if len(s.split()) >= min_words]


@functools.lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """Prose sentences (6-40 words, no digits or code characters) from standard-library docstrings,
    sorted and deduplicated. Read from the source files, nothing imported or downloaded."""
    found: set[str] = set()
    for name in _DOC_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None) if spec else None
        if not origin or not origin.endswith(".py") or not os.path.isfile(origin):
            continue
        try:
            with open(origin, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                lines = para.split("\n")
                if any(ln.startswith((" ", "\t")) or ln.strip().startswith((">>>", "...", "-", "*", ":"))
                       for ln in lines):
                    continue  # code, lists, field lists
                for s in split_sentences(" ".join(ln.strip() for ln in lines)):
                    if (6 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith(".")
                            and not _BAD_CHARS.search(s)):
                        found.add(s)
    return tuple(sorted(found))


def haystack_sentences(haystack: str = "essay", seed: int = 0) -> list[str]:
    """The filler sentences: 'noise', 'essay' (stdlib docstrings, shuffled with ``seed``) or a text file."""
    if haystack == "noise":
        return list(NOISE_SENTENCES)
    if haystack == "essay":
        sentences = list(stdlib_sentences())
        if len(sentences) < 50:  # a Python without its sources: fall back to the noise filler
            return list(NOISE_SENTENCES)
        random.Random(seed).shuffle(sentences)
        return sentences
    if not os.path.isfile(haystack):
        raise FileNotFoundError(f"haystack: expected 'noise', 'essay' or a text file, got {haystack!r} "
                                "(no such file)")
    with open(haystack, encoding="utf-8", errors="replace") as f:
        sentences = split_sentences(f.read())
    if not sentences:
        raise ValueError(f"haystack: {haystack} holds no text")
    return sentences


class TokenCounter:
    """Token counts of text pieces (no special tokens), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(self._cache) < 100_000:
                self._cache[text] = n
        return n


def fill(sentences: Sequence[str], count: TokenCounter, budget: int, start: int = 0) -> list[str]:
    """Sentences taken in order (cycling, from ``start``) while their tokens (+1 for the joining
    space) fit in ``budget``."""
    out: list[str] = []
    used = 0
    i = start
    if not sentences:
        return out
    while True:
        s = sentences[i % len(sentences)]
        cost = count(s) + 1
        if used + cost > budget:
            return out
        out.append(s)
        used += cost
        i += 1
        if len(out) > 10_000_000:  # pragma: no cover - guard against a zero-cost tokenizer
            return out


def insert_at_depth(sentences: list[str], needle: str, depth: float, count: TokenCounter) -> list[str]:
    """Insert ``needle`` between sentences, at the first boundary at or after ``depth`` (0..1) of the
    haystack's tokens."""
    total = sum(count(s) + 1 for s in sentences)
    target = depth * total
    used = 0
    idx = len(sentences)
    for i, s in enumerate(sentences):
        if used >= target:
            idx = i
            break
        used += count(s) + 1
    return sentences[:idx] + [needle] + sentences[idx:]


def insert_random(sentences: list[str], needles: Sequence[str], rng: random.Random) -> list[str]:
    """Insert ``needles`` at random sentence boundaries, keeping their order."""
    slots = sorted(rng.randint(0, len(sentences)) for _ in needles)
    out: list[str] = []
    prev = 0
    for slot, needle in zip(slots, needles):
        out.extend(sentences[prev:slot])
        out.append(needle)
        prev = slot
    out.extend(sentences[prev:])
    return out


# ----------------------------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sample:
    task: str
    before: str           # instruction before the context
    context: str          # the haystack with the needles (compressed first under context-only)
    after: str            # the question
    answer_prefix: str    # appended after the (chat-wrapped) question
    expected: list[str]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def prompt(self, tokenizer, chat: bool) -> common.Prompt:
        return common.make_prompt(tokenizer, self.before, self.context, self.after, chat=chat,
                                  answer_prefix=self.answer_prefix)


def magic_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def make_keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in keys:
            keys.append(k)
    return keys


def variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


_NIAH_BEFORE = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                "I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."


def _haystack(needles: Sequence[str], fixed: Sequence[str], *, counter: TokenCounter, sentences: Sequence[str],
              length: int, rng: random.Random, depth: float | None = None, joiner: str = " ") -> str:
    """The context: filler sentences (from a random start) with the needles, sized so that the prompt
    (the ``fixed`` texts around the context included) takes about ``length`` tokens. With ``depth``
    the first needle goes at that depth and the others at random places; else all at random places."""
    overhead = sum(counter(t) for t in fixed) + sum(counter(n) + 1 for n in needles) + 8
    start = rng.randrange(len(sentences)) if sentences else 0
    hay = fill(sentences, counter, max(length - overhead, 0), start)
    if depth is None:
        hay = insert_random(hay, needles, rng)
    else:
        hay = insert_at_depth(insert_random(hay, needles[1:], rng), needles[0], depth, counter)
    return joiner.join(hay)


def niah_sample(task: str, counter: TokenCounter, sentences: Sequence[str], length: int, rng: random.Random,
                depth: float | None = None, n_needles: int = 4) -> Sample:
    if task == "niah_single":
        keys, values = make_keys(rng, 1), [magic_number(rng)]
        pairs, asked = list(zip(keys, values)), keys[:1]
    elif task == "niah_multikey":
        keys = make_keys(rng, n_needles)
        values = [magic_number(rng) for _ in keys]
        pairs, asked = list(zip(keys, values)), [keys[0]]
    elif task == "niah_multivalue":
        keys = make_keys(rng, 1)
        values = list(dict.fromkeys(magic_number(rng) for _ in range(n_needles)))
        pairs, asked = [(keys[0], v) for v in values], keys
    elif task == "niah_multiquery":
        keys = make_keys(rng, n_needles)
        values = [magic_number(rng) for _ in keys]
        pairs, asked = list(zip(keys, values)), keys
    else:
        raise ValueError(f"task: unknown needle task {task!r}")
    needles = [NEEDLE.format(key=k, value=v) for k, v in pairs]
    rng.shuffle(needles)
    expected = [v for k, v in pairs if k in asked]
    many = len(expected) > 1
    who = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    if many:
        after = f"\nWhat are all the special magic numbers for {who} mentioned in the provided text?"
        prefix = f" The special magic numbers for {who} mentioned in the provided text are"
    else:
        after = f"\nWhat is the special magic number for {who} mentioned in the provided text?"
        prefix = f" The special magic number for {who} mentioned in the provided text is"
    context = _haystack(needles, (_NIAH_BEFORE, after, prefix), counter=counter, sentences=sentences,
                        length=length, rng=rng, depth=depth if len(needles) == 1 else None)
    return Sample(task, _NIAH_BEFORE, context, after, prefix, expected,
                  {"keys": asked, "needles": needles, "depth": depth})


FIRST_NAMES = """Ada Alma Anton Aris Bea Boris Carla Cyril Dana Dmitri Edda Elias Fiona Felix Greta Gustav Hana
Hugo Ines Ivan Jana Jonas Kira Lars Lena Marco Mara Nadia Nils Olga Oscar Petra Pablo Rosa Rufus Sara Sven Tara
Tomas Una Uriel Vera Viktor Wanda Walter Xenia Yara Yusuf Zora Zeno""".split()
LAST_NAMES = """Abbott Alder Baxter Berg Blackwood Brandt Carver Castell Dalton Dorn Ellery Engel Falk Fenwick
Garrow Grieve Halden Hart Ingram Ives Jansen Kessler Lind Lowell Marsh Moreau Nolan Novak Orwell Pike Quint
Radley Rook Sandoval Stroud Thorne Tulley Ulric Varga Vance Weller Wren Yates Zeller""".split()


def person_name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def fact_sample(counter: TokenCounter, sentences: Sequence[str], length: int, rng: random.Random,
                depth: float | None = None, n_facts: int = 1, attribute: str = "secret code",
                digits: int = 5) -> Sample:
    """A needle in the format of the shipped tiny model: fact lines "The secret code of NAME is
    CODE." in filler lines, asked "What is the secret code of NAME? The secret code of NAME is". The
    first fact (the one asked) goes at ``depth``, the others at random lines."""
    names: list[str] = []
    while len(names) < n_facts:
        name = person_name(rng)
        if name not in names:
            names.append(name)
    codes = [magic_number(rng, digits) for _ in names]
    facts = [f"The {attribute} of {n} is {c}." for n, c in zip(names, codes)]
    after = f"\nWhat is the {attribute} of {names[0]}?"
    prefix = f" The {attribute} of {names[0]} is"
    context = _haystack(facts, (after, prefix), counter=counter, sentences=sentences, length=length, rng=rng,
                        depth=0.5 if depth is None else depth, joiner="\n")
    return Sample("fact", "", context, after, prefix, [codes[0]],
                  {"name": names[0], "facts": dict(zip(names, codes)), "depth": depth})


def variable_tracking_sample(counter: TokenCounter, sentences: Sequence[str], length: int, rng: random.Random,
                             hops: int = 4, chains: int = 2) -> Sample:
    used: set[str] = set()

    def fresh():
        while True:
            v = variable_name(rng)
            if v not in used:
                used.add(v)
                return v

    all_chains = []
    values = list(dict.fromkeys(magic_number(rng, 5) for _ in range(chains * 2)))[:chains]
    for value in values:
        names = [fresh() for _ in range(hops + 1)]
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        all_chains.append((value, names, lines))
    # interleave the chains, keeping each chain's order
    order = [c for c, (_, _, lines) in enumerate(all_chains) for _ in lines]
    rng.shuffle(order)
    cursor = [0] * len(all_chains)
    needles = []
    for c in order:
        needles.append(all_chains[c][2][cursor[c]])
        cursor[c] += 1
    value, names, _ = all_chains[0]
    before = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    after = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
              f"variables are assigned the value {value}, they are:")
    context = _haystack(needles, (before, after, prefix), counter=counter, sentences=sentences,
                        length=length, rng=rng)
    return Sample("variable_tracking", before, context, after, prefix, list(names),
                  {"value": value, "chains": [c[1] for c in all_chains]})


def _pseudo_words(rng: random.Random):
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    while True:
        yield "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))


def common_words_sample(counter: TokenCounter, length: int, rng: random.Random, n_common: int = 10,
                        freq_common: int = 30, freq_rare: int = 3) -> Sample:
    pool = list(dict.fromkeys(ADJECTIVES + NOUNS))
    rng.shuffle(pool)
    common_words, rare_words = pool[:n_common], pool[n_common:]
    extra = _pseudo_words(random.Random(rng.random()))
    shuffle_seed = rng.random()
    before = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.\n")
    after = f"\nQuestion: What are the {n_common} most common words in the above list?"
    prefix = f" Answer: The top {n_common} words that appear most often in the list are:"
    overhead = counter(before) + counter(after) + counter(prefix) + 8

    def words_for(n_rare, f_common):
        while len(rare_words) < n_rare:  # past the real words: pronounceable pseudo-words
            w = next(extra)
            if w not in pool and w not in rare_words:
                rare_words.append(w)
        words = common_words * f_common + rare_words[:n_rare] * freq_rare
        random.Random(shuffle_seed).shuffle(words)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    def cost(n_rare, f_common):
        return overhead + len(counter.tokenizer(words_for(n_rare, f_common), add_special_tokens=False)["input_ids"])

    # the common words' frequency must leave them clearly on top; lower it for short prompts
    f_common = freq_common
    while f_common > freq_rare + 1 and cost(0, f_common) > length:
        f_common -= 1
    lo, hi = 0, 1
    while cost(hi, f_common) <= length and hi < 1_000_000:
        hi *= 2
    while lo < hi - 1:  # the most rare words whose prompt fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid, f_common) <= length else (lo, mid)
    return Sample("common_words", before, words_for(lo, f_common), after, prefix, list(common_words),
                  {"freq_common": f_common, "freq_rare": freq_rare, "n_rare": lo})


def make_sample(task: str, tokenizer, length: int, seed: int, *, haystack: str = "noise",
                counter: TokenCounter | None = None, depth: float | None = None) -> Sample:
    """One sample of ``task`` at about ``length`` prompt tokens, fully determined by ``seed``."""
    counter = counter or TokenCounter(tokenizer)
    rng = random.Random(f"{task}:{length}:{seed}")
    if task.startswith("niah_"):
        return niah_sample(task, counter, haystack_sentences(haystack, seed), length, rng, depth=depth)
    if task == "variable_tracking":
        return variable_tracking_sample(counter, haystack_sentences(haystack, seed), length, rng)
    if task == "common_words":
        return common_words_sample(counter, length, rng)
    raise ValueError(f"tasks: unknown task {task!r}; known: {', '.join(TASKS)}")


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
def contains_item(prediction: str, item: str) -> bool:
    """``item`` occurs in ``prediction`` as a whole word / number (case-insensitive)."""
    return re.search(r"(?<![A-Za-z0-9])" + re.escape(item) + r"(?![A-Za-z0-9])", prediction,
                     re.IGNORECASE) is not None


def score_items(prediction: str, expected: Sequence[str]) -> float:
    """Fraction of the expected items found in the prediction."""
    if not expected:
        return 0.0
    return sum(contains_item(prediction, e) for e in expected) / len(expected)


# ----------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------
def max_new_tokens_for(task: str) -> int:
    return {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_multiquery": 64,
            "variable_tracking": 48, "common_words": 96}[task]


def evaluate(setup: common.Setup, tasks: Sequence[str], lengths: Sequence[int], samples: int, *,
             haystack: str = "noise", max_new_tokens: int | None = None) -> list[dict]:
    """Every run x task x length x sample; one record per generation."""
    counter = TokenCounter(setup.tokenizer)
    items = []
    for task in tasks:
        for length in lengths:
            for i in range(samples):
                sample = make_sample(task, setup.tokenizer, length, setup.seed * 100_003 + i, haystack=haystack,
                                     counter=counter)
                encoded = common.encode_prompt(setup.tokenizer, sample.prompt(setup.tokenizer, setup.chat),
                                               setup.protocol)
                items.append((encoded, max_new_tokens or max_new_tokens_for(task), (length, i, sample)))

    def record(run, payload, gen):
        length, i, sample = payload
        return {"method": run.method, "budget": run.budget, "task": sample.task, "length": length, "sample": i,
                "prompt_tokens": gen.prompt_tokens, "expected": sample.expected, "pred": gen.text,
                "score": score_items(gen.text, sample.expected), "time_s": round(gen.seconds, 4),
                "kv_fraction": gen.kv_fraction}

    return common.evaluate_items(setup, items, desc="synthetic", record=record)


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """{run label: {task: score, ..., 'avg': x}} with scores 100 x mean, per length and overall."""
    table: dict[str, Any] = {}
    for rec in records:
        label = common.Run(rec["method"], rec["budget"]).label
        entry = table.setdefault(label, {"method": rec["method"], "budget": rec["budget"], "by_length": {}})
        entry["by_length"].setdefault(str(rec["length"]), {}).setdefault(rec["task"], []).append(rec["score"])
    for entry in table.values():
        overall: dict[str, list[float]] = {}
        for length, per in entry["by_length"].items():
            for task, scores in per.items():
                overall.setdefault(task, []).extend(scores)
                per[task] = round(100 * sum(scores) / len(scores), 2)
            per["avg"] = round(sum(v for k, v in per.items() if k != "avg") / len(per), 2)
        entry["tasks"] = {t: round(100 * sum(s) / len(s), 2) for t, s in overall.items()}
        entry["avg"] = round(sum(entry["tasks"].values()) / len(entry["tasks"]), 2)
    return table


def write_report(out: str, records: Sequence[dict], info: dict[str, Any]) -> dict[str, str]:
    table = summarize(records)
    tasks = [t for t in TASKS if any(t in e["tasks"] for e in table.values())]
    lengths = sorted({int(r["length"]) for r in records})
    labels = sorted(table, key=lambda k: common.Run.from_label(k).order)
    paths = {"json": os.path.join(out, "results.json"), "markdown": os.path.join(out, "results.md"),
             "png": os.path.join(out, "results.png"), "records": os.path.join(out, "predictions.jsonl")}
    common.write_json(paths["json"], {"task": "synthetic", "info": info, "tasks": tasks, "lengths": lengths,
                                      "results": table})
    with open(paths["records"], "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    md = [f"# Synthetic RULER-style tasks ({info.get('protocol', '?')} protocol)", "",
          f"model: `{info.get('model', '?')}`, window {info.get('window', '?')}, context lengths "
          f"{', '.join(map(str, lengths))}, {info.get('samples', '?')} samples per task and length; "
          "score = 100 x fraction of expected items found", ""]

    md.append(common.markdown_table(["method", "budget", *tasks, "avg"],
                                    [[table[k]["method"], table[k]["budget"], *[table[k]["tasks"].get(t) for t in tasks],
                                      table[k]["avg"]] for k in labels]))
    if len(lengths) > 1:
        for length in lengths:
            md += ["", f"## {length} tokens", ""]
            md.append(common.markdown_table(
                ["method", "budget", *tasks, "avg"],
                [[table[k]["method"], table[k]["budget"], *[table[k]["by_length"].get(str(length), {}).get(t) for t in tasks],
                  table[k]["by_length"].get(str(length), {}).get("avg")] for k in labels]))
    common.write_text(paths["markdown"], "\n".join(md))
    common.plot_scores_vs_budget({common.Run.from_label(k): table[k]["avg"] for k in labels}, paths["png"], title="Synthetic tasks, average score",
                                 ylabel="average score (%)")
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", default=",".join(TASKS),
                        help="tasks, comma or space separated (default: all)")
    parser.add_argument("--lengths", nargs="+", default="4096", help="prompt lengths in tokens (default: 4096)")
    parser.add_argument("--samples", type=int, default=5, help="samples per task and length (default: 5)")
    parser.add_argument("--haystack", default="noise",
                        help="noise (RULER's repeated sentences), essay (stdlib docstrings) or a text file")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the per-task answer length")
    common.add_common_arguments(parser, default_out="results/synthetic")


def run(args: argparse.Namespace, model=None, tokenizer=None) -> dict[str, str]:
    tasks = common.split_list(args.tasks)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks: unknown task {t!r}; known: {', '.join(TASKS)}")
    lengths = common.parse_int_list(args.lengths, "lengths")
    if not lengths or min(lengths) < 16:
        raise ValueError("lengths: give prompt lengths of at least 16 tokens")
    if args.samples < 1:
        raise ValueError("samples: must be >= 1")
    if args.haystack not in ("noise", "essay") and not os.path.isfile(args.haystack):
        raise FileNotFoundError(f"haystack: no such file {args.haystack!r} (or use noise / essay)")
    setup = common.setup_from_args(args, model, tokenizer)
    records = evaluate(setup, tasks, lengths, args.samples, haystack=args.haystack,
                       max_new_tokens=args.max_new_tokens)
    info = common.environment_info(setup)
    info.update(tasks=tasks, lengths=lengths, samples=args.samples, haystack=args.haystack)
    paths = write_report(setup.out, records, info)
    print(open(paths["markdown"], encoding="utf-8").read())
    return paths


main = common.script_main("cakekv eval synthetic", __doc__, add_arguments, run)
