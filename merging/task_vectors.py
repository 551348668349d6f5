"""Task vectors τ = θ_ft − θ0 as plain `{name: tensor}` dicts, and the small algebra around them."""
from __future__ import annotations

from typing import Any

import torch

from mtl.io import as_plain

from .engine import KeyOptions, all_finite, check_input_finite, open_context, overflow_error, to_output_dtype
from .keys import _fmt_shape, compute_dtype
from .methods import _check_lam
from .sources import MergeInputError, load_state_dict, open_source

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


def apply_task_vector(pretrained, tau: dict[str, torch.Tensor], lam: float = 1.0,
                      check_finite: bool = True) -> dict[str, torch.Tensor]:
    """θ0 + λ·τ on τ's floating-point keys, computed as a merge does (float32, float64 if either is) and cast to
    θ0's dtype; the other keys of θ0 are copied (an integer or bool entry of τ is ignored, as a merge keeps θ0's).

    Checked as a merge is: λ one finite number, τ's keys in θ0 with θ0's shapes, and no NaN / Inf in the
    result (traced to the input that holds it, else an overflow; `check_finite=False` returns the Inf)."""
    lam = as_plain(lam)
    _check_lam("lam", lam, allow_list=False,
               list_hint="one λ for one task vector; one λ per model: merging.merge('task_arithmetic', ..., lam=[...])")
    src, vec = open_source(pretrained, label="pretrained"), open_source(tau, label="the task vector")
    problems = [f"{k!r} is in the task vector but missing from {src.label}" for k in vec.keys() if k not in src]
    problems += [f"{k!r} has shape {_fmt_shape(src.info(k).shape)} in {src.label_of(k)} but {_fmt_shape(vec.info(k).shape)} "
                 "in the task vector" for k in vec.keys() if k in src and src.info(k).shape != vec.info(k).shape]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise MergeInputError("task vector and pretrained model do not match: " + "; ".join(problems[:8]) + more)
    out = {}
    for k in src.keys():
        x = src.get(k)
        t = vec.get(k) if k in vec else None
        if t is not None and x.is_floating_point() and t.is_floating_point():
            cd = compute_dtype([x.dtype, t.dtype])  # as a merge computes: θ0 not rounded to a narrower τ's dtype
            out[k] = to_output_dtype(torch.add(x.to(cd), t.to(cd), alpha=lam), x.dtype)
        else:  # not in τ, or an integer / bool entry (num_batches_tracked): θ0's, as a merge keeps it
            out[k] = x.clone()
        if check_finite and out[k].is_floating_point() and not all_finite(out[k]):
            check_input_finite(x, k, src.label_of(k))
            if k in vec:
                check_input_finite(vec.get(k), k, vec.label_of(k))
            raise overflow_error(k, x.dtype, what="θ0 + λ·τ tensor")
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
