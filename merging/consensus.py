"""TALL masks per tensor and Consensus merging (Wang et al., ICML 2024, "Localizing Task Information
for Improved Model Merging and Compression").

m_t = |τ_t| > λ_t·|τ_MTL − τ_t| on the base method's τ_MTL (strict, as the authors' code and FusionBench:
a weight no task changed is used by none); Consensus keeps the entries used by at
least k tasks: θ = θ0 + λ (m_cons ∘ τ_MTL). The TALL store and `tall_masks` (tall.py) share these.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtl.io import as_plain

from .engine import Context
from .methods import METHODS, MergeMethod, TaskArithmetic, Ties, _check_lam, _per_task

__all__ = ["Consensus", "check_tall_lam", "per_task_lams", "tall_mask_tensors", "usage_count", "make_mtv_method"]


def check_tall_lam(name: str, lam: Any) -> None:
    """λ of the TALL masks: a finite number ≥ 0, one per task, or ``{task: λ}`` (a negative λ would keep
    every entry, even those no task changed, whatever the other tasks do)."""
    lam = as_plain(lam)
    if isinstance(lam, Mapping):
        bad = [k for k in lam if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{name} maps task names to λ; {bad[0]!r} is not a task name")
        values: Any = as_plain(list(lam.values()))
    else:
        values = lam
    _check_lam(name, values, allow_list=True)
    if any(v < 0 for v in (values if isinstance(values, Sequence) and not isinstance(values, str) else [values])):
        raise ValueError(f"{name} must be ≥ 0, got {lam!r}")


def per_task_lams(name: str, lam: Any, tasks: Sequence[str]) -> list[float]:
    """λ_t in the order of `tasks` from one λ, a list in that order, or ``{task: λ}`` naming each task once
    (as a `tall_masks` run records `selected.lam`)."""
    if not isinstance(lam, Mapping):
        return _per_task(name, as_plain(lam), len(tasks))
    unknown, missing = [k for k in lam if k not in tasks], [t for t in tasks if t not in lam]
    if unknown or missing:
        said = "; ".join(s for s in (unknown and f"unknown task(s) {unknown}", missing and f"no λ for {missing}") if s)
        raise ValueError(f"{name}: {said}; the fine-tuned models' tasks are {list(tasks)} (give one λ for each)")
    return [float(lam[t]) for t in tasks]


def tall_mask_tensors(taus: Sequence[torch.Tensor], mtv: torch.Tensor, lams: Sequence[float],
                      ctx: Context | None = None) -> list[torch.Tensor]:
    """m_t = |τ_t| > λ_t·|τ_MTL − τ_t| for one tensor: one bool tensor per task (context buffers when
    `ctx` is given, else new tensors)."""
    if ctx is None:
        diff, mag = torch.empty_like(mtv), torch.empty_like(mtv)
    else:
        diff, mag = ctx.buffer("diff", mtv.shape, mtv.dtype), ctx.buffer("abs", mtv.shape, mtv.dtype)
    masks = []
    for t, (tau, lam) in enumerate(zip(taus, lams)):
        torch.sub(mtv, tau, out=diff).abs_().mul_(lam)
        out = None if ctx is None else ctx.buffer(f"mask{t}", mtv.shape, torch.bool)
        masks.append(torch.gt(torch.abs(tau, out=mag), diff, out=out))
    return masks


def usage_count(masks: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """How many tasks use each entry."""
    dt = torch.uint8 if len(masks) < 256 else torch.int32
    cnt = torch.zeros(masks[0].shape, dtype=dt) if out is None else out.zero_()
    for m in masks:
        cnt.add_(m)
    return cnt


def make_mtv_method(mtv: str, ties_hp: dict[str, Any]) -> MergeMethod:
    """The method that defines τ_MTL: "sum" (Σ τ_t, i.e. task arithmetic before λ) or "ties"."""
    if mtv == "sum":
        return TaskArithmetic(lam=1.0)
    if mtv == "ties":
        return Ties(**ties_hp)
    raise ValueError(f"mtv must be 'sum' or 'ties', got {mtv!r}")


@METHODS.register("consensus")
class Consensus(MergeMethod):
    name = "consensus"
    defaults = {
        "k": 2, "tall_lam": 0.4, "base": "task_arithmetic", "lam": None,
        "ties_k": 20, "merge_func": "mean", "trim": "global",
    }

    def validate(self) -> None:
        k = self.hp["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:  # k=0 would keep every entry: plain τ_MTL
            raise ValueError(f"k (minimum number of tasks using a weight) must be an int ≥ 1, got {k!r}")
        check_tall_lam("tall_lam", self.hp["tall_lam"])
        base = self.hp["base"]
        if base == "task_arithmetic":
            unused = [n for n in ("ties_k", "merge_func", "trim") if self.hp[n] != self.defaults[n]]
            if unused:  # TIES settings would do nothing here: refuse rather than ignore them
                verb = "configures" if len(unused) == 1 else "configure"
                raise ValueError(f"consensus: {', '.join(unused)} {verb} base='ties' and do nothing with "
                                 "base='task_arithmetic'; drop them or set base=ties")
            self.base = make_mtv_method("sum", {})
            lam = 0.3 if self.hp["lam"] is None else self.hp["lam"]
        elif base == "ties":
            hp = {"k": self.hp["ties_k"], "merge_func": self.hp["merge_func"], "trim": self.hp["trim"]}
            self.base = make_mtv_method("ties", hp)
            lam = 1.0 if self.hp["lam"] is None else self.hp["lam"]
        else:
            raise ValueError(f"consensus: base must be 'task_arithmetic' or 'ties', got {base!r}")
        _check_lam("lam", lam, allow_list=False)
        self.lam = float(lam)

    def used_hparams(self) -> dict[str, Any]:
        """The settings this merge ran with: λ resolved from its default, TIES settings only with base=ties."""
        used = {**self.hp, "lam": self.lam}
        if self.hp["base"] == "task_arithmetic":
            for n in ("ties_k", "merge_func", "trim"):
                used.pop(n)
        return used

    def min_models(self) -> int:
        return max(1, self.hp["k"])

    def bind(self, T: int) -> None:
        super().bind(T)
        lam = self.hp["tall_lam"]  # a per-task list or mapping must match the pool: refused up front
        if isinstance(lam, Mapping) and len(lam) != T:
            raise ValueError(f"tall_lam names {len(lam)} tasks but there are {T} fine-tuned models")
        if not isinstance(lam, Mapping):
            _per_task("tall_lam", lam, T)

    def prepare(self, ctx: Context, select: str) -> None:
        super().prepare(ctx, select)
        self.base.prepare(ctx, select)
        lam = self.hp["tall_lam"]  # the models' names only for a {task: λ} mapping (reading them opens every folder)
        self.tall_lams = per_task_lams("tall_lam", lam, ctx.task_names() if isinstance(lam, Mapping) else
                                       [f"task{t}" for t in range(ctx.T)])

    def merge_tensor(self, ctx: Context, key: str) -> torch.Tensor:
        pre = ctx.pre(key)
        taus = self.task_vectors(ctx, key, pre)
        mtv = self.base.merged_vector(ctx, key, taus, inplace=False)
        masks = tall_mask_tensors(taus, mtv, self.tall_lams, ctx)
        cnt = usage_count(masks, out=ctx.buffer("count", pre.shape, torch.uint8 if ctx.T < 256 else torch.int32))
        return mtv.mul_(torch.ge(cnt, self.hp["k"], out=ctx.buffer("keep", pre.shape, torch.bool))).mul_(self.lam).add_(pre)
