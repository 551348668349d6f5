"""AdaMerging (Yang et al., ICLR 2024): θ = θ0 + Σ_t λ_t τ_t, λ learned by test-time entropy minimisation.

`granularity="task"`: one λ_t per task vector; `"layer"`: one λ per merged tensor and task. The same
coefficient learner serves aTLAS (one coefficient per parameter block, `atlas.py`) and the inner
problem of Concrete subspace merging (`concrete.py`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

import torch

from .layout import Layout
from .loop import Callback, Objective, check_finite, mean, optimiser_step, step_gradients, step_progress
from .problem import MergeProblem

__all__ = ["CoefficientLearner", "Trace"]


@dataclass
class Trace:
    """What happened per step: the objective (per task and summed), the seconds since learning started
    (taken before any callback of that step runs) and any callback metrics."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add(self, step: int, losses: dict[str, float], seconds: float, extra: dict[str, float] | None = None,
            phase: str = "") -> None:
        row: dict[str, Any] = {"step": step, "objective": sum(losses.values()), "per_task": losses,
                               "seconds": round(seconds, 6)}
        if phase:
            row["phase"] = phase
        if extra:
            row.update(extra)
        self.steps.append(row)


#: fields every history row has (or may have): a callback's metrics must not replace them
RESERVED = ("step", "objective", "per_task", "seconds", "phase", "mask_mean_probability")


def callback_metrics(callback: Callback, step: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The metrics a callback returns for history, checked: a mapping (or None), no reserved field."""
    got = callback(step, state)
    if got is None:
        return {}
    if not isinstance(got, Mapping):
        raise TypeError(f"callback returned {type(got).__name__} at step {step}; it returns a mapping of metrics "
                        "(or None)")
    clash = sorted(k for k in got if k in RESERVED)
    if clash:
        raise ValueError(f"callback metrics {clash} would replace the history's own fields; name them otherwise")
    return dict(got)


class CoefficientLearner:
    """Adam on a (rows, T) coefficient matrix; rows not in `learn_rows` and columns in `frozen_cols` stay put."""

    def __init__(self, problem: MergeProblem, layout: Layout, init: float = 0.3, lr: float = 1e-3,
                 clamp: bool = False, learn_rows: list[int] | None = None, frozen_cols: list[int] | None = None,
                 lr_name: str = "lr"):
        if not 0 < lr < float("inf"):
            raise ValueError(f"{lr_name} must be positive and finite, got {lr}")
        if clamp and not 0 <= init <= 1:  # entries not learned would stay outside the range the others are held to
            raise ValueError(f"init must be in [0, 1] with clamp=true, got {init}")
        self.problem, self.layout, self.clamp, self.init = problem, layout, bool(clamp), float(init)
        self.coef = torch.full((layout.rows, problem.T), float(init), device=problem.device, dtype=problem.coef_dtype,
                               requires_grad=True)
        keep = torch.zeros(layout.rows, problem.T, dtype=torch.bool, device=problem.device)
        keep[learn_rows if learn_rows is not None else slice(None)] = True
        if frozen_cols:
            keep[:, frozen_cols] = False
        self.keep = keep
        self.opt = torch.optim.Adam([self.coef], lr=lr)
        self.lr_name = lr_name  # the hyperparameter an error names (lr, coef_lr, inner_lr)

    def reset(self, lr: float | None = None, lr_name: str = "lr") -> None:
        """Every coefficient back to `init`; with `lr`, a fresh Adam at that rate (else its state carries on)."""
        with torch.no_grad():
            self.coef.fill_(self.init)
        if lr is not None:
            self.opt, self.lr_name = torch.optim.Adam([self.coef], lr=lr), lr_name

    def initial(self) -> torch.Tensor:
        """The coefficients `reset` sets: every entry at `init` (detached)."""
        return torch.full_like(self.coef.detach(), self.init)

    def merged(self, mask: dict[str, torch.Tensor] | None = None, detach: bool = False) -> dict[str, torch.Tensor]:
        coef = self.coef.detach() if detach else self.coef
        return self.problem.merged(coef, self.layout.group_of, mask)

    def apply_step(self, step: int) -> None:
        if self.coef.grad is not None:
            self.coef.grad.mul_(self.keep)
        optimiser_step(self.opt, self.lr_name)
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if self.clamp:  # learned entries only: the others stay exactly at init
                self.coef.copy_(torch.where(self.keep, self.coef.clamp(0.0, 1.0), self.coef))
        check_finite(self.coef, self.layout.groups, self.problem.vector_names, step)

    def run(self, objective: Objective, frozen: dict[str, torch.Tensor], steps: int, trace: Trace,
            label: str, progress: bool = True, callback: Callback | None = None, callback_every: int = 0,
            mask: dict[str, torch.Tensor] | None = None, phase: str = "") -> None:
        bar = step_progress(label, steps, progress)
        for step in range(1, steps + 1):
            losses = step_gradients(self.problem, self.merged(mask), objective, frozen, step)
            self.apply_step(step)
            seconds, extra = trace.elapsed(), None
            if callback is not None and callback_every and (step % callback_every == 0 or step == steps):
                with torch.no_grad():
                    extra = callback_metrics(callback, step, self.problem.state(self.merged(mask, detach=True)))
            trace.add(step, losses, seconds, extra, phase)
            bar.update(step, f"objective {mean(losses) * len(losses):.4f}")

    def values(self) -> torch.Tensor:
        """(T,) for task granularity, else (rows, T); detached, on the CPU."""
        c = self.coef.detach().cpu().clone()
        return c[0] if self.layout.granularity == "task" else c
