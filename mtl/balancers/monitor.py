"""Monitoring of a balancer: task weights and pairwise task-gradient cosines, every N steps.

The module calls, each training step::

    logs = monitor.before_backward(ctx)              # cosines (needs the graph: before backward)
    balancer.backward(ctx); opt.step(); balancer.after_step(ctx)
    logs |= monitor.after_step(ctx, balancer)        # weights used at this step
    self.log_dict(logs)
    ...
    monitor.save_plot(run_dir / "balancer_weights.png")   # rank 0, at the end of fit, if weights vary

Keys: ``balancer/weight/<task>`` and ``balancer/cos/<a>-<b>``. Both return {} on other steps.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from mtl.balancers.base import Balancer, StepContext, dist_mean


class BalancerMonitor:
    def __init__(self, every: int = 50, level: str = "params"):
        if every < 1:
            raise ValueError(f"BalancerMonitor: every must be >= 1, got {every}")
        if level not in ("params", "features"):
            raise ValueError(f"BalancerMonitor: level must be 'params' or 'features', got {level!r}")
        self.every, self.level = int(every), level
        self.history: list[dict[str, Any]] = []  # {"step", "weights": {t: w}, "cos": {"a-b": c}}
        self.cosines = True  # False: weights only (mtl.distributed.check_strategy, under FSDP)
        self._cos: dict[str, float] = {}

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def before_backward(self, ctx: StepContext) -> dict[str, float]:
        """Pairwise cosine similarity of the task gradients over the shared parameters (or the
        shared representation with ``level="features"``). Costs T extra backward passes through the
        shared part, on due steps only; the graph is retained for the balancer's backward. Under DDP the task
        gradients are averaged over the ranks first (one all-reduce of T x P on due steps): the cosines are the
        global batch's, the same on every rank."""
        self._cos = {}
        if not self.cosines or not self.due(ctx.step) or len(ctx.losses) < 2:
            return {}
        wrt = self._wrt(ctx)
        if not wrt:
            return {}
        names = list(ctx.losses)
        rows = []
        for t in names:
            grads = torch.autograd.grad(ctx.losses[t], wrt, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(w) if g is None else g).reshape(-1).float()
                                   for w, g in zip(wrt, grads)]))
        # the mean over DDP ranks of their local gradients: with equal per-rank batches, the global batch's gradient
        # (each rank's own would be its share's cosine, and only rank 0's is logged)
        G = dist_mean(torch.stack(rows))
        G = G / G.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = (G @ G.T).cpu()
        self._cos = {f"{a}-{b}": float(cos[i, j])
                     for (i, a), (j, b) in itertools.combinations(list(enumerate(names)), 2)}
        return {f"balancer/cos/{k}": v for k, v in self._cos.items()}

    def after_step(self, ctx: StepContext, balancer: Balancer) -> dict[str, float]:
        """The weights the balancer used at this step; recorded for the plot."""
        if not self.due(ctx.step):
            return {}
        weights = {t: float(w) for t, w in balancer.weights().items()}
        self.history.append({"step": int(ctx.step), "weights": weights, "cos": dict(self._cos)})
        return {f"balancer/weight/{t}": w for t, w in weights.items()}

    def _wrt(self, ctx: StepContext) -> list[torch.Tensor]:
        if self.level == "features" and ctx.features is not None:
            return [ctx.features] if isinstance(ctx.features, torch.Tensor) else list(ctx.features)
        return list(ctx.shared_params)

    def weights_vary(self) -> bool:
        """Whether the recorded weights ever differ (between tasks or over steps): a single-task or
        ``ew`` run records a flat line at 1, which is not worth a panel."""
        values = [w for h in self.history for w in h["weights"].values()]
        return bool(values) and max(values) - min(values) > 1e-9

    def save_plot(self, path: str | Path) -> Path | None:
        """Weights (when they varied) and gradient cosines (when measured) over training as a PNG; None
        (nothing written) when there is neither: one task, or constant weights without cosines."""
        vary = self.weights_vary()
        has_cos = any(h["cos"] for h in self.history)
        if not (vary or has_cos):
            return None
        from matplotlib.figure import Figure  # object-oriented: the user's pyplot backend is untouched

        from mtl.io import atomic_path, user_path

        steps = [h["step"] for h in self.history]
        marker = "o" if len(steps) <= 30 else None  # short runs: a line of one point is invisible
        fig = Figure(figsize=(7, 6 if vary and has_cos else 3.5))
        axes = fig.subplots(int(vary) + int(has_cos), 1, sharex=True, squeeze=False)
        if vary:
            ax = axes[0, 0]
            for task in self.history[-1]["weights"]:
                ax.plot(steps, [h["weights"].get(task, float("nan")) for h in self.history], label=task, marker=marker,
                        ms=3)
            ax.set_ylabel("task weight (EW = 1)")
            ax.legend(fontsize=7, ncol=3)
            ax.grid(alpha=0.3)
        if has_cos:
            ax = axes[-1, 0]
            pairs = sorted({k for h in self.history for k in h["cos"]})
            for pair in pairs:
                ax.plot(steps, [h["cos"].get(pair, float("nan")) for h in self.history], label=pair, lw=1, marker=marker, ms=2)
            ax.axhline(0.0, color="k", lw=0.5)
            ax.set_ylabel("gradient cosine")
            ax.legend(fontsize=6, ncol=3)
            ax.grid(alpha=0.3)
            if not vary:
                ax.set_title("task weights constant (EW = 1)", fontsize=8)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        path = user_path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        return path

    # the history travels with Lightning checkpoints when the module stores it there
    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "level": self.level, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))

