"""The Task concept: what a head predicts, how it is trained and how it is scored."""
from __future__ import annotations

import abc
import inspect
import math
from typing import Any, ClassVar, Mapping

import torch
from torchmetrics import Metric

from mtl.registry import Registry, unknown_settings

TASKS: "Registry[type[Task]]" = Registry("task")


class Task(abc.ABC):
    """Base class. Subclasses set the class attributes and implement `out_channels`, `loss`, `metrics`.

    Conventions for batches (a dict of tensors produced by the data modules):
      * ``batch["image"]``: uint8 (B, 3, H, W); the module normalises it.
      * ``batch[task.target_key]``: the target, in the layout the subclass documents.
    Dense predictions come at input resolution, (B, C, H, W); image-level ones are (B, C).
    ``loss`` and every metric's ``update`` take the *raw* head output (logits, unnormalised vectors).
    """

    kind: ClassVar[str] = ""
    dense: ClassVar[bool] = True
    #: {metric_name: True if higher is better}
    directions: ClassVar[dict[str, bool]] = {}
    #: the metric Δm's "primary" variant uses; checkpoints are chosen on val/loss
    #: (callbacks.model_checkpoint.monitor), not on it
    primary: ClassVar[str] = ""

    def __init__(self, name: str | None = None, weight: float = 1.0, target_key: str | None = None):
        self.name = name or self.kind
        # names become log keys `val/<task>/<metric>` and module-dict keys
        if not isinstance(self.name, str) or "/" in self.name or "." in self.name:
            raise ValueError(f"task name must be a string without '/' or '.', got {self.name!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"task {self.name!r}: weight must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)  # static loss weight, applied before any balancer
        self.target_key = target_key or self.kind

    @property
    @abc.abstractmethod
    def out_channels(self) -> int:
        """Channels of the raw head output (C in (B, C, H, W) or (B, C))."""

    @abc.abstractmethod
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar training loss from the raw head output and the batch target (without `weight`)."""

    @abc.abstractmethod
    def metrics(self) -> dict[str, Metric]:
        """Fresh metric objects that accumulate over a whole split: {metric_name: Metric}."""

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Raw head output -> a prediction to show (argmax, sigmoid, normalised vectors...)."""
        return pred

    def to_config(self) -> dict[str, Any]:
        """Everything `create_task` needs to rebuild this task (stored in model folders)."""
        return {"kind": self.kind, "name": self.name, "weight": self.weight, "target_key": self.target_key}

    def _check_dense(self, pred: torch.Tensor, target: torch.Tensor, target_dims: int) -> None:
        # A wrong resolution or layout would otherwise broadcast silently or fail deep inside torch.
        if pred.ndim != 4 or target.ndim != target_dims or pred.shape[0] != target.shape[0] \
                or pred.shape[-2:] != target.shape[-2:]:
            raise ValueError(
                f"task {self.name!r}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} do not "
                f"match; expected (B, {self.out_channels}, H, W) at the target's resolution"
            )
        if pred.shape[1] != self.out_channels:
            raise ValueError(f"task {self.name!r}: prediction has {pred.shape[1]} channels, "
                             f"expected {self.out_channels}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight})"


def create_task(kind: str, *, where: str | None = None, **kwargs: Any) -> Task:
    """Build a task from its registry name, e.g. ``create_task("depth", weight=2.0)``.

    ``create_task(**task.to_config())`` rebuilds an equivalent task. `where`: the config node the settings
    came from (``task.<key>``; a task's `name` may differ from its key), named by an unknown-setting error;
    default ``task.<name>``.
    """
    cls = TASKS.get(kind)
    params = list(inspect.signature(cls).parameters)
    unknown = [k for k in kwargs if k not in params]
    if unknown:  # named as the config key it came from, with the option it most likely meant
        raise TypeError(unknown_settings(where or f"task.{kwargs.get('name') or kind}", unknown, params))
    return cls(**kwargs)


def task_from_config(spec: Any) -> Task:
    """A task from its config (``{"kind": "depth", "weight": 2.0}``, ``Task.to_config()``), a registry name or a
    Task; anything else, or a config without its ``kind``, is refused in one line."""
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, str):
        return create_task(spec)
    if not isinstance(spec, Mapping):
        raise TypeError(f"a task must be a name, a Task or a task config (a dict with 'kind'), got {spec!r}")
    if "kind" not in spec:  # 'name' alone is the common slip: it is the task's own name, 'kind' its type
        raise ValueError(f"task config {dict(spec)!r} has no 'kind' key (the task type, e.g. "
                         "{'kind': 'depth', 'weight': 2.0}; 'name' is optional: the task's own name)")
    return create_task(**dict(spec))


def out_of_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Where ``target`` holds neither a class id in [0, num_classes) nor ``ignore_index``."""
    return (target != ignore_index) & ((target < 0) | (target >= num_classes))


def bad_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> str:
    """Why class ids failed a loss: the out-of-range values found (a few), in one line."""
    found = sorted({int(v) for v in target[out_of_range(target, num_classes, ignore_index)].unique()[:5]})
    return (f"target labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; found {found}"
            + (" (the built-in loaders mark unlabelled pixels 255: keep ignore_index=255)" if 255 in found else ""))


def checked_cross_entropy(name: str, pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int,
                          precheck: bool | None = None, **kwargs) -> torch.Tensor:
    """``F.cross_entropy`` whose out-of-range target is an error naming the task and the values. On the CPU torch
    raises an IndexError, caught here; on an accelerator such a target is a device-side assert that breaks
    every later call, so the labels are checked first (``precheck``, default: off the CPU; one sync)."""
    import torch.nn.functional as F

    if target.is_floating_point():  # .long() would truncate 0.9 to class 0 without a word
        raise ValueError(f"task {name!r}: class-id targets must be integers, got {target.dtype}")
    if precheck if precheck is not None else target.device.type != "cpu":
        if bool(out_of_range(target, num_classes, ignore_index).any()):
            raise ValueError(f"task {name!r}: {bad_labels(target, num_classes, ignore_index)}")
    try:
        return F.cross_entropy(pred.float(), target.long(), ignore_index=ignore_index, **kwargs)
    except (IndexError, RuntimeError) as e:  # torch's "Target 255 is out of bounds" names nothing of ours
        if not bool(out_of_range(target, num_classes, ignore_index).any()):
            raise  # not the labels (out of memory, ...): torch's own error
        raise ValueError(f"task {name!r}: {bad_labels(target, num_classes, ignore_index)}") from e
