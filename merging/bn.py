"""Re-estimating the BatchNorm statistics of a merged model on unlabeled data (`bn="recompute"`).

Merging moves the weights, so the activations each BN layer sees no longer have the mean and
variance stored in its buffers (θ0's, or an average of the fine-tunes'). Re-estimating them on data
with the merged weights is the standard repair (Jordan et al. 2023, "REPAIR"; Ainsworth et al. 2023,
"Git Re-Basin", reset BN statistics after merging).

How (`bn_statistics`): the BN layers of the shared part of the model (those outside the task-specific
keys, `heads.` by default: a head keeps its fine-tune's statistics) run in train mode — they normalise
with the statistics of the batch they see, as in `torch.optim.swa_utils.update_bn` — the rest of the
model runs in eval mode whatever mode it was in (each module's own mode comes back), nothing gets a gradient. Each layer's inputs are accumulated over every
batch (per channel: count, mean, sum of squared deviations, combined exactly across batches in
float64), and the layer's buffers become the pooled statistics of all those inputs, as BN stores them:
`running_mean` = mean, `running_var` = unbiased variance (n − 1 in the denominator),
`num_batches_tracked` = the number of batches. One batch mixes every task (`pooled_batches`), so the
layers normalise with statistics of the same mixture they end up storing. Only inputs are read: labels
never reach this module.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mtl.io import require_model
from mtl.modes import eval_mode

from .keys import BN_OPTIONS, DEFAULT_TASK_KEYS, KeyPattern, compile_pattern

__all__ = ["BN_OPTIONS", "check_batches", "check_bn", "bn_layers", "bn_statistics", "pooled_batches", "recompute_bn",
           "batch_inputs",
           "shared_bn_in_train_mode"]


def check_bn(bn: Any) -> str:
    if bn not in BN_OPTIONS:
        raise ValueError(f"bn must be one of {', '.join(map(repr, BN_OPTIONS))}, got {bn!r}")
    return bn


def check_batches(batches: Any, where: str) -> None:
    """Refuse one tensor where an iterable of batches is expected: iterating it would yield its samples."""
    if isinstance(batches, torch.Tensor):
        raise TypeError(f"{where} is one tensor; pass an iterable of batches, e.g. [x] or a DataLoader")


def batch_inputs(batch: Any, task: str = "?") -> torch.Tensor:
    """The input tensor of a batch: the batch itself, `batch["image"]`, or `batch[0]` — nothing else is read."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and "image" in batch:
        return batch["image"]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"unlabeled[{task!r}]: a batch must be an input tensor (or a dict with 'image'), "
                    f"got {type(batch).__name__}")


def bn_layers(model: nn.Module, task_keys: KeyPattern = DEFAULT_TASK_KEYS) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BN layers whose statistics are re-estimated: tracking ones outside the task-specific keys
    (a regex, a list of them or a callable, as for `merging.merge`)."""
    task = compile_pattern(task_keys, "task_keys")
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
            and not (task is not None and task(f"{name}.running_mean"))}


def pooled_batches(unlabeled: Mapping[str, Iterable], max_batches: int | None = None) -> Iterator[torch.Tensor]:
    """One pass over every task's batches, round robin: one batch of each task concatenated into one
    (tasks whose inputs differ in shape go separately). `max_batches` caps the batches taken per task."""
    if not unlabeled:
        raise ValueError("bn='recompute' needs unlabeled data: got no task")
    for t, src in unlabeled.items():
        check_batches(src, f"unlabeled[{t!r}]")
    its = {t: iter(src) for t, src in unlabeled.items()}
    taken = dict.fromkeys(its, 0)
    while its:
        xs = []
        for t in list(its):
            if max_batches is not None and taken[t] >= max_batches:
                del its[t]
                continue
            try:
                xs.append(batch_inputs(next(its[t]), t))
                taken[t] += 1
            except StopIteration:
                del its[t]
        if not xs:
            break
        shapes = {tuple(x.shape[1:]) for x in xs}
        if len(shapes) == 1:
            yield torch.cat(xs) if len(xs) > 1 else xs[0]
        else:
            yield from xs
    empty = [t for t, n in taken.items() if n == 0]
    if empty:
        raise ValueError(f"bn='recompute': unlabeled[{empty[0]!r}] yields no batches")


class _Moments:
    """Per-channel count, mean and sum of squared deviations, combined across batches (Chan et al.)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.ndim)]
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total


@contextmanager
def shared_bn_in_train_mode(model: nn.Module, params: Mapping[str, torch.Tensor] | None = None,
                            task_keys: KeyPattern = DEFAULT_TASK_KEYS) -> Iterator[dict[str, torch.Tensor]]:
    """The shared BN layers in train mode (normalising with batch statistics), the rest of the model in eval
    mode, for the duration (every module's own mode comes back afterwards), and the
    tensors to call the model with through `torch.func.functional_call`: `params` plus copies of those
    layers' buffers, which absorb the running-statistics updates (module and `params` stay untouched)."""
    check_recompute_model(model)
    layers = bn_layers(model, task_keys)
    scratch = dict(params or {})
    for name, m in layers.items():
        for b in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(m, b, None) is not None:
                scratch[f"{name}.{b}"] = getattr(m, b).detach().clone()
    with eval_mode(model):  # the heads' BN and dropout must not act as in training; each module's mode comes back
        for m in layers.values():
            m.train()
        yield scratch


