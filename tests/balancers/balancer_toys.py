"""Tiny hand-made multi-task models for the balancer tests: a shared trunk + one head per task."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl.balancers import StepContext, freeze_norm_stats


class Toy(nn.Module):
    def __init__(self, tasks=("a", "b"), bn: bool = False, width: int = 8, same_heads: bool = False):
        super().__init__()
        layers = [nn.Linear(4, width)] + ([nn.BatchNorm1d(width)] if bn else []) + [nn.Tanh(), nn.Linear(width, width)]
        self.shared = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({t: nn.Linear(width, 1) for t in tasks})
        if same_heads:
            first = self.heads[tasks[0]]
            for t in tasks[1:]:
                self.heads[t].load_state_dict(first.state_dict())

    def forward(self, x, tasks=None):
        z = self.shared(x)
        return z, {t: self.heads[t](z).squeeze(-1) for t in (tasks or self.heads)}


def toy_batch(n: int = 16, tasks=("a", "b"), seed: int = 0, same_targets: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    base = torch.randn(n, generator=g)
    y = {t: base.clone() if same_targets else torch.randn(n, generator=g) for t in tasks}
    return x, y


def toy_ctx(model: Toy, x, y, *, step: int = 0, epoch: int = 0, features: bool = True, scales=None) -> StepContext:
    """Forward + losses; ``scales`` multiplies task losses (static task weights)."""
    scales = scales or {}
    z, preds = model(x)
    losses = {t: F.mse_loss(p, y[t]) * scales.get(t, 1.0) for t, p in preds.items()}

    def recompute(tasks=None):
        with freeze_norm_stats(model):
            _, p = model(x, tasks)
        return {t: F.mse_loss(v, y[t]) * scales.get(t, 1.0) for t, v in p.items()}

    return StepContext(
        losses=losses,
        shared_params=[p for p in model.shared.parameters()],
        task_params={t: list(h.parameters()) for t, h in model.heads.items()},
        features=z if features else None,
        recompute=recompute,
        step=step,
        epoch=epoch,
    )


def grads_of(params) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])



def _gloo_rank(rank, fn, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(fn(rank), out / f"rank{rank}.pt")
        # both ranks done before either tears the group down: a rank leaving while its peer still talks aborted
        # the process ("terminate called without an active exception") once on a loaded machine
        dist.barrier()
    finally:
        dist.destroy_process_group()


def on_two_gloo_ranks(fn, tmp_path) -> list:
    """``fn(rank)`` (a module-level function, or a partial of one) in 2 new processes joined by a gloo process group,
    as DDP's ranks are; what each returned. (Spawned, not forked: autograd in a forked child can hang.)"""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gloo_rank, args=(fn, port, tmp_path), nprocs=2, start_method="spawn")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
