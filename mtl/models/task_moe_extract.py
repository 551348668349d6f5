"""Single-task sub-network of a task-routed MoE ViT: the task's head and routers plus only the experts
it routes to on calibration batches.

The extracted model keeps each router's full set of E gate outputs, so its softmax over experts is
the parent's; only the choice of the top k is restricted to the kept experts. Every token whose k
chosen experts are all kept therefore gets exactly the parent's output — on the calibration batches
that is every token when ``min_share=0`` (only experts that received no token are dropped).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from mtl.modes import eval_mode
from mtl.registry import is_real


def _images(calib: Any) -> Iterable[torch.Tensor]:
    if isinstance(calib, torch.Tensor):
        yield calib
        return
    if isinstance(calib, dict):  # one batch
        calib = [calib]
    for batch in calib:
        if isinstance(batch, dict) and "image" not in batch:
            raise ValueError(f"calib: a batch dict has no 'image' key (keys: {list(batch)})")
        x = batch["image"] if isinstance(batch, dict) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calib: expected image tensors or batches with an 'image' key, got {type(x).__name__}")
        yield x


@torch.no_grad()
def route_counts(model, task: str, calib: Any) -> torch.Tensor:
    """Tokens each expert receives from ``task`` on ``calib``: (MoE layers, E), eval mode."""
    was_recording = model.record_usage
    saved = model.expert_usage(reset=True)
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            model.record_usage = True
            n = 0
            for x in _images(calib):
                model(x.to(device), tasks=[task])
                n += 1
            if n == 0:
                raise ValueError("calib: no calibration batch given")
            return model.expert_usage(reset=True)[task]
    finally:
        model._usage = saved
        model.record_usage = was_recording


def check_request(model, task: str, calib: Any, min_share: float = 0.0) -> None:
    """The request's task name, ``calib`` type and ``min_share`` range, before any routing (mtl-extract
    calls it with ``calib=[]`` before loading data)."""
    if not isinstance(task, str):
        raise TypeError(f"task= takes one task name (a string), got {task!r}: a sub-network serves one task")
    model._check_tasks([task])
    if calib is None or isinstance(calib, (str, bytes)):
        raise TypeError(f"calib must be calibration batches (images, or dicts with 'image'), got {type(calib).__name__}")
    check_min_share(min_share)


def check_min_share(min_share: Any) -> None:
    """``min_share`` is a number in [0, 1) (mtl-extract checks it before its run folder, as given: no float())."""
    # a bool or a numeric string would pass float(): refused as what they are, not read as 0, 1 or a number
    if not is_real(min_share) or not 0.0 <= min_share < 1.0:  # numpy's numbers too, not a bool, Fraction or Decimal
        raise ValueError(f"min_share must be in [0, 1), got {min_share!r}")


def extract_task(model, task: str, calib: Any, min_share: float = 0.0):
    """A standalone ``TaskMoEViT`` for ``task``; its ``extraction_report`` says which experts were kept
    and the share of the task's routed tokens the dropped experts received on ``calib``."""
    from mtl.models.task_moe_vit import TaskMoEViT

    check_request(model, task, calib, min_share)
    counts = route_counts(model, task, calib).float()
    k = int(model._moe["top_k"])
    kept, dropped_share = [], []
    for layer, (moe, c) in enumerate(zip(model.moe_modules(), counts)):
        ids = moe.expert_ids.tolist()
        share = c / c.sum().clamp_min(1)
        keep = [e for e in ids if share[e] > min_share]
        if len(keep) < k:  # a router must be able to pick k experts: keep the k most used
            top = set(sorted(ids, key=lambda e: -float(share[e]))[:k])
            keep = [e for e in ids if e in top]
        kept.append(keep)
        dropped_share.append(float(sum(share[e] for e in ids if e not in keep)))
    cfg = model.config
    cfg["tasks"] = [model.tasks[task].to_config()]
    cfg["decoder"]["experts_kept"] = kept
    sub = TaskMoEViT.from_config(cfg).to(next(model.parameters()).device)
    parent = model.state_dict()
    state = {}
    for name, target in sub.state_dict().items():
        src = parent[name]
        if ".mlp.experts." in name:  # stacked expert weights: the kept experts' rows, looked up by id
            layer = model.moe_layers.index(int(name.split(".")[1]))
            rows = [model.moe_modules()[layer].expert_ids.tolist().index(e) for e in kept[layer]]
            src = src[rows]
        state[name] = src.clone()
    sub.load_state_dict(state)
    n_all = sum(len(m.expert_ids) for m in model.moe_modules())
    sub.extraction_report = {
        "task": task,
        "min_share": float(min_share),
        "calibration_tokens_per_layer": int(counts[0].sum().item()) // k if len(counts) else 0,
        "experts_kept": kept,
        "experts_kept_total": sum(map(len, kept)),
        "experts_total": n_all,
        "dropped_token_share": dropped_share,
        "dropped_token_share_max": max(dropped_share, default=0.0),
    }
    return sub.train(model.training)
