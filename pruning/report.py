"""What a pruning run measures beyond the plan: test metrics, Δm%, CPU latency, and its pictures."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mtl.modes import eval_mode


@torch.no_grad()
def evaluate_all(model: nn.Module, datamodule, split: str = "test", max_batches: int | None = None) -> dict[str, dict[str, float]]:
    """Every task's metrics on one split (one forward pass per batch serves all tasks), in eval mode; every
    module's own mode comes back."""
    metrics = {t: task.metrics() for t, task in model.tasks.items()}
    loader = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}[split]()
    with eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            out = model(batch["image"])
            for t, task in model.tasks.items():
                for m in metrics[t].values():
                    m.update(out[t], batch[task.target_key])
    return {t: {k: float(m.compute()) for k, m in ms.items()} for t, ms in metrics.items()}


def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3, threads: int = 1) -> float:
    """Median wall time of ``model(x)`` in ms on CPU with a fixed number of threads, in eval mode; every
    module's own mode comes back."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        times = []
        with torch.inference_mode(), eval_mode(model):
            for i in range(warmup + repeats):
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    finally:
        torch.set_num_threads(old)


def plot_kept(report: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart of kept units per layer (of the original size), PAGCP's limiting task written on each bar."""
    from matplotlib.figure import Figure

    rows = report["layers"]
    fig = Figure(figsize=(max(6.0, 0.32 * len(rows) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    xs = range(len(rows))
    ax.bar(xs, [r["size"] for r in rows], color="#dddddd", label="original")
    ax.bar(xs, [r["kept"] for r in rows], color="#3b75af", label="kept")
    tasks = sorted({r["limiting_task"] for r in rows if r.get("limiting_task")})
    colors = dict(zip(tasks, ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"] * 3))
    for x, r in zip(xs, rows):
        if r.get("limiting_task"):
            ax.plot(x, r["kept"], marker="v", color=colors[r["limiting_task"]], markersize=7, linestyle="none")
    for t, c in colors.items():
        ax.plot([], [], marker="v", color=c, linestyle="none", label=f"limited by {t}")
    ax.set_xticks(list(xs), [r["layer"].replace("backbone.body.", "").replace("decoder.", "") for r in rows],
                  rotation=75, fontsize=6)
    ax.set_ylabel("units (channels / heads)")
    ax.set_title(f"kept units per layer: {report['method']}")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_delta_m_vs_flops(points: Mapping[str, list[tuple[float, float]]], path: str | Path,
                          title: str = "Δm% vs FLOPs") -> Path:
    """``points``: {label: [(GFLOPs or FLOPs reduction, Δm%), ...]} (one line per method)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, pts in points.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(0, color="#888888", linewidth=0.8)
    ax.set_xlabel("FLOPs per sample (M)")
    ax.set_ylabel("Δm% vs the unpruned model")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    from mtl.io import atomic_path, user_path

    path = user_path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path
