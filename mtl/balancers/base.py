"""The Balancer concept: per-task losses (and, for gradient methods, gradients) -> one update.

The MultiTaskModule runs Lightning in manual-optimisation mode and, every training step, does

    opt.zero_grad()
    ctx = StepContext(...)            # losses, parameter groups, shared features, closures
    if not check_finite(ctx.losses, balancer.skip_nonfinite, ctx.step):
        return                        # step skipped (only when skip_nonfinite=True)
    if balancer.backward(ctx) is False:  # fills .grad of every trainable parameter
        return                        # a non-finite task gradient, skipped (skip_nonfinite=True)
    opt.step(); scheduler.step()
    balancer.after_step(ctx)          # e.g. FAMO's logit update from the new losses

Loss-level methods only implement ``combine`` (weighted sum of the losses); gradient methods
override ``backward``. Every balancer reports its current task weights through ``weights()``.

Scale convention (docs/balancers.md): every balancer produces a shared-parameter update on the
scale of the equal-weight *sum* of the task gradients, so a learning rate tuned for ``ew`` is
sensible for all of them; ``weights()`` are reported on the same scale (``ew`` = 1 per task).
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mtl.registry import Registry, check_kwargs

BALANCERS: "Registry[type[Balancer]]" = Registry("balancer")
log = logging.getLogger("mtl.balancers")

Features = torch.Tensor | Sequence[torch.Tensor]


@dataclass
class StepContext:
    """What a balancer may use during one training step."""

    #: {task: scalar loss}, already multiplied by the task's static weight, part of the graph
    losses: dict[str, torch.Tensor]
    #: parameters shared by all tasks (backbone + shared decoder), requires_grad only
    shared_params: list[nn.Parameter]
    #: {task: parameters only that task uses (its head)}
    task_params: dict[str, list[nn.Parameter]]
    #: the shared representation the task heads consume (part of the graph): one tensor or a
    #: sequence of tensors (multi-scale), batch on dim 0; None if unavailable. When given, every loss
    #: must reach ``shared_params`` only through it: gradient methods and gradnorm backpropagate from
    #: here, so a term that bypasses it (a router's aux loss) silently gets no gradient from them
    features: Features | None
    #: the last shared layer's weight (``mtl.models.families.last_shared_weight``; GradNorm's W); None:
    #: the last of ``shared_params`` with ≥ 2 dims
    anchor: nn.Parameter | None = None
    #: backward that respects Lightning's precision/DDP plugins (LightningModule.manual_backward)
    backward: Callable[..., None] = field(default=lambda loss, **kw: loss.backward(**kw))
    #: ``recompute(tasks=None) -> {task: loss}``: re-run the forward pass on the same batch at the
    #: *current* parameter values, for ``tasks`` (all when None). It must (a) leave batch-norm
    #: running statistics untouched (batch statistics are still used, as in the training pass),
    #: (b) run the unwrapped model (not the DDP wrapper), (c) follow the caller's grad mode.
    #: Used by ``flat`` (at perturbed weights, with grad) and ``famo`` (after the step, no grad).
    recompute: Callable[..., dict[str, torch.Tensor]] | None = None
    #: global optimisation step (0-based)
    step: int = 0
    #: current epoch (0-based); DWA's default window
    epoch: int = 0


class NonFiniteLossError(FloatingPointError):
    """A task loss is NaN or infinite; the message names the task(s)."""


class NonFiniteGradientError(NonFiniteLossError):
    """A task's gradient is NaN or infinite though its loss is finite; the message names the task(s)."""


