"""Which balancers run under which distributed strategy.

DDP keeps a full replica per process, so every balancer works (gradient methods average their
``.grad`` over ranks themselves). FSDP shards the parameters: only the model's own forward/backward
sees whole tensors, so methods that take per-task gradients of the shared parameters
(``autograd.grad``), fill ``.grad`` themselves, or re-run the unwrapped model (``recompute``) cannot
run; loss-level weightings can.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

def fsdp_compatible(balancer) -> bool:
    return not (balancer.needs_shared_params or balancer.computes_own_gradients
                or bool(getattr(balancer, "recompute", False)))


def is_fsdp(strategy: Any) -> bool:
    try:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    except ImportError:  # older Lightning without ModelParallelStrategy
        from lightning.pytorch.strategies import FSDPStrategy

        ModelParallelStrategy = FSDPStrategy
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def pooled_means(sums: dict[str, torch.Tensor], count: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Batch-size-weighted means over all processes, Σ_b n_b·L_b / Σ_b n_b, and Σ_b n_b: ``sums`` is this process's
    Σ_b n_b·L_b per name (the same names on every process, 0 where it had no batch), ``count`` its Σ_b n_b,
    ``reduce(t)`` the sum of ``t`` over the processes (None: one process). Sums and counts are added first and divided
    once: Lightning's ``self.log(..., batch_size=n, sync_dist=True)`` averages the count over the processes as an
    integer, so processes holding unequal shares (evaluation's unrepeated sampler) got Σ / (W·⌊N/W⌋), not Σ / N."""
    if reduce is not None:
        total = reduce(torch.stack(list(sums.values())))
        count = int(reduce(torch.tensor(count, device=total.device)))
        sums = dict(zip(sums, total))
    return ({n: s / count for n, s in sums.items()} if count else {}), count


def check_strategy(balancer, strategy: Any, monitor=None) -> None:
    """Refuse a balancer the strategy cannot run, naming the ones it can. Under FSDP the balancer
    monitor's gradient cosines (per-task gradients of the shared parameters, like the refused methods)
    are switched off with a warning; it still logs the task weights."""
    if not is_fsdp(strategy):
        return
    if monitor is not None and monitor.cosines:
        monitor.cosines = False
        log.warning("trainer=fsdp: the balancer monitor logs task weights only, no gradient cosines "
                    "(balancer/cos/*: per-task gradients of the shared parameters, which FSDP shards)")
    if fsdp_compatible(balancer):
        return
    from mtl.balancers import BALANCERS, create_balancer

    ok = []
    for name in BALANCERS.names():
        try:
            if fsdp_compatible(create_balancer(name, tasks=["a", "b"])):
                ok.append(name)
        except (TypeError, ValueError):
            continue
    raise ValueError(f"balancer={balancer.name} does not run under trainer=fsdp (it needs per-task gradients of "
                     f"the whole shared parameters, which FSDP shards); use trainer=ddp, or one of: "
                     f"{', '.join(ok)} (famo with balancer.recompute=false)")
