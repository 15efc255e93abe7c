"""Writing results: the environment of a run, JSON, JSON lines, markdown tables and text.
Plots are in :mod:`.plots`."""
from __future__ import annotations

import datetime
import json
import os
import platform
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from .runs import Setup


def environment_info(setup: Setup | None = None, **extra: Any) -> dict[str, Any]:
    """Versions, date and platform; with ``setup``, the model, device and run settings; then ``extra``."""
    import torch
    import transformers
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}
    if setup is not None:
        device = next(setup.model.parameters()).device
        info.update(model=setup.model_name, device=str(device),
                    dtype=str(next(setup.model.parameters()).dtype).replace("torch.", ""),
                    protocol=setup.protocol, window=setup.window, options=setup.options,
                    chat=setup.chat, seed=setup.seed, batch_size=setup.batch_size)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
        placed = getattr(setup.model, "hf_device_map", None)
        if placed:
            info["devices"] = sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in placed.values()})
        if setup.group.size > 1:
            info["processes"] = setup.group.size
    info.update(extra)
    return info


def prefill_count(questions_per_prefill: Iterable[int]) -> int:
    """The prefills behind a list of answers, from each answer's count of the questions that shared
    its prefill (a prefill shared by n questions counts 1/n for each)."""
    return round(sum(1 / n for n in questions_per_prefill))


def _parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_json(path: str, data: Any) -> None:
    _parent(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """One JSON object per line (the predictions files)."""
    _parent(path)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(str, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_text(path: str, text: str) -> None:
    _parent(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def print_file(path: str) -> None:
    """Print a written report (the markdown) to stdout."""
    with open(path, encoding="utf-8") as f:
        print(f.read())


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
