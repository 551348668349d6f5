"""The optimisation step every learned merge shares, data cycling and progress.

One step: merged weights θ(c, m) are built once, every task's batch runs through the one model with
θ detached into leaf tensors, the leaf gradients are summed over tasks, then pushed back through
θ(c, m) to the coefficients / mask in a single backward. When the tasks' inputs share a shape and the
pooled batch holds at most `pool_limit` input values (2^20 for models built from folders; a caller's
`model=` promises only forward(x, tasks=[t]), so it goes task by task unless asked), all tasks' batches go through
the model in ONE pass (each task's loss on its slice, through its own head): with the BN layers in
eval mode every sample is computed alone, so this is the per-task result, and one large pass costs
~1.7× less than T small ones on CPU. Otherwise — larger batches, where holding every task's
activations at once would dominate memory — task by task, each task's activations freed after its
backward. Peak memory: θ0 + T task vectors + θ + ∂θ + one pass's activations.

With `bn="recompute"`, the BatchNorm layers must see statistics that match the current θ, as the
final model's re-estimated ones will: every task's batch goes through the model in ONE pass, pooled
(also the batches of tasks left out of the objective, whose rows shape the statistics and carry no loss),
with the shared BN layers in train mode, so they normalise with the statistics of the pooled batch —
a differentiable function of θ, so the gradient also accounts for how the statistics move with the
coefficients (BN makes a layer blind to the scale of the weights before it; a gradient holding the
statistics fixed would push the coefficients up for sharper predictions that re-estimation undoes).
Each task's loss is computed on its slice through its own head. Peak memory then holds every task's
activations at once. When the tasks' inputs differ in shape there is no pooled batch: the statistics
are re-estimated on the step's batches (no gradient) and held constant.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from mtl.progress_log import ProgressLog

from ..bn import batch_inputs, check_batches, bn_statistics, pooled_batches, shared_bn_in_train_mode
from .objective import entropy
from .problem import MergeProblem

__all__ = ["POOL_LIMIT", "BatchCycler", "Objective", "step_gradients", "step_progress"]

#: input values of one pooled pass of every task's batch (BN in eval mode); larger steps go task by task
POOL_LIMIT = 1 << 20


class BatchCycler:
    """Endless batches from a re-iterable (list, DataLoader, ...); restarts it when exhausted."""

    def __init__(self, source: Iterable, task: str, what: str = "unlabeled"):
        self.source, self.task, self.what = source, task, what
        self._it: Iterator | None = None
        self._served = False

    def next_raw(self) -> Any:
        for attempt in range(2):
            if self._it is None:
                self._it = iter(self.source)
            try:
                batch = next(self._it)
                self._served = True
                return batch
            except StopIteration:
                self._it = None
        if self._served:  # a generator or iterator: its second pass is empty
            raise ValueError(f"{self.what}[{self.task!r}] was exhausted after one pass; batches are cycled, so it must "
                             "be re-iterable (a list or a DataLoader, not a generator or iterator)")
        raise ValueError(f"{self.what}[{self.task!r}] yields no batches")

    def __next__(self) -> torch.Tensor:
        return batch_inputs(self.next_raw(), self.task)


class Objective:
    """Entropy of each task's predictions (unsupervised) or the task's own loss on labelled batches."""

    def __init__(self, problem: MergeProblem, tasks: list[str], unlabeled: Mapping[str, Iterable] | None,
                 labeled: Mapping[str, Iterable] | None, supervised: bool, recompute_bn: bool = False,
                 bn_options: Mapping[str, Any] | None = None, pool_limit: int = POOL_LIMIT,
                 channels_last: bool = False):
        self.problem, self.tasks, self.supervised = problem, tasks, supervised
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last must be true or false (null: on for models built from folders), "
                             f"got {channels_last!r}")
        self.channels_last = channels_last
        self.pool_limit = pool_limit  # an int ≥ 0: checked and converted once, by api.check_hparams
        self._poolable = True  # False once the model turned out not to return {task: prediction}
        # bn_options: keyword arguments of merging.bn's functions (`task_keys` when the caller set it)
        self.recompute_bn, self.bn_options = recompute_bn, dict(bn_options or {})
        data = labeled if supervised else unlabeled
        name = self.what = "labeled" if supervised else "unlabeled"  # as errors name the data
        if data is not None and not isinstance(data, Mapping):
            raise TypeError(f"{name} must map each task to an iterable of batches ({{task: batches}}), "
                            f"got {type(data).__name__}")
        for t in tasks:
            if data is not None:
                check_batches(data.get(t), f"{name}[{t!r}]")
        missing = [t for t in tasks if data is None or t not in data]
        if missing:
            raise ValueError(f"{name} has no data for task {missing[0]!r}" + (f" (nor {missing[1:]})" if missing[1:] else "")
                             + f"; it needs batches for {tasks}")
        # bn="recompute": tasks with data but no loss (regression-like heads under the entropy objective) still
        # have their batches in each step's BN pass, as in the final re-estimation over every task's data
        self.bn_only = [t for t in data if t not in tasks] if recompute_bn and data is not None else []
        for t in self.bn_only:
            check_batches(data[t], f"{name}[{t!r}]")
        self.iters = {t: BatchCycler(data[t], t, name) for t in [*tasks, *self.bn_only]}

    def draw(self) -> dict[str, Any]:
        """This step's batch of every task (with `recompute_bn`, also of the tasks in the BN pass only)."""
        return {t: self.iters[t].next_raw() for t in [*self.tasks, *self.bn_only]}

    def bn_statistics(self, params: dict[str, torch.Tensor], batches: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """BN statistics of the model with `params` on this step's inputs of every task, pooled."""
        inputs = {t: [batch_inputs(b, t)] for t, b in batches.items()}
        return bn_statistics(self.problem.model, pooled_batches(inputs), params=params, task=self.tasks[0],
                             **self.bn_options)

    def _xy(self, batch: Any, task: str) -> tuple[torch.Tensor, Any]:
        """Inputs, and targets for the supervised objective only (unlabeled batches: inputs alone are read)."""
        if not self.supervised:
            return _checked(batch_inputs(batch, task), task, "unlabeled"), None
        tasks = getattr(self.problem.model, "tasks", None)
        key = getattr(tasks.get(task), "target_key", task) if isinstance(tasks, Mapping) else task
        if isinstance(batch, Mapping):
            if "image" not in batch or key not in batch:
                raise ValueError(f"labeled[{task!r}]: a batch dict needs 'image' and {key!r} (the targets); it has "
                                 f"{sorted(map(str, batch))} (objective='supervised' trains on labelled shots)")
            x, y = batch["image"], batch[key]
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
        else:  # a bare tensor of two images would otherwise unpack into an input and a "target"
            raise TypeError(f"labeled[{task!r}]: batches must be (inputs, targets) pairs or dicts with 'image' and "
                            f"{key!r}, got {type(batch).__name__} (objective='supervised' trains on labelled shots)")
        return _checked(x, task, "labeled"), y

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` on the learning device; 4-D batches in channels-last memory format when asked (CPU
        max-pooling and BN's backward are much faster on it: 3–9 % per step at one thread on the zoo CNN)."""
        x = x.to(self.problem.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def loss(self, pred: torch.Tensor, task: str, y: Any) -> torch.Tensor:
        if not self.supervised:
            return entropy(pred, self.problem.task_kinds.get(task), task)
        model = self.problem.model
        y = y.to(pred.device)
        t = getattr(model, "tasks", {}).get(task) if isinstance(getattr(model, "tasks", None), dict) else None
        if t is None or hasattr(t, "ignore_index"):  # class ids: F.cross_entropy's, or an mtlkit task's
            _check_class_ids(pred, y, task, getattr(t, "ignore_index", -100))
        return t.loss(pred, y) if t is not None else F.cross_entropy(pred, y)

    def task_loss(self, params: dict[str, torch.Tensor], task: str, batch: Any = None) -> torch.Tensor:
        if batch is None:
            batch = self.iters[task].next_raw()
        x, y = self._xy(batch, task)
        x = self.model_input(x)
        try:
            pred = self.problem.predict(params, x, task)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as e:  # torch (or the model's input check) names neither the task nor its data
            raise forward_failed(e, self.what, [task], x, self.problem.model) from e
        return self.loss(pred, task, y)

    def pooled_losses(self, params: dict[str, torch.Tensor], batches: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        """Every task's loss from ONE forward pass of all tasks' batches concatenated. With `recompute_bn`
        the shared BN layers run in train mode: they normalise with the statistics of the pooled batch, a
        differentiable function of the merged weights. None when the tasks' inputs differ in shape (no
        pooled batch), or without `recompute_bn` when the batch exceeds `pool_limit` input values or the
        model does not return {task: prediction} (the caller then goes task by task)."""
        xys = {t: self._xy(batches[t], t) for t in self.tasks}
        stats_only = [_checked(batch_inputs(batches[t], t), t, self.what) for t in self.bn_only]  # BN rows, no loss
        if len({tuple(x.shape[1:]) for x in [*(x for x, _ in xys.values()), *stats_only]}) > 1:
            return None
        if not self.recompute_bn and (len(self.tasks) < 2 or not self._poolable
                                      or sum(x.numel() for x, _ in xys.values()) > self.pool_limit):
            return None
        model = self.problem.model
        x = self.model_input(torch.cat([*(x for x, _ in xys.values()), *stats_only]))
        try:
            if self.recompute_bn:
                with shared_bn_in_train_mode(model, params, **self.bn_options) as scratch:
                    out = torch.func.functional_call(model, scratch, (x,), {"tasks": list(self.tasks)}, strict=False)
            else:
                out = torch.func.functional_call(model, params, (x,), {"tasks": list(self.tasks)}, strict=False)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as e:  # torch (or the model's input check) names neither the tasks nor their data
            raise forward_failed(e, self.what, list(self.tasks), x, model) from e
        except KeyError as e:  # most often a model without a head for one of the tasks
            if self.recompute_bn:
                raise KeyError(f"the model raised KeyError {e} on forward(x, tasks={list(self.tasks)}); does it "
                               "predict every one of these tasks? (tasks= names one task per fine-tuned model)") from e
            self._poolable = False  # task by task, whose error names the task
            return None
        if not isinstance(out, Mapping) or any(t not in out for t in self.tasks):
            if not self.recompute_bn:  # a `model=` that answers one task at a time: task by task from now on
                self._poolable = False
                return None
            if len(self.tasks) > 1:
                raise TypeError(f"bn='recompute' runs every task's batch in one pass: the model must return "
                                f"{{task: prediction}} for tasks={self.tasks}, got {type(out).__name__}")
            out = {self.tasks[0]: out}
        losses, start = {}, 0
        for t, (xt, y) in xys.items():
            losses[t] = self.loss(out[t][start:start + len(xt)], t, y)
            start += len(xt)
        return losses


def forward_failed(error: Exception, what: str, tasks: list[str], x: torch.Tensor, model: torch.nn.Module
                   ) -> RuntimeError:
    """A forward that raised, as one line naming the batches it ran on and their shape, and the channels the
    model's first convolution takes when a 4-D batch has others (the usual cause: grayscale vs RGB)."""
    names = ", ".join(f"{what}[{t!r}]" for t in tasks)
    whose = "its batch" if len(tasks) == 1 else "their pooled batch"
    cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    hint = ""
    if x.dim() == 4 and conv is not None and conv.in_channels != x.shape[1]:
        hint = (f"; the model's first convolution takes {conv.in_channels} channels: expected shape "
                f"(B, {conv.in_channels}, H, W)")
    return RuntimeError(f"{names}: the model's forward failed on {whose} of shape {tuple(x.shape)} ({cause}){hint}")


def _check_class_ids(pred: torch.Tensor, y: torch.Tensor, task: str, ignore_index: int) -> None:
    """Integer targets against the head's classes (dim 1 of its logits), before the loss: torch names neither
    the task nor where the labels came from ("Target 7 is out of bounds"), and on a GPU it asserts."""
    if y.is_floating_point() or pred.dim() < 2:  # probabilities or regression targets: no class ids
        return
    from mtl.tasks.base import out_of_range  # here: `import merging` keeps the model world unloaded

    classes = pred.shape[1]
    bad = out_of_range(y, classes, ignore_index)
    if bool(bad.any()):
        found = sorted({int(v) for v in y[bad].unique()[:5]})
        raise ValueError(f"labeled[{task!r}] holds target label(s) {found}, but task {task!r}'s head has {classes} "
                         f"classes (labels lie in [0, {classes}) or equal the loss's ignore_index={ignore_index})")


def _checked(x: Any, task: str, what: str) -> Any:
    """A batch the objective can use: rows, and finite values (a NaN pixel would read as divergence)."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 or len(x) == 0:
            raise ValueError(f"{what}[{task!r}] gave an empty batch (shape {tuple(x.shape)})")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"{what}[{task!r}] gave a batch with NaN or infinite inputs")
    return x


def _check_loss(t: str, loss: torch.Tensor, step: int | None) -> None:
    if not torch.isfinite(loss):
        at = f" at step {step}" if step is not None else ""
        raise FloatingPointError(f"the objective of task {t!r} is {loss.detach().item()}{at}; the merged model "
                                 "diverged (lower lr, or clamp the coefficients)")


def step_gradients(problem: MergeProblem, merged: dict[str, torch.Tensor], objective: Objective,
                   frozen: dict[str, torch.Tensor], step: int | None = None) -> dict[str, float]:
    """Backpropagate Σ_t loss_t to whatever `merged` depends on; returns each task's loss."""
    # BN running statistics (problem.no_grad) enter BN as constants: no gradient through them
    leaves = {k: v.detach().requires_grad_(k not in problem.no_grad) for k, v in merged.items()}
    params = {**frozen, **leaves}
    batches = objective.draw()
    losses = {}
    pooled = objective.pooled_losses(params, batches)
    if pooled is not None:
        for t, loss in pooled.items():
            _check_loss(t, loss, step)
        sum(pooled.values()).backward()
        losses = {t: float(loss.detach()) for t, loss in pooled.items()}
    else:
        if objective.recompute_bn:  # inputs of different shapes: statistics re-estimated, then held constant
            params.update(objective.bn_statistics({**frozen, **{k: v.detach() for k, v in merged.items()}}, batches))
        for t in objective.tasks:
            loss = objective.task_loss(params, t, batches[t])
            _check_loss(t, loss, step)
            loss.backward()
            losses[t] = float(loss.detach())
    keys = [k for k in merged if leaves[k].grad is not None and merged[k].requires_grad]
    if keys:
        torch.autograd.backward([merged[k] for k in keys], [leaves[k].grad for k in keys])
    return losses


def optimiser_step(opt: torch.optim.Optimizer, lr_name: str) -> None:
    """`opt.step()`, with an update too large for the parameters' dtype (Adam's lr / bias correction
    does not fit in float32) reported as the learning rate that caused it."""
    try:
        opt.step()
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        lr = opt.param_groups[0]["lr"]
        raise ValueError(f"{lr_name}={lr!r} overflows the optimiser's update ({e}); lower {lr_name}") from None


def check_finite(coef: torch.Tensor, groups: list[str], names: list[str], step: int) -> None:
    if torch.isfinite(coef).all():
        return
    c = coef.detach().reshape(-1, len(names))
    r, t = [int(i) for i in (~torch.isfinite(c)).nonzero()[0]]
    value = float(c[r, t])
    # clamping bounds an infinite coefficient; a NaN (NaN gradients) stays NaN
    advice = "lower lr" if math.isnan(value) else "lower lr or pass clamp=true"
    raise FloatingPointError(f"coefficient of task {names[t]!r}, tensor/block {groups[r]!r} became {value} "
                             f"at step {step}; {advice}")


def step_progress(label: str, total: int, enabled: bool = True) -> ProgressLog:
    """A learned merge's optimisation steps as lines that also reach log files: the first and last step
    and one every 10 s, with the rate, ETA and (in the note) the objective."""
    return ProgressLog(f"[{label}] step", total, unit="steps", every_seconds=10.0, enabled=enabled)


def mean(values: Mapping[str, float]) -> float:
    return math.fsum(values.values()) / max(len(values), 1)


Callback = Callable[[int, dict[str, torch.Tensor]], Mapping[str, float] | None]
