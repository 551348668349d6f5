"""Training strategies: extra work a model family needs inside each training step.

``MultiTaskModule`` runs the standard step (forward, balancer backward of the task losses, optimiser
step); a strategy, when configured (``strategy: {name: ..., ...}``), hooks into it at two points:

* ``before_forward(module, batch)``: e.g. put a slimmable model at its widest configuration;
* ``after_backward(module, batch, ctx) -> {name: value}``: more backward passes whose gradients add to
  the balancer's before the optimiser step (e.g. the sandwich rule's sub-networks); returns values to log.

A strategy is an ``nn.Module``: its own parameters (e.g. feature projections) are trained with the
model's and stored in Lightning checkpoints, but not in the model folder.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtl.registry import Registry

STRATEGIES: "Registry[type[TrainingStrategy]]" = Registry("training strategy")


class TrainingStrategy(nn.Module):
    def idle_parameters(self) -> bool:
        """True when some of its parameters get no gradient in a step by design (DDP must be told)."""
        return False

    def before_forward(self, module: Any, batch: dict[str, torch.Tensor]) -> None:
        pass

    def after_backward(self, module: Any, batch: dict[str, torch.Tensor], ctx: Any) -> dict[str, torch.Tensor]:
        return {}


def create_strategy(name: str, model: nn.Module, **kwargs: Any) -> TrainingStrategy:
    """``create_strategy("sandwich", model, num_random=2)``."""
    import mtl.models  # noqa: F401  (model families register their strategies)

    return STRATEGIES.get(name)(model, **kwargs)
