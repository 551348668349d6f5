"""PNGs of a learned merge: coefficient heatmap (rows × tasks) and the per-step curves."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..plots import _save

__all__ = ["coefficients_figure", "learning_curves_figure", "model_order", "plot_coefficients", "plot_learning_curves"]

#: what `merge.eval_every` records: each task's primary metric relative to its fine-tune's (an MAE too), averaged
VAL_LABEL = "val. score normalized to the fine-tunes (task mean)"


def _short(name: str, width: int = 38) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _fitted(title: str, width_in: float, fontsize: float) -> str:
    """Each line of `title` shortened from the left to what a figure `width_in` wide holds (~0.6 em a character)."""
    chars = max(12, int(0.9 * width_in * 72 / (0.6 * fontsize)))
    return "\n".join(_short(line, chars) for line in title.split("\n"))


def model_order(rows: Sequence[str], keys: Sequence[str]) -> list[int] | None:
    """Row indices in the model's own order `keys` (a row is a tensor, or a module: its first tensor's place);
    None when a row has no place there (named blocks): the rows then keep their given order."""
    pos = {k: i for i, k in enumerate(keys)}
    places = []
    for r in rows:
        hits = [pos[r]] if r in pos else [i for k, i in pos.items() if k.startswith(r + ".")]
        if not hits:
            return None
        places.append(min(hits))
    return sorted(range(len(rows)), key=places.__getitem__)


def coefficients_figure(coefficients, rows: Sequence[str], tasks: Sequence[str], *, title: str = "",
                        model_keys: Sequence[str] | None = None):
    """Heatmap of the learned coefficients: one row per tensor / block, one column per task (bars for (T,)).
    With `model_keys` (the model's state-dict keys, in its order) the rows follow the model's order; else
    they keep the inputs' (a folder pool's safetensors files list keys alphabetically)."""
    from matplotlib.figure import Figure

    c = coefficients.detach().cpu().float().reshape(-1, len(tasks)).numpy()
    if c.shape[0] == 1:
        fig = Figure(figsize=(max(4.0, 0.7 * len(tasks) + 2), 3.4))
        ax = fig.subplots()
        ax.bar(range(len(tasks)), c[0], color="tab:blue")
        ax.set_xticks(range(len(tasks)), [_short(t, 14) for t in tasks], rotation=30, ha="right")
        ax.set_ylabel("λ")
    else:
        order = model_order(rows, model_keys) if model_keys is not None else None
        if order is not None:
            c, rows = c[order], [rows[i] for i in order]
        fig = Figure(figsize=(max(4.5, 0.55 * len(tasks) + 3.5), min(40.0, 1.8 + 0.16 * c.shape[0])))
        ax = fig.subplots()
        im = ax.imshow(c, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.05, label="coefficient")
        ax.set_xticks(range(len(tasks)), [_short(t, 14) for t in tasks], rotation=30, ha="right")
        step = max(1, c.shape[0] // 60)  # a label per row up to ~60 rows
        ticks = list(range(0, c.shape[0], step))
        ax.set_yticks(ticks, [_short(rows[i]) for i in ticks], fontsize=6 if c.shape[0] > 20 else 8)
        ax.set_ylabel("tensor / block, " + ("in the model's order" if order is not None else "in the inputs' key order"))
    # centred on the figure, not on the axes the row labels push right: a long run name is not cut off
    fig.suptitle(_fitted(title or "learned merging coefficients", fig.get_figwidth(), 10), fontsize=10)
    return fig


def plot_coefficients(coefficients, rows: Sequence[str], tasks: Sequence[str], path, *, title: str = "",
                      model_keys: Sequence[str] | None = None) -> Path:
    return _save(coefficients_figure(coefficients, rows, tasks, title=title, model_keys=model_keys), path)


def learning_curves_figure(history: Sequence[dict[str, Any]], *, title: str = "", metric: str = "val_normalized",
                           objective: str = "entropy"):
    """Objective per step (sum and per task) and, where recorded, the validation metric per step."""
    from matplotlib.figure import Figure

    evals = [h for h in history if metric in h]
    fig = Figure(figsize=(9.0 if evals else 5.5, 3.8))
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
        axes[1].set_ylabel(VAL_LABEL if metric == "val_normalized" else metric, fontsize=8)
    fig.suptitle(_fitted(title or "learned merging", fig.get_figwidth(), 10), fontsize=10)
    return fig


def plot_learning_curves(history: Sequence[dict[str, Any]], path, *, title: str = "",
                         metric: str = "val_normalized", objective: str = "entropy") -> Path:
    return _save(learning_curves_figure(history, title=title, metric=metric, objective=objective), path)
