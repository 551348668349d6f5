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


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process, by rank; ``[obj]`` in one process. A collective: every process must call it
    (Lightning dumps a checkpoint on every process, with a barrier, before rank 0 writes it)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rank_local_parts(balancer, prefix: str):
    """(``prefix`` + the part's name + ".", part) for ``balancer``'s parts (itself, flat's nested methods) that keep
    state differing per DDP rank (``Balancer.RANK_LOCAL``)."""
    return [(f"{prefix}{name + '.' if name else ''}", part) for name, part in balancer.named_modules()
            if getattr(part, "RANK_LOCAL", ())]


def rank_local_states(balancer, prefix: str = "balancer.") -> dict[str, Any]:
    """The extra state of ``balancer``'s rank-local parts by their key in the module's state_dict; {} if none."""
    return {f"{name}_extra_state": part.get_extra_state() for name, part in _rank_local_parts(balancer, prefix)}


def restore_rank_states(weights: dict[str, Any], ranks: list[dict[str, Any]] | None, rank: int, world: int,
                        balancer, prefix: str = "balancer.") -> None:
    """Give this rank its own saved state in a checkpoint's ``weights`` (which hold rank 0's): ``ranks`` is every
    saving process's `rank_local_states`, by rank (None: a checkpoint from before they were kept, whose process
    count is unknown: taken as its own in a one-process run). Saved by another number of processes, or unknown
    under DDP, no saved state is this rank's: the ``RANK_LOCAL`` values start afresh on every rank (nash_mtl
    solves its weights at the first resumed step), with a warning."""
    if (len(ranks) if ranks is not None else 1) == world:
        weights.update(ranks[rank] if ranks is not None else {})
        return
    dropped = []
    for name, part in _rank_local_parts(balancer, prefix):
        if isinstance(weights.get(f"{name}_extra_state"), dict):
            weights[f"{name}_extra_state"] = {k: v for k, v in weights[f"{name}_extra_state"].items()
                                              if k not in part.RANK_LOCAL}
            dropped += [f"{name}{k}" for k in part.RANK_LOCAL]
    if dropped and rank == 0:
        saved = (f"was saved by {len(ranks)} process(es)" if ranks is not None else
                 "does not record how many processes saved it (written before mtlkit kept each one's state)")
        log.warning("the checkpoint %s, this run has %d: the balancer state that differs per process (%s) starts "
                    "afresh; the run does not continue exactly as it would have", saved, world, ", ".join(dropped))


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
