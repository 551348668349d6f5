"""Δm%: the multi-task performance relative to single-task baselines, and the baselines file.

    Δm = (100 / T) Σ_t (−1)^{l_t} (M_t − M_b,t) / M_b,t,   l_t = 1 for lower-is-better metrics

Variants (always report which one was used):
  * "primary": M_t is the task's primary metric.
  * "all": for each task, the signed relative change is averaged over all its metrics first, then
    over tasks, so a task with five metrics weighs as much as a task with one.
  * "flat": the signed relative change averaged over all K metrics of all tasks at once,
    Δm = (100 / K) Σ_t Σ_k (−1)^{l_tk} (M_tk − M_b,tk) / M_b,tk — how Nash-MTL (Navon et al., 2022) and
    FAMO (Liu et al., 2023) report NYUv2, where normals' five metrics outweigh depth's two.
Positive Δm means the multi-task model is better than the baselines.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mtl.folder_checks import JSON_ERRORS
from mtl.io import user_path, write_json
from mtl.tasks.base import Task

VARIANTS = ("primary", "all", "flat")


class Baselines(dict):
    """{task: {metric: value}} that remembers where it came from, for error messages: a baselines file
    (`source`), or another reference named by `label` (e.g. "the unpruned model's metrics")."""

    source: str | None = None
    label: str | None = None


def _task_map(tasks: Sequence[Task] | Mapping[str, Task]) -> dict[str, Task]:
    if isinstance(tasks, Mapping):
        return dict(tasks)
    return {t.name: t for t in tasks}


def _metric_names(task: Task, variant: str) -> list[str]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown Δm variant {variant!r}; valid names: {', '.join(VARIANTS)}")
    return [task.primary] if variant == "primary" else list(task.directions)  # "all" and "flat": every metric


def _from(baselines: Mapping) -> str:
    source, label = getattr(baselines, "source", None), getattr(baselines, "label", None)
    return f" in baselines file {source}" if source else f" in {label}" if label else " in the baselines"


def _lookup(values: Mapping, task: str, metric: str, where: str) -> float:
    if task not in values:
        raise ValueError(f"task {task!r} (metric {metric!r}) is missing{where}")
    if metric not in values[task]:
        raise ValueError(f"metric {metric!r} of task {task!r} is missing{where}")
    return float(values[task][metric])


def _signed_changes(metrics: Mapping[str, Mapping[str, float]], baselines: Mapping[str, Mapping[str, float]],
                    tasks: Sequence[Task] | Mapping[str, Task], variant: str) -> dict[str, list[float]]:
    """{task: [(−1)^l (M − M_b) / M_b for each metric the variant uses]}."""
    task_map = _task_map(tasks)
    if not task_map:
        raise ValueError("Δm needs at least one task")
    out = {}
    for name, task in task_map.items():
        changes = []
        for metric in _metric_names(task, variant):
            base = _lookup(baselines, name, metric, _from(baselines))
            value = _lookup(metrics, name, metric, " in the metrics")
            if not base > 0 or not math.isfinite(base):  # a negative base would flip the term's sign
                raise ValueError(f"baseline of task {name!r} metric {metric!r} is {base}{_from(baselines)}; "
                                 "Δm's relative change needs a positive baseline")
            if not math.isfinite(value):  # e.g. a split with no valid pixel: Δm would be NaN, silently
                raise ValueError(f"task {name!r} metric {metric!r} is {value} in the metrics; Δm is undefined")
            sign = 1.0 if task.directions[metric] else -1.0
            changes.append(sign * (value - base) / base)
        out[name] = changes
    return out


def delta_m_per_task(metrics: Mapping[str, Mapping[str, float]], baselines: Mapping[str, Mapping[str, float]],
                     tasks: Sequence[Task] | Mapping[str, Task], variant: str = "primary") -> dict[str, float]:
    """{task: 100 · (−1)^l · relative change}, averaged over the task's metrics for "all" and "flat"
    (a task's own share; "flat" then weighs each task by its number of metrics in `delta_m`)."""
    return {name: 100.0 * sum(c) / len(c) for name, c in _signed_changes(metrics, baselines, tasks, variant).items()}


def delta_m(metrics: Mapping[str, Mapping[str, float]], baselines: Mapping[str, Mapping[str, float]],
            tasks: Sequence[Task] | Mapping[str, Task], variant: str = "primary") -> float:
    """Δm% of `metrics` ({task: {metric: value}}) against `baselines` (same layout) over `tasks`."""
    changes = _signed_changes(metrics, baselines, tasks, variant)
    if variant == "flat":
        flat = [c for per_task in changes.values() for c in per_task]
        return 100.0 * sum(flat) / len(flat)
    return sum(100.0 * sum(c) / len(c) for c in changes.values()) / len(changes)


def _validate(data: Any, where: str) -> Baselines:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object {{task: {{metric: value}}}}")
    out = Baselines()
    for task, values in data.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}: task {task!r} must map metric names to numbers")
        out[task] = {}
        for metric, v in values.items():
            if hasattr(v, "item"):  # a tensor or numpy scalar from a metric's compute()
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{where}: task {task!r} metric {metric!r} must be a finite number, got {v!r}")
            out[task][metric] = float(v)
    return out


