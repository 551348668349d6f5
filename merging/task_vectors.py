"""Task vectors τ = θ_ft − θ0 as plain `{name: tensor}` dicts, and the small algebra around them."""
from __future__ import annotations

from typing import Any

import torch

from .engine import KeyOptions, open_context
from .sources import load_state_dict, open_source

__all__ = ["task_vector", "apply_task_vector", "compose"]


def task_vector(pretrained, finetuned, **key_options: Any) -> dict[str, torch.Tensor]:
    """τ = θ_ft − θ0 over the keys a merge would merge (floating point, shared, after the key filters).

    Values are new tensors in the compute dtype (float32 for half-precision models, float64 kept).
    """
    opts, rest = KeyOptions.split(dict(key_options))
    if rest:
        raise TypeError(f"task_vector: unknown option(s) {', '.join(sorted(rest))}")
    ctx = open_context(pretrained, [finetuned], opts, 1, "task_vector")
    try:
        return {k: ctx.tv(k, 0) for k in ctx.plan.merge}
    finally:
        ctx.close()


def apply_task_vector(pretrained, tau: dict[str, torch.Tensor], lam: float = 1.0) -> dict[str, torch.Tensor]:
    """θ0 + λ·τ on τ's keys; the other keys of θ0 are copied. Dtypes follow θ0."""
    src = open_source(pretrained, label="pretrained")
    missing = [k for k in tau if k not in src]
    if missing:
        raise KeyError(f"task vector keys not in the pretrained model: {missing[:5]}")
    out = {}
    for k in src.keys():
        x = src.get(k)
        if k in tau:
            out[k] = torch.add(x.to(tau[k].dtype), tau[k], alpha=lam).to(x.dtype)
        else:
            out[k] = x.clone()
    return out


def compose(merged: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """A full model for one task: its own state dict with every merged tensor substituted.

    This is how a merged backbone is evaluated per task: merged shared weights + the task's own head.
    """
    full = load_state_dict(model)
    unknown = [k for k in merged if k not in full]
    if unknown:
        raise KeyError(f"merged keys not in the task model: {unknown[:5]}")
    for k, v in merged.items():
        if tuple(v.shape) != tuple(full[k].shape):
            raise ValueError(f"{k!r}: merged shape {tuple(v.shape)} != task model shape {tuple(full[k].shape)}")
        full[k] = v.to(full[k].dtype).clone()
    return full
