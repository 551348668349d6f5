"""TALL masks (Wang et al., ICML 2024): per-task masks over one merged multi-task vector.

τ_MTL is Σ_t τ_t (mtv="sum") or the TIES vector (mtv="ties", λ=1); task t's mask is
m_t = |τ_t| > λ_t·|τ_MTL − τ_t| (the formula compares |τ_t|, not |θ0 − τ_t|; strict, so a weight no task
changed is in no mask); task t's model is θ0 + m_t ∘ τ_MTL. λ_t is picked per task on validation in
about [0.2, 0.6]; λ_t = 0 keeps every entry task t changed (τ_t ≠ 0). How many tasks use each weight tells selfish (1 task) and catastrophic (0 tasks) weights apart,
which Consensus merging drops.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mtl.registry import check_bool

from .engine import Context, KeyOptions, check_merged_variance, open_context, to_output_dtype, torch_threads
from .keys import is_bn_variance
from .consensus import check_tall_lam, make_mtv_method, per_task_lams, tall_mask_tensors, usage_count
from .methods import SELECTS

__all__ = ["TallMasks", "tall_masks", "TallKernel", "mask_overlap", "reconstruct_tensor"]


def reconstruct_tensor(pre: torch.Tensor, tau: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """θ0 + m ∘ τ_MTL (the one formula both the in-memory object and the store use, so they agree exactly)."""
    return to_output_dtype((tau * mask).add_(pre), dtype)


def ties_options(mtv: str, k: Any, merge_func: Any, trim: Any) -> dict[str, Any] | None:
    """TIES settings of the multi-task vector: used with ``mtv="ties"``, refused (when not at their
    defaults) otherwise, so a setting that would do nothing is never accepted silently."""
    if mtv == "ties":
        return {"k": k, "merge_func": merge_func, "trim": trim}
    given = [n for n, v, d in (("k", k, 20), ("merge_func", merge_func, "mean"), ("trim", trim, "global")) if v != d]
    if given:
        verbs = ("configures", "applies") if len(given) == 1 else ("configure", "apply")
        raise ValueError(f"{', '.join(given)} {verbs[0]} the TIES multi-task vector and {verbs[1]} only with mtv='ties' "
                         f"(got mtv={mtv!r})")
    return None


class TallKernel:
    """Per-tensor TALL computation shared by `tall_masks` and the streaming store writer."""

    def __init__(self, lam: float | Sequence[float] | Mapping[str, float] = 0.4, mtv: str = "sum",
                 ties: dict[str, Any] | None = None):
        check_tall_lam("lam", lam)
        self.lam_arg, self.mtv = lam, mtv
        self.base = make_mtv_method(mtv, dict(ties or {}))

    def prepare(self, ctx: Context, select: str, tasks: Sequence[str]) -> None:
        """`tasks`: the models' names, in order (what a ``{task: λ}`` is matched against)."""
        self.base.prepare(ctx, select)
        self.lams = per_task_lams("lam", self.lam_arg, tasks)

    def tensor(self, ctx: Context, key: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(θ0, τ_MTL, [m_t]) for one key, θ0 and τ_MTL in compute dtype. θ0 may be the input's own
        tensor and τ_MTL a context buffer (copy them to keep them); the masks are new tensors."""
        pre = ctx.pre(key)
        taus = [ctx.tv(key, t, pre, out=ctx.buffer(f"tau{t}", pre.shape, pre.dtype)) for t in range(ctx.T)]
        mtv = self.base.merged_vector(ctx, key, taus, inplace=False)
        return pre, mtv, tall_mask_tensors(taus, mtv, self.lams)


class TallMasks:
    """Result of `tall_masks`: θ0, τ_MTL and one mask per task, all `{name: tensor}` dicts.

    `masks[t]` holds a separate bool tensor per name (never shared between tasks); `merged` is
    θ0 + τ_MTL; `reconstruct(t)` is θ0 + m_t ∘ τ_MTL (t an index or a name from `tasks`) with model t's own
    keys, the keys `load_task_model` returns. Keys that are copied rather than merged (integer buffers, BN
    statistics under the BN rule) appear unchanged in `merged` and every reconstruction. `task_tensors[t]`
    holds model t's own keys (its head), which `save` stores and `reconstruct(t)` includes.
    """

    def __init__(self, pretrained, tau, masks, kept, dtypes, lam, mtv, task_keys=None, task_tensors=None, bn="pretrained"):
        self.pretrained: dict[str, torch.Tensor] = pretrained
        self.tau: dict[str, torch.Tensor] = tau
        self.masks: list[dict[str, torch.Tensor]] = masks
        self.kept: dict[str, torch.Tensor] = kept
        self.dtypes: dict[str, torch.dtype] = dtypes
        self.lam: list[float] = lam
        self.mtv = mtv
        self.bn = bn  # the BN rule the kept statistics follow (recorded by save)
        self.task_keys: list[list[str]] = task_keys or [[] for _ in masks]
        self.task_tensors: list[dict[str, torch.Tensor]] = task_tensors or [{} for _ in masks]
        self.tasks: list[str] | None = None  # names of the fine-tuned models (set by tall_masks), used by save
        self.inputs: list[Path] = []  # the inputs given by path (set by tall_masks): save never writes over them
        self.order = list(dtypes)
        self.merged = {
            k: (self.kept[k].clone() if k in self.kept else to_output_dtype(torch.add(self.pretrained[k], self.tau[k]), self.dtypes[k]))
            for k in self.order
        }

    @property
    def num_tasks(self) -> int:
        return len(self.masks)

    def __repr__(self) -> str:
        return (f"TallMasks(tasks {self.tasks or self.num_tasks}, {len(self.order)} tensors, lam={self.lam}, "
                f"mtv={self.mtv!r}, bn={self.bn!r})")

    def _task_index(self, t: int | str) -> int:
        if isinstance(t, str):
            if t not in (self.tasks or []):
                raise KeyError(f"unknown task {t!r}: this result's tasks are {self.tasks}")
            return self.tasks.index(t)
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.num_tasks:
            raise IndexError(f"task index {t!r} out of range: this result has {self.num_tasks} tasks (0..{self.num_tasks - 1})")
        return t

    def reconstruct(self, t: int | str, include_task_keys: bool = True) -> dict[str, torch.Tensor]:
        """Task t's model: θ0 + m_t ∘ τ_MTL over the merged keys, the kept ones as they are and (with
        `include_task_keys`, as `load_task_model` does) model t's own keys (its head), copied."""
        check_bool("include_task_keys", include_task_keys)
        i = self._task_index(t)
        m = self.masks[i]
        out = {
            k: (self.kept[k].clone() if k in self.kept else reconstruct_tensor(self.pretrained[k], self.tau[k], m[k], self.dtypes[k]))
            for k in self.order
        }
        if include_task_keys:
            out.update((k, v.clone()) for k, v in self.task_tensors[i].items())
        return out

    def usage(self) -> dict[str, torch.Tensor]:
        """Number of tasks whose mask keeps each entry."""
        return {k: usage_count([m[k] for m in self.masks]) for k in self.tau}

    def consensus(self, k: int = 2) -> dict[str, torch.Tensor]:
        """Consensus mask: entries kept by at least k tasks (1 <= k <= the number of tasks)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_tasks:
            raise ValueError(f"consensus k must be an int in [1, {self.num_tasks}] (the number of tasks), got {k!r}")
        return {name: c >= k for name, c in self.usage().items()}

    def overlap(self) -> dict[str, Any]:
        return mask_overlap(self)

    def save(self, out, tasks: Sequence[str] | None = None, overwrite: bool = False):
        """Write the compressed store (θ0 + τ_MTL + bit-packed masks); see `merging.storage`. An `out` that
        is, lies inside or holds an input given by path is refused, as by `write_tall_store`."""
        from .storage import save_tall_masks

        return save_tall_masks(self, out, tasks=tasks or self.tasks, overwrite=overwrite)


def tall_masks(
    pretrained,
    finetuned,
    lam: float | Sequence[float] | Mapping[str, float] = 0.4,
    mtv: str = "sum",
    *,
    k: float = 20,
    merge_func: str = "mean",
    trim: str = "global",
    select: str = "kthvalue",
    threads: int | None = None,
    **key_options: Any,
) -> TallMasks:
    """TALL masks for each fine-tuned model. `lam`: one λ for all tasks, one per task, or ``{task: λ}``
    over the names `.tasks` gets (`merging.sources.default_task_names`).
    `mtv`: "sum" or "ties" (then `k`, `merge_func`, `trim` configure TIES, with λ_TIES = 1)."""
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    opts, rest = KeyOptions.split(dict(key_options))
    if rest:
        raise TypeError(f"tall_masks: unknown option(s) {', '.join(sorted(rest))}")
    kernel = TallKernel(lam, mtv, ties_options(mtv, k, merge_func, trim))
    if not isinstance(finetuned, (str, os.PathLike, Mapping)):
        finetuned = list(finetuned)
    ctx = open_context(pretrained, finetuned, opts, 1, "tall_masks")
    try:
        with torch_threads(threads):
            result = _tall_in_memory(ctx, kernel, select, mtv, opts["bn"])
    finally:
        ctx.close()
    from .sources import input_paths

    result.inputs = input_paths(pretrained, finetuned)
    return result


def _tall_in_memory(ctx: Context, kernel: TallKernel, select: str, mtv: str, bn: str) -> TallMasks:
    tasks = ctx.task_names()
    kernel.prepare(ctx, select, tasks)
    plan = ctx.plan
    pre, tau, kept = {}, {}, {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in range(ctx.T)]
    for key in ctx.iter_keys(plan.order):
        if plan.kind[key] != "merge":
            kept[key] = _copied(ctx, key)
            continue
        p, mtv_t, ms = kernel.tensor(ctx, key)
        check_merged(ctx, key, p, mtv_t, ms, tasks)
        # θ0 in its own dtype is the input's tensor (or a file view): keep a copy, never an alias.
        pre[key] = p.clone() if plan.compute[key] == plan.infos[key].dtype else p
        tau[key] = mtv_t.clone()
        for t, m in enumerate(ms):
            masks[t][key] = m
    dtypes = {k_: plan.infos[k_].dtype for k_ in plan.order}
    heads = [{k_: ctx.sources[t + 1].get(k_).clone() for k_ in ks} for t, ks in enumerate(plan.task_specific)]
    result = TallMasks(pre, tau, masks, kept, dtypes, kernel.lams, mtv, plan.task_specific, heads, bn)
    result.tasks = tasks
    return result


def check_merged(ctx: Context, key: str, pre: torch.Tensor, tau: torch.Tensor, masks: Sequence[torch.Tensor],
                 tasks: Sequence[str]) -> None:
    """θ0 + τ_MTL in the model's dtype must be finite (an overflow is an error, not a silent Inf): every
    task model θ0 + m_t ∘ τ_MTL takes each entry from it or from θ0. A BN variance (merged under
    bn="merge") must also stay >= 0 in each of them (`check_tall_variance`)."""
    dtype = ctx.plan.infos[key].dtype
    if ctx.check_finite:
        ctx.check_output(key, to_output_dtype(torch.add(pre, tau), dtype))
    if is_bn_variance(key):
        check_tall_variance(key, pre, tau, masks, tasks, dtype)


def check_tall_variance(key: str, pre: torch.Tensor, tau: torch.Tensor, masks: Sequence[torch.Tensor],
                        tasks: Sequence[str], dtype: torch.dtype) -> None:
    """A merged BN variance below zero turns BatchNorm's outputs into NaN: refused in every task model
    θ0 + m_t ∘ τ_MTL and in θ0 + τ_MTL (the multi-task model `mtl-merge` writes), as `merging.merge` refuses it."""
    for name, m in zip(tasks, masks):
        check_merged_variance(key, reconstruct_tensor(pre, tau, m, dtype), f"of the TALL model of task {name!r}")
    check_merged_variance(key, to_output_dtype(torch.add(pre, tau), dtype), "of the multi-task model θ0 + τ_MTL")


def _copied(ctx: Context, key: str) -> torch.Tensor:
    """A non-merged key's output (copied from θ0, or the fine-tuned average for BN under bn="average")."""
    if ctx.plan.kind[key] == "copy":
        out = ctx.raw_pre(key).clone()
    else:
        out = to_output_dtype(ctx.average(key), ctx.plan.infos[key].dtype)
    ctx.check_output(key, out)  # as `merging.engine.produce` checks every output
    return out


