"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario"): drop each entry of τ_t with
probability p, rescale the survivors by 1/(1−p), then merge with task arithmetic or TIES.

The drop pattern is seeded per (seed, task, tensor name), so it does not depend on reading order:
the in-memory and streaming engines draw the same masks.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from .engine import Context
from .methods import METHODS, MergeMethod, TaskArithmetic, Ties, unknown_hparams

__all__ = ["Dare", "dare", "dare_mask"]


def _dare_seed(seed: int, task: int, key: str) -> int:
    # One stream per (seed, task, tensor): the drop pattern does not depend on reading order, so every
    # pass and both engines draw the same mask.
    h = hashlib.blake2b(f"{seed}\x00{task}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def dare_mask(shape, p: float, seed: int = 0, task: int = 0, key: str = "", out: torch.Tensor | None = None,
              scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The keep mask DARE draws for task `task`'s tensor `key` (True = kept)."""
    g = torch.Generator().manual_seed(_dare_seed(seed, task, key))
    r = torch.rand(tuple(shape), generator=g, out=scratch)
    return torch.ge(r, p, out=out)


def _dare_(tau: torch.Tensor, p: float, seed: int, task: int, key: str, ctx: Context | None = None) -> torch.Tensor:
    if p == 0:
        return tau
    if ctx is None:
        m = dare_mask(tau.shape, p, seed, task, key)
    else:
        m = dare_mask(tau.shape, p, seed, task, key, out=ctx.buffer("dare_m", tau.shape, torch.bool),
                      scratch=ctx.buffer("dare_r", tau.shape, torch.float32))
    return tau.mul_(m).div_(1 - p)


def dare(task_vector: dict[str, torch.Tensor], p: float = 0.5, seed: int = 0, task: int = 0) -> dict[str, torch.Tensor]:
    """DARE on one task vector (returns new tensors): drop with probability p, rescale by 1/(1−p)."""
    _check_p(p)
    return {k: _dare_(v.detach().clone(), p, seed, task, k) for k, v in task_vector.items()}


def _check_p(p: float) -> None:
    if isinstance(p, bool) or not (isinstance(p, (int, float)) and 0 <= p < 1):
        raise ValueError(f"p (drop probability) must be in [0, 1), got {p!r}")


_BASES = {"task_arithmetic": TaskArithmetic, "ties": Ties}


@METHODS.register("dare")
class Dare(MergeMethod):
    name = "dare"
    own = {"p": 0.5, "seed": 0, "base": "task_arithmetic"}
    defaults = own  # the base method's hyperparameters are accepted too (checked in __init__)

    def __init__(self, **hparams: Any):
        base = hparams.get("base", self.own["base"])
        if base not in _BASES:
            raise ValueError(f"dare: base must be one of {sorted(_BASES)}, got {base!r}")
        base_hp = {k: v for k, v in hparams.items() if k not in self.own}
        unknown = sorted(set(base_hp) - set(_BASES[base].defaults))
        if unknown:  # checked here, not by the base, so that a mergekit key is explained for DARE (density → p)
            raise TypeError(unknown_hparams("dare", "paper", unknown, [*_BASES[base].defaults, *self.own],
                                            what=f"dare (base={base})"))
        self.base = _BASES[base](**base_hp)
        super().__init__(**{k: v for k, v in hparams.items() if k in self.own})
        self.hp.update(self.base.hp)
        self.propagates_nonfinite = self.base.propagates_nonfinite
        p, seed = self.hp["p"], self.hp["seed"]
        self.base.transform = lambda ctx, key, t, tau: _dare_(tau, p, seed, t, key, ctx)

    def validate(self) -> None:
        _check_p(self.hp["p"])
        if isinstance(self.hp["seed"], bool) or not isinstance(self.hp["seed"], int):
            raise ValueError(f"seed must be an int, got {self.hp['seed']!r}")

    def prepare(self, ctx: Context, select: str) -> None:
        super().prepare(ctx, select)
        self.base.prepare(ctx, select)

    def merge_tensor(self, ctx: Context, key: str) -> torch.Tensor:
        return self.base.merge_tensor(ctx, key)
