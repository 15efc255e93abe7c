"""Haystacks and needles: the one place that writes the texts hidden in long prompts and the
filler around them. Used by the synthetic tasks (:mod:`.synthetic`), the needle heatmap
(:mod:`.needle`), the demo, and ``experiments/tiny_data.py`` (the training and evaluation data of
the shipped tiny model, which uses its own word lists with the same texts and generators).

Needles, two families:

* ``magic`` (RULER): "One of the special magic numbers for KEY is: VALUE.", KEY an adjective-noun
  pair ("calm-anchor"), after the instruction :data:`MAGIC_INTRO`; asked "What is the special magic
  number for KEY mentioned in the provided text?";
* ``fact`` (the shipped tiny model's format): "The ATTRIBUTE of NAME is CODE."; asked "What is the
  ATTRIBUTE of NAME?", answered after "The ATTRIBUTE of NAME is".

Haystacks (filler sentences): ``noise`` (RULER's repeated "The grass is green. ..."), ``essay``
(sentences from the docstrings of Python's standard library, shuffled with the seed: natural text
that is always there offline) or a text file.

Standard library only: ``experiments/tiny_data.py`` imports it without torch.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import os
import random
import re
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

# ----------------------------------------------------------------------------------------------
# needles
# ----------------------------------------------------------------------------------------------
MAGIC_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.\n")


def magic_needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def magic_question(who: str, many: bool = False) -> tuple[str, str]:
    """(question, answer prefix) asking the number of ``who`` (or, ``many``, all the numbers of ``who``)."""
    if many:
        return (f"\nWhat are all the special magic numbers for {who} mentioned in the provided text?",
                f" The special magic numbers for {who} mentioned in the provided text are")
    return (f"\nWhat is the special magic number for {who} mentioned in the provided text?",
            f" The special magic number for {who} mentioned in the provided text is")


def fact_needle(attribute: str, name: str, code: str) -> str:
    return f"The {attribute} of {name} is {code}."


def fact_question(attribute: str, name: str) -> tuple[str, str]:
    """(question, answer prefix) asking ``name``'s ``attribute``."""
    return f"\nWhat is the {attribute} of {name}?", f" The {attribute} of {name} is"


def random_code(rng: random.Random, digits: int = 7) -> str:
    """A number of exactly ``digits`` digits (no leading zero)."""
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


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

FIRST_NAMES = """Ada Alma Anton Aris Bea Boris Carla Cyril Dana Dmitri Edda Elias Fiona Felix Greta Gustav Hana
Hugo Ines Ivan Jana Jonas Kira Lars Lena Marco Mara Nadia Nils Olga Oscar Petra Pablo Rosa Rufus Sara Sven Tara
Tomas Una Uriel Vera Viktor Wanda Walter Xenia Yara Yusuf Zora Zeno""".split()
LAST_NAMES = """Abbott Alder Baxter Berg Blackwood Brandt Carver Castell Dalton Dorn Ellery Engel Falk Fenwick
Garrow Grieve Halden Hart Ingram Ives Jansen Kessler Lind Lowell Marsh Moreau Nolan Novak Orwell Pike Quint
Radley Rook Sandoval Stroud Thorne Tulley Ulric Varga Vance Weller Wren Yates Zeller""".split()


def random_key(rng: random.Random, adjectives: Sequence[str] = ADJECTIVES, nouns: Sequence[str] = NOUNS) -> str:
    """An adjective-noun key for a magic needle ("calm-anchor")."""
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def person_name(rng: random.Random, first: Sequence[str] = FIRST_NAMES, last: Sequence[str] = LAST_NAMES) -> str:
    """A first and a last name for a fact needle ("Ada Berg")."""
    return f"{rng.choice(first)} {rng.choice(last)}"


def distinct(n: int, make: Callable[[], T]) -> list[T]:
    """``n`` different values of ``make()``, in the order first made."""
    out: list[T] = []
    while len(out) < n:
        value = make()
        if value not in out:
            out.append(value)
    return out


# ----------------------------------------------------------------------------------------------
# haystacks
# ----------------------------------------------------------------------------------------------
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
    check_haystack(haystack)
    with open(haystack, encoding="utf-8", errors="replace") as f:
        sentences = split_sentences(f.read())
    if not sentences:
        raise ValueError(f"haystack: {haystack} holds no text")
    return sentences


def check_haystack(haystack: str) -> None:
    """``haystack`` is 'noise', 'essay' or an existing file (checked before a model is loaded)."""
    if haystack not in ("noise", "essay") and not os.path.isfile(haystack):
        raise FileNotFoundError(f"haystack: expected 'noise', 'essay' or a text file, got {haystack!r} "
                                "(no such file)")


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


def hide_needles(needles: Sequence[str], fixed: Sequence[str], *, counter: TokenCounter, sentences: Sequence[str],
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
