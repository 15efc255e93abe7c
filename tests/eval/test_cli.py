"""The `cakekv` command line: methods, argument errors, generate / demo / eval on a tiny local model."""
from __future__ import annotations

import json
import os
import runpy
import sys

import pytest
import torch

import cakekv
from cakekv import cli
from cakekv.eval import models
from helpers import needs_eval_extra

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def test_methods(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.strip().splitlines()]
    assert listed == cakekv.available_methods()
    assert "gamma=200" in out  # cake's options are shown


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["bogus"], "invalid choice"),
    (["eval"], "required"),
    (["eval", "needle", "--protocol", "both"], "invalid choice"),
    (["eval", "needle", "--window", "0"], "cakekv eval needle: error: --window must be >= 1"),
    (["generate", "--prompt-file", "x", "--window", "0"], "cakekv generate: error: --window must be >= 1"),
    (["eval", "synthetic", "--samples", "0"], "--samples must be >= 1"),
    (["generate", "--model", "m"], "--prompt-file"),
    (["generate", "--model", "m", "--prompt-file", "x", "--budget", "many"], "invalid int"),
    (["demo", "--depth", "2"], "--depth must be between 0 and 1"),
])
def test_argument_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


ARGUMENT_ERRORS = [  # (argv, message): refused before torch is imported
    (["generate", "--prompt-file", "p", "--budget", "0"], "budget: must be >= window + 1 = 33, got 0"),
    (["generate", "--prompt-file", "p", "--method", "nope"], "unknown method 'nope'"),
    (["generate", "--prompt-file", "p", "--option", "gamma"], "--option: expected KEY=VALUE, got 'gamma'"),
    (["generate", "--prompt-file", "p", "--option", "gamma=1", "--option", "gamma=2"],
     "--option: gamma given twice ('gamma=1' and 'gamma=2')"),
    (["generate", "--prompt-file", "/no/such/file", "--method", "full", "--budget", "8"],
     "prompt-file: cannot read"),  # full's budget is not checked: it keeps everything
    (["demo", "--budgets", "8"], "budget: must be >= window + 1 = 17, got 8"),
    (["generate", "--prompt-file", "p", "--prefill-chunk", "8"], "prefill_chunk: must be >= window + 1 = 33, got 8"),
]


def test_argument_errors_load_no_torch():
    """Each error above, in a fresh interpreter: exit 2, the message, and torch never imported (what makes a
    mistyped flag fail at once; benchmarks/bench_cli_errors.py times them)."""
    import subprocess
    for argv, message in ARGUMENT_ERRORS:
        code = ("import sys\nfrom cakekv import cli\ntry:\n    code = cli.main(%r)\nexcept SystemExit as e:\n"
                "    code = e.code\nprint('exit', code, 'torch' in sys.modules)\n" % argv)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        assert done.stdout.split() == ["exit", "2", "False"], (argv, done.stdout, done.stderr)
        assert message in done.stderr, (argv, done.stderr)


