"""TaskExpert-style MoE decoder (Ye & Xu, ICCV 2023).

At K chosen backbone stages the features are projected to ``channels`` and N expert MLPs turn every
token into N task-generic features (stacked weights, one batched matmul for all experts). Each task
then, per stage and per token, mixes the N expert outputs and its own memory state (the (N+1)-th
candidate) with a softmax gate, and updates the memory with the mixture; the memory after the last
stage feeds the task head.

Split for the trainer: ``shared(feats)`` returns, per stage, the projected features and the N expert
outputs — everything tasks have in common; gates, memories and heads are per task
(``heads[task]``). The task paths therefore split *at* the representation, so representation-level
balancers (``balancer.level=features``) see the exact Jacobian of every task loss (docs/training.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl.models.decoders.base import DECODERS
from mtl.models.decoders.hps import create_head
from mtl.models.moe import StackedExperts
from mtl.registry import check_int
from mtl.tasks import Task

MEMORY_UPDATES = ("replace", "average", "gated")


def update_memory(rule: str, memory: torch.Tensor, mixed: torch.Tensor, gate_logit: torch.Tensor | None = None) -> torch.Tensor:
    """``replace``: m' = f; ``average``: m' = (m + f) / 2; ``gated``: m' = σ(a) f + (1 − σ(a)) m."""
    if rule == "replace":
        return mixed
    if rule == "average":
        return 0.5 * (memory + mixed)
    if rule == "gated":
        a = torch.sigmoid(gate_logit)
        return a * mixed + (1 - a) * memory
    raise ValueError(f"memory_update must be one of {MEMORY_UPDATES}, got {rule!r}")


def check_stages(stages: object, num_stages: int) -> list[int]:
    """``decoder.stages`` as given must already be distinct valid indices: int() would turn 0.5 into stage 0
    and "12" into [1, 2], building another model than config.json records."""
    if not isinstance(stages, (list, tuple)):
        raise ValueError(f"decoder.stages must be a list of backbone stage indices such as [{num_stages - 1}] "
                         f"(or null: all), got {stages!r} ({type(stages).__name__})")
    if not stages:
        raise ValueError("decoder.stages must name at least one backbone stage (or be null: all), got []")
    bad = [s for s in stages if isinstance(s, bool) or not isinstance(s, int)]
    if bad:
        raise ValueError(f"decoder.stages must hold int stage indices, got {list(stages)!r} "
                         f"({bad[0]!r} is {type(bad[0]).__name__})")
    for s in stages:
        if not 0 <= s < num_stages:
            raise ValueError(f"decoder.stages: stage index {s} does not exist; the backbone has {num_stages} "
                             f"feature stages (valid: 0..{num_stages - 1})")
    if len(set(stages)) != len(stages):  # a stage twice would be projected and fused twice
        raise ValueError(f"decoder.stages {list(stages)} name a stage more than once")
    return list(stages)