LINEARIZED_BN = ("bn='recompute' is not available for linearised models: their expansion is around one fixed "
                 "function, whose BN layers always use θ0's running statistics")
SLIMMABLE_BN = ("bn='recompute' is not available for the slimmable family: its SwitchableBatchNorm2d layers keep one "
                "row of running statistics per width (running_means/running_vars), which this re-estimation does not "
                "cover; use bn='pretrained' (default) or bn='average'")
#: model families (config.json's model.family) whose BN statistics bn='recompute' cannot re-estimate, and why
RECOMPUTE_REFUSED = {"linearized": LINEARIZED_BN, "slimmable": SLIMMABLE_BN}


def check_recompute_family(family: Any) -> None:
    """bn='recompute' refused for a family by its config alone (mtl-merge: before the run folder)."""
    if family in RECOMPUTE_REFUSED:
        raise ValueError(RECOMPUTE_REFUSED[family])


def check_recompute_model(model: nn.Module) -> None:
    """bn='recompute' refused for a model whose BN statistics it cannot re-estimate, rather than left as they were:
    a linearised model, or one with per-width statistics (SwitchableBatchNorm2d, whatever its class)."""
    from mtl.models import LinearizedModel
    from mtl.models.slimmable.layers import SwitchableBatchNorm2d

    if isinstance(model, LinearizedModel):
        raise ValueError(LINEARIZED_BN)
    if any(isinstance(m, SwitchableBatchNorm2d) for m in model.modules()):
        raise ValueError(SLIMMABLE_BN)


@torch.no_grad()
def bn_statistics(model: nn.Module, batches: Iterable[torch.Tensor], *, params: Mapping[str, torch.Tensor] | None = None,
                  task: str | None = None, task_keys: KeyPattern = DEFAULT_TASK_KEYS) -> dict[str, torch.Tensor]:
    """The BN buffers (`<layer>.running_mean`, `.running_var`, `.num_batches_tracked`) estimated on `batches`.

    `params`: weights to predict with instead of the model's own. The model runs through
    `torch.func.functional_call` with copies of its BN buffers: the module (parameters, buffers,
    train/eval modes) and `params` are left untouched. `task`: the model is called as
    ``model(x, tasks=[task])`` (a multi-task model needs one head to run), else ``model(x)``.
    """
    require_model(model, "bn_statistics")
    check_batches(batches, "batches")
    check_recompute_model(model)
    layers = bn_layers(model, task_keys)
    if not layers:
        return {}
    device = next(iter(model.parameters()), torch.empty(0)).device
    moments = {name: _Moments() for name in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, _n=name: moments[_n].add(inp[0]))
             for name, m in layers.items()]
    kwargs = {"tasks": [task]} if task is not None else {}
    n_batches = 0
    try:
        with shared_bn_in_train_mode(model, params, task_keys) as scratch:
            for x in batches:
                torch.func.functional_call(model, scratch, (x.to(device, non_blocking=True),), kwargs, strict=False)
                n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    if n_batches == 0:
        raise ValueError("bn='recompute': no batches to estimate the BatchNorm statistics on")
    out = {}
    for name, m in layers.items():
        mo = moments[name]
        if mo.n < 2:
            raise ValueError(f"bn='recompute': BN layer {name!r} saw {mo.n} value per channel; an unbiased "
                             "variance needs at least 2 (use larger batches)")
        out[f"{name}.running_mean"] = mo.mean.to(m.running_mean.dtype)
        out[f"{name}.running_var"] = (mo.m2 / (mo.n - 1)).to(m.running_var.dtype)
        if m.num_batches_tracked is not None:
            out[f"{name}.num_batches_tracked"] = torch.tensor(n_batches, dtype=m.num_batches_tracked.dtype, device=device)
    return out


def recompute_bn(model: nn.Module, batches: Iterable[torch.Tensor], *, task: str | None = None,
                 task_keys: KeyPattern = DEFAULT_TASK_KEYS) -> nn.Module:
    """Replace the shared BN layers' statistics of `model` (in place) by those of `batches`; returns it.

    Nothing else changes (parameters, other buffers, train/eval modes). The buffers are only written
    once every batch has gone through, so an error leaves the model as it was.
    """
    require_model(model, "recompute_bn")
    check_batches(batches, "batches")
    stats = bn_statistics(model, batches, task=task, task_keys=task_keys)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for k, v in stats.items():
            buffers[k].copy_(v)
    return model
