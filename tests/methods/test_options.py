"""Typed method options: every declared option refuses values of the wrong type or range with an
error naming it (API and CLI alike), numpy scalars are accepted, and the listings come from the
declarations."""
from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import FrozenInstanceError, dataclass
from types import SimpleNamespace

import numpy as np
import pytest

import cakekv
from cakekv import cli
from cakekv.eval import common
from cakekv.methods import Options, get_method, option
from helpers import tiny_model

CONFIG = SimpleNamespace(num_hidden_layers=2, _name_or_path="")

# The public option names and defaults, written out: a rename or a changed default shows up here.
EXPECTED = {
    "adakv": {"kernel_size": 7, "pooling": "max", "head_floor": 0.2, "gqa": "mean", "official": False,
              "decode_evict": False},
    "cake": {"tau1": 1.0, "tau2": 1.0, "gamma": 200.0, "kernel_size": 5, "cascading": True,
             "head_budgets": False, "head_floor": 0.2, "decode_evict": True, "official": False},
    "defensivekv": {"kernel_size": 5, "threshold": 0.9, "protected_set": "reach", "head_budgets": True,
                    "official": False, "decode_evict": False},
    "full": {"decode_evict": False},
    "h2o": {"decode_evict": False},
    "lava": {"kernel_size": 7, "pooling": "max", "head_floor": 0.2, "cascading": True, "official": False,
             "decode_evict": False},
    "layer_defensivekv": {"kernel_size": 5, "threshold": 0.9, "protected_set": "reach", "head_budgets": True,
                          "official": False, "cascading": False, "decode_evict": False},
    "pyramidkv": {"kernel_size": 7, "pooling": "max", "beta": 20, "official": False, "decode_evict": False},
    "snapkv": {"kernel_size": 7, "pooling": "max", "decode_evict": False},
    "spancake": {"tau1": 1.0, "tau2": 1.0, "gamma": 200.0, "kernel_size": 5, "cascading": True, "head_budgets": False,
                 "head_floor": 0.2, "span_before": 2, "span_after": 16, "span_weight": 0.5, "decode_spans": True,
                 "decode_evict": True},
    "streamingllm": {"sinks": 4, "decode_evict": False},
    "spanzip": {"ranking": "global", "chunk_size": 2000, "sinks": 4, "resume_tokens": 8, "repeat_ids": (),
                "resume_ids": (), "answer_ids": (), "reread": "full", "reread_lookback": 2000, "tau1": 1.0,
                "tau2": 1.0, "gamma": 200.0, "kernel_size": 5,
                "head_budgets": False, "head_floor": 0.2, "span_before": 2, "span_after": 16, "span_weight": 0.5,
                "decode_spans": True, "window_weight": 1.0, "normalise": "rank", "decode_evict": True},
    "kvzip": {"ranking": "global", "chunk_size": 2000, "sinks": 4, "resume_tokens": 8, "repeat_ids": (),
              "resume_ids": (), "answer_ids": (), "reread": "full", "reread_lookback": 2000, "decode_evict": False},
}

# Values of the wrong type (TypeError) or not a usable value of the right type (ValueError), per type.
BAD_BY_TYPE = {
    "int": [("7", TypeError), (7.0, TypeError), (True, TypeError), (np.bool_(True), TypeError), (None, TypeError)],
    "float": [("high", TypeError), (True, TypeError), (None, TypeError), (float("nan"), ValueError),
              (float("inf"), ValueError), (-math.inf, ValueError), (np.float64("nan"), ValueError),
              (10 ** 400, ValueError)],
    "bool": [("yes", TypeError), ("no", TypeError), ("False", TypeError), (1, TypeError), (0, TypeError),
             (None, TypeError)],
    "choice": [("median", ValueError), ("MAX", ValueError), (3, TypeError), (None, TypeError)],
    "token ids": [("Repeat", TypeError), (3, TypeError), (None, TypeError), ([1, 2.0], TypeError),
                  ([1, True], TypeError), ((5, -1), ValueError)],
}


def declared():
    return [(m, o) for m in cakekv.available_methods() for o in cakekv.describe_options(m)]


def type_key(info) -> str:
    return info.type if info.type in ("int", "float", "bool", "token ids") else "choice"


def build(method: str, **options):
    return get_method(method)(CONFIG, 64, 8, **options)


def test_method_options_lists_the_declared_options_with_defaults():
    assert {m: cakekv.method_options(m) for m in cakekv.available_methods()} == EXPECTED
    for method in EXPECTED:
        for info in cakekv.describe_options(method):
            assert info.doc and info.type, (method, info)
        assert build(method).options == get_method(method).Options(**EXPECTED[method])


BAD_CASES = [(m, o.name, v, e) for m, o in declared() for v, e in BAD_BY_TYPE[type_key(o)]]


@pytest.mark.parametrize("method,name,value,error", BAD_CASES,
                         ids=[f"{m}-{n}-{v!r}" for m, n, v, _ in BAD_CASES])
def test_every_option_refuses_bad_values_by_name(method, name, value, error):
    with pytest.raises(error, match=f"^{name}: must be "):
        build(method, **{name: value})


