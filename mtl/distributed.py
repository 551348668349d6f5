"""Which balancers run under which distributed strategy.

DDP keeps a full replica per process, so every balancer works (gradient methods average their
``.grad`` over ranks themselves). FSDP shards the parameters: only the model's own forward/backward
sees whole tensors, so methods that take per-task gradients of the shared parameters
(``autograd.grad``), fill ``.grad`` themselves, or re-run the unwrapped model (``recompute``) cannot
run; loss-level weightings can.
"""
from __future__ import annotations

import logging
from typing import Any

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
