"""PNG plots for merging reports (matplotlib's Agg renderer: no display needed)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_task_accuracy", "plot_mask_overlap", "plot_disentanglement"]


def _figure(size):
    # A bare Figure renders through Agg without touching pyplot's global backend or figure registry.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.subplots()


def _save(fig, path, *, tight_layout: bool = True) -> Path:
    """`tight_layout=False` for figures whose colorbar spans several axes (tight_layout cannot fit it);
    they are cropped at save time instead."""
    from mtl.io import atomic_path, user_path

    if tight_layout:
        fig.tight_layout()
    path = user_path(path)
    with atomic_path(path) as tmp:  # never a half-written PNG
        fig.savefig(tmp, dpi=120, format="png", bbox_inches=None if tight_layout else "tight")
    return path


def plot_task_accuracy(
    results: Mapping[str, Mapping[str, float]],
    path,
    *,
    title: str = "Per-task accuracy by method",
    ylabel: str = "accuracy",
    mean: bool = True,
) -> Path:
    """Grouped bars: one group per task (plus their mean), one bar per method.

    `results`: {method: {task: value}}; tasks missing for a method are left blank.
    """
    if not results:
        raise ValueError("no results to plot")
    methods = list(results)
    tasks: list[str] = []
    for r in results.values():
        tasks += [t for t in r if t not in tasks]
    groups = tasks + (["mean"] if mean else [])
    width = 0.8 / len(methods)
    # readable up to ~10 groups x 10 methods: the width grows with the bar count, capped
    fig, ax = _figure((min(16.0, max(6.0, 0.12 * len(groups) * len(methods) + 3)), 5.0))
    for i, m in enumerate(methods):
        vals = [results[m].get(t, float("nan")) for t in tasks]
        if mean:
            present = [v for v in vals if v == v]
            vals.append(sum(present) / len(present) if present else float("nan"))
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, vals, width, label=m)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=min(5, len(methods)), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_mask_overlap(masks_or_overlap: Any, path, *, k: int | None = None, title: str | None = None) -> Path:
    """Histogram of how many tasks use each weight, selfish and catastrophic fractions annotated.

    Accepts the dict from `merging.mask_overlap`, or anything it accepts (TallMasks, store, mask list).
    `k`: Consensus' threshold, drawn between the weights it drops (< k tasks) and keeps (≥ k), and named
    in the default title ("Consensus mask overlap (k = 2)"; "TALL mask overlap" without it).
    """
    return _save(mask_overlap_figure(masks_or_overlap, k=k, title=title), path)


#: the bars stay below this share of the axes' height, the annotation box above it
_BARS_TOP = 0.7


def mask_overlap_figure(masks_or_overlap: Any, *, k: int | None = None, title: str | None = None):
    """The figure `plot_mask_overlap` saves (matplotlib `Figure`)."""
    from .tall import mask_overlap

    ov = masks_or_overlap
    if not (isinstance(ov, Mapping) and "fractions" in ov):
        ov = mask_overlap(ov)
    T, fr = ov["tasks"], ov["fractions"]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= T):
        raise ValueError(f"plot_mask_overlap: k must be an int in [1, {T}] (the number of tasks), got {k!r}")
    fig, ax = _figure((max(5.0, 0.5 * (T + 1) + 2), 4))
    colors = ["tab:red", "tab:orange"] + ["tab:blue"] * (T - 1)
    ax.bar(range(T + 1), [100 * f for f in fr], color=colors[: T + 1])
    ax.set_ylim(0, max(100 * max(fr), 1e-9) / _BARS_TOP)  # headroom: the box never covers a bar, the tallest included
    ax.set_xticks(range(T + 1))
    ax.set_xlabel("number of tasks whose mask keeps the weight")
    ax.set_ylabel("% of merged weights")
    ax.set_title(title or ("TALL mask overlap" if k is None else f"Consensus mask overlap (k = {k})"))
    lines = [f"catastrophic (0 tasks): {100 * ov['catastrophic']:.1f}%", f"selfish (1 task): {100 * ov['selfish']:.1f}%"]
    if k is not None:
        ax.axvline(k - 0.5, ymax=_BARS_TOP, color="black", linestyle="--", linewidth=1)
        kept = sum(fr[k:])
        lines.append(f"kept by Consensus (≥ {k} tasks): {100 * kept:.1f}%")
    ax.text(0.98, 0.97, "\n".join(lines), transform=ax.transAxes, ha="right", va="top", fontsize="small",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_disentanglement(result: Any, path, *, title: str = "Weight disentanglement error ξ") -> Path:
    """One heatmap per α point of a `merging.Disentanglement`: ξ for each task pair (0 = no interference,
    2 = every prediction of both tasks changed). With a single pair measured on a grid of α points, one
    heatmap over (α_s, α_t) instead — the paper's figure."""
    import numpy as np

    if len(result.errors) == 1 and len(result.alphas) > 3:
        (s, t), by = next(iter(result.errors.items()))
        xs = sorted({a for a, _ in by})
        ys = sorted({b for _, b in by})
        grid = np.full((len(ys), len(xs)), np.nan)
        for (a, b), v in by.items():
            grid[ys.index(b), xs.index(a)] = v
        fig, ax = _figure((5.5, 4.5))
        im = ax.imshow(grid, origin="lower", cmap="magma_r", vmin=0, vmax=2, aspect="auto")
        ax.set_xticks(range(len(xs)), [f"{a:g}" for a in xs])
        ax.set_yticks(range(len(ys)), [f"{b:g}" for b in ys])
        ax.set_xlabel(f"α ({s})")
        ax.set_ylabel(f"α ({t})")
        ax.set_title(f"{title}: {s} + {t}")
        fig.colorbar(im, ax=ax, label="ξ")
        return _save(fig, path)
    from matplotlib.figure import Figure

    n, k = len(result.tasks), len(result.alphas)
    fig = Figure(figsize=(min(18.0, 0.45 * n * k + 2.5 * k), 0.45 * n + 2))
    axes = fig.subplots(1, k, squeeze=False)[0]
    for ax, alpha in zip(axes, result.alphas):
        m = result.matrix(alpha).numpy()
        im = ax.imshow(m, cmap="magma_r", vmin=0, vmax=2)
        ax.set_xticks(range(n), result.tasks, rotation=60, ha="right", fontsize="small")
        ax.set_yticks(range(n), result.tasks, fontsize="small")
        ax.set_title(f"α = ({alpha[0]:g}, {alpha[1]:g}), mean {result.mean(alpha):.2f}", fontsize="small")
        for i in range(n):
            for j in range(n):
                if m[i, j] == m[i, j]:
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] > 1 else "black")
    fig.colorbar(im, ax=list(axes), label="ξ", shrink=0.8)
    fig.suptitle(title)
    return _save(fig, path, tight_layout=False)
