"""Image-level tasks: one prediction (B, C) per image."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from mtl.tasks.base import TASKS, Task, checked_cross_entropy
from mtl.tasks.metrics import Accuracy, MeanAbsoluteError, RootMeanSquaredError


@TASKS.register("classification")
class ClassificationTask(Task):
    """Single-label classification. Target: int64 (B,) class ids; `ignore_index` marks unlabelled images."""

    kind = "classification"
    dense = False
    directions = {"accuracy": True}
    primary = "accuracy"

    def __init__(self, num_classes: int = 3, label_smoothing: float = 0.0, ignore_index: int = -100,
                 name: str | None = None, weight: float = 1.0, target_key: str | None = None):
        super().__init__(name=name, weight=weight, target_key=target_key)
        if int(num_classes) < 2:
            raise ValueError(f"task {self.name!r}: num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"task {self.name!r}: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)
        if 0 <= self.ignore_index < self.num_classes:  # that class's images would drop out, its predictions not
            raise ValueError(f"task {self.name!r}: ignore_index={self.ignore_index} is one of its num_classes="
                             f"{self.num_classes} classes [0, {self.num_classes}); the ignored label must lie outside "
                             "them (default -100): remap the labels or drop the override")

    @property
    def out_channels(self) -> int:
        return self.num_classes

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.ndim != 2 or target.shape != pred.shape[:1]:
            raise ValueError(f"task {self.name!r}: expected prediction (B, {self.num_classes}) and target (B,), "
                             f"got {tuple(pred.shape)} and {tuple(target.shape)}")
        valid = target != self.ignore_index
        if not valid.any():  # mean CE over zero elements would be NaN; keep the graph, add nothing
            return pred.sum() * 0.0
        return checked_cross_entropy(self.name, pred, target, self.num_classes, self.ignore_index,
                                     label_smoothing=self.label_smoothing)

    def metrics(self) -> dict[str, Metric]:
        return {"accuracy": Accuracy(ignore_index=self.ignore_index, num_classes=self.num_classes)}

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.argmax(dim=1)

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "num_classes": self.num_classes,
                "label_smoothing": self.label_smoothing, "ignore_index": self.ignore_index}


@TASKS.register("regression")
class RegressionTask(Task):
    """Vector regression. Target: float32 (B, D) with D = out_dim."""

    kind = "regression"
    dense = False
    directions = {"mae": False, "rmse": False}
    primary = "mae"
    LOSSES = ("l1", "mse")

    def __init__(self, out_dim: int = 1, loss: str = "l1",
                 name: str | None = None, weight: float = 1.0, target_key: str | None = None):
        super().__init__(name=name, weight=weight, target_key=target_key)
        if int(out_dim) < 1:
            raise ValueError(f"task {self.name!r}: out_dim must be >= 1, got {out_dim}")
        if loss not in self.LOSSES:
            raise ValueError(f"task {self.name!r}: unknown loss {loss!r}; valid names: {', '.join(self.LOSSES)}")
        self.out_dim = int(out_dim)
        self.loss_type = loss

    @property
    def out_channels(self) -> int:
        return self.out_dim

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # (B, 1) against (B,) would broadcast to (B, B) without this check
        if pred.ndim != 2 or pred.shape != target.shape or pred.shape[1] != self.out_dim:
            raise ValueError(f"task {self.name!r}: expected prediction and target (B, {self.out_dim}), "
                             f"got {tuple(pred.shape)} and {tuple(target.shape)}")
        fn = F.l1_loss if self.loss_type == "l1" else F.mse_loss
        return fn(pred.float(), target.float())

    def metrics(self) -> dict[str, Metric]:
        return {"mae": MeanAbsoluteError(), "rmse": RootMeanSquaredError()}

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "out_dim": self.out_dim, "loss": self.loss_type}

