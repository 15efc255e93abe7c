"""Data-parallel evaluations (cakekv/eval/parallel.py): the shards and their merge, the part files of LongBench's
predictions and their resumption, and the command line under torchrun / accelerate launch with 2 CPU processes,
whose predictions and scores must be those of one process."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from cakekv.eval import parallel
from cakekv.eval.parallel import Group, PredictionFile, merge_interleaved, merge_predictions
from helpers import needs_eval_extra
from test_eval_longbench import write_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------------
# shards
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, size", [(0, 2), (1, 2), (7, 3), (8, 4), (5, 8)])
def test_shards_are_interleaved_and_merge_back_in_order(n, size):
    items = [f"item{i}" for i in range(n)]
    shards = [[items[i] for i in Group(rank, size).shard(n)] for rank in range(size)]
    assert sorted(i for rank in range(size) for i in Group(rank, size).shard(n)) == list(range(n))
    assert all(len(s) - len(shards[-1]) in (0, 1) for s in shards)  # balanced
    assert merge_interleaved(shards) == items


def test_merge_refuses_shards_of_the_wrong_sizes():
    with pytest.raises(ValueError, match="process 1 holds 2 items"):
        merge_interleaved([["a", "c"], ["b", "d"], []])  # 4 items in 3 shards: 2, 1, 1


def test_the_launchers_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.launched_group() == parallel.SINGLE
    assert parallel.process_group("cuda:3") == (parallel.SINGLE, "cuda:3")  # one process: --device as given
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parallel.launched_group() == Group(3, 4, 1)
    with pytest.raises(ValueError, match="^--device: 'cuda:1' would put the 4 launched processes on one device"):
        parallel.process_group("cuda:1")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="^RANK, WORLD_SIZE: rank 4 of 4"):
        parallel.launched_group()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="^RANK: expected an integer"):
        parallel.launched_group()


# ------------------------------------------------------------------------------------------------
# predictions files
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_barrier(monkeypatch):
    """Processes played one after the other in this process: their barriers have nothing to wait for."""
    monkeypatch.setattr(Group, "barrier", lambda self: None)


def predict_all(path, total, group, done=0, stop=None):
    """What predict() does with a PredictionFile: the examples of `todo`, in any order (here reversed), up to
    `stop` of them (an interrupted process)."""
    pf = PredictionFile(str(path), total, group, done)
    with pf:
        for k in reversed(range(len(pf.todo))[:stop]):
            pf.add(k, {"pred": f"p{pf.todo[k]}"})
    return pf


def preds(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["pred"] for line in f]


def test_one_process_writes_the_file_itself_in_the_data_order(tmp_path, no_barrier):
    path = tmp_path / "pred" / "full" / "hotpotqa.jsonl"
    pf = predict_all(path, 5, parallel.SINGLE)
    assert (pf.share, pf.todo, pf.parts) == (5, [0, 1, 2, 3, 4], False)
    merge_predictions(parallel.SINGLE, [pf])
    assert preds(path) == [f"p{i}" for i in range(5)] and os.listdir(path.parent) == ["hotpotqa.jsonl"]
    # --resume after 5 of 7 examples (the file cut by --limit 5)
    pf = predict_all(path, 7, parallel.SINGLE, done=5)
    assert pf.todo == [5, 6]
    assert preds(path) == [f"p{i}" for i in range(7)]


def test_processes_write_parts_the_main_one_merges(tmp_path, no_barrier):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text("".join(json.dumps({"pred": f"p{i}"}) + "\n" for i in range(2)))  # resumed after 2
    files = [predict_all(path, 9, Group(rank, 3), done=2) for rank in (2, 1, 0)]
    assert [f.todo for f in files] == [[2, 5, 8], [4, 7], [3, 6]]
    assert sorted(os.listdir(tmp_path)) == ["hotpotqa.jsonl", *[f"hotpotqa.jsonl.part{r}" for r in range(3)]]
    merge_predictions(Group(1, 3), [files[1]])  # not the main process: nothing merged
    assert len(os.listdir(tmp_path)) == 4
    merge_predictions(Group(0, 3), [files[2]])
    assert preds(path) == [f"p{i}" for i in range(9)] and os.listdir(tmp_path) == ["hotpotqa.jsonl"]


def test_an_interrupted_run_resumes_with_any_number_of_processes(tmp_path, no_barrier):
    path = tmp_path / "lcc.jsonl"
    predict_all(path, 10, Group(0, 3), stop=2)  # 0 and 3 of 0, 3, 6, 9
    predict_all(path, 10, Group(1, 3))          # 1, 4, 7
    with open(f"{path}.part2", "w", encoding="utf-8") as f:  # 5, then interrupted in the middle of a line
        f.write(json.dumps({"index": 5, "record": {"pred": "p5"}}) + '\n{"index": 2, "rec')
    assert parallel.read_parts(str(path)).keys() == {0, 3, 1, 4, 7, 5}
    # resumed by 2 processes: what no part holds, shared out
    files = [predict_all(path, 10, Group(rank, 2)) for rank in (0, 1)]
    assert [f.todo for f in files] == [[2, 6, 8], [9]]
    with open(f"{path}.part2", encoding="utf-8") as f:
        assert f.read().endswith('"index": 2, "rec')  # another process's part: read, never cut
    merge_predictions(Group(0, 2), files[:1])
    assert preds(path) == [f"p{i}" for i in range(10)] and os.listdir(tmp_path) == ["lcc.jsonl"]
    # and by one process, which finishes the parts left behind
    path2 = tmp_path / "trec.jsonl"
    predict_all(path2, 4, Group(1, 2))
    pf = predict_all(path2, 4, parallel.SINGLE)
    assert (pf.parts, pf.todo) == (True, [0, 2])
    merge_predictions(parallel.SINGLE, [pf])
    assert preds(path2) == [f"p{i}" for i in range(4)] and sorted(os.listdir(tmp_path)) == ["lcc.jsonl", "trec.jsonl"]


def test_a_missing_prediction_keeps_the_parts(tmp_path, no_barrier):
    path = tmp_path / "lsht.jsonl"
    files = [predict_all(path, 4, Group(0, 2)), predict_all(path, 4, Group(1, 2), stop=1)]
    with pytest.raises(RuntimeError, match="no prediction of example 3 in its part files"):
        merge_predictions(Group(0, 2), files[:1])
    assert sorted(os.listdir(tmp_path)) == ["lsht.jsonl.part0", "lsht.jsonl.part1"]


# ------------------------------------------------------------------------------------------------
# the command line under a launcher, 2 CPU processes
# ------------------------------------------------------------------------------------------------
def launch(launcher, argv, tmp_path):
    """`cakekv` started by `launcher` in 2 CPU processes; its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [
        ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH")])), CUDA_VISIBLE_DEVICES="")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        if importlib.util.find_spec("accelerate") is None:
            pytest.skip("accelerate is not installed (it is optional: torchrun launches the same runs)")
        # --multi_gpu starts torchrun's processes, on the CPU where there is no GPU (--cpu would start one)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port())]
    done = subprocess.run([*cmd, "-m", "cakekv", *argv], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_times(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_needle_on_two_processes_is_the_single_process_run(tmp_path, model_dir, launcher):
    needs_eval_extra("matplotlib")
    from cakekv import cli
    argv = ["eval", "needle", "--model", model_dir, "--lengths", "64,100", "--depths", "0,50,100", "--samples", "1",
            "--methods", "full,cake", "--budgets", "40", "--window", "8", "--max-new-tokens", "3", "--device", "cpu",
            "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    out = launch(launcher, [*argv, "--out", str(tmp_path / "two")], tmp_path)
    assert out.count("# Needle in a haystack") == 1  # the main process reports
    one, two = (json.load(open(tmp_path / d / "results.json", encoding="utf-8")) for d in ("one", "two"))
    assert two["info"]["processes"] == 2 and two["results"] == one["results"]
    assert without_times(read_lines(tmp_path / "two" / "predictions.jsonl")) == without_times(
        read_lines(tmp_path / "one" / "predictions.jsonl"))
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def test_longbench_on_two_processes_resumed_is_the_single_process_run(tmp_path, model_dir):
    needs_eval_extra("matplotlib")
    from cakekv import cli
    data = write_fixture(tmp_path / "data")
    argv = ["eval", "longbench", "--model", model_dir, "--data-dir", str(tmp_path / "data"), "--datasets",
            "hotpotqa,lcc,lsht,passage_count", "--methods", "full,cake", "--budgets", "48", "--window", "8",
            "--max-length", "600", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    # two processes stopped after the first example of each dataset (--limit 1), then resumed
    launch("torchrun", [*argv, "--out", str(tmp_path / "two"), "--limit", "1"], tmp_path)
    launch("torchrun", [*argv, "--out", str(tmp_path / "two"), "--resume"], tmp_path)
    for run in ("full", "cake-48"):
        # the predictions and the official result.json, no part file left
        assert sorted(os.listdir(tmp_path / "two" / "pred" / run)) == sorted([*(f"{d}.jsonl" for d in data),
                                                                               "result.json"])
        for name in data:
            one, two = (read_lines(tmp_path / d / "pred" / run / f"{name}.jsonl") for d in ("one", "two"))
            assert len(two) == len(data[name]) and without_times(two) == without_times(one)
    one, two = (json.load(open(tmp_path / d / "results.json", encoding="utf-8"))["results"] for d in ("one", "two"))
    for table in (one, two):
        for run in table.values():
            for entry in run["datasets"].values():
                entry.pop("time_s")
    assert two == one
