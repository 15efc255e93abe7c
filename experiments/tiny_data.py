"""Data for the tiny long-context Llama shipped in cakekv/assets/tiny-llama.

Used by experiments/train_tiny_model.py (training) and reusable by evaluation code and tests.
Needs numpy, tokenizers, cakekv.eval.haystack (the needle texts and generators, standard library only)
and, for the evaluation helpers, torch + transformers; nothing is downloaded.

1. Corpus -- real text read from the machine at run time: source code and docs of the installed Python
   packages (site-packages), the Python standard library, /usr/share/doc, ... (`collect_corpus`).
   Files are split deterministically into train and held-out by a hash of their last two path
   components (`is_heldout`), which is the same on every machine; held-out files never enter training.

2. Synthetic retrieval documents for training (`NeedleDocSampler`): corpus text with key/value facts
   ("The secret code of Mara Quint is 48213.") hidden at random depths, and questions
   ("What is the secret code of Mara Quint? The secret code of Mara Quint is") answered with the code.
   Single-key, multi-key (several facts with hard negatives, some asked) and mid-document questions,
   sequences with verbatim repeated spans (an induction signal), and a few plain-text sequences. The
   answer tokens (and the repeated tokens) are marked so that the loss can weight them.

3. The needle-in-a-haystack evaluation (`make_needle_example`, `evaluate_needle`, `default_filler_text`):
   one fact at a given depth in held-out real text, the question at the end, greedy generation, exact
   match of the digits. Every example is a pure function of (tokenizer, context_tokens, depth, seed,
   filler_text), so the evaluation suite can rebuild exactly the same prompts.

Prompt format (token level, identical in training and evaluation)::

    <s> filler...\\nThe secret code of NAME is CODE.\\nfiller...\\nWhat is the secret code of NAME? The secret code of NAME is
    -> expected continuation " CODE" (the model then writes ".")

The fact is inserted at a line start of the filler (the nearest one to the requested depth; a line
start may keep the indentation that the byte-level BPE merged into the newline token).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import random
import re
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import numpy as np

try:  # the needle texts and generators shared with cakekv's evaluations (standard library only)
    from cakekv.eval import haystack
except ImportError:  # a checkout without cakekv installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from cakekv.eval import haystack

# --------------------------------------------------------------------------------------------------
# 1. Corpus from the machine
# --------------------------------------------------------------------------------------------------

TEXT_EXTS = {
    ".py", ".pyi", ".pyx", ".pxd", ".md", ".rst", ".txt", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu",
    ".cuh", ".sh", ".cfg", ".toml", ".ini", ".yaml", ".yml", ".tex", ".el", ".pl", ".pm",
}
DOC_NAMES = {"readme", "news", "changelog", "changes", "copyright", "authors", "history", "todo", "faq"}
MIN_FILE_BYTES = 200
MAX_FILE_BYTES = 400_000
HOLDOUT_PERCENT = 3


def text_roots() -> list[str]:
    """Directories searched for text: site-packages, stdlib, prefixes' lib dirs, /usr/share/doc, ..."""
    roots: list[str] = []
    try:
        import site
        roots += list(site.getsitepackages())
        roots.append(site.getusersitepackages())
    except Exception:  # noqa: BLE001  (site may be stripped in embedded interpreters)
        pass
    paths = sysconfig.get_paths()
    roots += [paths.get("purelib", ""), paths.get("platlib", ""), paths.get("stdlib", ""), paths.get("include", "")]
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        roots.append(os.path.join(prefix, "lib"))
        roots.append(os.path.join(prefix, "share", "doc"))
    roots += ["/usr/share/doc", "/usr/lib/python3", "/usr/local/lib", "/usr/lib/python3/dist-packages",
              "/usr/share/common-licenses", "/usr/include"]
    out, seen = [], set()
    for r in roots:
        if r and os.path.isdir(r):
            rp = os.path.realpath(r)
            if rp not in seen:
                seen.add(rp)
                out.append(rp)
    return out