class Balancer(nn.Module):
    #: True when the method needs gradients w.r.t. the shared parameters (Jacobian methods)
    needs_shared_params: bool = False
    #: True when the method fills ``.grad`` itself through ``torch.autograd.grad`` (not the
    #: module's backward), so Lightning's fp16 loss scaling never sees those gradients
    computes_own_gradients: bool = False

    def __init__(self, tasks: Sequence[str], skip_nonfinite: bool = False):
        super().__init__()
        if not tasks:
            raise ValueError("a balancer needs at least one task")
        self.tasks = list(tasks)
        self.skip_nonfinite = bool(skip_nonfinite)
        self._last_weights = {t: 1.0 for t in self.tasks}

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    # loss-level methods implement this
    def combine(self, losses: dict[str, torch.Tensor], step: int = 0) -> torch.Tensor:
        """Weighted total loss. Default: equal weights (sum)."""
        return self._stack(losses).sum()

    def backward(self, ctx: StepContext) -> bool | None:
        """Fill the .grad of every trainable parameter. Default: backward of `combine`. A gradient method
        returns False when it skipped the step (a non-finite task gradient under ``skip_nonfinite``;
        no ``.grad`` is left): the caller then makes no optimiser step."""
        ctx.backward(self.combine(ctx.losses, ctx.step))

    def after_step(self, ctx: StepContext) -> None:
        """Called after the optimiser step (FAMO measures its loss decrease here)."""

    #: counters a method keeps about its own run (``nash_mtl``'s ``solver_failures``: steps where its
    #: solver found no solution and fell back to equal weights; ``not_converged``: steps where it stopped at
    #: max_iters short of one); `diagnostics` reports them
    COUNTERS = ("solver_failures", "not_converged")

    #: keys of ``get_extra_state()`` whose values differ per DDP rank (``nash_mtl``'s weights in use, solved from
    #: each rank's own gradients): checkpoints keep every rank's extra state and each rank resumes its own
    #: (`mtl.distributed.restore_rank_states`)
    RANK_LOCAL: tuple[str, ...] = ()

    def diagnostics(self) -> dict[str, int]:
        """This run's counters, for metrics.json; a nested balancer (flat's) adds its own, prefixed."""
        out = {k: int(getattr(self, k)) for k in self.COUNTERS if hasattr(self, k)}
        for name, child in self.named_children():
            if isinstance(child, Balancer):
                out |= {f"{name}.{k}": v for k, v in child.diagnostics().items()}
        return out

    def weights(self) -> dict[str, float]:
        """The task weights used in the last step, for logging (EW-sum scale: ``ew`` gives 1)."""
        return dict(self._last_weights)

    def _set_weights(self, w: torch.Tensor | Sequence[float]) -> None:
        values = w.detach().float().cpu().tolist() if isinstance(w, torch.Tensor) else list(w)
        self._last_weights = {t: float(v) for t, v in zip(self.tasks, values)}

    _warned_negative = False

    def _warn_negative(self, L: torch.Tensor, step: int | None = None) -> None:
        """For methods that read loss values as positive scales (ratios, logs, 1/L): warn once when a task
        loss is < 0, as a model's aux term added to each task loss (decoder.mi_weight's −MI) can make it.
        Exactly 0 (a batch without a valid pixel) is not warned about: these methods handle it."""
        if self._warned_negative or not bool((L.detach() < 0).any()):
            return
        self._warned_negative = True
        neg = ", ".join(f"{t}={v:.4g}" for t, v in zip(self.tasks, L.detach().float().tolist()) if v < 0)
        where = f" at step {step}" if step is not None else ""
        log.warning("balancer %r: negative task loss%s (%s); it weighs tasks by their loss values, taken to be > 0, "
                    "so its weights are meaningless for such a task (famo gives it weight 0, or equal weights when every "
                    "loss is <= 0; gradnorm takes its training rate as 0, so its weight falls; dwa reads a falling ratio, or r = 1 once a window's mean is <= 0). A model's aux "
                    "loss added to each task loss can do this (decoder.mi_weight's -MI term); use a balancer that "
                    "does not read loss values (ew, rlw, a gradient method) or a smaller decoder.mi_weight. "
                    "Warned once.", self.name, where, neg)

    def _stack(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The task losses as a (T,) vector in ``self.tasks`` order. Every balancer's step goes through
        here, so the losses are checked here (`check_losses`)."""
        self.check_losses(losses)
        return torch.stack([losses[t] for t in self.tasks])

    def check_losses(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Refuse a missing task loss, or one that is not one number: a (1,) or per-pixel loss would stack
        to (T, 1) or worse, and ``w * L`` would broadcast to (T, T)."""
        missing = [t for t in self.tasks if t not in losses]
        if missing:
            raise KeyError(f"balancer {self.name!r}: no loss for task(s) {missing}; got {sorted(losses)}")
        for t in self.tasks:
            loss = losses[t]
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"balancer {self.name!r}: the loss of task {t!r} must be a scalar (0-dim) tensor, "
                                 f"got {got}; reduce it (e.g. .mean()) before the balancer")


def register(name: str):
    """Register a Balancer class under ``name`` (also stored as ``cls.registry_name``)."""

    def deco(cls: type[Balancer]) -> type[Balancer]:
        cls.registry_name = name
        return BALANCERS.register(name)(cls)

    return deco


def create_balancer(name: str, tasks: Sequence[str], **kwargs) -> Balancer:
    """The balancer registered as `name` for the task names `tasks` (in the order their losses come),
    with its hyper-parameters as keyword arguments; unknown or non-finite ones are refused by name."""
    cls = BALANCERS.get(name)
    if isinstance(tasks, (str, bytes)) or not all(isinstance(t, str) for t in tasks):
        # "depth" would be read as the tasks 'd', 'e', 'p', ...
        raise TypeError(f"tasks must be a list of task names such as ['semseg', 'depth'], got {tasks!r}")
    tasks = list(tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must name each task once (at least one), got {tasks}")
    try:
        inspect.signature(cls).bind(tasks, **kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(cls).parameters if p != "tasks"]
        raise TypeError(f"balancer {name!r}: {err}; its hyper-parameters are: {', '.join(params)}") from None
    check_kwargs(cls, kwargs, "balancer")
    for key, value in kwargs.items():  # NaN passes every `x < 0` check and fails steps later, elsewhere
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"balancer.{key} must be finite, got {value!r}")
    return cls(tasks, **kwargs)


# --- bad input -------------------------------------------------------------------------------