def mask_overlap(masks) -> dict[str, Any]:
    """How many tasks use each weight, over all masked entries.

    `masks`: a `TallMasks`, a TALL store (path or `TallStore`), or a list of `{name: bool tensor}`.
    Returns counts and fractions indexed by the number of tasks (0..T), plus `selfish` (used by exactly
    one task) and `catastrophic` (used by none) fractions.
    """
    from .store_reader import opened_store

    if isinstance(masks, TallMasks):
        T, names, get = masks.num_tasks, list(masks.tau), lambda n: [m[n] for m in masks.masks]
    elif isinstance(masks, (list, tuple)):
        if not masks:
            raise ValueError("mask_overlap needs at least one mask")
        T, names, get = len(masks), list(masks[0]), lambda n: [m[n] for m in masks]
    else:
        with opened_store(masks) as store:
            return _overlap(store.num_tasks, store.merged_keys, lambda n: [store.mask(t, n) for t in range(store.num_tasks)])
    return _overlap(T, names, get)


def _overlap(T: int, names, get) -> dict[str, Any]:
    counts = torch.zeros(T + 1, dtype=torch.int64)
    for n in names:
        c = usage_count(get(n))
        counts += torch.bincount(c.reshape(-1).long(), minlength=T + 1)
    total = int(counts.sum())
    fr = (counts.double() / max(total, 1)).tolist()
    return {
        "tasks": T,
        "params": total,
        "counts": counts.tolist(),
        "fractions": fr,
        "catastrophic": fr[0],
        "selfish": fr[1] if T >= 1 else 0.0,
        "universal": fr[T],
    }
