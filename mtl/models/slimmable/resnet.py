"""``slim_resnet``: a small ResNet-like encoder (basic blocks) whose every layer is slimmable.

With ``widths=None`` the same topology is built from plain torch layers at the given channel counts:
that is what ``extract_subnetwork`` produces (a physically smaller network, no slicing at run time).
All slimmable layers of the encoder share the width group ``"encoder"``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mtl.models.backbones import BACKBONES
from mtl.registry import check_indices
from mtl.models.slimmable.layers import DEFAULT_WIDTHS, batchnorm, check_width_set, conv

ENCODER = "encoder"


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, widths: Sequence[float] | None):
        super().__init__()
        kw = {"widths": widths, "in_key": ENCODER, "out_key": ENCODER}
        self.conv1 = conv(cin, cout, 3, stride, **kw)
        self.bn1 = batchnorm(cout, widths, ENCODER)
        self.conv2 = conv(cout, cout, 3, 1, **kw)
        self.bn2 = batchnorm(cout, widths, ENCODER)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, **kw), batchnorm(cout, widths, ENCODER))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


@BACKBONES.register("slim_resnet")
class SlimResNet(nn.Module):
    """Stem (3x3 conv, stride 2) then one stage per entry of ``channels``, each halving the resolution.

    Feature ``i`` of ``forward`` is the stem (i=0, stride 2) or stage ``i`` (stride ``2**(i+1)``);
    ``out_indices`` selects them, as timm's ``features_only`` does. ``channels``/``stem`` are the
    full-width counts; ``widths`` the width set (``None``: plain layers).
    """

    def __init__(self, stem: int = 32, channels: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] | None = None,
                 out_indices: Sequence[int] = (1, 2, 3, 4), widths: Sequence[float] | None = DEFAULT_WIDTHS):
        super().__init__()
        channels = [int(c) for c in channels]
        depths = [int(d) for d in (depths or [1] * len(channels))]
        if len(depths) != len(channels):
            raise ValueError(f"slim_resnet: depths {depths} and channels {channels} differ in length")
        given = check_indices("backbone.out_indices", out_indices, stages=len(channels) + 1)
        out_indices = [i + len(channels) + 1 if i < 0 else i for i in given]  # from the end, as timm's
        if not all(0 <= i <= len(channels) for i in out_indices):
            raise ValueError(f"slim_resnet: backbone.out_indices {given} outside the {len(channels) + 1} stages "
                             f"(0..{len(channels)}, or -{len(channels) + 1}..-1 from the end)")
        self.widths = check_width_set(widths, "backbone.widths") if widths is not None else None
        self.out_indices = out_indices
        self.stem = nn.Sequential(conv(3, stem, 3, 2, widths=self.widths, out_key=ENCODER),
                                  batchnorm(stem, self.widths, ENCODER), nn.ReLU(inplace=True))
        stages, cin = [], stem
        for cout, depth in zip(channels, depths):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if j == 0 else 1, self.widths) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        all_channels, all_reductions = [stem] + channels, [2 ** (i + 1) for i in range(len(channels) + 1)]
        self.channels = [all_channels[i] for i in self.out_indices]
        self.reductions = [all_reductions[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = [x]
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return [feats[i] for i in self.out_indices]
