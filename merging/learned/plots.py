"""PNGs of a learned merge: coefficient heatmap (rows × tasks) and the per-step curves."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..plots import _save

__all__ = ["plot_coefficients", "plot_learning_curves"]


def _short(name: str, width: int = 38) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_coefficients(coefficients, rows: Sequence[str], tasks: Sequence[str], path, *, title: str = "") -> Path:
    """Heatmap of the learned coefficients: one row per tensor / block, one column per task (bars for (T,))."""
    from matplotlib.figure import Figure

    c = coefficients.detach().cpu().float().reshape(-1, len(tasks)).numpy()
    if c.shape[0] == 1:
        fig = Figure(figsize=(max(4.0, 0.7 * len(tasks) + 2), 3.2))
        ax = fig.subplots()
        ax.bar(range(len(tasks)), c[0], color="tab:blue")
        ax.set_xticks(range(len(tasks)), [_short(t, 14) for t in tasks], rotation=30, ha="right")
        ax.set_ylabel("λ")
    else:
        fig = Figure(figsize=(max(4.5, 0.55 * len(tasks) + 3.5), min(40.0, 1.5 + 0.16 * c.shape[0])))
        ax = fig.subplots()
        im = ax.imshow(c, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.05, label="coefficient")
        ax.set_xticks(range(len(tasks)), [_short(t, 14) for t in tasks], rotation=30, ha="right")
        step = max(1, c.shape[0] // 60)  # a label per row up to ~60 rows
        ticks = list(range(0, c.shape[0], step))
        ax.set_yticks(ticks, [_short(rows[i]) for i in ticks], fontsize=6 if c.shape[0] > 20 else 8)
        ax.set_ylabel("tensor / block (model order)")
    ax.set_title(title or "learned merging coefficients")
    return _save(fig, path)


def plot_learning_curves(history: Sequence[dict[str, Any]], path, *, title: str = "",
                         metric: str = "val_normalized", objective: str = "entropy") -> Path:
    """Objective per step (sum and per task) and, where recorded, the validation metric per step."""
    from matplotlib.figure import Figure

    evals = [h for h in history if metric in h]
    fig = Figure(figsize=(9.0 if evals else 5.5, 3.6))
    axes = fig.subplots(1, 2 if evals else 1)
    ax = axes[0] if evals else axes
    steps = list(range(1, len(history) + 1))  # global step: Concrete's mask and λ phases run one after the other
    ax.plot(steps, [h["objective"] for h in history], color="black", lw=1.8, label="sum")
    tasks = list(history[0]["per_task"]) if history else []
    for t in tasks:
        ax.plot(steps, [h["per_task"][t] for h in history], lw=0.9, alpha=0.8, label=t)
    phases = [i for i in range(1, len(history)) if history[i].get("phase") != history[i - 1].get("phase")]
    for p in phases:
        ax.axvline(p + 0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("objective (entropy, nats)" if objective == "entropy" else "objective (supervised task loss)")
    ax.legend(fontsize=6, ncol=2)
    if evals:
        idx = [history.index(h) + 1 for h in evals]
        axes[1].plot(idx, [h[metric] for h in evals], marker="o", color="tab:green")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("val. accuracy (normalized, task mean)")
    fig.suptitle(title or "learned merging")
    return _save(fig, path)
