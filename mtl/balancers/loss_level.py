"""Loss-level balancers: they re-weight the task losses and run one ordinary backward.

Scale convention: weights are on the EW-sum scale (``ew`` = 1 per task; methods whose weights
are a distribution over tasks are multiplied by T so they sum to T).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from mtl.balancers.base import Balancer, StepContext, dist_mean, register


@register("ew")
class EqualWeighting(Balancer):
    """Sum of the task losses (each already scaled by its static task weight)."""

    def combine(self, losses, step=0):
        return self._stack(losses).sum()


@register("uw")
class UncertaintyWeighting(Balancer):
    """Kendall et al. 2018: L = Σ_t exp(−s_t) L_t + s_t with learnable log-variances s_t, for every task
    (as LibMTL does): twice the paper's regression form (and LibMTL's) Σ_t ½exp(−s_t) L_t + ½s_t, so that
    the network gradient is on the EW-sum scale; the paper's classification form exp(−s_t) L_t + ½s_t is
    not distinguished (docs/balancers.md).

    ``s`` is an ``nn.Parameter`` of this (sub)module, so the module's optimiser trains it through
    the ordinary backward (and DDP averages its gradient like any other parameter).
    """

    def __init__(self, tasks: Sequence[str], init: float = 0.0, skip_nonfinite: bool = False):
        super().__init__(tasks, skip_nonfinite)
        if not math.isfinite(float(init)):
            raise ValueError(f"uw: balancer.init (the initial log σ²) must be finite, got {init}")
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init)))
        self._set_weights(torch.exp(-self.log_vars.detach()))

    def combine(self, losses, step=0):
        L = self._stack(losses)
        self._warn_negative(L, step)  # with L < 0, exp(−s)·L + s has no minimum: s falls, the weight grows unbounded
        s = self.log_vars.to(L.dtype)
        w = torch.exp(-s)
        self._set_weights(w)
        return (w * L + s).sum()


@register("dwa")
class DynamicWeightAverage(Balancer):
    """Liu et al. 2019 (MTAN): w_t = T · softmax_t(r_t / temperature), r_t = L̄_t(k−1) / L̄_t(k−2),
    where L̄_t(k) is task t's mean training loss over window k.

    ``window="epoch"`` (paper) uses ``ctx.epoch``; an int uses windows of that many steps (handy for
    short runs). Weights are 1 until two windows have finished. Window means are averaged over
    DDP ranks so every replica uses the same weights. A task whose earlier window's mean loss is ≤ 0 has
    r_t = 1.
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0, window: str | int = "epoch",
                 skip_nonfinite: bool = False):
        super().__init__(tasks, skip_nonfinite)
        if temperature <= 0:
            raise ValueError(f"dwa: balancer.temperature must be > 0, got {temperature}")
        if window != "epoch" and not (isinstance(window, int) and window > 0):
            raise ValueError(f"dwa: balancer.window must be 'epoch' or a positive number of steps, got {window!r}")
        self.temperature = float(temperature)
        self.window = window
        T = len(self.tasks)
        # history[0] = mean loss of window k−2, history[1] = of window k−1 (NaN: not seen yet)
        self.register_buffer("history", torch.full((2, T), float("nan")))
        self.register_buffer("window_id", torch.tensor(-1, dtype=torch.long))
        # sums over the open window of each step's losses averaged over DDP ranks (so every rank holds the
        # same sums and rank 0's checkpoint resumes all of them exactly); not buffers, which DDP would
        # broadcast at every forward; they travel in the state dict as extra state
        self._sum, self._count = torch.zeros(T), 0

    def current_weights(self) -> torch.Tensor:
        h = self.history
        if torch.isnan(h).any():
            return torch.ones(len(self.tasks), device=h.device)
        # a window whose mean loss was 0 (every batch without a valid pixel) or negative has no descent
        # rate: r = 1, as if the loss had held (a clamped divisor gave ~1e12 and all the weight to one task)
        ratio = torch.where(h[0] > 0, h[1] / h[0].clamp_min(1e-12), torch.ones_like(h[1]))
        return len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)

    def _advance(self, ctx: StepContext) -> None:
        wid = ctx.epoch if self.window == "epoch" else ctx.step // int(self.window)
        if wid == int(self.window_id):
            return
        if self._count > 0:
            mean = (self._sum / self._count).to(self.history)
            self.history.copy_(torch.stack([self.history[1], mean]))
        self._sum, self._count = torch.zeros_like(self._sum), 0
        self.window_id.fill_(wid)

    def combine(self, losses, step=0):
        L = self._stack(losses)
        w = self.current_weights().to(L)
        self._set_weights(w)
        return (w * L).sum()

    def backward(self, ctx: StepContext) -> None:
        L = self._stack(ctx.losses)  # checked before the window advances
        self._advance(ctx)
        total = self.combine(ctx.losses, ctx.step)
        L = dist_mean(L.detach().float())
        self._warn_negative(L, ctx.step)
        self._sum = self._sum.to(L.device) + L
        self._count += 1
        ctx.backward(total)

    def get_extra_state(self):
        return {"sum": self._sum.cpu(), "count": self._count}

    def set_extra_state(self, state) -> None:
        if state is not None:  # None: no saved window (module.on_load_checkpoint's placeholder)
            self._sum, self._count = state["sum"].clone(), int(state["count"])


@register("rlw")
class RandomLossWeighting(Balancer):
    """Lin et al. 2021: w = T · softmax(λ), λ ~ N(0, I) drawn afresh every step (global torch RNG,
    so ``seed_everything`` makes runs repeatable)."""

    def combine(self, losses, step=0):
        L = self._stack(losses)
        w = len(self.tasks) * torch.softmax(torch.randn(len(self.tasks), device=L.device), dim=0).to(L.dtype)
        self._set_weights(w)
        return (w * L).sum()
