"""Gradient aggregation through TorchJD (``torchjd.autojac.mtl_backward`` + its aggregators).

Every task head gets its own task's gradient; the shared parameters get the aggregation of the
task Jacobian, rescaled to mtlkit's EW-sum convention (aligned task gradients -> the EW update):

==============  ================================================  ==========================
name            TorchJD output (rows = task gradients g_t)         mtlkit rescaling
==============  ================================================  ==========================
pcgrad          sum of projected gradients                         × 1
graddrop        sum of sign-masked gradients                       × 1
mgda            convex combination (min-norm point), Σw = 1        × T
imtl_g          affine combination, Σw = 1                         × T
upgrad          mean of dual-cone projections (Σw = 1 w/o conflict)× T
dualproj        mean projected onto the dual cone                  × T
aligned_mtl     mean, rescaled by the smallest singular value      × T
cagrad          g0 + c‖g0‖ g_w/‖g_w‖ (Σw = 1 + c when aligned)     × T / (1 + c)
nash_mtl        ‖d‖ = √T whatever the gradient scale               weights renormalised to Σw = T (no clip)
==============  ================================================  ==========================

``level="features"`` aggregates the Jacobian w.r.t. the shared representation (``ctx.features``)
instead of the shared parameters, then runs one backward of the aggregated feature gradient.
For the weighted aggregators this is exact linear algebra: the parameter update is Σ w_t g_t with
weights computed from the representation Gramian (MGDA-UB, IMTL-G as published); GradDrop runs the
paper's Algorithm 1 there instead (``mtl.balancers.graddrop``). Guarantees (non-conflict for
pcgrad/upgrad/dualproj, Pareto stationarity for mgda) then hold w.r.t. the representation gradients.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

# torchjd (and cvxpy behind it) is imported on first use: `import mtl.balancers` stays cheap
from mtl.balancers.base import (Balancer, NonFiniteGradientError, StepContext, check_finite_gradients, register,
                                require_shared, sync_grads)

log = logging.getLogger(__name__)


def feature_list(features) -> list[torch.Tensor]:
    return [features] if isinstance(features, torch.Tensor) else list(features)


def accumulate(param: torch.Tensor, grad: torch.Tensor | None) -> None:
    if grad is None:
        return
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


def head_backwards(ctx: StepContext, tasks: Sequence[str], extra: Sequence[torch.Tensor] = (),
                   head_scale: Sequence[float] | torch.Tensor | None = None):
    """One backward per task, each through its own head only (a vmapped Jacobian would run every head
    for every task: T x the head cost). Adds ``head_scale[t]`` x its head's gradient to the heads'
    ``.grad`` and returns, per task, its gradients w.r.t. the representation (zeros where unused) and
    w.r.t. ``extra``."""
    feats, extra = feature_list(ctx.features), list(extra)
    out = []
    for i, t in enumerate(tasks):
        head = list(ctx.task_params.get(t, []))
        grads = torch.autograd.grad(ctx.losses[t], feats + head + extra, retain_graph=True, allow_unused=True)
        nf, nh = len(feats), len(head)
        for p, g in zip(head, grads[nf:nf + nh]):
            accumulate(p, g if g is None or head_scale is None else head_scale[i] * g)
        out.append(([torch.zeros_like(f) if g is None else g for g, f in zip(grads[:nf], feats)], grads[nf + nh:]))
    return out


def backward_from_features(ctx: StepContext, grad_outputs: Sequence[torch.Tensor]) -> None:
    """One backward of a representation gradient into the shared parameters' ``.grad``."""
    grads = torch.autograd.grad(feature_list(ctx.features), ctx.shared_params, grad_outputs=list(grad_outputs),
                                allow_unused=True)
    for p, g in zip(ctx.shared_params, grads):
        accumulate(p, g)