def check_finite(losses: Mapping[str, torch.Tensor], skip: bool = False, step: int | None = None) -> bool:
    """True when every task loss is finite. Otherwise raise `NonFiniteLossError` naming the
    task(s), or, with ``skip=True``, log a warning and return False (the caller skips the step).

    Under DDP the verdict is agreed across ranks (one all-reduce), so every rank skips or raises
    together instead of some ranks waiting forever in the next collective.
    """
    names = list(losses)
    bad = _agreed_nonfinite(names, torch.stack([~torch.isfinite(losses[t].detach()).all() for t in names]))
    if not bad:
        return True
    values = ", ".join(f"{t}={float(losses[t].detach().float().sum()):g}" for t in bad)
    where = f" at step {step}" if step is not None else ""
    if skip:
        log.warning("non-finite loss for task(s) %s%s (%s); skipping this step (skip_nonfinite=true)",
                    bad, where, values)
        return False
    raise NonFiniteLossError(
        f"non-finite loss for task(s) {', '.join(repr(t) for t in bad)}{where} ({values}); "
        "set balancer.skip_nonfinite=true to skip such steps instead"
    )


def check_finite_gradients(balancer: Balancer, finite: torch.Tensor, step: int | None = None) -> bool:
    """``check_finite`` for the task gradients a gradient method is about to aggregate (``finite``: one
    flag per task of ``balancer.tasks``): a finite loss can still have a NaN/inf gradient (sqrt or norm at
    0, a bf16 overflow in the backward), which the solvers would fail on or spread over the update."""
    bad = _agreed_nonfinite(balancer.tasks, ~finite)
    if not bad:
        return True
    what = (f"balancer {balancer.name!r}: non-finite gradient for task(s) {', '.join(repr(t) for t in bad)}"
            f"{f' at step {step}' if step is not None else ''} (the loss is finite; e.g. a sqrt or norm at 0, or an "
            "overflow in the backward)")
    if balancer.skip_nonfinite:
        log.warning("%s; skipping this step (skip_nonfinite=true)", what)
        return False
    raise NonFiniteGradientError(f"{what}; set balancer.skip_nonfinite=true to skip such steps instead")


def _agreed_nonfinite(names: Sequence[str], flags: torch.Tensor) -> list[str]:
    """The names whose flag is set on any DDP rank (one all-reduce when distributed)."""
    flags = flags.to(torch.float32)
    if _world_size() > 1:
        flags = flags.to(_comm_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [t for t, f in zip(names, flags.tolist()) if f > 0]


def check_level(balancer: Balancer, model: nn.Module, family: str | None = None) -> None:
    """``level="features"`` needs one representation every task head reads; refused when built (by
    `MultiTaskModule` and before a run folder): the balancer itself would fail only at the first step. ``family``:
    the model's, where its config cannot be read (a model on the meta device)."""
    if getattr(balancer, "level", None) == "features" and not getattr(model, "shared_representation", True):
        family = family or model.config.get("family")
        raise ValueError(f"balancer.level=features needs one representation every task head reads, and family "
                         f"{family!r} has none (its backbone is task-conditioned); use balancer.level=params")


def require_shared(balancer: Balancer, ctx: StepContext) -> None:
    if not ctx.shared_params:
        raise ValueError(
            f"balancer {balancer.name!r} aggregates task gradients over the shared parameters, but this "
            "model has no shared trainable parameter (StepContext.shared_params is empty); use a "
            "loss-level balancer such as 'ew', or unfreeze the shared part"
        )


# --- distributed helpers ---------------------------------------------------------------------


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over DDP ranks (identity when not distributed)."""
    if _world_size() == 1:
        return t
    buf = t.detach().to(_comm_device(), torch.float32).clone()
    dist.all_reduce(buf)
    return (buf / _world_size()).to(t.device, t.dtype)


def sync_grads(params: Iterable[torch.Tensor]) -> None:
    """Average ``.grad`` over DDP ranks.

    Gradient methods compute gradients with ``torch.autograd.grad`` (TorchJD does too), which never
    fires DDP's reducer hooks, so they average the final gradients themselves. Averaging the
    aggregated direction (rather than the Jacobian) keeps replicas identical even for randomised
    aggregators (PCGrad, GradDrop).
    """
    if _world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads]).to(_comm_device())
    dist.all_reduce(flat)
    flat /= _world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g).to(g.device, g.dtype))
        offset += n


# --- batch-norm freezing for recompute closures ----------------------------------------------


class freeze_norm_stats:
    """Context manager: forward passes inside use batch statistics but leave the running
    statistics of every batch-norm-like layer as they were.

    Momentum is set to 0 (running = 1·running + 0·batch) rather than saving and copying the
    buffers back: training-mode batch norm saves the running buffers for its backward, so an
    in-place restore before that backward would invalidate the graph.
    """

    def __init__(self, module: nn.Module):
        self.layers = [m for m in module.modules()
                       if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training]

    def __enter__(self) -> "freeze_norm_stats":
        self.saved = []
        for m in self.layers:
            nbt = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            self.saved.append((m.momentum, nbt))
            m.momentum = 0.0
        return self

    def __exit__(self, *exc) -> None:
        for m, (momentum, nbt) in zip(self.layers, self.saved):
            m.momentum = momentum
            if nbt is not None:
                with torch.no_grad():
                    m.num_batches_tracked.copy_(nbt)
