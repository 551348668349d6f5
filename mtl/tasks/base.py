"""The Task concept: what a head predicts, how it is trained and how it is scored."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torchmetrics import Metric

from mtl.registry import Registry

TASKS: "Registry[type[Task]]" = Registry("task")


class Task:
    """Base class. Subclasses set the class attributes and implement `loss` and `metrics`.

    Conventions for batches (a dict of tensors produced by the data modules):
      * ``batch["image"]``: uint8 (B, 3, H, W); the module normalises it.
      * ``batch[task.target_key]``: the target, in the layout the subclass documents.
    Dense predictions come at input resolution, (B, C, H, W); image-level ones are (B, C).
    """

    kind: ClassVar[str] = ""
    dense: ClassVar[bool] = True
    #: {metric_name: True if higher is better}
    directions: ClassVar[dict[str, bool]] = {}
    #: the metric used for Δm and checkpoint selection
    primary: ClassVar[str] = ""

    def __init__(self, name: str | None = None, weight: float = 1.0, target_key: str | None = None):
        self.name = name or self.kind
        self.weight = float(weight)  # static loss weight, applied before any balancer
        self.target_key = target_key or self.kind

    @property
    def out_channels(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define out_channels")

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define loss")

    def metrics(self) -> dict[str, Metric]:
        """Fresh metric objects that accumulate over a whole split: {metric_name: Metric}."""
        raise NotImplementedError(f"{type(self).__name__} must define metrics")

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Raw head output -> a prediction to show (argmax, sigmoid, normalised vectors...)."""
        return pred

    def to_config(self) -> dict[str, Any]:
        """Everything `create_task` needs to rebuild this task (stored in model folders)."""
        return {"kind": self.kind, "name": self.name, "weight": self.weight, "target_key": self.target_key}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight})"


def create_task(kind: str, **kwargs: Any) -> Task:
    """Build a task from its registry name, e.g. ``create_task("depth", weight=2.0)``."""
    return TASKS.get(kind)(**kwargs)
