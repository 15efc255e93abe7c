"""The report's plots through matplotlib: scores against budget, and needle heatmaps.

matplotlib (in the ``eval`` extra) is imported when a plot is made; :func:`figure_class` raises an
ImportError saying how to install it, which the evaluations call before loading a model so that a missing
package fails at the start of a run, not after it. Figures are built with ``matplotlib.figure.Figure``
(no pyplot), so the caller's matplotlib backend and open figures are left alone."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from .runs import Run

NEEDLE_COLORS = ("#F0496E", "#EBB839", "#0CD79F")  # red (miss) -> yellow -> green (hit)


def figure_class():
    """``matplotlib.figure.Figure``, or an ImportError naming the package to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the evaluation reports plot with matplotlib (needle heatmaps, scores against "
                          "budget): `pip install matplotlib` (or `pip install 'cakekv[eval]'`)") from e
    return Figure


def _save(fig, path: str, **kwargs) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, **kwargs)
    return path


def plot_scores_vs_budget(scores: dict[Run, float], path: str, *, title: str, ylabel: str = "score") -> str:
    """One line per method (score against budget), the full cache as a dashed line."""
    Figure = figure_class()
    series: dict[str, dict[int, float]] = {}
    full = None
    for run in sorted(scores, key=lambda r: r.order):
        if run.budget is None:
            full = scores[run]
        else:
            series.setdefault(run.method, {})[run.budget] = scores[run]
    fig = Figure(figsize=(6.4, 4.2), layout="tight")
    ax = fig.subplots()
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
    return _save(fig, path)


def plot_heatmaps(grids: dict[str, list[list[float]]], xs: Sequence[Any], ys: Sequence[Any], path: str, *,
                  title: str, xlabel: str, ylabel: str) -> str:
    """Heatmaps (one panel per key) of values in [0, 1]: rows = ys (top to bottom), columns = xs."""
    Figure = figure_class()
    from matplotlib.colors import LinearSegmentedColormap
    cmap = LinearSegmentedColormap.from_list("needle", list(NEEDLE_COLORS))
    n = len(grids)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    panel_w = max(3.2, 0.55 * len(xs) + 1.6)
    panel_h = max(2.4, 0.4 * len(ys) + 1.6)
    fig = Figure(figsize=(panel_w * cols + 0.8, panel_h * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
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
    return _save(fig, path, bbox_inches="tight")


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]
    return sum(vals) / len(vals) if vals else float("nan")