@pytest.mark.parametrize("method,name,value,message", [
    ("cake", "kernel_size", 4, "odd and >= 1"), ("cake", "kernel_size", -1, "odd and >= 1"),
    ("snapkv", "kernel_size", 0, "odd and >= 1"), ("cake", "tau1", 0.0, "> 0"), ("cake", "tau2", -1, "> 0"),
    ("cake", "gamma", -0.5, ">= 0"), ("cake", "head_floor", 1.5, r"in \[0, 1\]"),
    ("adakv", "head_floor", -0.1, r"in \[0, 1\]"), ("lava", "head_floor", 2, r"in \[0, 1\]"),
    ("defensivekv", "threshold", 1.01, r"in \[0, 1\]"), ("pyramidkv", "beta", 0, ">= 1"),
    ("streamingllm", "sinks", -1, ">= 0"), ("adakv", "gqa", "sum", "one of 'mean', 'max'"),
    ("spancake", "span_weight", 1.5, r"in \[0, 1\]"), ("spancake", "span_after", -1, ">= 0"),
])
def test_constraints_are_checked(method, name, value, message):
    with pytest.raises(ValueError, match=f"^{name}: must be {message}, got"):
        build(method, **{name: value})


def test_the_reported_messages():
    """The exact lines users see for common mistakes."""
    cases = [(dict(gamma="high"), "gamma: must be a real number, got str 'high'"),
             (dict(cascading="yes"), "cascading: must be True or False, got str 'yes'"),
             (dict(decode_evict="no"), "decode_evict: must be True or False, got str 'no'"),
             (dict(kernel_size=True), "kernel_size: must be an integer, got bool True"),
             (dict(gamma=float("nan")), "gamma: must be finite, got nan")]
    for options, message in cases:
        with pytest.raises((TypeError, ValueError)) as e:
            build("cake", **options)
        assert str(e.value) == message


def test_unknown_options_list_the_valid_ones():
    with pytest.raises(TypeError) as e:
        build("snapkv", gamma=1.0)
    assert str(e.value) == ("gamma: method 'snapkv' takes no option 'gamma'; its options are "
                            "['decode_evict', 'kernel_size', 'pooling']")


@pytest.mark.parametrize("method,name", [(m, o.name) for m, o in declared() if o.type in ("int", "float", "bool")])
def test_numpy_scalars_are_accepted_and_normalised(method, name):
    default = cakekv.method_options(method)[name]
    kind = type(default)
    spellings = {bool: [np.bool_(default)], int: [np.int64(default), np.int32(default)],
                 float: [np.float32(default), np.float64(default), np.int64(round(default))]}
    for value in spellings[kind]:
        got = getattr(build(method, **{name: value}).options, name)
        assert type(got) is kind and got == pytest.approx(float(value)), (value, got)


def test_cake_tau_defaults_follow_the_model_table_and_yield_to_the_user():
    config = SimpleNamespace(num_hidden_layers=2, _name_or_path="meta-llama/Llama-3.1-8B-Instruct")
    cake = get_method("cake")
    assert (cake(config, 128, 8).options.tau1, cake(config, 128, 8).options.tau2) == (1.6, 0.6)
    assert (cake(config, 512, 8).options.tau1, cake(config, 512, 8).options.tau2) == (1.0, 1.0)
    assert cake(config, 128, 8, tau1=np.float32(2.0)).options.tau1 == 2.0
    with pytest.raises(ValueError, match="^tau2: must be > 0"):
        cake(config, 128, 8, tau2=0)


def test_options_are_frozen():
    method = build("cake")
    with pytest.raises(FrozenInstanceError):
        method.options.gamma = 1.0


def test_method_interface_reads_the_options():
    cake = build("cake", gamma=50, kernel_size=np.int64(3), decode_evict=np.bool_(False))
    assert cake.pooling == (3, "avg") and cake.decode_evict is False and cake.decode_variance_weight == 50.0
    assert build("snapkv", pooling="avg").pooling == (7, "avg")
    assert build("lava").pooling == (7, "max") and build("defensivekv").pooling == (5, "avg")
    assert build("h2o").pooling == (1, "avg") and build("streamingllm").pooling == (1, "avg")
    assert build("cake").decode_evict is True and build("snapkv").decode_evict is False
    assert [build(m).decode_variance_weight for m in ("snapkv", "adakv", "h2o", "full")] == [0.0] * 4


def test_cake_decode_score_weighs_the_variance_by_gamma():
    """The decode-time score itself is the evict_lowest op's (tests/ops/test_decode_ops.py)."""
    assert build("cake", gamma=30.0).decode_variance_weight == 30.0


def test_a_new_options_class_gets_the_checks():
    @dataclass(frozen=True, kw_only=True)
    class Demo(Options):
        width: int = option(3, "a width", ge=1)

    assert Demo(width=np.int16(2)).width == 2 and type(Demo(width=np.int16(2)).width) is int
    with pytest.raises(ValueError, match=r"^width: must be >= 1, got 0$"):
        Demo(width=0)
    with pytest.raises(TypeError, match="^height: method 'demo' takes no option 'height'; its options are "
                                        r"\['decode_evict', 'width'\]"):
        Demo.build("demo", {"height": 1})

    class Undecorated(Demo):
        height: int = option(1, "forgotten @dataclass")
    with pytest.raises(TypeError, match="@dataclass"):
        Undecorated()