def finite_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Per row (dim 0: a task), whether all its entries are finite, read from one sum per row: a NaN or an infinity
    makes the sum non-finite, and a finite row's sum overflows only where its Gramian would too. An elementwise
    ``isfinite`` over a Jacobian allocates a mask of its size every step (~25x slower on a ResNet-18 Jacobian)."""
    acc = torch.promote_types(matrix.dtype, torch.float32)  # fp16 rows summed in float32: no false overflow
    return torch.isfinite(matrix.reshape(matrix.shape[0], -1).sum(1, dtype=acc))


def at_least_float32(_module, args):
    """Forward pre-hook: a bf16/fp16 Jacobian (a ``precision="bf16-true"`` model) is aggregated in float32.
    Products of bf16/fp16 numbers are exact in float32, so G = J Jᵀ then carries float32 accumulation
    rounding only; formed in bf16, its rounding (eps 2^-7) swamps the solvers' tests of a vanishing
    combination, and nash_mtl took mild conflicts for "no bargaining point". TorchJD casts the result
    back to each parameter's dtype."""
    wide = torch.promote_types(args[0].dtype, torch.float32)
    return None if args[0].dtype == wide else (args[0].to(wide), *args[1:])


def finite_or_cleared(balancer: Balancer, finite: torch.Tensor, params: Sequence[torch.Tensor], step: int) -> bool:
    """Whether every task's gradient is finite (``finite``: one flag per task), checked before any solver
    sees them (``check_finite_gradients``: raises unless ``skip_nonfinite``). When the step is skipped, the
    ``.grad`` and TorchJD ``.jac`` of ``params`` are cleared (also before the error): nothing of the step
    is left to apply."""
    try:
        if check_finite_gradients(balancer, finite, step):
            return True
    except NonFiniteGradientError:
        _clear(params)
        raise
    _clear(params)
    return False


