"""What every learned merge optimises over: θ0 and the task vectors (held once), and one model.

The merged weights are a differentiable function of the coefficients (and of a mask):

    θ[k] = θ0[k] + Σ_t c[g(k), t] · (m[k] ⊙) τ_t[k]

where g(k) is the coefficient row (group) of tensor k. One model instance turns them into
predictions through `torch.func.functional_call`: nothing is copied per step, the model's own
parameters are never modified.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mtl.io import run_folder_refusal

from ..engine import KeyOptions, open_context
from ..keys import BN_STATS, compile_pattern
from ..sources import MergeInputError

__all__ = ["MergeProblem", "build_problem", "ties_task_vectors", "VECTORS"]

log = logging.getLogger("merging.learned")


@dataclass
class MergeProblem:
    """θ0 and the stacked task vectors of the merged keys, the model and the task ↔ vector mapping.

    `taus[k]` has shape (T, *θ0[k].shape): task vector t of tensor k in row t, stored once.
    `vector_tasks[t]` lists the prediction tasks (heads) of fine-tuned model t. `fixed`: every other
    key of the merge plan the model has, at the value the result holds (θ0's, averaged BN statistics),
    so that learning sees the model it returns. `dtypes`: θ0's dtype of each learned key (θ0 and the
    task vectors are held in compute dtype). `no_grad`: learned keys the loss is not differentiated
    through (BN running statistics under bn="merge": merged at the current coefficients, detached).
    """

    model: nn.Module
    keys: list[str]
    theta0: dict[str, torch.Tensor]
    taus: dict[str, torch.Tensor]
    vector_names: list[str]
    vector_tasks: list[list[str]]
    task_kinds: dict[str, str | None]
    device: torch.device
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    no_grad: set[str] = field(default_factory=set)

    @property
    def T(self) -> int:
        return len(self.vector_names)

    @property
    def coef_dtype(self) -> torch.dtype:
        """float64 when θ0 is, else float32 (half-precision θ0 is held and combined in float32)."""
        return torch.float64 if any(v.dtype == torch.float64 for v in self.theta0.values()) else torch.float32

    def frozen(self) -> dict[str, torch.Tensor]:
        """What the model runs with besides the learned tensors: `fixed`, and its own other parameters
        (heads) detached, so that no gradient reaches the caller's module."""
        own = {n: p.detach() for n, p in self.model.named_parameters() if n not in self.theta0}
        return {**own, **self.fixed}

    def state(self, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The merged state the model runs with, as a callback sees it: `fixed` plus the learned tensors, as
        copies (a callback that writes into them must not change the learning)."""
        return {k: v.detach().clone() for k, v in {**self.fixed, **merged}.items()}

    @property
    def tasks(self) -> list[str]:
        return [t for ts in self.vector_tasks for t in ts]

    def merged(self, coef: torch.Tensor, group_of: dict[str, int],
               mask: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """θ0 + Σ_t coef[g(k), t] (m ⊙) τ_t for every merged key, differentiable in `coef` and `mask`."""
        out = {}
        for k in self.keys:
            tau, base = self.taus[k], self.theta0[k]
            c = coef[group_of[k]].to(base.dtype)
            m = None if mask is None else mask.get(k)  # a key without a mask entry is merged unmasked
            if m is None and base.is_contiguous():
                # θ0 + c·τ in one GEMM (1×T @ T×n added to θ0): one output tensor and pass instead of two
                out[k] = torch.addmm(base.reshape(1, -1), c.reshape(1, -1), tau.reshape(len(c), -1)).view(base.shape)
            else:
                delta = torch.tensordot(c, tau, dims=1)  # Σ_t c_t τ_t, no (T, ...) temporary
                if m is not None:
                    delta = delta * m
                out[k] = base + delta
            dtype = self.dtypes.get(k, base.dtype)
            if out[k].dtype != dtype:  # half-precision θ0: the model runs with the dtype the result holds
                out[k] = out[k].to(dtype)
        return out

    def predict(self, params: dict[str, torch.Tensor], x: torch.Tensor, task: str) -> torch.Tensor:
        """Task `task`'s prediction for `x`, already on `device` (`Objective.model_input` places it)."""
        try:
            out = torch.func.functional_call(self.model, params, (x,), {"tasks": [task]}, strict=False)
        except KeyError as e:  # most often a module without a head for this task: say which task was asked
            raise KeyError(f"the model raised KeyError {e} on forward(x, tasks=[{task!r}]); does it predict task "
                           f"{task!r}? (tasks= names one task per fine-tuned model)") from e
        if isinstance(out, dict) and task not in out:
            raise KeyError(f"the model's forward(x, tasks=[{task!r}]) returned no {task!r} prediction "
                           f"(keys: {sorted(out)})")
        return out[task] if isinstance(out, dict) else out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.theta0, self.taus) for t in d.values())


