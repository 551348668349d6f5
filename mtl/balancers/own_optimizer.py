"""Loss-level balancers that learn their task weights with an optimiser of their own: GradNorm
(Chen et al. 2018) and FAMO (Liu et al. 2023). Same scale convention as ``loss_level``: the weights
sum to T (``ew`` = 1 per task).
"""
from __future__ import annotations

from typing import Sequence

import torch

from mtl.balancers.base import Balancer, StepContext, dist_mean, register, sync_grads
from mtl.balancers.gradient import backward_from_features, feature_list, finite_or_cleared, head_backwards


class _OwnOptimizer(Balancer):
    """A balancer that tunes one of its buffers with its own optimiser (GradNorm's weights, FAMO's
    logits). Buffers rather than parameters: the module's optimiser must not touch them and DDP
    must not wait for their gradients. The optimiser state travels in the state dict."""

    _opt: torch.optim.Optimizer | None = None
    _pending_state: dict | None = None

    def _init_own(self, buffer: str, lr: float, weight_decay: float, optimizer: str) -> None:
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"{self.name}: balancer.optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if lr <= 0:
            raise ValueError(f"{self.name}: balancer.lr must be > 0, got {lr}")
        self._own_buffer, self.lr, self.weight_decay, self.optimizer = buffer, float(lr), float(weight_decay), optimizer

    def _own_step(self, grad: torch.Tensor, frozen: torch.Tensor | None = None) -> None:
        """One step of the own optimiser; entries where ``frozen`` is True keep their value and (Adam) their
        moments: momentum from earlier steps would otherwise move them without a gradient of their own."""
        buf = getattr(self, self._own_buffer)
        if self._opt is None or self._opt.param_groups[0]["params"][0] is not buf:
            # (re)bind after .to(device) replaced the buffer or after a checkpoint load
            state = self._opt.state_dict() if self._opt is not None else self._pending_state
            cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
            self._opt = cls([buf], lr=self.lr, weight_decay=self.weight_decay)
            if state:
                self._opt.load_state_dict(state)
            self._pending_state = None
        buf.grad = grad.detach().to(buf)
        keep = None
        if frozen is not None and bool(frozen.any()):
            state = self._opt.state.get(buf, {})
            keep = [(t, t[frozen].clone()) for t in [buf, *(v for v in state.values() if torch.is_tensor(v)
                                                            and v.shape == buf.shape)]]
        self._opt.step()
        buf.grad = None
        if keep is not None:
            with torch.no_grad():
                for t, v in keep:
                    t[frozen] = v

    def get_extra_state(self):
        return {"optimizer": self._opt.state_dict() if self._opt is not None else self._pending_state}

    def set_extra_state(self, state) -> None:
        self._pending_state = (state or {}).get("optimizer")
        self._opt = None