def load_baselines(path: str | os.PathLike, tasks: Sequence[Task] | Mapping[str, Task] | None = None,
                   variant: str = "primary") -> Baselines:
    """Read and validate a baselines JSON {task: {metric: value}}.

    With `tasks`, also check now that every metric `variant` needs is present (errors name the file).
    """
    path = user_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read baselines file {path}: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except JSON_ERRORS as e:
        raise ValueError(f"baselines file {path} is not valid JSON: {e}") from e
    baselines = _validate(data, f"baselines file {path}")
    baselines.source = str(path)
    for name, task in _task_map(tasks or {}).items():
        for metric in _metric_names(task, variant):
            base = _lookup(baselines, name, metric, _from(baselines))
            if not base > 0:  # before training, not after it; a negative base would flip its term's sign
                other = ("" if metric == getattr(task, "primary", None) else  # the primary metric is in every variant
                         f", or use a Δm variant without {metric!r} (baselines.variant=primary uses only the primary metric)")
                raise ValueError(f"baseline of task {name!r} metric {metric!r} is {base:g}{_from(baselines)}; "
                                 f"Δm's relative change needs a positive baseline: retrain that baseline (longer, or on "
                                 f"more data){other}")
    return baselines


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Serialises read-merge-write when several single-task runs finish at once (POSIX only).
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_baselines(path: str | os.PathLike, metrics: Mapping[str, Mapping[str, float]],
                   target: str | None = None) -> Baselines:
    """Add `metrics` ({task: {metric: value}}) to the baselines file and return its new content.

    Tasks already in the file and not in `metrics` are kept; a task present in both is replaced as a
    whole (its metrics come from one run). The file is written atomically (`mtl.io.write_json`).
    `target` names the file in errors (default "baselines file <path>"; the CLI passes its config key).
    """
    path = user_path(path)
    new = _validate(metrics, f"baselines to save to {target or f'baselines file {path}'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        merged = Baselines(load_baselines(path)) if path.exists() else Baselines()
        merged.update(new)
        write_json(path, {k: merged[k] for k in sorted(merged)})
    merged.source = str(path)
    return merged


def check_run_baselines(settings: Mapping[str, Any], tasks: Sequence[Task]) -> tuple[Baselines | None, str]:
    """A training run's ``baselines`` settings judged before its run folder is made (settings alone, no training):
    ``save_to`` (a single-task run's; a JSON file path, an existing one a baselines file: results are merged into
    it), ``variant``, and ``path`` read and checked against ``tasks``' metrics. Returns (the baselines of ``path``
    or None, the variant)."""
    if settings.get("save_to"):  # after training, a bad target would fail the finished run
        if len(tasks) > 1:  # its numbers would replace real single-task baselines, silently
            raise ValueError(f"baselines.save_to: baselines are single-task runs, this run trains {len(tasks)} tasks "
                             f"({', '.join(t.name for t in tasks)}); save them from a -m multirun over task=... "
                             "(one task per job), as `make demo` does")
        target = Path(settings["save_to"])
        if target.is_dir():
            raise IsADirectoryError(f"baselines.save_to={target} is a folder; give a JSON file path")
        above = next(d for d in target.parents if d.exists())
        if not above.is_dir():  # its folder could never be made
            raise NotADirectoryError(f"baselines.save_to={target}: {above} is a file, not a folder; give a JSON file "
                                     "path in a folder")
        if target.exists():
            load_baselines(target)
    variant = settings.get("variant", "primary")
    if variant not in VARIANTS:  # checked with or without baselines.path (a sweep may add the path later)
        raise ValueError(f"baselines.variant={variant!r} is not a Δm variant; valid names: {', '.join(VARIANTS)}")
    path = settings.get("path")
    return (load_baselines(path, tasks=tasks, variant=variant) if path else None), variant
