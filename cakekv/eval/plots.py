"""The report's plots: scores against budget, and needle heatmaps. With matplotlib they are labelled
figures; without it, a plain PNG grid of coloured cells written with zlib alone (and a warning)."""
from __future__ import annotations

import os
import struct
import warnings
import zlib
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from .runs import Run

NEEDLE_COLORS = ("#F0496E", "#EBB839", "#0CD79F")  # red (miss) -> yellow -> green (hit)


def _matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _warn_no_matplotlib(path: str) -> None:
    warnings.warn(f"matplotlib is not installed: {path} is a plain colour grid without labels "
                  "(`pip install matplotlib` or `pip install 'cakekv[eval]'` for labelled plots)",
                  stacklevel=3)


def plot_scores_vs_budget(scores: dict[Run, float], path: str, *, title: str, ylabel: str = "score") -> str:
    """One line per method (score against budget), the full cache as a dashed line."""
    series: dict[str, dict[int, float]] = {}
    full = None
    for run in sorted(scores, key=lambda r: r.order):
        if run.budget is None:
            full = scores[run]
        else:
            series.setdefault(run.method, {})[run.budget] = scores[run]
    plt = _matplotlib()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if plt is None:
        budgets = sorted({b for s in series.values() for b in s})
        grid = [[s.get(b, float("nan")) for b in budgets] for s in series.values()] or [[full or 0.0]]
        write_png_grid(grid, path, vmin=0.0, vmax=max([full or 0.0] + [v for r in grid for v in r
                                                                       if v == v]) or 1.0)
        _warn_no_matplotlib(path)
        return path
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    if full is not None:
        ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full cache")
    budgets = sorted({b for s in series.values() for b in s})
    if budgets and min(budgets) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("KV budget (entries per layer per KV head)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmaps(grids: dict[str, list[list[float]]], xs: Sequence[Any], ys: Sequence[Any], path: str, *,
                  title: str, xlabel: str, ylabel: str) -> str:
    """Heatmaps (one panel per key) of values in [0, 1]: rows = ys (top to bottom), columns = xs."""
    plt = _matplotlib()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if plt is None:
        # panels side by side, separated by one blank column
        rows = [[] for _ in ys]
        for k, grid in enumerate(grids.values()):
            for i, row in enumerate(grid):
                rows[i].extend(([float("nan")] if k else []) + list(row))
        write_png_grid(rows, path, vmin=0.0, vmax=1.0)
        _warn_no_matplotlib(path)
        return path
    from matplotlib.colors import LinearSegmentedColormap
    cmap = LinearSegmentedColormap.from_list("needle", list(NEEDLE_COLORS))
    n = len(grids)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    panel_w = max(3.2, 0.55 * len(xs) + 1.6)
    panel_h = max(2.4, 0.4 * len(ys) + 1.6)
    fig, axes = plt.subplots(nrows, cols, figsize=(panel_w * cols + 0.8, panel_h * nrows + 0.6), squeeze=False,
                             layout="constrained")
    image = None
    for k, (ax, (name, grid)) in enumerate(zip(axes.flat, grids.items())):
        image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([str(x) for x in xs], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(ys)))
        ax.set_yticklabels([str(y) for y in ys], fontsize=7)
        for i in range(len(ys) + 1):
            ax.axhline(i - 0.5, color="white", linewidth=0.5)
        for j in range(len(xs) + 1):
            ax.axvline(j - 0.5, color="white", linewidth=0.5)
        mean = _nanmean([v for row in grid for v in row])
        ax.set_title(f"{name}  (acc {100 * mean:.1f}%)", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if k % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02, label="fraction found")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]
    return sum(vals) / len(vals) if vals else float("nan")


def write_png_grid(grid: Sequence[Sequence[float]], path: str, *, vmin: float = 0.0, vmax: float = 1.0,
                   cell: int = 24) -> str:
    """A PNG of coloured cells (red -> yellow -> green, NaN = white) with no dependency beyond zlib."""
    stops = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in NEEDLE_COLORS]

    def colour(v):
        if v != v:
            return (255, 255, 255)
        t = 0.0 if vmax <= vmin else min(max((v - vmin) / (vmax - vmin), 0.0), 1.0)
        seg = min(int(t * 2), 1)
        u = t * 2 - seg
        a, b = stops[seg], stops[seg + 1]
        return tuple(round(a[k] + (b[k] - a[k]) * u) for k in range(3))

    nrows = max(len(grid), 1)
    ncols = max((len(r) for r in grid), default=1) or 1
    width, height = ncols * cell, nrows * cell
    raw = bytearray()
    for i in range(nrows):
        row = list(grid[i]) if i < len(grid) else []
        row += [float("nan")] * (ncols - len(row))
        line = bytearray()
        for v in row:
            r, g, b = colour(v)
            line += bytes((r, g, b)) * (cell - 1) + b"\xff\xff\xff"  # 1-pixel white separator
        for y in range(cell):
            raw += b"\x00" + (line if y < cell - 1 else b"\xff" * (3 * width))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b""))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png)
    return path
