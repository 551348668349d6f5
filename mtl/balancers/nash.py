"""Nash-MTL (Navon et al., ICML 2022) as a TorchJD gramian aggregator: the bargaining weights solved by Newton
steps every ``update_weights_every`` steps, their schedule carried in checkpoints."""
from __future__ import annotations

import logging

import torch

from mtl.balancers.base import register
from mtl.balancers.gradient import JacobianBalancer

log = logging.getLogger("mtl.balancers.gradient")  # the logger its warning has always used


@register("nash_mtl")
class NashMTLBalancer(JacobianBalancer):
    """Navon et al. 2022: the Nash bargaining solution α_t (G α)_t = 1, solved exactly by Newton steps
    (``mtl.balancers.solvers.nash_weights``), recomputed every ``update_weights_every`` steps.

    Its direction's norm is √T whatever the gradient scale, so the scale is carried by nothing;
    mtlkit renormalises the weights to sum to T (the paper's max-norm clip is left to the trainer's
    gradient clipping). Where no bargaining point exists (some convex combination of the gradients
    vanishes, to the rounding of the Gramian: ``nash_weights``) the step uses equal weights; such steps
    are counted in ``solver_failures`` and reported once per run. Steps where Newton stops at ``max_iters`` above √tol (a point may exist) also
    use equal weights, but are counted apart, in ``not_converged``.
    """

    RANK_LOCAL = ("alpha",)  # each rank solves from its own gradients

    def __init__(self, tasks, update_weights_every: int = 1, tol: float = 1e-10, max_iters: int = 100,
                 level: str = "params", parallel_chunk_size: int | None = None, skip_nonfinite: bool = False):
        if int(update_weights_every) < 1:
            raise ValueError(f"nash_mtl: balancer.update_weights_every must be >= 1, got {update_weights_every}")
        if not tol > 0 or int(max_iters) < 1:  # otherwise Newton never converges: equal weights every step
            raise ValueError(f"nash_mtl: balancer.tol must be > 0 and balancer.max_iters >= 1, got tol={tol}, max_iters={max_iters}")
        self.update_weights_every, self.tol, self.max_iters = int(update_weights_every), float(tol), int(max_iters)
        self.solver_failures = self.not_converged = 0
        self._calls, self._alpha = 0, None
        super().__init__(tasks, level, parallel_chunk_size, skip_nonfinite)

    def _make_aggregator(self):
        from mtl.balancers.solvers import gramian_aggregator

        aggregator = gramian_aggregator(self._weights)
        # registered before JacobianBalancer's float64 cast: the rounding of "0 in the hull" is that of the
        # dtype TorchJD formed the Gramian in, float32 or wider (gradient.at_least_float32; a float32 Gramian
        # of rank-deficient gradients is slightly definite)
        aggregator.gramian_weighting.register_forward_pre_hook(self._note_gramian_dtype)
        return aggregator

    def _note_gramian_dtype(self, _module, args) -> None:
        self._gramian_eps = torch.finfo(args[0].dtype).eps

    def _weights(self, gramian: torch.Tensor) -> torch.Tensor:
        from mtl.balancers.solvers import NashNotConverged, nash_weights

        due = self._calls % self.update_weights_every == 0 or self._alpha is None
        self._calls += 1
        if due:
            try:
                alpha = nash_weights(gramian, self.tol, self.max_iters, eps=getattr(self, "_gramian_eps", None))
            except NashNotConverged as e:
                self.not_converged += 1
                if self.not_converged == 1:
                    log.warning("nash_mtl: the bargaining solver %s; using equal weights for this step (raise "
                                "balancer.max_iters or balancer.tol). Later such steps are only counted "
                                "(balancer.not_converged).", e)
                alpha = None
            else:
                if alpha is None:
                    self.solver_failures += 1
                    if self.solver_failures == 1:
                        log.warning("nash_mtl: no bargaining point for this step's gradients (a convex combination "
                                    "vanishes); using equal weights. Later such steps are only counted "
                                    "(balancer.solver_failures).")
            if alpha is None:
                alpha = torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
            self._alpha = alpha
        return self._alpha.to(gramian)  # a no-op unless restored from a checkpoint (on the CPU)

    def _rescale(self, w: torch.Tensor) -> torch.Tensor:
        return w * (len(self.tasks) / w.sum())

    def reset(self) -> None:
        self._calls, self._alpha = 0, None

    # the solve schedule, the weights in use between solves and the failure count span steps, so
    # they travel in checkpoints (a resumed run solves at the same steps as an uninterrupted one);
    # under DDP every rank's (RANK_LOCAL); alpha None: solved at the next step
    def get_extra_state(self):
        alpha = None if self._alpha is None else self._alpha.detach().cpu()
        return {"calls": self._calls, "alpha": alpha, "solver_failures": self.solver_failures,
                "not_converged": self.not_converged}

    def set_extra_state(self, state) -> None:
        state = state or {}  # None: a checkpoint from before these were saved (module.on_load_checkpoint)
        self._calls, self.solver_failures = int(state.get("calls", 0)), int(state.get("solver_failures", 0))
        self.not_converged = int(state.get("not_converged", 0))
        self._alpha = state.get("alpha")