def _clear(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = None
        if hasattr(p, "jac"):
            del p.jac


def full_precision(device: torch.device):
    """Autocast off: under mixed precision the aggregators' Gramians and solvers would run in
    bf16/fp16 (and numpy/cvxpy reject those); the Jacobians themselves are float32 already."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


class JacobianBalancer(Balancer):
    """Base class of the TorchJD-backed methods; subclasses build the aggregator and say how its
    output relates to the EW sum (``_rescale``)."""

    needs_shared_params = True
    computes_own_gradients = True
    #: whether ``level="features"`` is allowed
    supports_features_level = True
    #: solve on a float64 copy of the (float32-formed) Gramian
    float64_gramian = True

    def __init__(self, tasks: Sequence[str], level: str = "params", parallel_chunk_size: int | None = None,
                 skip_nonfinite: bool = False):
        super().__init__(tasks, skip_nonfinite)
        if level not in ("params", "features"):
            raise ValueError(f"{self.name}: balancer.level must be 'params' or 'features', got {level!r}")
        if level == "features" and not self.supports_features_level:
            raise ValueError(f"{self.name}: balancer.level=features is not supported (see docs/balancers.md)")
        self.level = level
        if parallel_chunk_size is not None and (isinstance(parallel_chunk_size, bool) or int(parallel_chunk_size) < 1):
            raise ValueError(f"{self.name}: balancer.parallel_chunk_size must be >= 1 or null, got {parallel_chunk_size!r}")
        self.parallel_chunk_size = parallel_chunk_size
        self.aggregator = self._make_aggregator()
        # TorchJD's documented extension point: forward hooks. Rescaling the weights (not the
        # vector) keeps jac_to_grad's returned weights and our logged weights on the EW-sum scale.
        from torchjd.aggregation import WeightedAggregator

        from torchjd.aggregation import GramianWeightedAggregator

        if isinstance(self.aggregator, GramianWeightedAggregator):
            self.aggregator.register_forward_pre_hook(at_least_float32)
        if isinstance(self.aggregator, GramianWeightedAggregator) and self.float64_gramian:
            # T x T solves in float64: in float32, nearly cancelling gradients lose the solvers'
            # defining properties to rounding (tests/balancers/test_aggregator_optima.py)
            self.aggregator.gramian_weighting.register_forward_pre_hook(lambda _m, args: (args[0].double(),))
        if isinstance(self.aggregator, WeightedAggregator):
            self.aggregator.weighting.register_forward_hook(self._weights_hook)
        else:
            self.aggregator.register_forward_hook(self._vector_hook)

    # --- per-method ------------------------------------------------------------------------
    def _make_aggregator(self):
        raise TypeError(f"{type(self).__name__} must define _make_aggregator")

    #: multiplier of TorchJD's weights / vector (see the module docstring)
    factor: float = 1.0

    def _rescale(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.factor

    def _weights_hook(self, _module, inputs, weights: torch.Tensor) -> torch.Tensor:
        scaled = self._rescale(weights).to(inputs[0].dtype)
        self._set_weights(scaled)
        return scaled

    def _vector_hook(self, _module, _inputs, vector: torch.Tensor) -> torch.Tensor:
        self._set_weights([self.factor] * len(self.tasks))  # no per-task weights (e.g. GradDrop)
        return vector * self.factor if self.factor != 1.0 else vector

    # --- backward --------------------------------------------------------------------------
    def backward(self, ctx: StepContext) -> bool | None:
        require_shared(self, ctx)
        if self.level == "features":
            if self._features_backward(ctx) is False:
                return False
        else:
            from torchjd.autojac import jac_to_grad

            if not self._jacobian_to_fields(ctx):
                return False
            with full_precision(ctx.shared_params[0].device):
                jac_to_grad(ctx.shared_params, self.aggregator)
        sync_grads(self._all_params(ctx))

    def _losses(self, ctx: StepContext) -> list[torch.Tensor]:
        self._stack(ctx.losses)  # checks every task has a loss
        return [ctx.losses[t] for t in self.tasks]

    def _heads(self, ctx: StepContext) -> list[list[torch.Tensor]]:
        return [list(ctx.task_params.get(t, [])) for t in self.tasks]

    def _all_params(self, ctx: StepContext) -> list[torch.Tensor]:
        return list(ctx.shared_params) + [p for h in self._heads(ctx) for p in h]

    def _jacobian_to_fields(self, ctx: StepContext) -> bool:
        """Heads' ``.grad`` += own-task gradient; shared params' ``.jac`` = task Jacobian. False: a task's
        row is not finite and the step is skipped (``finite_or_cleared``)."""
        self._jacobian_fields(ctx)
        T = len(self.tasks)
        rows = [finite_rows(p.jac.reshape(T, -1)) for p in ctx.shared_params if hasattr(p, "jac")]
        finite = torch.stack(rows).all(0) if rows else torch.ones(T, dtype=torch.bool)
        return finite_or_cleared(self, finite, self._all_params(ctx), ctx.step)

    def _jacobian_fields(self, ctx: StepContext) -> None:
        from torchjd.autojac import backward as jd_backward, mtl_backward

        losses, heads = self._losses(ctx), self._heads(ctx)
        chunk = self.parallel_chunk_size
        if torch.is_autocast_enabled(ctx.shared_params[0].device.type):
            chunk = 1  # vmapped backward through autocast (bf16) ops fails on their dtypes: go task by task
        if ctx.features is not None:
            mtl_backward(losses, features=ctx.features, tasks_params=heads, shared_params=ctx.shared_params,
                         parallel_chunk_size=chunk)
            return
        # no single representation (e.g. per-task routed features): heads from the summed loss
        # (disjoint heads -> each gets its own task's gradient), Jacobian over the shared params
        flat_heads = [p for h in heads for p in h]
        if flat_heads:
            grads = torch.autograd.grad(torch.stack(losses).sum(), flat_heads, retain_graph=True, allow_unused=True)
            for p, g in zip(flat_heads, grads):
                accumulate(p, g)
        jd_backward(losses, inputs=ctx.shared_params, parallel_chunk_size=chunk)

    def _feature_gradients(self, ctx: StepContext) -> list[list[torch.Tensor]] | None:
        """Per task, its gradients w.r.t. each representation tensor (heads' ``.grad`` filled on the way);
        None: one is not finite and the step is skipped (``finite_or_cleared``)."""
        if ctx.features is None:
            raise ValueError(f"{self.name}(level=features) needs StepContext.features, the shared representation "
                             "the heads consume; this model/module does not provide it (use level=params)")
        self._losses(ctx)  # checks every task has a loss
        grads = [g_feats for g_feats, _ in head_backwards(ctx, self.tasks)]
        finite = torch.stack([torch.stack([finite_rows(g.unsqueeze(0))[0] for g in g_feats]).all()
                              for g_feats in grads])
        return grads if finite_or_cleared(self, finite, self._all_params(ctx), ctx.step) else None

    def _features_backward(self, ctx: StepContext) -> bool | None:
        grads = self._feature_gradients(ctx)
        if grads is None:
            return False
        rows = [torch.cat([g.reshape(-1) for g in g_feats]) for g_feats in grads]
        matrix = torch.stack(rows).float()  # mixed precision: the solvers (numpy, cvxpy) want float32+
        with full_precision(matrix.device):
            direction = self.aggregator(matrix)
        feats = feature_list(ctx.features)
        backward_from_features(ctx, [d.view_as(f).to(f.dtype)
                                     for d, f in zip(direction.split([f.numel() for f in feats]), feats)])


@register("pcgrad")
class PCGradBalancer(JacobianBalancer):
    """Yu et al. 2020, gradient surgery: project each g_t off the conflicting g_s (random order)."""

    def _make_aggregator(self):
        from torchjd.aggregation import PCGrad

        return PCGrad()


class _MeanScaled(JacobianBalancer):
    @property
    def factor(self) -> float:
        return float(len(self.tasks))


@register("mgda")
class MGDABalancer(_MeanScaled):
    """Sener & Koltun 2018: the min-norm point of the convex hull of the g_t, solved on the T x T
    Gramian to a duality-gap tolerance (``mtl.balancers.solvers``; ``solver="exact"`` by default,
    ``"frank_wolfe"`` for the paper's loop)."""

    def __init__(self, tasks, solver: str = "exact", rtol: float = 1e-10, max_iters: int = 10_000,
                 level: str = "params", parallel_chunk_size: int | None = None, skip_nonfinite: bool = False):
        from mtl.balancers.solvers import SOLVERS

        if solver not in SOLVERS:
            raise ValueError(f"mgda: balancer.solver must be one of {SOLVERS}, got {solver!r}")
        if not float(rtol) >= 0 or int(max_iters) < 1:
            raise ValueError(f"mgda: balancer.rtol must be >= 0 and balancer.max_iters >= 1, got rtol={rtol}, max_iters={max_iters}")
        self.solver, self.rtol, self.max_iters = solver, float(rtol), int(max_iters)
        super().__init__(tasks, level, parallel_chunk_size, skip_nonfinite)

    def _make_aggregator(self):
        from mtl.balancers.solvers import gramian_aggregator, min_norm_weights

        return gramian_aggregator(lambda G: min_norm_weights(G, self.solver, self.rtol, max_iters=self.max_iters))


@register("imtl_g")
class IMTLGBalancer(_MeanScaled):
    """Liu et al. 2021 (IMTL-G): the combination whose projections on every unit g_t are equal."""

    def _make_aggregator(self):
        from mtl.balancers.solvers import gramian_aggregator, imtl_g_weights

        return gramian_aggregator(imtl_g_weights)


class _DualCone(_MeanScaled):
    """UPGrad / DualProj: a quadratic program on the dual cone {d : ⟨d, g_t⟩ ≥ 0 ∀t}, solved on the Gramian
    of the unit gradients g_t/‖g_t‖ (the cone is the same) regularised by ``reg_eps``·I
    (``solvers.dual_cone_weights``). Regularising the trace-normalised Gramian instead (as before, and as
    TorchJD does) let a task whose ‖g_t‖² is under ~reg_eps of Σ‖g‖² drop out of the constraint."""

    weighting: str = ""

    def __init__(self, tasks, reg_eps: float = 1e-9, level: str = "params", parallel_chunk_size: int | None = None,
                 skip_nonfinite: bool = False):
        if not 0 <= float(reg_eps) < 1:
            raise ValueError(f"{self.weighting.lower()}: balancer.reg_eps must be in [0, 1), got {reg_eps!r}")
        self.reg_eps = float(reg_eps)
        super().__init__(tasks, level, parallel_chunk_size, skip_nonfinite)

    def _make_aggregator(self):
        from mtl.balancers.solvers import dual_cone_weights, gramian_aggregator

        return gramian_aggregator(lambda G: dual_cone_weights(G, self.weighting, self.reg_eps))


@register("upgrad")
class UPGradBalancer(_DualCone):
    """Quinton & Rey 2024: mean of each g_t projected onto the dual cone of all rows."""

    weighting = "UPGrad"


@register("dualproj")
class DualProjBalancer(_DualCone):
    """The mean gradient projected onto the dual cone of the rows (GEM-style)."""

    weighting = "DualProj"


@register("aligned_mtl")
class AlignedMTLBalancer(_MeanScaled):
    """Senushkin et al. 2023: align the Jacobian's singular values, scaled by ``scale_mode``."""

    # its rank cut-off is max λ · T · eps of the Gramian's dtype: G is formed in float32, so judging
    # its rank at float64's eps would count rounding noise as directions
    float64_gramian = False

    def __init__(self, tasks, scale_mode: str = "min", level: str = "params",
                 parallel_chunk_size: int | None = None, skip_nonfinite: bool = False):
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"aligned_mtl: balancer.scale_mode must be min, median or rmse, got {scale_mode!r}")
        self.scale_mode = scale_mode
        super().__init__(tasks, level, parallel_chunk_size, skip_nonfinite)

    def _make_aggregator(self):
        from torchjd.aggregation import AlignedMTL

        return AlignedMTL(scale_mode=self.scale_mode)


@register("cagrad")
class CAGradBalancer(JacobianBalancer):
    """Liu et al. 2021: maximise the worst task improvement within a ball of radius c‖g0‖ around
    the mean gradient g0."""

    def __init__(self, tasks, c: float = 0.4, norm_eps: float = 1e-4, level: str = "params",
                 parallel_chunk_size: int | None = None, skip_nonfinite: bool = False):
        if c < 0 or norm_eps < 0:
            raise ValueError(f"cagrad: balancer.c and balancer.norm_eps must be >= 0, got c={c}, norm_eps={norm_eps}")
        self.c, self.norm_eps = float(c), float(norm_eps)
        super().__init__(tasks, level, parallel_chunk_size, skip_nonfinite)

    @property
    def factor(self) -> float:
        return len(self.tasks) / (1.0 + self.c)

    #: below this ‖g_w‖ (on G / trace(G)) Clarabel's answer is rounding: on a zero task's gradient it is ~5e-9
    RESOLUTION = 1e-7

    def _make_aggregator(self):
        from torchjd.aggregation import CAGradWeighting

        from mtl.balancers.solvers import gramian_aggregator, scale_free

        weighting = CAGradWeighting(c=self.c, norm_eps=self.norm_eps)

        def weights(gramian: torch.Tensor) -> torch.Tensor:
            # ‖g_w‖ < norm_eps·(the smallest non-zero ‖g_t‖) is a vanishing g_w (mean fallback); relative to √trace
            # it was: a task 1e4× smaller in norm than another fell under it, and the step was the plain mean
            norms = gramian.diagonal().clamp_min(0).sqrt()
            relative = self.norm_eps * float(norms[norms > 0].min())
            weighting.norm_eps = max(relative, self.RESOLUTION)
            w = weighting(gramian)
            if relative < self.RESOLUTION and not bool(w.abs().sum() > 0) and bool((norms > 0).all()):
                if not self._warned_spread:
                    self._warned_spread = True
                    log.warning("cagrad: the task gradient norms differ by about %.1e x, beyond what its solver "
                                "resolves (~1e7 x); this step uses the mean gradient. Warned once.",
                                float(norms.max() / norms.min()))
            return w

        return gramian_aggregator(scale_free(weights, fallback_to_mean=True))

    _warned_spread = False


#: the gradient methods, for `flat`'s ``aggregator=`` and for docs/tests
JACOBIAN_METHODS = ("pcgrad", "mgda", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "dualproj", "graddrop")
