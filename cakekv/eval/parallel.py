"""Data-parallel evaluations: one process per device, started by a launcher (``torchrun``, or ``accelerate
launch`` on GPUs), each predicting an interleaved shard of every dataset or task, the main process merging
the predictions in the data's order and scoring them once.

The launcher's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) say which
process this is; :func:`process_group` joins the others through ``torch.distributed`` (``env://``, gloo:
only Python objects and barriers travel between the processes, whatever their devices). Without a
launcher (``WORLD_SIZE`` unset or 1) nothing is started and nothing is imported: the single-process run is
the one it always was.

Shards are interleaved: example ``i`` goes to process ``i % size``, so that each process gets as many long
prompts as short ones (the needle and synthetic items, and LongBench files sorted by length, are ordered).

LongBench's predictions files grow on disk, for ``--resume``: each process appends its predictions to a
part file ``{dataset}.jsonl.part{rank}`` (lines ``{"index": i, "record": ...}``), and the main process
merges the parts into ``{dataset}.jsonl`` in the data's order once every process is done, then removes
them (:class:`PredictionFile`, :func:`merge_predictions`). A resumed run takes up whatever the files hold,
whatever the number of processes that wrote them."""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import glob
import json
import os
from typing import Any, Callable, Iterable, Sequence

# The main process waits for the slowest shard at the end: a run's collective may wait hours.
TIMEOUT = datetime.timedelta(days=7)


@dataclasses.dataclass(frozen=True)
class Group:
    """The processes of one evaluation: this one's rank, their number, and this one's device index."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that merges, scores and writes the report."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This process's indices of ``n`` items (interleaved)."""
        return range(self.rank, n, self.size)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist
            dist.barrier()

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's ``value`` in rank order, on the main process (None on the others)."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist
        out = [None] * self.size if self.main else None
        dist.gather_object(value, out, dst=0)
        return out

    def on_main(self, action: Callable[[], Any]) -> None:
        """``action`` on the main process once every process got here, the others waiting until it is done (the
        main process changes a folder the others read)."""
        self.barrier()
        if self.main:
            action()
        self.barrier()


SINGLE = Group()


def launched_group() -> Group:
    """The group the launcher's environment describes (:data:`SINGLE` without a launcher); a bad variable is a
    ValueError naming it."""
    values = {}
    for name, default in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", None)):
        text = os.environ.get(name)
        try:
            values[name] = default if text is None else int(text)
        except ValueError:
            raise ValueError(f"{name}: expected an integer from the launcher, got {text!r}") from None
    size, rank = values["WORLD_SIZE"], values["RANK"]
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK, WORLD_SIZE: rank {rank} of {size} processes is not a process of the launch")
    local = rank if values["LOCAL_RANK"] is None else values["LOCAL_RANK"]
    return Group(rank, size, local)


def process_group(device: str | None) -> tuple[Group, str | None]:
    """(the launched group, joined; this process's device). Under a launcher ``--device`` auto or cuda is
    ``cuda:LOCAL_RANK`` where CUDA is available, else cpu; a device with an index would put every process on
    it: refused. Without a launcher: (:data:`SINGLE`, ``device`` as given), nothing imported."""
    group = launched_group()
    if group.size == 1:
        return group, device
    import torch
    import torch.distributed as dist
    if device not in (None, "auto", "cpu", "cuda"):
        raise ValueError(f"--device: {device!r} would put the {group.size} launched processes on one device; pass "
                         "auto, cuda or cpu (each process takes cuda:LOCAL_RANK)")
    if device != "cpu" and torch.cuda.is_available():
        if group.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK: process {group.local_rank} has no CUDA device of its own (this host "
                             f"sees {torch.cuda.device_count()}); launch at most that many processes per host")
        device = f"cuda:{group.local_rank}"
        torch.cuda.set_device(group.local_rank)
    elif device == "cuda":
        raise ValueError("--device: 'cuda' asked for, but this torch sees no CUDA device")
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://", rank=group.rank, world_size=group.size,
                                timeout=TIMEOUT)
        atexit.register(dist.destroy_process_group)
    group.barrier()  # every process has checked its arguments and its output folder before any writes
    return group, device