def _is_model_folder(p: Any) -> bool:
    return isinstance(p, (str, Path)) and (Path(p) / "config.json").is_file()


def _model_from_folders(pretrained, finetuned):
    """The pool's model: θ0's shared weights plus every fine-tune's own head (merging.pool)."""
    from mtl.io import load_state

    from ..pool import HEAD_PREFIX, ModelPool

    pool = ModelPool.from_folders(pretrained, list(finetuned))
    state = {k: v for k, v in load_state(pretrained).items() if not k.startswith(HEAD_PREFIX)}
    model = pool.merged_model(state)
    return model, [m.tasks for m in pool.members], ["+".join(m.tasks) for m in pool.members]


def _uncovered_weights(model: nn.Module, pre_src: Any, task_keys: Any) -> list[str]:
    """The model's weights (parameters, persistent floating buffers) that θ0 does not hold and `task_keys` does not
    mark task-specific: a shared layer with no θ0 value to run at, which would run with the caller's own values.
    Integer/bool buffers are bookkeeping, not weights (BN's num_batches_tracked never enters an eval forward;
    the merge copies them, never learns them), so inputs may leave them out."""
    held = set(pre_src.keys())
    is_task_key = compile_pattern(task_keys, "task_keys") or (lambda k: False)
    names: dict[int, list[str]] = {}  # tied weights: one name the inputs hold covers every alias
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(n)
    return [k for k, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)
            and (t.is_floating_point() or t.is_complex() or isinstance(t, nn.Parameter))
            and not any(n in held or is_task_key(n) for n in names.get(id(t), [k]))]


def _left_out(ctx: Any, own: dict[str, torch.Tensor], planned: set[str], task_keys: Any,
              device: torch.device) -> dict[str, torch.Tensor]:
    """θ0's value of each key of a caller's model that θ0 holds and the merge leaves out (not a task's own): the
    model runs with it, as the result's model (θ0 with the merged keys in) and a model built from folders do."""
    is_task_key = compile_pattern(task_keys, "task_keys") or (lambda k: False)
    out = {}
    for k in ctx.sources[0].keys():
        if k in planned or k not in own or is_task_key(k):
            continue
        value = ctx.raw_pre(k)
        if tuple(own[k].shape) != tuple(value.shape):
            raise MergeInputError(f"{k!r} has shape {tuple(value.shape)} in {ctx.sources[0].label_of(k)} but "
                                  f"{tuple(own[k].shape)} in the model")
        out[k] = value.to(device, copy=True)
    return out


def _key_task(key: str, tasks: set[str]) -> str | None:
    """The task a task-specific key belongs to: its first path component that names a task (`heads.a.0.weight`
    -> 'a'); None when none does."""
    return next((part for part in key.split(".") if part in tasks), None)


def _unused_heads(model: nn.Module, ft_srcs: Sequence[Any], task_specific: list[list[str]],
                  vector_tasks: list[list[str]]) -> dict[int, str]:
    """Fine-tuned model index -> its first own task-specific key that model= does not run with, and why. Own: the
    key names one of the fine-tune's tasks, or no task at all; the other tasks' heads a fine-tune carries are as
    θ0 left them, so their differing from the model's (fine-tuned) heads says nothing."""
    mine = model.state_dict(keep_vars=True)
    every_task = {t for ts in vector_tasks for t in ts}
    unused = {}
    for t, (src, keys, own_tasks) in enumerate(zip(ft_srcs, task_specific, vector_tasks)):
        for k in keys:
            owner = _key_task(k, every_task)
            if owner is not None and owner not in own_tasks:
                continue
            theirs, own = src.get(k), mine.get(k)
            if not isinstance(own, torch.Tensor):
                unused[t] = f"{k!r} (not in the model)"
            elif own.shape != theirs.shape or not torch.equal(own.detach().cpu(), theirs.to(own.dtype)):
                unused[t] = f"{k!r} (the model holds different values)"
            else:
                continue
            break
    return unused


