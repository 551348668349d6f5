"""Dense (per-pixel) tasks: predictions (B, C, H, W) at the target's resolution."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from mtl.tasks.base import TASKS, Task, checked_cross_entropy
from mtl.tasks.metrics import (
    AbsoluteRelativeError,
    Accuracy,
    AngleWithin,
    BoundaryFScore,
    MeanAbsoluteError,
    MeanAngularError,
    MeanIoU,
    MedianAngularError,
    RootMeanSquaredError,
    ThresholdAccuracy,
    normals_valid,
)


def _unit(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(v, dim=1)`` (v / max(|v|, eps)) from elementwise ops: torch's norm along the
    channel axis of an NCHW tensor is ~10x slower on CPU, forward and backward."""
    return v * torch.rsqrt(v.pow(2).sum(dim=1, keepdim=True).clamp_min(eps * eps))


def _nan_to_zero(t: torch.Tensor) -> torch.Tensor:
    """NaN (an invalid pixel) -> 0; ±inf stay, so corrupt data still surfaces as a non-finite loss."""
    return torch.where(t.isnan(), 0.0, t)


def _zero_loss(pred: torch.Tensor) -> torch.Tensor:
    # A batch without a single valid pixel contributes nothing, but stays in the graph so DDP and
    # gradient balancers still see every parameter used.
    return pred.sum() * 0.0


@TASKS.register("semseg")
class SemSegTask(Task):
    """Semantic segmentation. Target: int64 (B, H, W) class ids, `ignore_index` (255) = unlabelled."""

    kind = "semseg"
    directions = {"miou": True, "pixel_acc": True}
    primary = "miou"

    def __init__(self, num_classes: int = 5, ignore_index: int = 255,
                 name: str | None = None, weight: float = 1.0, target_key: str | None = None):
        super().__init__(name=name, weight=weight, target_key=target_key)
        if int(num_classes) < 2:
            raise ValueError(f"task {self.name!r}: num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        if 0 <= self.ignore_index < self.num_classes:  # the head still predicts it: mIoU would score it at 0
            raise ValueError(f"task {self.name!r}: ignore_index={self.ignore_index} is one of its num_classes="
                             f"{self.num_classes} classes [0, {self.num_classes}); the ignored label must lie outside "
                             "them (the loaders mark unlabelled pixels 255): remap the labels or set ignore_index=255")

    @property
    def out_channels(self) -> int:
        return self.num_classes

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_dense(pred, target, target_dims=3)
        if not (target != self.ignore_index).any():
            return _zero_loss(pred)
        return checked_cross_entropy(self.name, pred, target, self.num_classes, self.ignore_index)

    def metrics(self) -> dict[str, Metric]:
        return {"miou": MeanIoU(self.num_classes, ignore_index=self.ignore_index),
                "pixel_acc": Accuracy(ignore_index=self.ignore_index, num_classes=self.num_classes)}

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.argmax(dim=1)

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "num_classes": self.num_classes, "ignore_index": self.ignore_index}