# ---- compress() ---------------------------------------------------------------------------------
def test_compress_accepts_numpy_integers_and_checks_options():
    model = tiny_model("llama", layers=1)
    with cakekv.compress(model, method="cake", budget=np.int64(64), window=np.int32(8), gamma=np.float32(100),
                         decode_evict=np.bool_(False)) as handle:
        assert (handle.budget, handle.window) == (64, 8) and type(handle.budget) is int
        assert handle.method.budget == 64 and handle.method.options.gamma == 100.0
        assert handle.method.decode_evict is False
    for kwargs, error, message in [
            (dict(budget=True), TypeError, "budget: must be an integer, got bool True"),
            (dict(budget=64.0), TypeError, "budget: must be an integer, got float 64.0"),
            (dict(window="8"), TypeError, "window: must be an integer, got str '8'"),
            (dict(gamma="high"), TypeError, "gamma: must be a real number, got str 'high'"),
            (dict(decode_evict="no"), TypeError, "decode_evict: must be True or False, got str 'no'")]:
        with pytest.raises(error) as e:
            cakekv.compress(model, **(dict(method="cake", budget=64, window=8) | kwargs))
        assert str(e.value) == message
    assert model.config._attn_implementation == "sdpa"  # left unpatched


# ---- command line -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("True", True), ("true", True), ("False", False), ("false", False), ("None", None), ("null", None),
    ("3", 3), ("-2.5", -2.5), ("1e3", 1000.0), ("'max'", "max"), ('"max"', "max"), ("max", "max"),
    (" 7 ", 7), ("no", "no"), ("hello world", "hello world"),
])
def test_option_values_in_python_or_json_spelling(text, value):
    parsed = common.parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_cli_decode_evict_false_is_false():
    assert common.parse_options(["decode_evict=False"], ["cake"])["decode_evict"] is False
    assert common.parse_options(["decode_evict=false", "gamma=100"], ["cake"]) == {"decode_evict": False,
                                                                                    "gamma": 100}


@pytest.mark.parametrize("item,message", [
    ("decode_evict=no", "--option decode_evict: must be True or False, got str 'no'"),
    ("gamma=abc", "--option gamma: must be a real number, got str 'abc'"),
    ("kernel_size=True", "--option kernel_size: must be an integer, got bool True"),
    ("gamma=NaN", "--option gamma: must be a real number, got str 'NaN'"),
    ("tau3=1", "--option tau3: method 'cake' takes no option 'tau3'; its options are"),
    ("gamma", "--option: expected KEY=VALUE, got 'gamma'"),
])
def test_cli_options_go_through_the_typed_checks(item, message):
    with pytest.raises(ValueError) as e:
        common.parse_options([item], ["cake"])
    assert str(e.value).startswith(message)


def test_cli_bad_option_is_one_line_before_loading_the_model(capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    argv = ["generate", "--model", str(tmp_path / "not-loaded"), "--prompt-file", str(prompt),
            "--option", "decode_evict=no"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "cakekv: error: --option decode_evict: must be True or False, got str 'no'\n"


def test_cli_generate_passes_decode_evict_false(capsys, tmp_path, monkeypatch):
    handles = []
    compress = cakekv.compress

    def recording(*args, **kwargs):
        handles.append(compress(*args, **kwargs))
        return handles[-1]
    monkeypatch.setattr(cakekv, "compress", recording)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The secret code of Ada Berg is 12345. " * 20)
    argv = ["generate", "--model", common.tiny_model_path(), "--budget", "32", "--window", "8", "--prompt-file",
            str(prompt), "--max-new-tokens", "2", "--device", "cpu", "--option", "decode_evict=False"]
    assert cli.main(argv) == 0
    assert [h.method.decode_evict for h in handles] == [False]


def test_cli_methods_describes_options(capsys):
    assert cli.main(["methods", "cake"]) == 0
    out = capsys.readouterr().out
    assert "  gamma=200.0 (float, >= 0): weight of the attention variance" in out
    assert "  kernel_size=5 (int, odd and >= 1):" in out


# ---- import time --------------------------------------------------------------------------------
def test_import_is_lazy():
    code = ("import sys, cakekv; assert 'torch' not in sys.modules, 'torch'; "
            "from cakekv import cli; cli.build_parser(); assert 'transformers' not in sys.modules, 'transformers'; "
            "assert callable(cakekv.compress) and 'compress' in dir(cakekv)")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cakekv.nope  # noqa: B018


@pytest.mark.parametrize("method,old,new,value", [("defensivekv", "head_adaptive", "head_budgets", False),
                                                  ("adakv", "floor_alpha", "head_floor", 0.3)])
def test_renamed_option_is_read_under_its_new_name_with_a_warning(method, old, new, value):
    with pytest.warns(FutureWarning, match=f"{old}: renamed {new}"):
        built = build(method, **{old: value})
    assert getattr(built.options, new) == value