def merge_interleaved(parts: Sequence[Sequence[Any]]) -> list[Any]:
    """The items of :meth:`Group.shard`'s shards, ``parts[r]`` being process ``r``'s, back in their order."""
    size = len(parts)
    total = sum(len(p) for p in parts)
    for rank, part in enumerate(parts):
        if len(part) != len(range(rank, total, size)):
            raise ValueError(f"parts: process {rank} holds {len(part)} items, its shard of {total} has "
                             f"{len(range(rank, total, size))}")
    return [parts[i % size][i // size] for i in range(total)]


# ----------------------------------------------------------------------------------------------
# predictions files (LongBench)
# ----------------------------------------------------------------------------------------------
PART = ".part"


def part_paths(path: str) -> list[str]:
    """The part files of the predictions file ``path``, whatever the number of processes that wrote them."""
    return sorted(p for p in glob.glob(glob.escape(path) + PART + "*") if p[len(path) + len(PART):].isdigit())


def read_parts(path: str) -> dict[int, dict]:
    """{example index: prediction} of the part files of ``path``. A line cut short (its process was
    interrupted while writing it) is not a prediction; any other bad line is an error naming file and line."""
    found: dict[int, dict] = {}
    for part in part_paths(path):
        with open(part, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break
                try:
                    entry = json.loads(line)
                    found[int(entry["index"])] = entry["record"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{part}:{lineno}: not a prediction of a part file ({e})") from None
    return found


def _cut_partial_line(path: str) -> None:
    """Drop the last line of ``path`` when its writer was interrupted before its end."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class PredictionFile:
    """One predictions file as this process writes it: the examples it predicts (``todo``, indices in the data)
    and :meth:`add`, which writes them in ``todo``'s order however they are finished.

    A single process with no part files on disk writes ``path`` itself (appending after ``done`` examples kept by
    ``--resume``). Otherwise (several processes, or a resumed run of several) the examples not yet predicted, in
    ``path`` or its part files, are shared out (:meth:`Group.shard` of the data), each process writing its part
    file, merged by :func:`merge_predictions`."""

    def __init__(self, path: str, total: int, group: Group, done: int = 0):
        self.path, self.done = path, done
        found = read_parts(path)
        self.total = total
        self.parts = group.size > 1 or bool(found)
        mine = group.shard(total) if self.parts else range(total)
        self.share = len(mine)  # examples this process answers for, predicted before or now
        self.todo = [i for i in mine if i >= done and i not in found]
        self._ready: dict[int, dict] = {}
        self._written = 0
        self._file = None
        if self.parts:
            self._target = f"{path}{PART}{group.rank}"
            _cut_partial_line(self._target)
        else:
            self._target = path

    def __enter__(self) -> "PredictionFile":
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = open(self._target, "a" if self.parts or self.done else "w", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def add(self, k: int, record: dict) -> None:
        """The prediction of ``todo[k]``; written with those before it (the file grows in the data's order,
        which ``--resume`` relies on)."""
        self._ready[k] = record
        while self._written in self._ready:
            record = self._ready.pop(self._written)
            if self.parts:
                record = {"index": self.todo[self._written], "record": record}
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._written += 1
        self._file.flush()


def merge_predictions(group: Group, files: Iterable[PredictionFile]) -> None:
    """Once every process is done: the main process appends each file's parts after its ``done`` examples, in
    the data's order, and removes the parts."""
    files = list(files)
    group.barrier()
    if not group.main:
        return
    for pf in files:
        if not pf.parts:
            continue
        found = read_parts(pf.path)
        merged = []
        while pf.done + len(merged) in found:
            merged.append(found[pf.done + len(merged)])
        if pf.done + len(merged) < pf.total:
            raise RuntimeError(f"{pf.path}: no prediction of example {pf.done + len(merged)} in its part files "
                               "after every process ended; rerun with --resume to predict what is missing")
        with open(pf.path, "a" if pf.done else "w", encoding="utf-8") as f:
            for record in merged:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        for part in part_paths(pf.path):
            os.remove(part)
