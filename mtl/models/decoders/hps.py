"""Hard parameter sharing: a light multi-scale fusion shared by every task, one small head per task."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl.models.decoders.base import DECODERS
from mtl.registry import check_int
from mtl.tasks import Task


NORMS = ("batch", "layer")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm2d ("batch") or a layer norm over (C, H, W) ("layer", GroupNorm with one group): the
    latter keeps no running statistics, which merged weights cannot match (docs/zoo.md)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"decoder.norm must be one of {NORMS}, got {kind!r}")


def conv_bn_relu(cin: int, cout: int, k: int = 3, norm: str = "batch") -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), norm_layer(norm, cout), nn.ReLU(inplace=True))


class Fusion(nn.Module):
    """Project every scale to `channels`, upsample to the finest one, sum, refine."""

    def __init__(self, in_channels: list[int], channels: int, norm: str = "batch"):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.refine = conv_bn_relu(channels, channels, norm=norm)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        out = self.lateral[0](feats[0])
        for lat, f in zip(self.lateral[1:], feats[1:]):
            out = out + F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
        return self.refine(out)


class DenseHead(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels), nn.Conv2d(channels, out_channels, 1))

    def forward(self, z: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.body(z), size=out_size, mode="bilinear", align_corners=False)


class ImageHead(nn.Module):
    def __init__(self, channels: int, out_channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        self.body = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_channels))

    def forward(self, z: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return self.body(z.mean(dim=(2, 3)))


class CosineImageHead(nn.Module):
    """An image head whose logits are `scale · cos(hidden features, class weight)` (NormFace; CLIP's
    zero-shot head with its fixed logit scale): every logit is bounded by the scale and unchanged when
    the hidden features are scaled, so merged weights cannot make predictions confident by growing
    activations (docs/merging.md, "When entropy is a poor proxy")."""

    def __init__(self, channels: int, out_channels: int, scale: float = 16.0, hidden: int | None = None):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"decoder.cosine_scale must be > 0, got {scale!r}")
        hidden = hidden or channels
        self.body = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, out_channels, bias=False)
        self.scale = float(scale)

    def forward(self, z: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        h = F.normalize(self.body(z.mean(dim=(2, 3))), dim=-1)
        # the classifier runs as a module call, so structural pruning sees its input channels
        return self.scale * self.classifier(h) / self.classifier.weight.norm(dim=1).clamp_min(1e-12)


HEADS = ("mlp", "cosine")


def create_head(task: Task, channels: int, head: str = "mlp", cosine_scale: float = 16.0) -> nn.Module:
    """The task's head. `head="cosine"` applies to image-level classification tasks; dense and regression
    tasks keep their usual head (a cosine has no meaning for a regressed value)."""
    if head not in HEADS:
        raise ValueError(f"decoder.head must be one of {HEADS}, got {head!r}")
    if head == "cosine" and task.kind == "classification" and not task.dense:
        return CosineImageHead(channels, task.out_channels, cosine_scale)
    return (DenseHead if task.dense else ImageHead)(channels, task.out_channels)


@DECODERS.register("hps")
class HPSDecoder(nn.Module):
    """Shared fusion neck + per-task heads. `shared(feats)` is the representation the heads consume.
    `norm` is the neck's normalisation ("batch" or "layer"); task heads keep BatchNorm. `head`: "mlp"
    (default) or "cosine" logits for classification tasks (`CosineImageHead`, at `cosine_scale`)."""

    HEAD_OPTIONS = ("head", "cosine_scale")  # shape only the task heads (merging compares the rest)

    def __init__(self, in_channels: list[int], tasks: list[Task], channels: int = 64, norm: str = "batch",
                 head: str = "mlp", cosine_scale: float = 16.0):
        super().__init__()
        check_int("decoder.channels", channels, low=1)
        self.neck = Fusion(in_channels, channels, norm)
        self.heads = nn.ModuleDict({t.name: create_head(t, channels, head, cosine_scale) for t in tasks})

    def shared(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.neck(feats)

    def head(self, task: str, z: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return self.heads[task](z, out_size)