@register("gradnorm")
class GradNorm(_OwnOptimizer):
    """Chen et al. 2018, α = 1.5.

    Network update: backward of Σ w_t L_t. Weight update (own optimiser, ``lr``): the gradient of
    L_grad = Σ_t |G_t − Ḡ · r_t^α| w.r.t. w, where G_t = w_t ‖∇_W L_t‖, Ḡ = mean_t G_t and
    r_t = (L_t/L_t(0)) / mean_s(L_s/L_s(0)), Ḡ·r^α held constant; then w is renormalised to sum to T.
    L_t(0) is task t's first positive loss (until it has one, r_t = 1).
    Since G_t is linear in w_t, ∂L_grad/∂w_t = sign(G_t − target_t) · ‖∇_W L_t‖ exactly (no
    second-order backward needed).

    ``level="params"``: W is ``ctx.anchor`` (the module passes the model's last shared layer weight,
    never a stacked expert bias or a router's projection), else the last shared parameter with ≥ 2
    dimensions in ``ctx.shared_params`` order (models list parameters in forward order). ``level="features"``: gradients w.r.t. the shared representation
    (cheaper, independent of parameter order).
    """

    computes_own_gradients = True  # when the representation is known (the single-pass backward)

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, lr: float = 0.025, level: str = "params",
                 optimizer: str = "adam", skip_nonfinite: bool = False):
        super().__init__(tasks, skip_nonfinite)
        if not float(alpha) >= 0:
            raise ValueError(f"gradnorm: balancer.alpha must be >= 0, got {alpha}")
        if level not in ("params", "features"):
            raise ValueError(f"gradnorm: balancer.level must be 'params' or 'features', got {level!r}")
        self.alpha, self.level = float(alpha), level
        T = len(self.tasks)
        self.register_buffer("task_weights", torch.ones(T))
        self.register_buffer("initial_losses", torch.full((T,), float("nan")))
        self._init_own("task_weights", lr, 0.0, optimizer)

    def _anchor(self, ctx: StepContext) -> list[torch.Tensor]:
        if self.level == "features":
            if ctx.features is None:
                raise ValueError("gradnorm(level=features) needs StepContext.features (the shared representation)")
            return feature_list(ctx.features)
        if ctx.anchor is not None:
            return [ctx.anchor]
        weights = [p for p in ctx.shared_params if p.ndim >= 2] or list(ctx.shared_params)
        if not weights:
            raise ValueError("gradnorm(level=params) needs a shared layer, but StepContext.shared_params is empty; "
                             "use level=features or a model with a shared part")
        return [weights[-1]]

    def combine(self, losses, step=0):
        L = self._stack(losses)
        return (self.task_weights.to(L) * L).sum()

    def backward(self, ctx: StepContext) -> bool | None:
        L = self._stack(ctx.losses)
        Ld = L.detach().float()
        self._warn_negative(Ld, ctx.step)
        anchor = self._anchor(ctx)
        w = self.task_weights.detach().clone().to(Ld.device)
        if ctx.features is not None:
            norms = self._backward_through_features(ctx, w, anchor)
        else:  # one autograd.grad per task (each through its own head only), then the weighted backward
            norms = torch.stack([_grad_norm(ctx.losses[t], anchor) for t in self.tasks]).to(Ld.device)
            ctx.backward((w.to(L.dtype) * L).sum())
        params = list(ctx.shared_params) + [p for t in self.tasks for p in ctx.task_params.get(t, [])]
        if not finite_or_cleared(self, torch.isfinite(norms), params, ctx.step):
            return False  # a NaN norm would turn its weights NaN for good
        unset = torch.isnan(self.initial_losses)
        if unset.any():  # each task's L(0) is its first positive loss: a first batch with no valid pixel
            mean = dist_mean(Ld).to(self.initial_losses)  # (loss 0) would make its rate look 10¹² x too fast
            self.initial_losses.copy_(torch.where(unset & (mean > 0), mean, self.initial_losses))
        G = w * norms
        L0 = self.initial_losses.to(Ld.device)
        known = ~torch.isnan(L0)
        rate = Ld / L0.nan_to_num(1.0)
        # a task with no L(0) yet trains at the others' mean rate (r = 1): neither pushed nor held back
        rate = torch.where(known, rate, rate[known].mean() if known.any() else torch.ones_like(rate))
        # a negative loss (a model's aux term) has no training rate: taken as 0, the fastest, so its target
        # norm is 0 and its weight falls (r < 0 made r^α NaN, and the weight's update sign(NaN) = 0)
        rate = rate.clamp_min(0.0)
        r = rate / rate.mean().clamp_min(1e-12)
        target = G.mean() * r.pow(self.alpha)
        grad_w = dist_mean(torch.sign(G - target) * norms)
        self._set_weights(w)

        self._own_step(grad_w)
        with torch.no_grad():
            new = self.task_weights.clamp_min(1e-4)
            self.task_weights.copy_(new * len(self.tasks) / new.sum())


    def _backward_through_features(self, ctx: StepContext, w: torch.Tensor, anchor: list[torch.Tensor]) -> torch.Tensor:
        """The network gradient of Σ w_t L_t and the T norms at the anchor in one pass: task t's backward
        runs through its own head to the representation (and the anchor), once; the shared part then
        gets a single backward of Σ_t w_t ∂L_t/∂z. Costs ≈ ew plus T short backwards from z to W."""
        at_feats = self.level == "features"
        per_task = head_backwards(ctx, self.tasks, extra=() if at_feats else anchor, head_scale=w)
        dz = [torch.zeros_like(f) for f in feature_list(ctx.features)]
        for wt, (g_feats, _) in zip(w.tolist(), per_task):
            for acc, g in zip(dz, g_feats):
                acc.add_(g, alpha=wt)
        backward_from_features(ctx, dz)
        # autograd.grad never fires DDP's reducer hooks: average over ranks ourselves
        sync_grads(list(ctx.shared_params) + [p for t in self.tasks for p in ctx.task_params.get(t, [])])
        return torch.stack([_l2(g_feats if at_feats else g_anchor) for g_feats, g_anchor in per_task]).to(w.device)


