"""The Balancer concept: per-task losses (and, for gradient methods, gradients) -> one update.

The MultiTaskModule runs Lightning in manual-optimisation mode and, every training step, does

    opt.zero_grad()
    ctx = StepContext(...)            # losses, parameter groups, shared features, closures
    balancer.backward(ctx)            # fills .grad of every trainable parameter
    opt.step(); scheduler.step()
    balancer.after_step(ctx)          # e.g. FAMO's logit update from the new losses

Loss-level methods only implement ``combine`` (weighted sum of the losses); gradient methods
override ``backward``. Every balancer reports its current task weights through ``weights()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from mtl.registry import Registry

BALANCERS: "Registry[type[Balancer]]" = Registry("balancer")


@dataclass
class StepContext:
    """What a balancer may use during one training step."""

    #: {task: scalar loss}, already multiplied by the task's static weight, part of the graph
    losses: dict[str, torch.Tensor]
    #: parameters shared by all tasks (backbone + shared decoder), requires_grad only
    shared_params: list[nn.Parameter]
    #: {task: parameters only that task uses (its head)}
    task_params: dict[str, list[nn.Parameter]]
    #: the shared representation the task heads consume (part of the graph); None if unavailable
    features: torch.Tensor | None
    #: backward that respects Lightning's precision/DDP plugins (LightningModule.manual_backward)
    backward: Callable[..., None] = field(default=lambda loss, **kw: loss.backward(**kw))
    #: re-run the forward pass on the same batch and return fresh {task: loss};
    #: used by sharpness-aware methods (at perturbed weights) and by FAMO after the step
    recompute: Callable[[], dict[str, torch.Tensor]] | None = None
    #: global optimisation step (0-based)
    step: int = 0


class Balancer(nn.Module):
    #: True when the method needs gradients w.r.t. the shared parameters (Jacobian methods)
    needs_shared_params: bool = False

    def __init__(self, tasks: list[str]):
        super().__init__()
        if not tasks:
            raise ValueError("a balancer needs at least one task")
        self.tasks = list(tasks)
        self._last_weights = {t: 1.0 for t in self.tasks}

    # loss-level methods implement this
    def combine(self, losses: dict[str, torch.Tensor], step: int = 0) -> torch.Tensor:
        """Weighted total loss. Default: equal weights (sum)."""
        return torch.stack([losses[t] for t in self.tasks]).sum()

    def backward(self, ctx: StepContext) -> None:
        """Fill the .grad of every trainable parameter. Default: backward of `combine`."""
        ctx.backward(self.combine(ctx.losses, ctx.step))

    def after_step(self, ctx: StepContext) -> None:
        """Called after the optimiser step (FAMO measures its loss decrease here)."""

    def weights(self) -> dict[str, float]:
        """The task weights used in the last step, for logging."""
        return dict(self._last_weights)


def create_balancer(name: str, tasks: list[str], **kwargs) -> Balancer:
    return BALANCERS.get(name)(tasks, **kwargs)