def build_problem(pretrained, finetuned, *, model: nn.Module | None = None, tasks: Sequence[str] | None = None,
                  device: str | torch.device = "cpu", **key_options: Any) -> MergeProblem:
    """Validate the inputs, hold θ0 and the task vectors once on `device`, pick the model.

    With `model=None`, `pretrained` and `finetuned` must be model folders: the model is θ0 with each
    fine-tune's own head, the tasks the folders' (`tasks` is refused: it would go unread). Otherwise `model` is
    any module with ``forward(x, tasks=[t])`` returning ``{t: prediction}`` (or the prediction) and `tasks` names the task of each fine-tuned model.
    """
    from ..sources import open_sources

    fts = list(finetuned) if not isinstance(finetuned, (str, Path, dict, nn.Module)) else None
    if fts is None:
        raise TypeError("finetuned must be a list of models (state dicts, modules, folders or files), not one model")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:<index>'") from None
    if device.type == "cuda" and not torch.cuda.is_available():  # said here, not as a driver error mid-setup
        raise ValueError(f"device={device} but CUDA is not available here; use device='cpu'")
    if model is None:
        for f in (pretrained, *fts):  # a run folder passed for its model/: say so, as mtl.load_model does
            if isinstance(f, (str, Path)) and (refusal := run_folder_refusal(f)):
                raise MergeInputError(refusal)
        if not (_is_model_folder(pretrained) and all(_is_model_folder(f) for f in fts)):
            raise TypeError("learned merging needs a model to predict with: pass model folders (each fine-tune "
                            "brings its head) or model=<nn.Module with forward(x, tasks=[t])>")
        if tasks is not None:  # unread: each folder names its own tasks, and the columns follow finetuned's order
            raise ValueError(f"tasks={list(tasks)!r} is read only with model= (the task of each fine-tuned model for "
                             "that model); model folders bring their own tasks and the coefficients' columns follow "
                             "the order of finetuned: leave tasks out")
    else:
        if tasks is None:
            raise ValueError("with model=..., pass tasks=[one task name per fine-tuned model]")
        if len(tasks) != len(fts):
            raise ValueError(f"tasks names {len(tasks)} task(s) for {len(fts)} fine-tuned models: {list(tasks)}")
        repeated = sorted({str(t) for t in tasks if list(map(str, tasks)).count(str(t)) > 1})
        if repeated:  # the objective is a sum over tasks: two models of one task would be counted once
            raise ValueError(f"tasks names {repeated} for more than one fine-tuned model: {list(tasks)}; "
                             "give each fine-tuned model its own task")
        vector_tasks, names = [[str(t)] for t in tasks], [str(t) for t in tasks]
    opts, rest = KeyOptions.split(dict(key_options))
    if rest:
        raise TypeError(f"unknown option(s) {', '.join(sorted(rest))}")
    # the inputs' keys and shapes first: building the merged model from mismatched folders would fail
    # with a message about the model, not about which input differs
    pre_src, ft_srcs = open_sources(pretrained, fts)
    ctx = open_context(pre_src, ft_srcs, opts, 1, "learned merging")
    built = model is None
    try:
        if built:
            model, vector_tasks, names = _model_from_folders(pretrained, fts)
            model = model.to(device).eval()
        else:  # the caller's model is used as it is (never moved or copied); learn() restores each module's train/eval mode
            first = next(iter(model.parameters()), None)  # no eager fallback tensor: creating it on an absent GPU fails
            where = first.device if first is not None else device
            if where.type != device.type or (device.index is not None and where != device):
                raise ValueError(f"model= is on {where} but device={device}; move the model there first "
                                 "(learned merging does not move or copy your model)")
            uncovered = _uncovered_weights(model, pre_src, opts["task_keys"])
            if uncovered:
                more = f" (and {len(uncovered) - 3} more)" if len(uncovered) > 3 else ""
                raise MergeInputError(
                    f"model= ({type(model).__name__}) has {', '.join(map(repr, uncovered[:3]))}{more} that θ0 (the "
                    f"pretrained input) does not hold and task_keys={opts['task_keys']!r} does not mark task-specific: "
                    "a shared layer with no θ0 value would run with the model's own weights; add it to θ0 and the "
                    "fine-tuned models, or widen task_keys if it is a task's own")
            model.eval()
    except BaseException:
        ctx.close()
        raise
    known = getattr(model, "tasks", None)
    kinds = {t: getattr(known.get(t), "kind", None) if isinstance(known, dict) else None
             for ts in vector_tasks for t in ts}

    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    first = {id(p): n for n, p in own.items()}
    tied = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if n not in own}
    is_stat = re.compile(BN_STATS).match
    theta0, taus, fixed, dtypes = {}, {}, {}, {}
    try:
        for k in ctx.plan.order:
            kind, info = ctx.plan.kind[k], ctx.plan.infos[k]
            if k not in own:
                if kind == "merge" and k in tied:
                    raise MergeInputError(f"merged tensor {k!r} is tied to {tied[k]!r} in the model "
                                          f"({type(model).__name__}): learned merging does not support tied weights "
                                          "(each key would get its own coefficients); untie them, or exclude one "
                                          "with exclude=")
                if kind == "merge":
                    raise MergeInputError(f"merged tensor {k!r} is not a parameter or buffer of the model "
                                          f"({type(model).__name__}); models must share an architecture")
                continue  # a buffer the model lacks: nothing to run with (the result still holds it)
            shape = tuple(info.shape)
            if tuple(own[k].shape) != shape:
                raise MergeInputError(f"{k!r} has shape {shape} in the inputs but {tuple(own[k].shape)} in the model")
            # A model built here already holds θ0: share its storage instead of a second copy.
            mine = own[k].detach()
            if kind == "merge":
                pre = ctx.pre(k)
                stack = torch.empty((len(fts), *shape), dtype=pre.dtype)
                for t in range(len(fts)):
                    ctx.tv(k, t, pre=pre, out=stack[t])
                if stack.any():  # else no fine-tune changed it (frozen layers, a linearised model's θ0)
                    theta0[k] = mine if built and mine.dtype == pre.dtype else pre.to(device, copy=True)
                    taus[k], dtypes[k] = stack.to(device), info.dtype
                    continue
            # Not learned: θ0's value (or the fine-tunes' mean), as in the result, not the caller's module's.
            if built and kind != "average" and mine.dtype == info.dtype:
                fixed[k] = mine
            else:
                fixed[k] = (ctx.average(k) if kind == "average" else ctx.raw_pre(k)).to(device, info.dtype, copy=True)
        if not built:  # left out of the merge (include/exclude, unshared="skip"): θ0's value, as a built model holds
            fixed.update(_left_out(ctx, own, set(ctx.plan.order), opts["task_keys"], device))
        unused = {} if built else _unused_heads(model, ft_srcs, ctx.plan.task_specific, vector_tasks)
    finally:
        ctx.close()
    if unused:  # said once: the caller may expect each fine-tune's own head, as model folders bring it
        log.warning("the fine-tuned models of task(s) %s carry their own task-specific weights that the model lacks "
                    "or holds different values of (first: %s); they are not used: with model= the model's heads "
                    "predict (load those heads into the model to learn with them)", [names[t] for t in unused],
                    ", ".join(unused.values()))
    if not theta0:
        raise MergeInputError("nothing to learn: the fine-tuned models do not differ from the pretrained one")
    return MergeProblem(model, list(theta0), theta0, taus, names, vector_tasks, kinds, device, fixed, dtypes,
                        {k for k in theta0 if is_stat(k)})