def _l2(grads) -> torch.Tensor:
    """Euclidean norm of a list of gradients (None: unused), in float32."""
    squares = [g.float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def _grad_norm(loss: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    return _l2(torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True))


@register("famo")
class FAMO(_OwnOptimizer):
    """Liu et al. 2023, "FAMO: Fast Adaptive Multitask Optimization".

    Task logits ξ, z = softmax(ξ). One backward per step of Σ_t w_t L_t with
    w_t = T · c · z_t / L_t, c = (Σ_s z_s / L_s)^−1 — the gradient of T·c·Σ z_t log L_t, a convex
    combination (×T for the EW-sum scale) that equalises the tasks' log-loss decrease rates.

    After the optimiser step the losses on the same batch are recomputed without gradient
    (``ctx.recompute``, BN statistics frozen), Δ_t = log L_t(before) − log L_t(after), and
    ξ ← ξ − lr · (Jᵀ Δ + weight_decay · ξ) with J = ∂z/∂ξ = diag(z) − z zᵀ — by Adam as in the
    paper (``optimizer=adam``, lr 0.025, weight decay 1e-3), or plainly (``optimizer=sgd``).
    ``recompute=false`` skips the extra forward and measures Δ against the next step's losses
    (another batch: cheaper, noisier). Losses are assumed ≥ 0 (floored at ``eps``). A task whose loss
    is exactly 0 (a batch without a valid pixel) carries no signal: it gets weight 0 for that step (the
    others share T) and no logit update — as 1/eps it would take all the weight and stall the others.
    """

    def __init__(self, tasks: Sequence[str], lr: float = 0.025, weight_decay: float = 1e-3,
                 optimizer: str = "adam", recompute: bool = True, eps: float = 1e-8,
                 skip_nonfinite: bool = False):
        super().__init__(tasks, skip_nonfinite)
        if not float(eps) > 0 or not float(weight_decay) >= 0:  # eps = 0 takes log 0 on a zero loss
            raise ValueError(f"famo: balancer.eps must be > 0 and balancer.weight_decay >= 0, got eps={eps}, weight_decay={weight_decay}")
        self.recompute, self.eps = bool(recompute), float(eps)
        self.register_buffer("logits", torch.zeros(len(self.tasks)))
        self._init_own("logits", lr, weight_decay, optimizer)
        self._before: torch.Tensor | None = None  # log-losses that produced the last update
        self._z: torch.Tensor | None = None
        self._live: torch.Tensor | None = None  # which of those losses were > 0

    def _weights_for(self, L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.softmax(self.logits.float(), dim=0).to(L.device)
        live = L > 0
        if not bool(live.any()):  # every loss 0: nothing to weigh
            return torch.ones_like(z), z
        inv = torch.where(live, z / L.clamp_min(self.eps), torch.zeros_like(z))
        return len(self.tasks) * inv / inv.sum(), z

    def combine(self, losses, step=0):
        L = self._stack(losses)
        w, _ = self._weights_for(L.detach().float())
        return (w.to(L.dtype) * L).sum()

    def backward(self, ctx: StepContext) -> None:
        L = self._stack(ctx.losses)
        self._warn_negative(L.detach().float(), ctx.step)
        # the weights (and the logit update) read the global batch's losses, the mean over DDP ranks of theirs:
        # every rank uses the same weights, so DDP's averaged gradient of Σ w_t L_t is the global batch's, as in
        # one process (each rank's own losses would give each its own weights)
        Ld = dist_mean(L.detach().float())
        if not self.recompute and self._before is not None:
            self._update(Ld)  # the previous step's decrease, seen on this batch
        w, z = self._weights_for(Ld)
        ctx.backward((w.to(L.dtype) * L).sum())
        self._set_weights(w)
        # a zero loss has no log: the log of eps stands in, and its task's change is not counted. With
        # recompute=false the pending log-losses span steps, hence checkpoints: every rank holds the same ones
        self._before, self._z, self._live = Ld.clamp_min(self.eps).log(), z, Ld > 0

    def after_step(self, ctx: StepContext) -> None:
        if not self.recompute or self._before is None:
            return
        if ctx.recompute is None:
            raise ValueError("famo(recompute=true) needs StepContext.recompute; pass one or set recompute=false")
        with torch.no_grad():
            after = dist_mean(self._stack(ctx.recompute()).detach().float())  # the global batch's, as before
        self._update(after)

    def get_extra_state(self):
        # with recompute=false the pending update (the log-losses and z of the last step) spans
        # steps, hence checkpoints: without it a resumed run would skip that step's logit update
        pending = {k: None if v is None else v.detach().cpu()
                   for k, v in (("before", self._before), ("z", self._z), ("live", self._live))}
        return super().get_extra_state() | pending

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        state, dev = state or {}, self.logits.device
        self._before, self._z, self._live = (None if state.get(k) is None else state[k].to(dev)
                                             for k in ("before", "z", "live"))

    def _update(self, after: torch.Tensor) -> None:
        after = after.to(self._before.device)
        delta = self._before - after.clamp_min(self.eps).log()
        # a task with a zero loss before or after the step has no decrease to learn from: its change is set to
        # the z-weighted mean of the others', which leaves its logit where it is ((Jᵀδ)_t = z_t (δ_t − z·δ) = 0)
        live = (after != 0) & (self._live.to(after.device) if self._live is not None else True)  # NaN stays, named below
        if not bool(live.any()):  # nothing to learn from
            delta = torch.zeros_like(delta)
        elif not bool(live.all()):
            zl = self._z.to(delta.device) * live
            delta = torch.where(live, delta, (zl * torch.where(live, delta, torch.zeros_like(delta))).sum() / zl.sum())
        frozen = ~live  # its logit and moments stay (the losses are the ranks' mean: the same on every rank)
        if not bool(torch.isfinite(delta).all()):
            # one inf/NaN loss (a recompute on a batch the step broke) would make the logits, hence every
            # later weight, NaN for good: skip this logit update, as skip_nonfinite skips a step
            from mtl.balancers.base import log

            bad = [t for t, d in zip(self.tasks, delta.tolist()) if not torch.isfinite(torch.tensor(d))]
            log.warning("famo: non-finite loss change for task(s) %s; logit update skipped", bad)
            self._before = None
            return
        z = self._z
        jac = torch.diag(z) - torch.outer(z, z)  # ∂z/∂ξ, symmetric
        self._own_step(jac @ delta, frozen=frozen)
        self._before = None
