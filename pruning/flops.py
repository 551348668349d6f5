"""The FLOPs estimate the methods search on, on the scale the report counts (``mtl.flops.count_flops``).

Per sample: every conv/linear (2 per multiply-add), every attention's two products q·kᵀ and attn·v
(2 · 2 · N² · head_dim per head, N tokens: what ``torch.utils.flop_counter`` counts for them), and the
rest of the counted FLOPs (``other``: ops these hooks do not see, a module run twice), which is assumed
not to shrink, so the estimate never promises more reduction than removal gives.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from mtl.flops import count_flops
from mtl.modes import eval_mode


class FlopsEstimate:
    def __init__(self, model: nn.Module, example: torch.Tensor, attention: Mapping[str, nn.Module]):
        """``attention``: {name of a ``qkv`` projection: its attention module (``num_heads``)}."""
        self.model = model
        self.leaf: dict[str, float] = {}   # conv/linear name -> FLOPs
        self.attn: dict[str, float] = {}   # qkv name -> FLOPs of its attention's two products
        self.heads = {name: int(a.num_heads) for name, a in attention.items()}
        n = example.shape[0]
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                k = m.weight[0].numel()  # (in/groups) * prod(kernel)
                hooks.append(m.register_forward_hook(
                    lambda mod, i, o, name=name, k=k: self.leaf.__setitem__(name, 2.0 * o.numel() * k / n)))
            elif isinstance(m, nn.Linear):
                hooks.append(m.register_forward_hook(
                    lambda mod, i, o, name=name: self.leaf.__setitem__(name, 2.0 * o.numel() * mod.in_features / n)))
            if name in self.heads:  # (..., N, 3·heads·head_dim): every row of N queries meets N keys
                hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: self.attn.__setitem__(
                    name, 2.0 * 2.0 * (o.numel() / o.shape[-1]) * o.shape[-2] * (o.shape[-1] // 3) / n)))
        try:
            with torch.no_grad(), eval_mode(model):
                model(example)
        finally:
            for h in hooks:
                h.remove()
        counted = count_flops(model, example[:1])
        self.other = max(counted - sum(self.leaf.values()) - sum(self.attn.values()), 0.0)

    def total(self) -> float:
        return sum(self.leaf.values()) + sum(self.attn.values()) + self.other

    def after(self, r_out: Mapping[str, int], r_in: Mapping[str, int], r_heads: Mapping[str, int]) -> float:
        """FLOPs once ``r_out``/``r_in`` output/input channels of the named modules and ``r_heads``
        heads of the named qkv projections are gone."""
        total = self.other
        for name, f in self.leaf.items():
            m = self.model.get_submodule(name)
            if isinstance(m, nn.Linear):
                cin, cout, grouped = m.in_features, m.out_features, False
            else:
                cin, cout, grouped = m.in_channels, m.out_channels, m.groups > 1
            keep_out = 1 - r_out.get(name, 0) / cout
            keep_in = 1.0 if grouped else 1 - r_in.get(name, 0) / cin
            total += f * max(keep_out, 0.0) * max(keep_in, 0.0)
        for name, f in self.attn.items():
            total += f * max(1 - r_heads.get(name, 0) / self.heads[name], 0.0)
        return total
