"""FLOPs and parameter counts from ``torch.utils.flop_counter``, with the CPU attention kernel it counts as 0
counted (one multiply-add = 2 FLOPs)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from mtl.io import require_model
from mtl.modes import eval_mode


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# timm's fused attention runs this kernel on CPU; torch's registry knows only the GPU ones, so
# without it every attention matmul on CPU would count as 0 FLOPs
_EXTRA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter with the CPU attention kernel counted (torch counts it as 0): use it for any
    FLOPs compared with `count_flops`'."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA)


def count_flops(model: nn.Module, x: torch.Tensor, tasks: Iterable[str] | str | None = None) -> int:
    """FLOPs of one forward pass of ``model(x, tasks=tasks)`` (the whole batch ``x``), eval mode; a single
    task may be given as its name, as the model's forward takes it.

    What runs is counted, so for a sparse model (routed experts) these are the *active* FLOPs.
    Every module's train/eval mode is restored afterwards.
    """
    require_model(model, "count_flops")
    with eval_mode(model), flop_counter() as counter:
        model(x) if tasks is None else model(x, tasks=[tasks] if isinstance(tasks, str) else list(tasks))
    return int(counter.get_total_flops())


def model_stats(model: nn.Module, x: torch.Tensor, tasks: Iterable[str] | None = None) -> dict[str, Any]:
    """Params, all-task FLOPs and each task's own FLOPs (``forward(x, tasks=[t])``) per sample; for a slimmable
    model also ``params_active``, the parameters of its active widths (``params`` holds every width's)."""
    require_model(model, "model_stats")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"model_stats takes an input batch x (a tensor), got {type(x).__name__}")
    names = ([tasks] if isinstance(tasks, str) else list(tasks)) if tasks is not None else list(getattr(model, "tasks", []))
    n = int(x.shape[0])
    stats: dict[str, Any] = {"params": count_params(model), "flops_all_tasks": count_flops(model, x) // n}
    if names:
        stats["flops_per_task"] = {t: count_flops(model, x, [t]) // n for t in names}
    if hasattr(model, "width_set") and hasattr(model, "extract_subnetwork"):
        # params counts every stored width; the FLOPs are those of the active widths: say both
        stats["params_active"] = count_params(model.extract_subnetwork())
    return stats
