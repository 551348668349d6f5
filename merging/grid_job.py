"""The grid-searched ``mtl-merge`` methods (average, task arithmetic, TIES, DARE, Consensus) and θ0 itself:
each λ of ``merge.lam_grid`` is merged, scored on validation, and the best kept; plus the hyperparameter checks
run before any model is loaded (`precheck`)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import merging
from mtl.progress_log import ProgressLog

from .consensus import per_task_lams
from .engine import KeyOptions
from .job import CLI_METHODS, MergeJob, Selection, better, resolved_hparams
from .methods import unknown_hparams


def grid_search(job: MergeJob, method: str, hp: Mapping[str, Any]) -> Selection:
    """`lam` set: merge once with it (a value, or one per fine-tuned model). Otherwise each value of
    `lam_grid` is tried and the best mean normalized validation score wins; only the best model so far
    is kept in memory."""
    candidates = grid_candidates(hp)
    if len(candidates) > 1:  # a fine-tune scoring 0 would make every candidate NaN: said before any is merged
        job.evaluator.require_references("val", f"merge={method}: the λ search over "
                                                f"{[kw.get('lam') for kw in candidates]}")
    grid, best, best_model = [], None, None
    bar = ProgressLog(f"[{method}] λ grid", len(candidates), unit="candidates", every_seconds=0,
                      enabled=job.evaluator.progress and len(candidates) > 1)
    for i, kw in enumerate(candidates):
        model = job.model(job.merge(method, **kw))
        val, why = job.val_score(model)
        grid.append({"hparams": kw, "val_normalized": val, **({"why": why} if why else {})})
        if best is None or better(val, best["val_normalized"]):
            best, best_model = grid[-1], model
        del model
        bar.update(i + 1, f"λ={kw.get('lam', 'default')} val normalized {val:.4f}")
    if len(grid) > 1 and math.isnan(best["val_normalized"]):
        raise ValueError(f"merge={method}: every λ candidate scored NaN on validation "
                         f"{[g['hparams'].get('lam') for g in grid]}; nothing to choose from")
    # every hyperparameter the chosen merge used, defaults included (trim, tie_rule, ...), as eval=none records it
    return Selection(best_model, resolved_hparams(method, best["hparams"]), grid=grid)


def grid_candidates(hp: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The hyperparameter sets a grid search tries: `lam` as given, else one per `lam_grid` value."""
    base = {k: v for k, v in hp.items() if k != "lam_grid" and not (k == "lam" and v is None)}
    grid_values = hp.get("lam_grid")
    if isinstance(grid_values, (list, tuple)) and not grid_values:
        raise ValueError("merge.lam_grid is empty: give at least one λ, or drop it for the method's default")
    if hp.get("lam") is None and grid_values:
        return [{**base, "lam": lam} for lam in (grid_values if isinstance(grid_values, list) else [grid_values])]
    return [base]


