"""Test-time objectives: the Shannon entropy of a head's predictions, or a few-shot supervised loss.

Entropy is defined for heads that output a distribution:

| head (task kind) | prediction | entropy |
|---|---|---|
| `classification` (or a plain module's logits) | (B, C) logits | H(softmax) per image, mean over images |
| `semseg` | (B, C, H, W) logits | H(softmax over C) per pixel, mean over pixels and images |
| `edges` | (B, 1, H, W) logits | binary entropy of sigmoid per pixel, mean |

Regression-like heads (`regression`, `depth`, `normals`) have no predictive distribution, so no
entropy: `has_entropy` is false for them and the caller decides. The learned merge leaves them out of
the objective, names them in `LearnedMerge.excluded_tasks` (`excluded_from_objective` in
coefficients.json) and keeps their fine-tuned model's coefficients at the initial value.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["ENTROPY_KINDS", "NO_ENTROPY_KINDS", "entropy", "entropy_tasks", "has_entropy"]

#: task kinds whose head outputs logits over classes along dim 1 (None: a plain module's logits)
ENTROPY_KINDS = {"classification": "softmax", "semseg": "softmax", "edges": "sigmoid", None: "softmax"}
NO_ENTROPY_KINDS = ("regression", "depth", "normals")


def has_entropy(kind: str | None) -> bool:
    return kind in ENTROPY_KINDS


def entropy_tasks(kinds: Mapping[str, str | None], advice: str) -> list[str]:
    """The tasks (of `{task: kind}`) an entropy objective reads. None is refused, with `advice` in the caller's
    terms: `merging.learn` names its arguments, mtl-merge its settings (checked there before the run folder)."""
    use = [t for t, kind in kinds.items() if has_entropy(kind)]
    if not use:
        raise ValueError(f"no task has an entropy objective: {list(kinds)} are regression-like heads; {advice}")
    return use


def entropy(pred: torch.Tensor, kind: str | None = None, task: str = "?") -> torch.Tensor:
    """Mean Shannon entropy (nats) of the predictive distribution(s) in `pred` (raw logits)."""
    if not has_entropy(kind):
        raise ValueError(f"task {task!r} ({kind} head) outputs no distribution, so it has no entropy; "
                         f"entropy objectives support {', '.join(k for k in ENTROPY_KINDS if k)} heads")
    if pred.dtype in (torch.float16, torch.bfloat16):  # half precision: computed in float32; float64 kept
        pred = pred.float()
    if ENTROPY_KINDS[kind] == "sigmoid":
        p = torch.sigmoid(pred)
        # −p log p − (1−p) log(1−p), with log-sigmoids for stability
        h = -(p * F.logsigmoid(pred) + (1 - p) * F.logsigmoid(-pred))
        return h.mean()
    if pred.ndim < 2 or pred.shape[1] < 2:
        raise ValueError(f"task {task!r}: expected logits (B, C, ...) with C ≥ 2, got shape {tuple(pred.shape)}")
    logp = F.log_softmax(pred, dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()