@TASKS.register("depth")
class DepthTask(Task):
    """Depth. Target: float32 (B, 1, H, W); pixels with target <= 0 (0 = no depth) are invalid.

    ``metrics`` picks the reported metrics from ``rmse``, ``abs_err`` (mean |p − t|), ``abs_rel``
    (mean |p − t| / t) and ``delta1``/``delta2``/``delta3`` (share of pixels with max(p/t, t/p) < 1.25^k);
    the first is the primary one. NYUv2/Cityscapes papers report ``[abs_err, abs_rel]``, so Δm over
    "all"/"flat" then counts exactly those two.
    """

    kind = "depth"
    directions = {"rmse": False, "abs_rel": False}
    primary = "rmse"
    _METRICS = ("rmse", "abs_err", "abs_rel", "delta1", "delta2", "delta3")

    def __init__(self, metrics: list[str] | tuple[str, ...] | None = None,
                 name: str | None = None, weight: float = 1.0, target_key: str | None = None):
        super().__init__(name=name, weight=weight, target_key=target_key)
        if metrics is not None:
            metrics = list(metrics)
            unknown = [m for m in metrics if m not in self._METRICS]
            if not metrics or unknown or len(set(metrics)) != len(metrics):
                raise ValueError(f"task {self.name!r}: metrics must be distinct names from "
                                 f"{', '.join(self._METRICS)}; got {metrics}")
            self.directions = {m: m.startswith("delta") for m in metrics}  # errors ↓, δ shares ↑
            self.primary = metrics[0]

    @property
    def out_channels(self) -> int:
        return 1

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean absolute error over the valid pixels of the batch."""
        self._check_dense(pred, target, target_dims=4)
        valid = target > 0  # False for NaN targets
        n = valid.sum()
        if not n:
            return _zero_loss(pred)
        # a masked sum, not pred[valid]: boolean indexing (nonzero + gather/scatter) costs more than
        # the whole loss on CPU. NaN targets become 0 first: NaN * 0 is NaN, in the backward pass too
        err = (pred.float() - _nan_to_zero(target.float())).abs()
        return (err * valid).sum() / n

    def metrics(self) -> dict[str, Metric]:
        make = {"rmse": lambda: RootMeanSquaredError(ignore_nonpositive_targets=True),
                "abs_err": lambda: MeanAbsoluteError(ignore_nonpositive_targets=True),
                "abs_rel": AbsoluteRelativeError,
                **{f"delta{k}": (lambda k=k: ThresholdAccuracy(1.25 ** k)) for k in (1, 2, 3)}}
        return {m: make[m]() for m in self.directions}

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "metrics": list(self.directions)}


@TASKS.register("normals")
class NormalsTask(Task):
    """Surface normals. Target: float32 (B, 3, H, W) unit vectors; an all-zero vector (or any NaN
    component) marks an invalid pixel."""

    kind = "normals"
    directions = {"mean_angle": False, "median_angle": False,
                  "pct_11_25": True, "pct_22_5": True, "pct_30": True}
    primary = "mean_angle"

    @property
    def out_channels(self) -> int:
        return 3

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean of 1 − cos(pred, target) over valid pixels, both L2-normalised along channels."""
        self._check_dense(pred, target, target_dims=4)
        valid = normals_valid(target)
        n = valid.sum()
        if not n:
            return _zero_loss(pred)
        cos = (_unit(pred.float()) * _unit(_nan_to_zero(target.float()))).sum(dim=1)
        return ((1.0 - cos) * valid).sum() / n

    def metrics(self) -> dict[str, Metric]:
        return {"mean_angle": MeanAngularError(), "median_angle": MedianAngularError(),
                "pct_11_25": AngleWithin(11.25), "pct_22_5": AngleWithin(22.5), "pct_30": AngleWithin(30.0)}

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        return F.normalize(pred, dim=1)


@TASKS.register("edges")
class EdgesTask(Task):
    """Boundary detection. Target: float32 (B, 1, H, W) in {0, 1} (1 = boundary pixel)."""

    kind = "edges"
    directions = {"f_score": True}
    primary = "f_score"

    def __init__(self, tolerance: int = 1, threshold: float = 0.5,
                 name: str | None = None, weight: float = 1.0, target_key: str | None = None):
        super().__init__(name=name, weight=weight, target_key=target_key)
        if int(tolerance) != tolerance or tolerance < 0:
            raise ValueError(f"task {self.name!r}: tolerance must be an integer >= 0, got {tolerance}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"task {self.name!r}: threshold must be in (0, 1), got {threshold}")
        self.tolerance = int(tolerance)
        self.threshold = float(threshold)

    @property
    def out_channels(self) -> int:
        return 1

    @staticmethod
    def balanced_weights(target: torch.Tensor) -> torch.Tensor:
        """Per-pixel BCE weights: positives get beta = fraction of negatives in the batch, negatives 1 − beta."""
        pos = target > 0.5
        beta = 1.0 - pos.float().mean()
        return torch.where(pos, beta, 1.0 - beta)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Class-balanced BCE (HED), averaged over all pixels of the batch."""
        self._check_dense(pred, target, target_dims=4)
        target = target.float()
        return F.binary_cross_entropy_with_logits(pred.float(), target, weight=self.balanced_weights(target))

    def metrics(self) -> dict[str, Metric]:
        return {"f_score": BoundaryFScore(tolerance=self.tolerance, threshold=self.threshold)}

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(pred)

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "tolerance": self.tolerance, "threshold": self.threshold}