def precheck(name: str, hp: Mapping[str, Any], num_models: int | None = None, tasks: list[str] | None = None,
             merged_keys: list[str] | None = None, task_kinds: Mapping[str, str | None] | None = None) -> None:
    """The hyperparameters of a grid-searched state-dict method (or tall_masks, or a learned method), checked before any
    model is loaded or evaluated (a bad `k` or λ would otherwise surface after the whole pool's individual evaluation).
    With `num_models` (the pool's size, once known), `tasks` (its task names) and `merged_keys` (the tensors the
    merge combines), also what depends on them: consensus' k, a per-task λ list or ``{task: λ}``, aTLAS's blocks;
    with `task_kinds` (``{task: kind}``), that a learned method's entropy objective has a task to read."""
    if name == "tall_masks":
        from .tall_job import precheck_tall

        return precheck_tall(hp, num_models, tasks)
    if name in merging.LEARNED_METHODS:
        from .learned.cli import precheck_learned

        return precheck_learned(name, hp, merged_keys, task_kinds)
    if name == "pretrained":
        return precheck_pretrained(hp)
    if name not in GRID_METHODS:
        return
    searched = hp.get("lam") is None and bool(hp.get("lam_grid"))
    for kw in grid_candidates(hp):
        _, method_hp = KeyOptions.split(dict(kw))
        try:
            method = merging.create_method(name, **method_hp)
            if num_models is not None:
                method.bind(num_models)
                tall_lam = method.hp.get("tall_lam") if name == "consensus" else None
                if isinstance(tall_lam, Mapping) and tasks is not None and len(tasks) == num_models:
                    per_task_lams("tall_lam", tall_lam, tasks)  # {task: λ}: the names, before the pool is evaluated
        except (ValueError, merging.MergeInputError) as e:
            about_lam = str(e).startswith("lam ")  # not tall_lam's errors: they name their own key
            where = f"merge={name}" + (f", lam_grid value {kw['lam']}" if searched and about_lam else "")
            raise ValueError(f"{where}: {e}") from None


GRID_METHODS = ("average", "task_arithmetic", "ties", "dare", "consensus")


def _register_grid(name: str, method: str | None = None) -> None:
    CLI_METHODS.register(name)(lambda job, hp: grid_search(job, method or name, hp))


for _name in GRID_METHODS[:-1]:  # consensus adds its mask-overlap summary (below)
    _register_grid(_name)


#: what `merge=pretrained` takes: the key options that shape θ0 with the heads (the BN rule: θ0's or the fine-tuned
#: models' averaged statistics); a key filter (include/exclude) or a λ would leave θ0 not θ0
PRETRAINED_ACCEPTED = tuple(k for k in KeyOptions.DEFAULTS if k not in ("include", "exclude"))


def precheck_pretrained(hp: Mapping[str, Any]) -> None:
    """`merge=pretrained`'s hyperparameters: anything but `PRETRAINED_ACCEPTED` is refused, as the other methods refuse
    theirs (it was dropped in silence, and the run recorded λ = 0)."""
    unknown = sorted(set(hp) - set(PRETRAINED_ACCEPTED))
    if unknown:
        raise TypeError(unknown_hparams("pretrained", "paper", unknown, PRETRAINED_ACCEPTED))


def pretrained_hparams(hp: Mapping[str, Any]) -> dict[str, Any]:
    """The task-arithmetic hyperparameters of `merge=pretrained`: λ = 0 with the options it was given."""
    precheck_pretrained(hp)
    return {**hp, "lam": 0.0}


@CLI_METHODS.register("pretrained")
def select_pretrained(job: MergeJob, hp: Mapping[str, Any]) -> Selection:
    """θ0 with each task's fine-tuned head (task arithmetic with λ = 0): the floor every method must beat."""
    return grid_search(job, "task_arithmetic", pretrained_hparams(hp))


def _tall_options(hp: Mapping[str, Any]) -> dict[str, Any]:
    """tall_masks' τ_MTL and key options (which tensors are merged) for a consensus run, so its overlap
    plot shows the masks it used."""
    keys = {k: hp[k] for k in KeyOptions.DEFAULTS if k in hp}
    if hp.get("base") == "ties":
        return {"mtv": "ties", "k": hp.get("ties_k", 20), "merge_func": hp.get("merge_func", "mean"),
                "trim": hp.get("trim", "global"), **keys}
    return {"mtv": "sum", **keys}


@CLI_METHODS.register("consensus")
def select_consensus(job: MergeJob, hp: Mapping[str, Any]) -> Selection:
    sel = grid_search(job, "consensus", hp)
    tall = merging.tall_masks(job.pool.pretrained, job.pool.member_paths, lam=sel.hparams.get("tall_lam", 0.4),
                              **_tall_options(sel.hparams))
    sel.extra["mask_overlap"] = merging.mask_overlap(tall)
    return sel