def test_runtime_errors_are_one_clear_line(capsys, tmp_path, model_dir):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    cases = [
        (["generate", "--model", str(tmp_path / "no-such-model"), "--prompt-file", str(prompt)],
         "--model: no such folder"),
        (["generate", "--model", "./missing-folder", "--prompt-file", str(prompt)], "--model: no such folder"),
        (["generate", "--model", model_dir, "--prompt-file", str(prompt), "--option", "gamma=abc"],
         "--option gamma: must be a real number"),
        (["generate", "--model", model_dir, "--prompt-file", str(prompt), "--option", "tau3=1"], "tau3"),
        (["generate", "--model", model_dir, "--prompt-file", str(prompt), "--device", "nonsense"],
         "--device: unknown device"),
        (["generate", "--model", model_dir, "--prompt-file", str(tmp_path / "missing.txt")], "prompt-file"),
        (["generate", "--model", model_dir, "--prompt-file", str(prompt), "--budget", "16"], "window + 1"),
        (["generate", "--model", model_dir, "--prompt-file", str(prompt), "--method", "nope"], "unknown method"),
        (["eval", "longbench", "--data-dir", str(tmp_path), "--datasets", "hotpotqa"], "never downloads"),
        (["eval", "longbench", "--datasets", "hotpotqa"], "--data-dir is required"),
        (["eval", "needle", "--model", model_dir, "--methods", "nope"], "unknown method"),
        (["eval", "needle", "--model", model_dir, "--haystack", str(tmp_path / "none.txt")], "haystack"),
        (["eval", "needle", "--model", model_dir, "--batch-size", "0"], "batch_size"),
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", "--model", model_dir, "--prompt-file", str(prompt), "--device", "cuda"],
                      "--device: 'cuda' asked for, but this torch sees no CUDA device"))
    for argv, message in cases:
        assert cli.main(argv) == 2, argv  # as argparse's own errors
        err = capsys.readouterr().err
        assert err.startswith("cakekv: error: ") and message in err, (argv, err)


