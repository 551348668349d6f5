"""``decoder=slimmable``: the ``hps`` design (shared fusion neck + one head per task) in slimmable layers.

The neck belongs to the shared part, so it follows the encoder's width group (``"encoder"``); each
task head has its own group ``"decoder.<task>"``, so every task decoder gets its own width multiplier.
With ``widths=None`` plain layers are built at the given channels (``head_channels`` per task): the
form ``extract_subnetwork`` writes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl.models.decoders.base import DECODERS
from mtl.models.decoders.hps import Fusion
from mtl.models.slimmable.layers import DEFAULT_WIDTHS, batchnorm, check_width_set, conv, linear
from mtl.models.slimmable.resnet import ENCODER
from mtl.tasks import Task


def decoder_key(task: str) -> str:
    return f"decoder.{task}"


class SlimFusion(Fusion):
    """Project every scale to ``channels``, upsample to the finest one, sum, refine (as ``hps``)."""

    def __init__(self, in_channels: list[int], channels: int, widths: Sequence[float] | None):
        nn.Module.__init__(self)  # Fusion's forward, slimmable layers in place of its plain ones
        kw = {"widths": widths, "in_key": ENCODER, "out_key": ENCODER}
        self.lateral = nn.ModuleList(conv(c, channels, 1, bias=True, **kw) for c in in_channels)
        self.refine = nn.Sequential(conv(channels, channels, 3, **kw), batchnorm(channels, widths, ENCODER),
                                    nn.ReLU(inplace=True))


class SlimDenseHead(nn.Module):
    def __init__(self, cin: int, hidden: int, out_channels: int, widths: Sequence[float] | None, key: str):
        super().__init__()
        self.body = nn.Sequential(conv(cin, hidden, 3, widths=widths, in_key=ENCODER, out_key=key),
                                  batchnorm(hidden, widths, key, cond_key=ENCODER), nn.ReLU(inplace=True),
                                  conv(hidden, out_channels, 1, bias=True, widths=widths, in_key=key))

    def forward(self, z: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.body(z), size=out_size, mode="bilinear", align_corners=False)


class SlimImageHead(nn.Module):
    def __init__(self, cin: int, hidden: int, out_channels: int, widths: Sequence[float] | None, key: str):
        super().__init__()
        self.body = nn.Sequential(linear(cin, hidden, widths, in_key=ENCODER, out_key=key), nn.ReLU(inplace=True),
                                  linear(hidden, out_channels, widths, in_key=key))

    def forward(self, z: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return self.body(z.mean(dim=(2, 3)))


@DECODERS.register("slimmable")
class SlimmableDecoder(nn.Module):
    """Shared neck of ``channels`` (full width) + per-task heads of ``head_channels[task]`` hidden
    channels (default ``channels``). ``widths``: the width set; ``None`` builds plain layers."""

    def __init__(self, in_channels: list[int], tasks: list[Task], channels: int = 64,
                 head_channels: dict[str, int] | None = None, widths: Sequence[float] | None = DEFAULT_WIDTHS):
        super().__init__()
        self.widths = check_width_set(widths, "decoder.widths") if widths is not None else None
        head_channels = dict(head_channels or {})
        unknown = sorted(set(head_channels) - {t.name for t in tasks})
        if unknown:
            raise ValueError(f"decoder.head_channels names unknown task(s) {unknown}")
        self.neck = SlimFusion(list(in_channels), channels, self.widths)
        self.heads = nn.ModuleDict()
        for t in tasks:
            head = SlimDenseHead if t.dense else SlimImageHead
            self.heads[t.name] = head(channels, int(head_channels.get(t.name, channels)), t.out_channels,
                                      self.widths, decoder_key(t.name))

    def shared(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.neck(feats)

    def head(self, task: str, z: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return self.heads[task](z, out_size)
