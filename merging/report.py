"""Reporting for ``mtl-merge``: the metrics.json record, its plots and the summary table."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from mtl.io import write_json
from mtl.models.slimmable.family import SlimmableMultiTaskModel

from .evaluation import Evaluator
from .pool import score
from .run_outputs import MASK_PLOT, TASK_PLOT

__all__ = ["build_report", "write_report", "print_table"]


def build_report(method: str, ev: Evaluator, selection, test: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Everything a run records: the selection, per-task test metrics against the fine-tuned models,
    and the means (the plain mean only when every task shares its primary metric); for a slimmable model, the
    width configuration it was scored at."""
    pool, names = ev.pool, ev.names
    report: dict[str, Any] = {
        "method": method, "pretrained": str(pool.pretrained), "models": [str(p) for p in pool.member_paths],
        "selected": dict(selection.hparams),
    }
    if selection.grid is not None:
        report["grid"] = selection.grid
    report.update(selection.extra)
    report["tasks"] = {}
    for t in names:  # an undefined normalized score is null with its reason, as metrics.json stores it
        why = ev.undefined(t, test[t], "test")
        report["tasks"][t] = {"merged": test[t], "individual": ev.individual[t]["test"], "primary": ev.tasks[t].primary,
                              "normalized": None if why else ev.normalized(t, test[t], "test"),
                              **({"why": f"undefined on test: {why}"} if why else {})}
    same_metric = len({ev.tasks[t].primary for t in names}) == 1  # a mean over mixed metrics means nothing
    mean = lambda which: statistics.fmean(score(ev.tasks[t], which(t)) for t in names) if same_metric else None  # noqa: E731
    why = ev.undefined_mean(test, "test")
    report["mean"] = {
        "merged": mean(lambda t: test[t]),
        "individual": mean(lambda t: ev.individual[t]["test"]),
        "normalized": None if why else ev.normalized_mean(test, "test"),
        **({"why": why} if why else {}),
    }
    report["eval"] = ev.record()
    if isinstance(selection.model, SlimmableMultiTaskModel):  # scored at these widths only (its stored ones)
        report["widths"] = selection.model.widths
    return report


def write_report(report: dict[str, Any], run_dir: Path) -> None:
    """metrics.json, task_accuracy.png, and mask_overlap.png when the method measured mask overlap."""
    import merging

    write_json(run_dir / "metrics.json", report)
    scores = lambda which: {t: r[which][r["primary"]] for t, r in report["tasks"].items()}  # noqa: E731
    same_metric = len({r["primary"] for r in report["tasks"].values()}) == 1  # else no mean, as in metrics.json
    merging.plot_task_accuracy({"individual": scores("individual"), report["method"]: scores("merged")},
                               run_dir / TASK_PLOT, ylabel="primary metric (test)",
                               title="Per-task primary metric by method", mean=same_metric)
    if "mask_overlap" in report:
        k = report["selected"].get("k") if report["method"] == "consensus" else None  # its threshold, shown
        merging.plot_mask_overlap(report["mask_overlap"], run_dir / MASK_PLOT, k=k)


def print_table(report: dict[str, Any]) -> None:
    from mtl.progress_log import summary_console
    from rich.table import Table

    table = Table(title=f"mtl-merge: {report['method']} {report.get('selected') or ''}")
    for col in ("task", "metric", "merged", "individual", "normalized"):
        table.add_column(col)
    norm = lambda v: "undefined" if v is None else f"{v:.3f}"  # noqa: E731  (the reason is printed below)
    for t, r in report["tasks"].items():
        p = r["primary"]
        table.add_row(t, p, f"{r['merged'][p]:.4f}", f"{r['individual'][p]:.4f}", norm(r["normalized"]))
    m = report["mean"]
    fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    table.add_row("mean", "", fmt(m["merged"]), fmt(m["individual"]), norm(m["normalized"]))
    summary_console().print(table)
    if "why" in m:
        summary_console().print(f"normalized score {m['why']}")
    if "store" in report:
        summary_console().print(f"TALL store: {report['store']}")
