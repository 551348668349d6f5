"""Task-based flat regions (Phan et al. 2022, "Improving Multi-task Learning via Seeking Task-based
Flat Regions").

Per task t, a SAM ascent on the shared parameters ε_t = ρ g_t/‖g_t‖ (and on the task's head,
ρ h_t/‖h_t‖); the loss L_t is recomputed at the perturbed weights (``ctx.recompute``, BN running
statistics frozen) giving g_t^SAM. The shared update is

    A({g_t}) + A'({g_t^SAM − g_t})

with two instances A, A' of the chosen gradient method (stateful methods keep separate states),
each on mtlkit's EW-sum scale; each head takes its own SAM gradient h_t^SAM. ρ = 0 skips the
perturbed passes and is exactly the base method. Cost: T extra forward+backward passes per step.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mtl.balancers.base import Balancer, StepContext, create_balancer, register, require_shared, sync_grads
from mtl.balancers.gradient import (JACOBIAN_METHODS, JacobianBalancer, accumulate, finite_or_cleared, finite_rows,
                                    full_precision)


@register("flat")
class FlatBalancer(Balancer):
    needs_shared_params = True
    computes_own_gradients = True

    def __init__(self, tasks: Sequence[str], aggregator: str = "upgrad", rho: float = 0.05,
                 aggregator_kwargs: dict | None = None, parallel_chunk_size: int | None = None,
                 skip_nonfinite: bool = False, level: str = "params"):
        super().__init__(tasks, skip_nonfinite)
        if aggregator not in JACOBIAN_METHODS:
            raise ValueError(f"flat: balancer.aggregator must be one of {', '.join(JACOBIAN_METHODS)}, got {aggregator!r}")
        if rho < 0:
            raise ValueError(f"flat: balancer.rho must be >= 0, got {rho}")
        self.rho = float(rho)
        kw = dict(aggregator_kwargs or {})
        if level != "params" or kw.get("level", "params") != "params":  # accepted by name so the refusal says why
            key = "balancer.level" if level != "params" else "balancer.aggregator_kwargs.level"
            raise ValueError(f"flat: {key} must be 'params', got {kw.get('level', level)!r}: SAM perturbs the "
                             "parameters, so aggregation is over the shared parameters only")
        if "parallel_chunk_size" in kw:  # flat's own key: it would be overwritten below
            raise ValueError("flat: set balancer.parallel_chunk_size, not inside balancer.aggregator_kwargs")
        if parallel_chunk_size is not None and (isinstance(parallel_chunk_size, bool) or int(parallel_chunk_size) < 1):
            raise ValueError(f"flat: balancer.parallel_chunk_size must be >= 1 or null, got {parallel_chunk_size!r}")
        kw.update(parallel_chunk_size=parallel_chunk_size)
        try:
            self.base: JacobianBalancer = create_balancer(aggregator, self.tasks, **kw)
        except (TypeError, ValueError) as e:  # said as the user wrote it: a key of aggregator_kwargs
            inner = str(e).replace("balancer.", "balancer.aggregator_kwargs.")
            raise type(e)(f"flat: balancer.aggregator_kwargs for aggregator={aggregator}: {inner}") from None
        self.sharp: JacobianBalancer = create_balancer(aggregator, self.tasks, **kw)

    def weights(self) -> dict[str, float]:
        """The base aggregator's weights, of A({g_t}) only: the update also holds A'({g_t^SAM − g_t})."""
        return self.base.weights()

    def backward(self, ctx: StepContext) -> bool | None:
        from torchjd.autojac import jac_to_grad

        require_shared(self, ctx)
        self._stack(ctx.losses)  # checks the losses under this balancer's name, not the inner method's
        shared = list(ctx.shared_params)
        heads = self.base._heads(ctx)
        T = len(self.tasks)
        self.base._jacobian_fields(ctx)  # identical to the base method's first half
        finite = torch.stack([finite_rows(p.jac.reshape(T, -1)) for p in shared if hasattr(p, "jac")]).all(0)
        if not finite_or_cleared(self, finite, self.base._all_params(ctx), ctx.step):
            return False
        if self.rho == 0.0:
            with full_precision(shared[0].device):
                jac_to_grad(shared, self.base.aggregator)
            sync_grads(self.base._all_params(ctx))
            return
        if ctx.recompute is None:
            raise ValueError("flat(rho>0) needs StepContext.recompute to evaluate the losses at perturbed weights")

        jacobian = [p.jac for p in shared]  # TorchJD's documented .jac field: one row per task
        with full_precision(shared[0].device):
            jac_to_grad(shared, self.base.aggregator, retain_jac=True)
        for p in shared:
            del p.jac
        plain_heads = [[p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in h]
                       for h in heads]

        sharp_rows: list[list[torch.Tensor]] = []
        saved = [p.detach().clone() for p in shared]
        for i, task in enumerate(self.tasks):
            g_norm = torch.sqrt(sum((j[i].float() ** 2).sum() for j in jacobian))
            h_norm = torch.sqrt(sum((g.float() ** 2).sum() for g in plain_heads[i])) if heads[i] else None
            head_saved = [p.detach().clone() for p in heads[i]]
            try:  # the weights go back even when the perturbed pass fails
                with torch.no_grad():
                    for p, j in zip(shared, jacobian):
                        p.add_(j[i], alpha=float(self.rho / (g_norm + 1e-12)))
                    for p, g in zip(heads[i], plain_heads[i]):
                        p.add_(g, alpha=float(self.rho / (h_norm + 1e-12)))
                with torch.enable_grad():
                    loss = ctx.recompute(tasks=[task])[task]
                    grads = torch.autograd.grad(loss, shared + heads[i], allow_unused=True)
            finally:
                with torch.no_grad():
                    for p, s in zip(shared + heads[i], saved + head_saved):
                        p.copy_(s)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(shared + heads[i], grads)]
            sharp_rows.append(grads[:len(shared)])
            for p, g_sam, g_plain in zip(heads[i], grads[len(shared):], plain_heads[i]):
                accumulate(p, g_sam - g_plain)  # head: plain grad (already there) -> SAM grad

        flat_matrix = torch.cat(
            [(torch.stack([rows[k] for rows in sharp_rows]) - jacobian[k]).reshape(T, -1) for k in range(len(shared))],
            dim=1,
        )
        if not finite_or_cleared(self, finite_rows(flat_matrix), self.base._all_params(ctx), ctx.step):
            return False  # a gradient at the perturbed weights is not finite
        with full_precision(flat_matrix.device):
            direction = self.sharp.aggregator(flat_matrix.float())
        for p, d in zip(shared, direction.split([p.numel() for p in shared])):
            accumulate(p, d.view_as(p))
        sync_grads(self.base._all_params(ctx))
