"""Channel importance per layer: group L1 magnitude and multi-task first-order Taylor.

Scores are per *unit* of a layer (channel or attention head) and cover the whole coupled group: the
producing weights, the norms and the consumers' input weights (so the next layer's view of a channel
counts too). Each member's contribution is divided by its mean over the units, so a 3x3 conv and a
BatchNorm weigh alike, then members are averaged.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mtl.modes import eval_mode
from pruning.graph import NORMS, Layer, LayerGraph

COMBINE = ("sum", "max")
CRITERIA = ("abs", "squared")


def _member_scores(layer: Layer, model: nn.Module, value: Callable[[nn.Parameter], torch.Tensor | None],
                   per_member_mean: bool = True) -> torch.Tensor:
    """Each unit's score over the layer's coupled members. ``per_member_mean``: every member's scores
    are divided by their mean, then averaged (group L1: members of different sizes weigh alike);
    otherwise they are summed as they are (Taylor: the unit's whole first-order loss change, so layers
    and tasks keep their real magnitudes)."""
    per_member = []
    for dep in layer.deps:
        m = model.get_submodule(dep.module)
        norm = isinstance(m, NORMS)
        depthwise = isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
        acc = None
        for p in m.parameters(recurse=False):
            v = value(p)
            if v is None or v.ndim == 0:
                continue
            if norm or v.ndim == 1:
                if not (norm or dep.is_out):
                    continue  # a consumer's bias belongs to its own output channels
                flat = v
            else:
                if not dep.is_out and not depthwise:
                    v = v.transpose(0, 1)
                flat = v.reshape(v.shape[0], -1).sum(1)
            acc = flat if acc is None else acc + flat
        if acc is None:
            continue
        unit = torch.stack([acc[idx].sum() if idx else acc.new_zeros(()) for idx in dep.local])
        mean = unit.mean()
        per_member.append(unit / mean if per_member_mean and mean > 0 else unit)
    if not per_member:
        return torch.zeros(layer.size)
    stacked = torch.stack(per_member)
    return (stacked.mean(0) if per_member_mean else stacked.sum(0)).detach().cpu()


@torch.no_grad()
def l1_layer_scores(layer: Layer, model: nn.Module) -> torch.Tensor:
    """Group L1 magnitude of one layer's units in ``model`` (the graph's model or a masked copy)."""
    return _member_scores(layer, model, lambda p: p.detach().abs())


def l1_scores(graph: LayerGraph, model: nn.Module) -> dict[str, torch.Tensor]:
    return {l.name: l1_layer_scores(l, model) for l in graph.layers}


def taylor_scores(graph: LayerGraph, model: nn.Module, batches: list[dict[str, torch.Tensor]],
                  combine: str = "sum", criterion: str = "abs"
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Multi-task first-order Taylor importance per unit, from each calibration batch b's own gradient
    (averaging the gradients first would let batches cancel out):

    - ``criterion="abs"``: Σ_b Σ_s |w_s·∂L_t,b/∂w_s| over the unit's coupled weights s (the element-wise
      form Torch-Pruning uses);
    - ``criterion="squared"``: Σ_b (Σ_s w_s·∂L_t,b/∂w_s)², the squared first-order loss change of removing
      the whole unit (Molchanov et al., CVPR 2019, eq. 7 with the group's weights).

    Computed per task t, each task's scores divided by their total over all layers (so a task with a
    large loss scale does not dominate), then combined over tasks by ``sum`` or ``max`` (``max``
    keeps every channel that any single task relies on). Returns (combined, per task)."""
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    with eval_mode(model):  # the running statistics the pruned model will use; each module's mode comes back
        per_task = _task_scores(model, graph, batches, criterion)
    names = list(per_task)
    combined = {}
    for l in graph.layers:
        stack = torch.stack([per_task[t][l.name] for t in names])
        combined[l.name] = stack.sum(0) if combine == "sum" else stack.max(0).values
    return combined, per_task


def _task_scores(model: nn.Module, graph: LayerGraph, batches: list[dict[str, torch.Tensor]],
                 criterion: str) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's unit scores, divided by their total over all layers."""
    per_task: dict[str, dict[str, torch.Tensor]] = {}
    params = [p for p in model.parameters()]
    saved = [(p.requires_grad, p.grad) for p in params]  # the caller's flags and gradients come back
    for p in params:
        p.requires_grad_(True)
    signed = criterion == "squared"  # the unit's products are summed with their signs, then squared

    def wg(p: nn.Parameter) -> torch.Tensor | None:
        if p.grad is None:
            return None
        v = p.detach() * p.grad
        return v if signed else v.abs()
    try:
        for t, task in model.tasks.items():
            scores = {l.name: torch.zeros(l.size) for l in graph.layers}
            for b in batches:  # |w·g| of each batch's own gradient, summed over the batches
                model.zero_grad(set_to_none=True)
                task.loss(model(b["image"], tasks=[t])[t], b[task.target_key]).backward()
                for l in graph.layers:
                    unit = _member_scores(l, model, wg, per_member_mean=False)
                    scores[l.name] += unit.square() if signed else unit
            total = sum(float(s.sum()) for s in scores.values()) or 1.0
            per_task[t] = {k: v / total for k, v in scores.items()}
    finally:
        for p, (r, g) in zip(params, saved):
            p.grad = g
            p.requires_grad_(r)
    return per_task