def _path_key(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def is_heldout(path: str, percent: int = HOLDOUT_PERCENT) -> bool:
    """Deterministic held-out split, stable across machines (hash of the last two path components)."""
    h = int(hashlib.md5(_path_key(path).encode()).hexdigest()[:8], 16)
    return (h % 100) < percent


def _is_text_candidate(name: str) -> bool:
    low = name.lower()
    if low.endswith(".gz"):
        low = low[:-3]
    base, ext = os.path.splitext(low)
    return ext in TEXT_EXTS or base in DOC_NAMES or low in DOC_NAMES or low.startswith("changelog")


_SKIP_DIRS = {"__pycache__", ".git", "node_modules"}


def _scan(unit: str, skip: set[str], out: dict[str, int]) -> int:
    """Add candidate text files under unit (a file or a folder; no symlinks followed, folders in skip
    pruned) to out {path: size}; returns the bytes added."""
    added = 0
    stack = [unit]
    while stack:
        d = stack.pop()
        try:
            it = list(os.scandir(d))
        except (NotADirectoryError, FileNotFoundError, PermissionError, OSError):
            continue
        for e in it:
            try:
                if e.is_symlink():
                    continue
                if e.is_dir(follow_symlinks=False):
                    if e.name not in _SKIP_DIRS and e.path not in skip:
                        stack.append(e.path)
                elif _is_text_candidate(e.name):
                    added += _add_candidate(e.path, e.stat(follow_symlinks=False).st_size, out)
            except OSError:
                continue
    return added


def list_text_files(roots: Sequence[str], max_total_bytes: int | None = None, seed: int = 0
                    ) -> list[tuple[str, int]]:
    """(path, size) of candidate text files under roots, sorted by path.

    The top-level entries of all roots (packages, doc folders, ...) are visited in a seeded random
    order until max_total_bytes of candidates are found (None: everything), so that a machine with a
    huge site-packages is not walked completely. Roots nested in other roots are walked once."""
    roots = [os.path.realpath(r) for r in roots if r and os.path.isdir(r)]
    roots = list(dict.fromkeys(roots))
    skip = set(roots)
    units: list[str] = []
    loose: list[str] = []
    for r in roots:
        try:
            for e in os.scandir(r):
                if e.is_symlink():
                    continue
                if e.is_dir(follow_symlinks=False):
                    if e.name not in _SKIP_DIRS and e.path not in skip:
                        units.append(e.path)
                else:
                    loose.append(e.path)
        except OSError:
            continue
    units.sort()
    random.Random(seed).shuffle(units)
    found: dict[str, int] = {}
    total = 0
    for p in loose:
        total += _scan_file(p, found)
    for u in units:
        if max_total_bytes is not None and total >= max_total_bytes:
            break
        total += _scan(u, skip, found)
    return sorted(found.items())


def _scan_file(path: str, out: dict[str, int]) -> int:
    name = os.path.basename(path)
    if not _is_text_candidate(name):
        return 0
    try:
        sz = os.stat(path, follow_symlinks=False).st_size
    except OSError:
        return 0
    return _add_candidate(path, sz, out)


def _add_candidate(path: str, size: int, out: dict[str, int]) -> int:
    """Record a file of a candidate's size in out {path: size} unless already there; the bytes added."""
    if MIN_FILE_BYTES // 4 <= size <= MAX_FILE_BYTES and path not in out:
        out[path] = size
        return size
    return 0


_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def read_text_file(path: str) -> str | None:
    """The file's text if it looks like real text (utf-8, few control chars, sane line lengths)."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES * 4)
        else:
            with open(path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    if len(text) < MIN_FILE_BYTES or len(text) > MAX_FILE_BYTES * 4:
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    if len(_CTRL.findall(text[:20000])) > 5:
        return None
    n_lines = text.count("\n") + 1
    if len(text) / n_lines > 200:  # minified / generated data
        return None
    nonascii = sum(1 for c in text[:20000] if ord(c) > 127)
    if nonascii > 0.2 * min(len(text), 20000):
        return None
    return text


def collect_corpus(max_bytes: int, seed: int = 0, roots: Sequence[str] | None = None,
                   heldout: bool = False, threads: int = 16, log: Callable[[str], None] | None = None
                   ) -> tuple[list[str], dict]:
    """Read real text files from the machine until max_bytes.

    heldout=False: training files only; heldout=True: the held-out files only. Files are visited in
    a seeded random order and deduplicated by content. Returns (texts, stats).
    """
    t0 = time.time()
    roots = list(roots) if roots is not None else text_roots()
    files = [(p, s) for p, s in list_text_files(roots, max_total_bytes=4 * max_bytes, seed=seed)
             if is_heldout(p) == heldout]
    random.Random(seed).shuffle(files)
    texts: list[str] = []
    seen: set[bytes] = set()
    total = 0
    n_read = 0
    by_ext: dict[str, int] = {}
    chunk = 512
    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        for i in range(0, len(files), chunk):
            batch = files[i:i + chunk]
            for (p, _), text in zip(batch, ex.map(lambda f: read_text_file(f[0]), batch)):
                n_read += 1
                if text is None:
                    continue
                digest = hashlib.md5(text.encode("utf-8", "ignore")).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                texts.append(text)
                total += len(text)
                ext = os.path.splitext(p[:-3] if p.endswith(".gz") else p)[1] or "(none)"
                by_ext[ext] = by_ext.get(ext, 0) + len(text)
                if total >= max_bytes:
                    break
            if total >= max_bytes:
                break
    stats = {"roots": roots, "candidate_files": len(files), "files_read": n_read, "files_used": len(texts),
             "chars": total, "chars_by_ext": dict(sorted(by_ext.items(), key=lambda kv: -kv[1])[:15]),
             "seconds": round(time.time() - t0, 2), "heldout": heldout}
    if log:
        log(f"corpus ({'held-out' if heldout else 'train'}): {len(texts)} files, {total / 1e6:.1f} M chars "
            f"from {len(files)} candidates in {stats['seconds']} s")
    return texts, stats


def default_filler_text(max_chars: int = 600_000) -> str:
    """Held-out real text for needle haystacks: held-out files of the Python standard library
    (plus held-out site-packages / doc files if the stdlib gives too little). Deterministic on a
    given machine; never part of the training data."""
    stdlib = sysconfig.get_paths().get("stdlib", "")
    roots = [os.path.realpath(stdlib)] if stdlib and os.path.isdir(stdlib) else []
    files = [(p, s) for p, s in list_text_files(roots) if is_heldout(p)]
    texts, total = [], 0
    for p, _ in files:  # sorted by path: deterministic
        t = read_text_file(p)
        if t:
            texts.append(t)
            total += len(t)
            if total >= max_chars:
                break
    if total < max_chars // 4:
        more, _ = collect_corpus(max_chars - total, seed=0, heldout=True, threads=4)
        texts += more
    if not texts:
        raise RuntimeError("no held-out text found on this machine for the needle filler")
    return "\n\n".join(texts)[:max_chars]


# --------------------------------------------------------------------------------------------------
# 2. Tokenizer
# --------------------------------------------------------------------------------------------------

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (every digit its own token) trained with `tokenizers`; adds '<s>' in front."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return tok


def to_hf_tokenizer(tok, model_max_length: int = 8192):
    """Wrap a `tokenizers.Tokenizer` for transformers (pad token, left padding)."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


def _backend(tokenizer):
    """The raw `tokenizers.Tokenizer` of an HF fast tokenizer (or the object itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of texts, without special tokens (the same for HF wrapper and raw tokenizer).

    Uses the Rust tokenizer directly; padding / truncation left enabled on it by an earlier HF call
    (e.g. tokenizer(..., padding=True)) is switched off for the call and restored afterwards."""
    be = _backend(tokenizer)
    padding, truncation = be.padding, be.truncation
    if padding is not None:
        be.no_padding()
    if truncation is not None:
        be.no_truncation()
    try:
        fn = getattr(be, "encode_batch_fast", None) or be.encode_batch
        return [e.ids for e in fn(texts, add_special_tokens=False)]
    finally:
        if padding is not None:
            be.enable_padding(**padding)
        if truncation is not None:
            be.enable_truncation(**truncation)


def newline_token_mask(tokenizer) -> np.ndarray:
    """Boolean [vocab] array: tokens that end a line, i.e. a newline possibly followed by indentation
    (byte-level BPE merges "\n" with the next line's leading spaces)."""
    be = _backend(tokenizer)
    vocab = be.get_vocab(with_added_tokens=True)
    mask = np.zeros(max(vocab.values()) + 1, dtype=bool)
    for piece, i in vocab.items():
        k = piece.rfind("\u010a")  # byte-level 'Ċ' == '\n'
        if k >= 0 and set(piece[k + 1:]) <= {"\u0120"}:  # 'Ġ' == ' '
            mask[i] = True
    return mask


def tokenize_corpus(tokenizer, texts: list[str], chunk: int = 1024, sep: str = "\n\n") -> np.ndarray:
    """All texts (joined by sep) as one uint16/int32 token stream."""
    parts = []
    for i in range(0, len(texts), chunk):
        for ids in encode_texts(tokenizer, [t + sep for t in texts[i:i + chunk]]):
            parts.append(np.asarray(ids, dtype=np.int32))
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return arr.astype(np.uint16) if arr.size and arr.max() < 65536 else arr


# --------------------------------------------------------------------------------------------------
# 3. Facts, names, questions
# --------------------------------------------------------------------------------------------------
# The texts and generators are cakekv.eval.haystack's; the word lists below are the training data's own
# (the tiny model was trained on them: changing them changes the data), not the evaluations' lists.

FIRST_NAMES = """Aaron Abigail Adele Adrian Agnes Aida Alan Albert Alice Alma Amara Amir Anders Andrea Anika Anton
Aria Arjun Astrid Aurora Bastian Beatrix Benedict Bianca Boris Bruno Calla Camille Carmen Casper Cecil Celine Chloe
Clara Cosima Dalia Damon Daria Dexter Dimitri Dora Edgar Edith Elena Elias Elise Emil Enzo Esther Ezra Fabian Farah
Felix Fiona Flora Frida Gabriel Gemma Gideon Greta Gustav Hana Hector Helga Hugo Ida Igor Ilse Imani Ingrid Ivan
Jasper Jonas Juno Kai Karim Katya Kenji Kira Lars Leila Leon Lina Lorenzo Lucia Magnus Malik Mara Marco Mateo Mila
Milo Mira Nadia Naomi Nico Nina Noor Oden Olga Omar Oscar Paloma Pavel Petra Quentin Rafael Rania Remy Rhea Rosa
Rufus Saba Samir Selma Silas Sofia Soren Stella Tamsin Tariq Thea Tobias Ulla Ursula Valentin Vera Viktor Wanda
Wilhelm Xenia Yara Yusuf Zara Zeno Zofia""".split()
LAST_NAMES = """Abbott Achterberg Alvarez Amsel Arkwright Ashdown Baxter Becker Bellamy Bergstrom Blackwood
Bramble Brennan Calloway Carver Castellano Chen Corwin Crane Dalton Delacroix Drummond Duvall Eklund Ellery
Esposito Falk Farnsworth Fenwick Fischer Fontaine Garrick Gallo Greer Halvorsen Harlow Hartmann Hayashi Holloway
Ibarra Ingram Iverson Jaeger Jansen Kaminski Keller Kowalski Lambert Larkin Lindqvist Lowell Lund Marchetti
Mercer Montague Moreau Nakamura Nilsson Novak Oakley Okafor Olsen Ortega Pellegrini Petrov Prescott Quill Quint
Radcliffe Ramirez Renner Rossi Sandoval Schultz Sinclair Sorensen Stroud Tanaka Thorne Townsend Ueda Underwood
Valdez Vance Varga Voss Wainwright Waverly Weber Whitlock Winslow Yamada Yates Zeller Zimmermann Zoller""".split()
SYLLABLES = """ka lo mi ra ven tor quil bar zen dri mo sa lu fen rik tal gor nia pel dor vik sel ha ni ro
be ta xo mer lin cas pri ul tem bra fi zo kel mar dun""".split()

ADJECTIVES = """amber brave brisk calm candid chilly clever coral crisp curly damp dusty eager fancy fierce
fluffy frosty gentle gloomy golden grumpy hollow humble icy jolly keen lively lucky mellow misty noble plain
proud quiet rapid rosy rusty shiny silent sleepy smooth snowy sour spicy steady stormy sturdy sunny swift
tame tidy tiny vivid wavy wise witty young zesty""".split()
NOUNS = """acorn anchor apple arrow badge bagel bamboo banjo basket beacon bell berry blanket boat bonnet
bridge brook bucket button cabin cactus camel candle canoe canyon carpet castle cedar chalk cherry clock
comet cookie crayon daisy dragon drum falcon feather fern fiddle flute forest fossil garden glacier goblet
harbor helmet island jacket kettle ladder lantern lemon magnet maple meadow mirror mitten needle nutmeg
orchid otter paddle parrot pebble pepper piano pillow pocket quilt rabbit ribbon river rocket saddle
sandal shovel signal spoon squirrel tablet teapot thimble tiger tulip turnip velvet violin wagon walnut
whistle willow window zebra""".split()
MAGIC_INTRO = haystack.MAGIC_INTRO

ATTRIBUTES = ["secret code", "pass key", "magic number", "access code", "vault number", "ticket number",
              "room number", "lucky number", "serial number", "account number", "locker number", "PIN"]
EVAL_ATTRIBUTE = "secret code"


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def random_name(rng: random.Random) -> str:
    """A person-like name: real first/last name pairs (70%) or invented ones (30%)."""
    r = rng.random()
    if r < 0.7:
        return haystack.person_name(rng, FIRST_NAMES, LAST_NAMES)
    if r < 0.85:
        return f"{rng.choice(FIRST_NAMES)} {_pseudo_word(rng)}"
    return f"{_pseudo_word(rng)} {_pseudo_word(rng)}"


def random_key(rng: random.Random) -> str:
    """An adjective-noun key ("calm-anchor") for the magic-number template."""
    return haystack.random_key(rng, ADJECTIVES, NOUNS)


def random_code(rng: random.Random, n_digits: int) -> str:
    return haystack.random_code(rng, n_digits)


# Two template families: "fact" (the evaluation format: "The ATTRIBUTE of NAME is CODE.") and "magic"
# (RULER's needle: "One of the special magic numbers for KEY is: CODE."). A fact is written either on
# a line of its own ("...\n" inserted at a line start) or inside a line (" ..." after a sentence end).
def fact_text(attr: str, name: str, code: str, template: str = "fact", midline: bool = False) -> str:
    s = haystack.magic_needle(name, code) if template == "magic" else haystack.fact_needle(attr, name, code)
    return " " + s if midline else s + "\n"


def question_text(attr: str, name: str, template: str = "fact") -> str:
    """The question and the answer's start, in one piece."""
    if template == "magic":
        return "".join(haystack.magic_question(name))
    return "".join(haystack.fact_question(attr, name))


def answer_text(code: str) -> str:
    return f" {code}"


ANSWER_TAIL = ".\n"
ANSWER, COPY = 1, 2  # values of NeedleDocSampler's token mask


def _snap_to_line_start(pos: int, line_starts: np.ndarray, lo: int = 0) -> int:
    """The line start (index in filler) nearest to pos, at or after lo; pos itself if there is none."""
    cand = line_starts[line_starts >= lo]
    if cand.size == 0:
        return pos
    j = int(np.searchsorted(cand, pos))
    best = [cand[k] for k in (j - 1, j) if 0 <= k < cand.size]
    return int(min(best, key=lambda c: abs(int(c) - pos)))


def _line_starts(filler: np.ndarray, nl_mask: np.ndarray) -> np.ndarray:
    """Insertion points (0..len) at a line start: 0 and every index after a line-ending token
    (with a sentence-end mask instead: every index after a sentence-ending token)."""
    if filler.size == 0:
        return np.zeros(1, dtype=np.int64)
    after_nl = np.nonzero(nl_mask[filler])[0] + 1
    return np.concatenate([[0], after_nl]).astype(np.int64)


def sentence_end_token_mask(tokenizer) -> np.ndarray:
    """Boolean [vocab] array: tokens that end with '.', '!' or '?' (a sentence end)."""
    be = _backend(tokenizer)
    vocab = be.get_vocab(with_added_tokens=True)
    mask = np.zeros(max(vocab.values()) + 1, dtype=bool)
    for piece, i in vocab.items():
        if piece.endswith((".", "!", "?")):
            mask[i] = True
    return mask


# --------------------------------------------------------------------------------------------------
# 4. Training documents
# --------------------------------------------------------------------------------------------------

class NeedleDocSampler:
    """Makes training sequences: real corpus text with hidden facts and questions about them.

    `batch(batch_size, seq_len)` returns (ids int32 [B, T], mask uint8 [B, T]); every sequence starts
    with <s>; mask is 1 (ANSWER) on the answer tokens (" " + digits) of every question and 2 (COPY) on
    the predictable tokens of repeated spans.
    Kinds of sequences (probabilities in `mix`):
      plain   -- corpus text only;
      repeat  -- corpus text in which 1-3 earlier spans (16-256 tokens) are repeated verbatim at a later
                 line start (a dense induction / copying signal at all distances);
      single  -- one fact at a uniform depth, its question at the end (the evaluation format);
      multi   -- 2..K facts (hard negatives: same name other attribute, same attribute similar name),
                 1..4 of them asked at the end;
      inline  -- several facts, each asked at a random later point of the text, one more at the end.
    A document's facts use the "fact" template, or with probability magic_prob RULER's "magic" template
    (then half of the time after RULER's instruction line at the start). Facts go on a line of their own
    at a line start, or (midline_prob: 15% "fact", 70% "magic") inside a line after a sentence end.
    """

    DEFAULT_MIX = {"plain": 0.04, "repeat": 0.12, "single": 0.36, "multi": 0.33, "inline": 0.15}

    def __init__(self, tokenizer, corpus_ids: np.ndarray, seed: int = 0, mix: dict | None = None,
                 digits: tuple[int, int] = (3, 8), eval_attr_prob: float = 0.5, snap_prob: float = 0.85,
                 magic_prob: float = 0.2, midline_prob: tuple[float, float] = (0.15, 0.7)):
        self.tok = tokenizer
        self.corpus = corpus_ids
        self.rng = random.Random(seed)
        self.nprng = np.random.default_rng(seed)
        self.mix = dict(mix or self.DEFAULT_MIX)
        self.digits = digits
        self.eval_attr_prob = eval_attr_prob
        self.snap_prob = snap_prob
        self.magic_prob = magic_prob
        self.midline_prob = midline_prob
        be = _backend(tokenizer)
        self.bos = be.token_to_id(BOS)
        self.nl_mask = newline_token_mask(tokenizer)
        self.end_mask = sentence_end_token_mask(tokenizer)
        self.tail_ids, self.intro_ids = (np.asarray(x, dtype=np.int32)
                                         for x in encode_texts(tokenizer, [ANSWER_TAIL, MAGIC_INTRO]))

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.nprng = np.random.default_rng(seed)

    # -- planning -----------------------------------------------------------------------------------
    def _attr(self) -> str:
        return EVAL_ATTRIBUTE if self.rng.random() < self.eval_attr_prob else self.rng.choice(ATTRIBUTES)

    def _facts(self, n: int, template: str) -> list[tuple[str, str, str, bool]]:
        """n distinct (attribute, name or key, code, midline) facts of one template family."""
        rng = self.rng
        facts: list[tuple[str, str, str, bool]] = []
        used: set[tuple[str, str]] = set()
        midline_p = self.midline_prob[1] if template == "magic" else self.midline_prob[0]
        while len(facts) < n:
            if facts and rng.random() < 0.3:  # hard negative of an earlier fact
                a, nm, _, _ = rng.choice(facts)
                if template == "magic":
                    adj, noun = nm.split("-", 1)
                    nm = f"{adj}-{rng.choice(NOUNS)}" if rng.random() < 0.5 else f"{rng.choice(ADJECTIVES)}-{noun}"
                elif rng.random() < 0.5:
                    a = rng.choice([x for x in ATTRIBUTES if x != a])
                else:
                    first, last = nm.split(" ", 1)
                    nm = f"{first} {rng.choice(LAST_NAMES)}" if rng.random() < 0.5 else \
                        f"{rng.choice(FIRST_NAMES)} {last}"
            elif template == "magic":
                a, nm = "special magic number", random_key(rng)
            else:
                a, nm = self._attr(), random_name(rng)
            if (a, nm) in used:
                continue
            used.add((a, nm))
            facts.append((a, nm, random_code(rng, rng.randint(*self.digits)), rng.random() < midline_p))
        return facts

    def _plan(self, seq_len: int) -> dict:
        rng = self.rng
        kinds, probs = zip(*self.mix.items())
        kind = rng.choices(kinds, probs)[0]
        max_facts = max(1, min(12, seq_len // 384))
        plan = {"kind": kind, "template": "fact", "intro": False, "facts": [], "end_q": [], "inline_q": []}
        if kind in ("plain", "repeat"):
            return plan
        if rng.random() < self.magic_prob:
            plan["template"] = "magic"
            plan["intro"] = rng.random() < 0.5
        if kind == "single" or max_facts == 1:
            plan.update(kind="single", facts=self._facts(1, plan["template"]), end_q=[0])
            return plan
        n = rng.randint(2, max_facts)
        plan["facts"] = self._facts(n, plan["template"])
        k = rng.randint(1, min(n, 4))
        if kind == "multi":
            plan["end_q"] = rng.sample(range(n), k)
        else:
            asked = rng.sample(range(n), k)
            plan["end_q"], plan["inline_q"] = [asked[-1]], asked[:-1]
        return plan

    # -- assembly ------------------------------------------------------------------------------------
    def batch(self, batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        plans = [self._plan(seq_len) for _ in range(batch_size)]
        strings: list[str] = []
        for p in plans:
            for (a, nm, code, midline) in p["facts"]:
                strings += [fact_text(a, nm, code, p["template"], midline), question_text(a, nm, p["template"]),
                            answer_text(code)]
        enc = encode_texts(self.tok, strings) if strings else []
        ids = np.empty((batch_size, seq_len), dtype=np.int32)
        amask = np.zeros((batch_size, seq_len), dtype=np.uint8)
        k = 0
        for b, p in enumerate(plans):
            nf = len(p["facts"])
            f_ids = [np.asarray(enc[k + 3 * i], dtype=np.int32) for i in range(nf)]
            q_ids = [np.asarray(enc[k + 3 * i + 1], dtype=np.int32) for i in range(nf)]
            a_ids = [np.asarray(enc[k + 3 * i + 2], dtype=np.int32) for i in range(nf)]
            k += 3 * nf
            self._assemble(p, f_ids, q_ids, a_ids, seq_len, ids[b], amask[b])
        return ids, amask

    def _qa(self, q, a):
        seg = np.concatenate([q, a, self.tail_ids])
        m = np.zeros(seg.size, dtype=np.uint8)
        m[q.size:q.size + a.size] = ANSWER
        return seg, m

    def _assemble(self, p, f_ids, q_ids, a_ids, T, out_ids, out_mask) -> None:
        facts = list(range(len(f_ids)))
        end_q, inline_q = list(p["end_q"]), list(p["inline_q"])
        intro = self.intro_ids if p["intro"] else self.intro_ids[:0]
        while True:
            used = sum(f_ids[i].size for i in facts) + intro.size
            used += sum(q_ids[i].size + a_ids[i].size + self.tail_ids.size for i in end_q + inline_q)
            F = T - 1 - used
            if F >= T // 4 or not facts:
                break
            # too long for this sequence length: drop an unasked fact, else the last question + fact
            unasked = [i for i in facts if i not in end_q and i not in inline_q]
            if unasked:
                facts.remove(unasked[-1])
            else:
                drop = (inline_q or end_q)[-1]
                (inline_q if drop in inline_q else end_q).remove(drop)
                facts.remove(drop)
        copies: list[int] = []
        if not facts:
            end_q, inline_q = [], []
            intro = self.intro_ids[:0]
            F = T - 1
            if p["kind"] == "repeat" and T >= 256:  # spans <= T/8 each, so F >= 5T/8 - 1 > 2 * span
                for _ in range(self.rng.randint(1, 3)):
                    copies.append(self.rng.randint(16, max(16, min(256, T // 8))))
                F = T - 1 - sum(copies)
        n = self.corpus.size
        off = int(self.nprng.integers(0, max(1, n - F)))
        filler = np.asarray(self.corpus[off:off + F], dtype=np.int32)
        if filler.size < F:  # tiny corpus: wrap around
            reps = F // max(1, n) + 2
            filler = np.tile(np.asarray(self.corpus, dtype=np.int32), reps)[:F]
        starts = _line_starts(filler, self.nl_mask)
        ends = _line_starts(filler, self.end_mask) if any(f[3] for f in p["facts"]) else starts
        # (position in filler, order, ids, mask)
        segs: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        if intro.size:
            segs.append((0, -1, intro, np.zeros(intro.size, dtype=np.uint8)))
        fact_pos = {}
        for i in facts:
            pos = int(self.rng.random() * (F + 1))
            if self.rng.random() < self.snap_prob:
                pos = _snap_to_line_start(pos, ends if p["facts"][i][3] else starts)
            fact_pos[i] = pos
            segs.append((pos, 0, f_ids[i], np.zeros(f_ids[i].size, dtype=np.uint8)))
        for i in inline_q:
            lo = fact_pos[i]
            pos = lo + int(self.rng.random() * (F - lo + 1))
            pos = _snap_to_line_start(pos, starts, lo=lo)
            seg, m = self._qa(q_ids[i], a_ids[i])
            segs.append((max(pos, lo), 1, seg, m))
        for i in end_q:
            seg, m = self._qa(q_ids[i], a_ids[i])
            segs.append((F, 2, seg, m))
        for n in copies:  # a verbatim copy of filler[src:src+n] at a line start after it
            src = int(self.rng.random() * (F - n + 1))
            lo = src + n
            pos = _snap_to_line_start(lo + int(self.rng.random() * (F - lo + 1)), starts, lo=lo)
            seg = filler[src:src + n].copy()
            m = np.full(n, COPY, dtype=np.uint8)
            m[:2] = 0  # the first tokens of a copy are not predictable
            segs.append((max(pos, lo), 1, seg, m))
        segs.sort(key=lambda s: (s[0], s[1]))
        pieces, masks = [np.asarray([self.bos], dtype=np.int32)], [np.zeros(1, dtype=np.uint8)]
        prev = 0
        for pos, _, seg, m in segs:
            pieces.append(filler[prev:pos])
            masks.append(np.zeros(pos - prev, dtype=np.uint8))
            pieces.append(seg)
            masks.append(m)
            prev = pos
        pieces.append(filler[prev:])
        masks.append(np.zeros(F - prev, dtype=np.uint8))
        row = np.concatenate(pieces)
        mrow = np.concatenate(masks)
        assert row.size == T, (row.size, T)
        out_ids[:] = row
        out_mask[:] = mrow


# --------------------------------------------------------------------------------------------------
# 5. Needle evaluation
# --------------------------------------------------------------------------------------------------

def _filler_ids(tokenizer, filler_text: str, n_tokens: int, rng: random.Random) -> list[int]:
    """n_tokens of filler_text, starting at a seeded random line start (wrapping around the text)."""
    if n_tokens <= 0:
        return []
    text = filler_text
    start = rng.randrange(len(text))
    nl = text.find("\n", start)
    start = nl + 1 if 0 <= nl < len(text) - 1 else 0
    window = n_tokens * 8 + 2000
    while True:
        piece = text[start:start + window]
        while len(piece) < window:  # wrap around
            piece += "\n\n" + text[:window - len(piece)]
        ids = encode_texts(tokenizer, [piece])[0]
        if len(ids) >= n_tokens + 1:
            return ids[:n_tokens]  # the last (possibly cut) token of the window is never used
        window *= 2


def make_needle_example(tokenizer, context_tokens: int, depth: float, seed: int, filler_text: str,
                        n_digits: int = 5, attribute: str = EVAL_ATTRIBUTE, n_keys: int = 1,
                        template: str = "fact") -> dict:
    """One needle-in-a-haystack prompt of exactly `context_tokens` tokens (deterministic in its arguments).

    The fact "The {attribute} of NAME is CODE." sits at the line start nearest to `depth` (0.0 = right
    after <s>, 1.0 = right before the question) of held-out real text `filler_text`; the prompt ends
    with "\\nWhat is the {attribute} of NAME? The {attribute} of NAME is". With n_keys > 1, n_keys-1
    other facts (other names, same attribute) are spread at random depths (multi-key variant).
    template="magic" uses RULER's needle instead: "One of the special magic numbers for KEY is: CODE."
    asked "What is the special magic number for KEY mentioned in the provided text? The special magic
    number for KEY mentioned in the provided text is" (KEY an adjective-noun pair; also on its own line).

    Returns dict(input_ids: list[int] (starting with <s>), answer: str (the digits), name, attribute,
    needle_index: token index of the fact's first token, depth, context_tokens, n_keys).
    """
    rng = random.Random(f"needle/{seed}/{context_tokens}/{depth}/{n_digits}/{attribute}/{n_keys}"
                        + ("" if template == "fact" else f"/{template}"))
    be = _backend(tokenizer)
    bos = be.token_to_id(BOS)
    if template not in ("fact", "magic"):
        raise ValueError(f"template: expected 'fact' or 'magic', got {template!r}")
    names = haystack.distinct(n_keys, lambda: random_key(rng) if template == "magic" else random_name(rng))
    codes = [random_code(rng, n_digits) for _ in names]
    strings = [fact_text(attribute, nm, c, template) for nm, c in zip(names, codes)]
    strings.append(question_text(attribute, names[0], template))
    enc = encode_texts(tokenizer, strings)
    facts, q = enc[:-1], enc[-1]
    n_filler = context_tokens - 1 - len(q) - sum(len(f) for f in facts)
    if n_filler < 0:
        raise ValueError(f"context_tokens={context_tokens} is too short for the needle ({context_tokens - n_filler})")
    filler = np.asarray(_filler_ids(tokenizer, filler_text, n_filler, rng), dtype=np.int64)
    starts = _line_starts(filler, newline_token_mask(tokenizer))
    pos0 = _snap_to_line_start(int(round(float(depth) * n_filler)), starts)
    inserts = [(pos0, 0)]
    for j in range(1, n_keys):
        inserts.append((_snap_to_line_start(rng.randint(0, n_filler), starts), j))
    inserts.sort()
    ids: list[int] = [bos]
    prev, needle_index = 0, None
    for pos, j in inserts:
        ids += filler[prev:pos].tolist()
        if j == 0:
            needle_index = len(ids)
        ids += facts[j]
        prev = pos
    ids += filler[prev:].tolist() + q
    assert len(ids) == context_tokens, (len(ids), context_tokens)
    return {"input_ids": ids, "answer": codes[0], "name": names[0], "attribute": attribute,
            "needle_index": needle_index, "depth": float(depth), "context_tokens": context_tokens,
            "n_keys": n_keys, "template": template}


_DIGITS = re.compile(r"\s*(\d+)")


def parse_answer(text: str) -> str:
    """The digits at the start of a generated continuation ('' if none)."""
    m = _DIGITS.match(text)
    return m.group(1) if m else ""


def cell_seed(seed: int, length: int, depth_index: int, i: int) -> int:
    return ((seed * 1_000_003 + length) * 1009 + depth_index) * 10_007 + i


def evaluate_needle(model, tokenizer, lengths: Sequence[int] = (1024, 2048, 4096, 8192),
                    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), n_per_cell: int = 10,
                    filler_text: str | None = None, seed: int = 0, n_digits: int = 5, batch_size: int = 8,
                    generate_kwargs: dict | None = None, return_details: bool = False,
                    deadline: float | None = None, log: Callable[[str], None] | None = None,
                    template: str = "fact"):
    """Needle-in-a-haystack accuracy: the fraction of prompts whose greedy continuation starts with
    exactly the needle's digits. Prompts come from `make_needle_example(tokenizer, L, depth,
    cell_seed(seed, L, depth_index, i), filler_text, n_digits=n_digits, template=template)`; all
    prompts of a cell have the same length, so batches need no padding. generate_kwargs are passed to `model.generate` (e.g. a custom cache).
    deadline (time.time() value) stops early; the accuracy is then over the prompts evaluated.

    Returns the accuracy (float), or (accuracy, details) with return_details=True, where details has
    by_length, by_depth, cells ({"L/depth": acc}), n, correct, seconds, partial and a few failures.
    """
    import torch
    t0 = time.time()
    if filler_text is None:
        filler_text = default_filler_text()
    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None)
    gen = dict(do_sample=False, num_beams=1, max_new_tokens=n_digits + 2)
    if pad_id is not None:
        gen["pad_token_id"] = pad_id
    gen.update(generate_kwargs or {})
    was_training = model.training
    model.eval()
    res_cells: dict[str, list[int]] = {}
    failures: list[dict] = []
    partial = False
    for L in lengths:
        for di, d in enumerate(depths):
            exs = [make_needle_example(tokenizer, L, d, cell_seed(seed, L, di, i), filler_text, n_digits=n_digits,
                                       template=template)
                   for i in range(n_per_cell)]
            for s in range(0, len(exs), max(1, batch_size)):
                if deadline is not None and time.time() > deadline:
                    partial = True
                    break
                chunk = exs[s:s + batch_size]
                inp = torch.tensor([e["input_ids"] for e in chunk], dtype=torch.long, device=device)
                with torch.no_grad():
                    out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), **gen)
                new = out[:, inp.shape[1]:].tolist()
                for e, toks in zip(chunk, new):
                    text = tokenizer.decode(toks, skip_special_tokens=True)
                    ok = parse_answer(text) == e["answer"]
                    res_cells.setdefault(f"{L}/{d}", []).append(int(ok))
                    if not ok and len(failures) < 20:
                        failures.append({"length": L, "depth": d, "answer": e["answer"], "generated": text})
            if partial:
                break
        if log and f"{L}/{depths[0]}" in res_cells:
            got = [v for k, vs in res_cells.items() if k.startswith(f"{L}/") for v in vs]
            log(f"needle L={L}: {sum(got)}/{len(got)} = {sum(got) / max(1, len(got)):.3f}")
        if partial:
            break
    if was_training:
        model.train()
    allv = [v for vs in res_cells.values() for v in vs]
    acc = sum(allv) / len(allv) if allv else float("nan")
    if not return_details:
        return acc

    def _group(key_fn):
        g: dict[str, list[int]] = {}
        for k, vs in res_cells.items():
            g.setdefault(key_fn(k), []).extend(vs)
        return {k: sum(v) / len(v) for k, v in g.items()}

    details = {"accuracy": acc, "n": len(allv), "correct": sum(allv),
               "by_length": _group(lambda k: k.split("/")[0]), "by_depth": _group(lambda k: k.split("/")[1]),
               "cells": {k: sum(v) / len(v) for k, v in res_cells.items()}, "partial": partial,
               "seconds": round(time.time() - t0, 2), "failures": failures,
               "settings": {"lengths": list(lengths), "depths": list(depths), "n_per_cell": n_per_cell,
                            "seed": seed, "n_digits": n_digits, "template": template}}
    return acc, details


__all__ = [
    "collect_corpus", "default_filler_text", "is_heldout", "text_roots", "train_bpe_tokenizer", "to_hf_tokenizer",
    "encode_texts", "tokenize_corpus", "newline_token_mask", "NeedleDocSampler", "make_needle_example",
    "evaluate_needle", "parse_answer", "cell_seed", "random_name", "random_key", "fact_text", "question_text",
    "answer_text", "ANSWER", "COPY",
]


if __name__ == "__main__":  # quick look at the data: python experiments/tiny_data.py
    t = default_filler_text(50_000)
    print(len(t), repr(t[:300]))
