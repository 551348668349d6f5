"""``mtl-merge merge=tall_masks``: TALL masks with λ_t picked per task on validation.

The run folder holds the compressed TALL store (`<run>/tall_store`: θ0 + τ_MTL + one bit-packed mask
per task), and the test scores reported are those of each task's TALL model θ0 + m_t ∘ τ_MTL, rebuilt
from that store (`merging.load_task_model(store, task)`). The model folder holds θ0 + τ_MTL with every
task's head: the one multi-task model the masks apply to, which is not itself tested.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import merging
from mtl.progress_log import ProgressLog
from mtl.registry import meant

from .consensus import make_mtv_method, per_task_lams
from .engine import KeyOptions
from .job import CLI_METHODS, MergeJob, Selection, better
from .run_outputs import STORE_DIR
from .methods import SELECTS, _per_task
from .tall import TallKernel, ties_options

__all__ = ["precheck_tall", "select_tall"]

DEFAULT_GRID = [0.2, 0.3, 0.4, 0.5, 0.6]
#: `merging.tall_masks`'s options with their defaults (the key options aside)
_OPTIONS = {n: p.default for n, p in inspect.signature(merging.tall_masks).parameters.items()
            if p.kind is p.KEYWORD_ONLY or n in ("lam", "mtv")}
ACCEPTED = sorted({"lam_grid", *_OPTIONS, *KeyOptions.DEFAULTS})


def _lams_tried(hp: Mapping[str, Any]) -> list[Any]:
    if hp.get("lam") is not None:
        return [hp["lam"]]
    grid = hp.get("lam_grid")
    if grid is None:
        grid = DEFAULT_GRID
    elif isinstance(grid, (list, tuple)) and not grid:  # as the other grid methods: not the default in disguise
        raise ValueError("merge=tall_masks: merge.lam_grid is empty; give λ values, or leave it unset for the default")
    return list(grid) if isinstance(grid, (list, tuple)) else [grid]


def precheck_tall(hp: Mapping[str, Any], num_models: int | None = None, tasks: list[str] | None = None) -> None:
    """Unknown keys, `mtv`, `select`, TIES's options and every λ tried (with `num_models`, a per-task λ
    list's length too; with `tasks`, a ``{task: λ}``'s names), checked before the pool is loaded and evaluated."""
    unknown = sorted(set(hp) - set(ACCEPTED))
    if unknown:
        raise ValueError(f"merge=tall_masks: unknown hyperparameter(s) {', '.join(unknown)}{meant(unknown, ACCEPTED)}; "
                         f"accepted: {', '.join(ACCEPTED)}")
    o = {**_OPTIONS, **{k: v for k, v in hp.items() if k in _OPTIONS and v is not None}}
    try:
        if o["select"] not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {o['select']!r}")
        ties_options(o["mtv"], o["k"], o["merge_func"], o["trim"])  # a TIES setting with mtv=sum: refused now
        make_mtv_method(o["mtv"], {"k": o["k"], "merge_func": o["merge_func"], "trim": o["trim"]})
    except (ValueError, TypeError) as e:
        raise ValueError(f"merge=tall_masks: {e}") from None
    searched = hp.get("lam") is None
    for lam in _lams_tried(hp):
        try:
            TallKernel(lam)
            if isinstance(lam, Mapping) and tasks is not None and len(tasks) == num_models:
                per_task_lams("merge.lam", lam, tasks)  # {task: λ}, as a run's metrics.json records it
            if num_models is not None and isinstance(lam, (list, tuple)):
                _per_task("lam", lam, num_models)
        except ValueError as e:
            where = f", lam_grid value {lam!r}" if searched else ""
            raise ValueError(f"merge=tall_masks{where}: {e}") from None


def _best_lam(task: str, tried: list[tuple[float, float]]) -> float:
    """The λ whose TALL model scored best on the task's validation split, `tried` in grid order, by the grid
    search's rule (`job.better`: among equal scores the earlier λ; NaN never wins); a search where every
    λ scored NaN is an error."""
    if len(tried) > 1 and all(math.isnan(s) for s, _ in tried):
        raise ValueError(f"merge=tall_masks: task {task}'s TALL model scored NaN on validation for every λ tried "
                         f"{[lam for _, lam in tried]}; nothing to choose from")
    best = tried[0]
    for candidate in tried[1:]:
        if better(candidate[0], best[0]):
            best = candidate
    return best[1]


def _search(job: MergeJob, hp: Mapping[str, Any], opts: dict[str, Any]) -> tuple[list[float], list[dict[str, Any]]]:
    """λ_t per task from `lam_grid`: each λ's masks, each task's TALL model scored on its validation split."""
    pre, fts, names, ev = job.pool.pretrained, job.pool.member_paths, job.evaluator.names, job.evaluator
    per_task: dict[str, list[tuple[float, float]]] = {t: [] for t in names}
    grid: list[dict[str, Any]] = []
    lams = _lams_tried(hp)
    if len(lams) > 1:  # a fine-tune scoring 0 would make its task's every λ NaN: said before any is merged
        ev.require_references("val", f"merge=tall_masks: the λ search over {lams}")
    bar = ProgressLog("[tall_masks] λ grid", len(lams), unit="candidates", every_seconds=0, enabled=ev.progress)
    for lam in lams:
        tm = merging.tall_masks(pre, fts, lam=lam, **opts)
        scores, why = {}, {}
        for i, t in enumerate(names):
            metrics = ev.run(job.model(tm.reconstruct(i, include_task_keys=False)), t, "val")
            scores[t] = ev.normalized(t, metrics, "val")
            if (reason := ev.undefined(t, metrics, "val")) is not None:
                why[t] = f"undefined on val: {reason}"
            per_task[t].append((scores[t], lam))
        grid.append({"hparams": {"lam": lam}, "val_normalized": scores, **({"why": why} if why else {})})
        del tm
        bar.update(len(grid), f"λ={lam} val normalized " + " ".join(f"{t} {v:.4f}" for t, v in scores.items()))
    return [_best_lam(t, per_task[t]) for t in names], grid


@CLI_METHODS.register("tall_masks")
def select_tall(job: MergeJob, hp: Mapping[str, Any]) -> Selection:
    """TALL masks: λ_t picked per task on its own validation split (or `lam` as given); the store is
    written into the run folder and each task's model rebuilt from it is the one tested."""
    fts, names, ev = job.pool.member_paths, job.evaluator.names, job.evaluator
    if len(names) != len(fts):
        raise ValueError("tall_masks needs one task per fine-tuned model (its masks are per model); "
                         f"the pool's models hold the tasks {[m.tasks for m in job.pool.members]}")
    opts = {k: v for k, v in hp.items() if k not in ("lam", "lam_grid")}
    grid = None
    if hp.get("lam") is not None:
        lams = per_task_lams("merge.lam", hp["lam"], names)  # {task: λ}: an earlier run's selected.lam, as it is
    else:
        lams, grid = _search(job, hp, opts)
    store = merging.write_tall_store(job.pool.pretrained, fts, job.run_dir / STORE_DIR, lam=lams, tasks=names,
                                     overwrite=bool(job.cfg.get("overwrite")), **opts)
    with merging.open_store(store) as st:
        test = {t: ev.run(job.model(st.task_model(t, include_task_keys=False)), t, "test") for t in names}
        extra: dict[str, Any] = {
            "tested": f"each task's TALL model θ0 + m_t ∘ τ_MTL, rebuilt from {store} (merging.load_task_model); "
                      "the model folder holds θ0 + τ_MTL, which is not tested",
            "store": {"path": str(store), **st.report()},
            "mask_overlap": merging.mask_overlap(st),
        }
        merged = job.model(st.merged())
    return Selection(merged, {"lam": dict(zip(names, lams)), **opts}, grid=grid, test=test, extra=extra)
