"""`merging.merge`: any registered method, state dicts (or modules, folders, files) in, a state dict out."""
from __future__ import annotations

from typing import Any

import torch

from mtl.registry import UnknownNameError

from .engine import KeyOptions, open_context, produce, torch_threads
from .methods import MERGEKIT_ONLY, OWN_ENTRY_POINTS, create_method

__all__ = ["merge"]


def merge(
    method: str, pretrained, finetuned, *, select: str = "kthvalue", threads: int | None = None, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """Merge `finetuned` (a list of models) into one state dict, in memory.

    `method`: "average", "task_arithmetic", "ties", "dare" or "consensus"; its hyperparameters are keyword
    arguments (see docs/merging.md). The learned methods ("adamerging", "atlas", "concrete_ta",
    "concrete_adamerging") also need `unlabeled=` data; `merging.learn` returns their coefficients too. Key options shared by all methods: `include`, `exclude`,
    `task_keys`, `unshared`, `bn`, `check_finite`. `select` picks how the TIES global threshold is found:
    "kthvalue" over the concatenated magnitudes (the reference) or "radix" (memory-bounded); both are exact.
    `threads`: torch intra-op threads for this call (default: leave torch's setting alone).

    The result holds every selected key shared by all models (task-specific keys such as `heads.*` are
    left out), in the pretrained model's dtypes, as new tensors that share no memory with the inputs.
    """
    from .learned import LEARNED_METHODS, learn

    if method in LEARNED_METHODS:  # learned at test time: needs data and a model (see merging.learn)
        if "unlabeled" not in kwargs and "labeled" not in kwargs:
            raise ValueError(f"{method} learns its coefficients at test time: pass unlabeled={{task: iterable of "
                             "input batches} (and model=... unless the inputs are model folders)")
        with torch_threads(threads):
            return learn(method, pretrained, finetuned, **kwargs).state_dict
    opts, hp = KeyOptions.split(dict(kwargs))
    try:
        m = create_method(method, **hp)
    except UnknownNameError as e:
        if method in MERGEKIT_ONLY or method in OWN_ENTRY_POINTS:  # the message says what to call instead
            raise
        raise UnknownNameError(f"{e}; learned at test time (with unlabeled=...): {', '.join(LEARNED_METHODS)}") from None
    ctx = open_context(pretrained, finetuned, opts, m.min_models(), method, base_among=not m.uses_task_vectors)
    try:
        with torch_threads(threads):
            m.prepare(ctx, select)
            # produce() hands out workspaces and the inputs' own tensors: keep copies.
            return {k: t.clone() for k, t in produce(m, ctx)}
    finally:
        ctx.close()
