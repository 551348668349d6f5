"""The optimisation step every learned merge shares, data cycling and progress.

One step: merged weights θ(c, m) are built once, every task's batch runs through the one model with
θ detached into leaf tensors (so each task's activations are freed after its backward), the leaf
gradients are summed over tasks, then pushed back through θ(c, m) to the coefficients / mask in a
single backward. Peak memory: θ0 + T task vectors + θ + ∂θ + one task's activations.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from mtl.progress_log import ProgressLog

from .objective import entropy
from .problem import MergeProblem

__all__ = ["BatchCycler", "Objective", "step_gradients", "step_progress"]


def _inputs(batch: Any, task: str) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and "image" in batch:
        return batch["image"]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"unlabeled[{task!r}]: a batch must be an input tensor (or a dict with 'image'), "
                    f"got {type(batch).__name__}")


class BatchCycler:
    """Endless batches from a re-iterable (list, DataLoader, ...); restarts it when exhausted."""

    def __init__(self, source: Iterable, task: str, what: str = "unlabeled"):
        self.source, self.task, self.what = source, task, what
        self._it: Iterator | None = None

    def next_raw(self) -> Any:
        for attempt in range(2):
            if self._it is None:
                self._it = iter(self.source)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise ValueError(f"{self.what}[{self.task!r}] yields no batches")

    def __next__(self) -> torch.Tensor:
        return _inputs(self.next_raw(), self.task)


class Objective:
    """Entropy of each task's predictions (unsupervised) or the task's own loss on labelled batches."""

    def __init__(self, problem: MergeProblem, tasks: list[str], unlabeled: Mapping[str, Iterable] | None,
                 labeled: Mapping[str, Iterable] | None, supervised: bool):
        self.problem, self.tasks, self.supervised = problem, tasks, supervised
        data = labeled if supervised else unlabeled
        name = "labeled" if supervised else "unlabeled"
        missing = [t for t in tasks if data is None or t not in data]
        if missing:
            raise ValueError(f"{name} has no data for task {missing[0]!r}" + (f" (nor {missing[1:]})" if missing[1:] else "")
                             + f"; it needs batches for {tasks}")
        self.iters = {t: BatchCycler(data[t], t, name) for t in tasks}

    def task_loss(self, params: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        model = self.problem.model
        if not self.supervised:
            pred = self.problem.predict(params, next(self.iters[task]), task)
            return entropy(pred, self.problem.task_kinds.get(task), task)
        batch = self.iters[task].next_raw()
        if isinstance(batch, Mapping):
            x, y = batch["image"], batch[getattr(getattr(model, "tasks", {}).get(task), "target_key", task)]
        else:
            x, y = batch
        pred = self.problem.predict(params, x, task)
        y = y.to(pred.device)
        t = getattr(model, "tasks", {}).get(task) if isinstance(getattr(model, "tasks", None), dict) else None
        return t.loss(pred, y) if t is not None else F.cross_entropy(pred, y)


def step_gradients(problem: MergeProblem, merged: dict[str, torch.Tensor], objective: Objective,
                   frozen: dict[str, torch.Tensor]) -> dict[str, float]:
    """Backpropagate Σ_t loss_t to whatever `merged` depends on; returns each task's loss."""
    leaves = {k: v.detach().requires_grad_() for k, v in merged.items()}
    params = {**frozen, **leaves}
    losses = {}
    for t in objective.tasks:
        loss = objective.task_loss(params, t)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the objective of task {t!r} is {float(loss)}; the merged model diverged "
                                     "(lower lr, or clamp the coefficients)")
        loss.backward()
        losses[t] = float(loss.detach())
    keys = [k for k in merged if leaves[k].grad is not None and merged[k].requires_grad]
    if keys:
        torch.autograd.backward([merged[k] for k in keys], [leaves[k].grad for k in keys])
    return losses


def check_finite(coef: torch.Tensor, groups: list[str], names: list[str], step: int, what: str = "coefficient") -> None:
    if torch.isfinite(coef).all():
        return
    c = coef.detach().reshape(-1, len(names))
    r, t = [int(i) for i in (~torch.isfinite(c)).nonzero()[0]]
    raise FloatingPointError(f"{what} of task {names[t]!r}, tensor/block {groups[r]!r} became {float(c[r, t])} "
                             f"at step {step}; lower lr or pass clamp=true")


def step_progress(label: str, total: int, enabled: bool = True) -> ProgressLog:
    """A learned merge's optimisation steps as lines that also reach log files: the first and last step
    and one every 10 s, with the rate, ETA and (in the note) the objective."""
    return ProgressLog(f"[{label}] step", total, unit="steps", every_seconds=10.0, enabled=enabled)


def mean(values: Mapping[str, float]) -> float:
    return math.fsum(values.values()) / max(len(values), 1)


Callback = Callable[[int, dict[str, torch.Tensor]], Mapping[str, float] | None]