def test_generate(capsys, tmp_path, model_dir):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The secret code of Ada Berg is 12345. " * 20)
    argv = ["generate", "--model", model_dir, "--method", "cake", "--budget", "64", "--window", "8",
            "--prompt-file", str(prompt), "--max-new-tokens", "5", "--device", "cpu", "--dtype", "float32"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "[cakekv] method cake, budget 64" in captured.err and "5 new tokens" in captured.err
    assert "KV memory" in captured.err


def test_generate_reads_a_long_prompt_in_chunks(capsys, tmp_path, model_dir, monkeypatch):
    """--prefill-chunk reaches compress (beside the method's options) and the run finishes as one-shot does."""
    calls = []
    compress = cakekv.compress
    monkeypatch.setattr(cakekv, "compress", lambda *a, **k: calls.append(k) or compress(*a, **k))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The secret code of Ada Berg is 12345. " * 20)
    argv = ["generate", "--model", model_dir, "--method", "cake", "--budget", "64", "--window", "8", "--prefill-chunk",
            "128", "--option", "gamma=100", "--prompt-file", str(prompt), "--max-new-tokens", "5", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert "5 new tokens" in capsys.readouterr().err
    assert [(k["prefill_chunk"], k["gamma"]) for k in calls] == [(128, 100)]


def test_generate_defaults_to_the_shipped_model(capsys, tmp_path):
    if not os.path.isfile(os.path.join(models.tiny_model_path(), "config.json")):
        pytest.fail("the shipped tiny model is missing")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The secret code of Ada Berg is 12345. " * 10)
    assert cli.main(["generate", "--prompt-file", str(prompt), "--max-new-tokens", "2", "--device", "cpu",
                     "--budget", "48", "--window", "8"]) == 0
    assert "[cakekv] method cake, budget 48" in capsys.readouterr().err


def test_generate_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--method", "--budget", "--window", "--prompt-file", "--max-new-tokens", "--device",
                 "--dtype", "--attn-implementation", "--chat", "--option"):
        assert flag in out
    assert out.count("default:") >= 8


def test_eval_batch_size(tmp_path, model_dir):
    needs_eval_extra("matplotlib")
    out = tmp_path / "synthetic"
    argv = ["eval", "synthetic", "--model", model_dir, "--tasks", "niah_single", "--lengths", "120", "--samples", "3",
            "--methods", "full", "--window", "8", "--max-new-tokens", "2", "--batch-size", "2", "--device", "cpu",
            "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    report = json.load(open(out / "results.json", encoding="utf-8"))
    assert report["info"]["batch_size"] == 2
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3


def test_demo(capsys, monkeypatch, model_dir, tmp_path):
    monkeypatch.setattr(models, "tiny_model_path", lambda: str(tmp_path / "absent"))
    assert cli.main(["demo"]) == 2
    assert "shipped tiny model is missing" in capsys.readouterr().err
    monkeypatch.setattr(models, "tiny_model_path", lambda: model_dir)
    argv = ["demo", "--length", "300", "--budgets", "40", "--window", "8", "--facts", "2", "--max-new-tokens", "3",
            "--methods", "full,cake"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "question: \"What is the secret code of" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert lines[header].split() == ["method", "budget", "answer", "correct", "KV", "kept", "KV", "memory", "time"]
    rows = [line.split()[0] for line in lines[header + 2:header + 4]]
    assert rows == ["full", "cake"]
    at = lines[header].index("correct")
    correct = [line[at:].split()[0] for line in lines[header + 2:header + 4]]
    assert set(correct) <= {"yes", "no"}
    assert ("cut by token-level selection" in out) == (correct[1] == "no")  # why, under the table, when cake errs
    assert "compressed once with kvzip at budget 40" in out


def test_demo_asks_every_fact_of_one_document_compressed_once(capsys, monkeypatch, model_dir):
    """The last table: one row per fact, each asked of the same compressed document, with its expected code and
    whether the answer holds it."""
    monkeypatch.setattr(models, "tiny_model_path", lambda: model_dir)
    argv = ["demo", "--length", "300", "--budgets", "40", "--window", "8", "--facts", "3", "--max-new-tokens", "3",
            "--methods", "full", "--reuse-method", "spanzip"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("question "))
    assert lines[header].split() == ["question", "expected", "answer", "correct"]
    rows = [line for line in lines[header + 2:] if line.strip()]
    assert len(rows) == 3 and all(row.startswith("What is the secret code of") for row in rows)
    assert len({row.split("?")[0] for row in rows}) == 3
    assert all(row.split()[-1] in ("yes", "no") for row in rows)
    assert cli.main(["demo", "--reuse-method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_experiment_scripts(monkeypatch, capsys):
    """experiments/run_*.py are thin wrappers over cakekv.eval (they put the checkout on sys.path)."""
    for name in ("longbench", "needle", "synthetic"):
        monkeypatch.setattr(sys, "argv", [f"run_{name}.py", "--help"])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, "experiments", f"run_{name}.py"), run_name="__main__")
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"cakekv eval {name}" in out and "--methods" in out


def test_merge_renames_runs_and_confidence_counts_trials(tmp_path, monkeypatch, capsys):
    """merge_results DIR=NAME renames a folder's runs (ablations of one method side by side); confidence.py
    gives each run its found / trials with a Wilson interval."""
    needs_eval_extra("matplotlib")
    def folder(name, found):
        d = tmp_path / name
        d.mkdir()
        recs = [{"method": "spancake", "budget": 128, "length": 1024, "depth": 50.0, "sample": i, "prompt_tokens": 1000,
                 "needle": "1", "pred": "1", "found": float(f), "time_s": 0.1, "kv_fraction": 0.1}
                for i, f in enumerate(found)]
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "results.json").write_text(json.dumps({"info": {}, "lengths": [1024], "depths": [50.0]}))
        return str(d)

    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    import confidence
    import merge_results
    out = str(tmp_path / "merged")
    assert merge_results.main(["needle", out, folder("a", [1, 1, 1, 0]), folder("b", [0] * 12) + "=spancake.x"]) == 0
    assert confidence.main(["needle", out]) == 0
    table = json.load(open(os.path.join(out, "confidence.json")))
    assert table["spancake-128"]["overall"] == {"found": 3.0, "n": 4, "pct": 75.0, "lo": 30.1, "hi": 95.4}
    none = table["spancake.x-128"]["overall"]  # 0 of n: the upper bound is z^2 / (n + z^2)
    assert (none["n"], none["lo"]) == (12, 0.0) and none["hi"] == pytest.approx(100 * 1.96 ** 2 / (12 + 1.96 ** 2), abs=0.05)
    assert set(json.load(open(os.path.join(out, "results.json")))["results"]) == {"spancake-128", "spancake.x-128"}
