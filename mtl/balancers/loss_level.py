"""Loss-level balancers (they only re-weight the losses)."""
from __future__ import annotations

import torch

from mtl.balancers.base import BALANCERS, Balancer


@BALANCERS.register("ew")
class EqualWeighting(Balancer):
    """Sum of the task losses (each already scaled by its static task weight)."""

    def combine(self, losses, step=0):
        return torch.stack([losses[t] for t in self.tasks]).sum()