VECTORS = ("plain", "ties")


def ties_task_vectors(taus: dict[str, torch.Tensor], k: float) -> dict[str, torch.Tensor]:
    """AdaMerging++ (Yang et al., ICLR 2024): every task vector preprocessed as TIES-Merging does (Yadav
    et al., NeurIPS 2023) before its coefficients are learned — trimmed to its top-k % magnitudes over all
    learned tensors, then only the entries whose sign agrees with the elected sign γ = sign(Σ_t τ̂_t) kept
    (entries where the trimmed vectors cancel are dropped). Edits the stacks in `taus` in place and returns
    it: beyond them it holds one task's magnitudes (for its threshold) and three one-tensor buffers."""
    from ..methods import Ties
    from ..selection import as_threshold, keep_count, kthvalue_threshold

    T = next(iter(taus.values())).shape[0]
    n = keep_count(sum(v[0].numel() for v in taus.values()), k)
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in taus.values()) else torch.float32
    thr = [kthvalue_threshold(torch.cat([v[t].abs().reshape(-1).to(dtype) for v in taus.values()]), n) for t in range(T)]
    for key in list(taus):
        v = taus[key]
        rows = list(v.unbind(0))  # views: trim_and_elect trims them in place
        bufs = (torch.empty_like(rows[0]), torch.empty(rows[0].shape, dtype=torch.bool, device=v.device),
                torch.empty_like(rows[0]))
        trimmed, sign = Ties.trim_and_elect(rows, [as_threshold(x, v.dtype) for x in thr], *bufs)
        for tt in trimmed:
            tt.mul_(tt * sign > 0)
    return taus