class TaskExpertPath(nn.Module):
    """One task's gates (one per stage, over N experts + memory), memory and head."""

    def __init__(self, task: Task, channels: int, num_experts: int, num_stages: int, memory_update: str):
        super().__init__()
        self.memory_update = memory_update
        self.gates = nn.ModuleList(nn.Linear(channels, num_experts + 1) for _ in range(num_stages))
        self.memory_init = nn.Parameter(torch.zeros(channels))
        self.update_logit = nn.Parameter(torch.zeros(num_stages, channels)) if memory_update == "gated" else None
        self.head = create_head(task, channels)
        self.record_usage, self.usage = False, None

    def mix(self, z: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final memory (B, HW, D) and each stage's gate weights (B, HW, N+1)."""
        b, _, d = z[0].shape[:3]
        memory = self.memory_init.expand(b, z[0].shape[-2] * z[0].shape[-1], d)
        weights = []
        for s, zs in enumerate(z):
            tokens = zs.flatten(3).transpose(2, 3)                     # (B, N+1, T, D)
            proj, experts = tokens[:, 0], tokens[:, 1:]                # (B, T, D), (B, N, T, D)
            gate = self.gates[s](proj).softmax(-1)                     # (B, T, N+1)
            mixed = torch.einsum("btn,bntd->btd", gate[..., :-1], experts) + gate[..., -1:] * memory
            logit = self.update_logit[s] if self.update_logit is not None else None
            memory = update_memory(self.memory_update, memory, mixed, logit)
            weights.append(gate)
        if self.record_usage:
            with torch.no_grad():
                used = torch.stack([w.detach().float().sum((0, 1)) for w in weights]).cpu()
                self.usage = used if self.usage is None else self.usage + used
        return memory, weights

    def forward(self, z: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        memory, _ = self.mix(z)
        b, _, d = memory.shape
        return self.head(memory.transpose(1, 2).reshape(b, d, *z[0].shape[-2:]), out_size)


@DECODERS.register("moe")
class TaskExpertDecoder(nn.Module):
    """``stages``: indices into the backbone's feature list (default: all); features are resized to
    the finest chosen stage. ``expert_hidden``: each expert's hidden width (default 2 × channels)."""

    def __init__(self, in_channels: list[int], tasks: list[Task], channels: int = 64, num_experts: int = 8,
                 expert_hidden: int | None = None, stages: list[int] | None = None, memory_update: str = "gated"):
        super().__init__()
        check_int("decoder.num_experts", num_experts, low=1)
        check_int("decoder.channels", channels, low=1)
        if expert_hidden is not None:
            check_int("decoder.expert_hidden", expert_hidden, low=1, note=" or null")
        if memory_update not in MEMORY_UPDATES:
            raise ValueError(f"decoder moe: memory_update must be one of {MEMORY_UPDATES}, got {memory_update!r}")
        stages = list(range(len(in_channels))) if stages is None else check_stages(stages, len(in_channels))
        self.stages, self.num_experts = stages, int(num_experts)
        self.proj = nn.ModuleList(nn.Conv2d(in_channels[s], channels, 1) for s in stages)
        self.norm = nn.ModuleList(nn.LayerNorm(channels) for _ in stages)
        self.experts = nn.ModuleList(StackedExperts(num_experts, channels, 2 * channels if expert_hidden is None else expert_hidden) for _ in stages)
        self.heads = nn.ModuleDict({t.name: TaskExpertPath(t, channels, num_experts, len(stages), memory_update) for t in tasks})

    def shared(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per stage a (B, N+1, D, H, W) tensor: the projected features, then the N expert outputs."""
        chosen = [feats[s] for s in self.stages]
        size = max((f.shape[-2:] for f in chosen), key=lambda hw: hw[0] * hw[1])
        out = []
        for f, proj, norm, experts in zip(chosen, self.proj, self.norm, self.experts):
            p = proj(f)
            if p.shape[-2:] != size:
                p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
            b, d, h, w = p.shape
            tokens = norm(p.flatten(2).transpose(1, 2))                            # (B, T, D)
            e = experts.dense(tokens.reshape(-1, d)).view(self.num_experts, b, h * w, d)
            stacked = torch.cat([tokens[:, None], e.transpose(0, 1)], dim=1)       # (B, N+1, T, D)
            out.append(stacked.transpose(2, 3).reshape(b, self.num_experts + 1, d, h, w))
        return out

    def head(self, task: str, z: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        return self.heads[task](z, out_size)

    @property
    def record_usage(self) -> bool:
        return all(h.record_usage for h in self.heads.values())

    @record_usage.setter
    def record_usage(self, on: bool) -> None:
        for h in self.heads.values():
            h.record_usage = bool(on)

    @property
    def usage_rows(self) -> list[str]:
        return [f"backbone stage {s}" for s in self.stages]

    @property
    def usage_columns(self) -> list[str]:
        return [str(e) for e in range(self.num_experts)] + ["mem"]

    #: what ``expert_usage`` sums: the dense gates' softmax weights over tokens (each token adds 1 per stage)
    usage_unit = "gate mass"

    def expert_usage(self, reset: bool = False) -> dict[str, torch.Tensor]:
        """Gate mass per stage over the N experts and the memory (last column): {task: (stages, N+1)}."""
        out = {t: h.usage for t, h in self.heads.items() if h.usage is not None}
        if reset:
            for h in self.heads.values():
                h.usage = None
        return out
