"""The per-tensor engine shared by the in-memory and the streaming (file-to-file) paths.

A `Context` reads one tensor at a time from the sources, in the key's compute dtype, checking each
source tensor for NaN/Inf the first time it is read (or, for methods whose output is non-finite
whenever an input is, only tracing a non-finite output back to its input). Every output is checked
after its cast to the output dtype, so an overflow is an error, not a silent Inf. It also owns the
scratch buffers the kernels reuse from key to key. `produce` walks the key plan and yields the output
tensors one by one; the callers only differ in where those go (a dict, or a file being written).
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .keys import DEFAULT_TASK_KEYS, EXPANSION_POINT, KeyPlan, is_bn_variance, plan_keys
from .sources import MergeInputError, StateSource, default_task_names, header_source, open_sources, weights_file

__all__ = ["Context", "KeyOptions", "all_finite", "check_input_finite", "open_context", "overflow_error", "produce",
           "to_output_dtype", "torch_threads"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None: leave torch's setting alone), restoring it afterwards.

    On a machine whose cores are busy with other work, one thread is often faster: every parallel
    operation waits for its slowest thread, and a descheduled thread stalls it.
    """
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"threads must be ≥ 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in `x`: a finite sum proves it (any NaN/Inf poisons the sum); only a sum that
    overflows needs the element-wise check. Half-precision and float8 sums accumulate in float32
    (torch has no float8 sum or isfinite)."""
    narrow = x.dtype.is_floating_point and x.dtype.itemsize < 4
    s = x.sum(dtype=torch.float32) if narrow else x.sum()
    return bool(torch.isfinite(s)) or bool(torch.isfinite(x.float() if x.dtype.itemsize == 1 else x).all())


@functools.cache
def _saturation_limit(dtype: torch.dtype) -> float | None:
    """For a dtype without Inf whose cast saturates (torch's float8_e4m3fn: even +Inf becomes 448), the
    magnitude beyond which a value rounds past its largest finite one (max + half a step); else None."""
    if not dtype.is_floating_point or not torch.isfinite(torch.tensor(float("inf")).to(dtype).float()):
        return None
    fi = torch.finfo(dtype)
    return fi.max + 2.0 ** math.floor(math.log2(fi.max)) * fi.eps / 2


def to_output_dtype(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`x` cast to the output `dtype` (into `out` if given). Where that cast saturates, a value out of
    range becomes NaN instead (the OCP FP8 non-saturating conversion), so the finite check after the
    cast reports the overflow as it does an Inf in float16, rather than writing a clamped value."""
    limit = None if x.dtype == dtype else _saturation_limit(dtype)
    if limit is not None:
        x = x.masked_fill(x.abs() > limit, float("nan"))
    return x.to(dtype) if out is None else out.copy_(x)


def check_input_finite(x: torch.Tensor, key: str, label: str) -> None:
    """Raise naming `key`, its input `label` and the NaN / Inf counts when `x` holds any."""
    if all_finite(x):
        return
    x = x.float() if x.dtype.itemsize == 1 else x  # torch has no float8 isfinite
    bad = ~torch.isfinite(x)
    if bad.any():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(bad.sum()) - n_nan
        raise MergeInputError(f"tensor {key!r} in {label} has non-finite values ({n_nan} NaN, {n_inf} Inf)")


def overflow_error(key: str, dtype: torch.dtype | None, what: str = "merged tensor") -> MergeInputError:
    """A result tensor went non-finite although every input was finite."""
    return MergeInputError(f"{what} {key!r} overflowed (inputs are finite): its values exceed what "
                           f"{dtype or 'its dtype'} holds, or an intermediate sum over the models does; "
                           "check the hyperparameters (λ, scaling) and the inputs' magnitudes")


class KeyOptions(dict):
    """The keyword options every entry point shares (key filters, BN rule, checks), with defaults."""

    DEFAULTS = dict(
        include=None, exclude=None, task_keys=DEFAULT_TASK_KEYS, unshared="error", bn="pretrained", check_finite=True
    )

    @classmethod
    def split(cls, kwargs: dict) -> tuple["KeyOptions", dict]:
        opts = cls({k: kwargs.pop(k, v) for k, v in cls.DEFAULTS.items()})
        return opts, kwargs


class Context:
    """Lazy, validated, per-tensor access to θ0 and the fine-tuned models for one merge."""

    def __init__(self, pre: StateSource, fts: Sequence[StateSource], plan: KeyPlan, check_finite: bool = True):
        self.sources = [pre, *fts]
        self.plan = plan
        self.T = len(fts)
        self.check_finite = check_finite
        # When the method's output is non-finite whenever an input is (task arithmetic, average), the
        # output is checked instead of every input: one pass over the result instead of T + 1.
        self.check_outputs_only = False
        self._checked: set[tuple[int, str]] = set()
        self._ws: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._ws_numel = max((plan.infos[k].numel for k in plan.merge), default=0)
        self.chunks = None  # a `merging.kernels.Chunks` when the chunked kernels are in use
        self._prefetcher = None  # one background thread for read-ahead hints
        self.finetuned: Sequence[object] = ()  # the fine-tuned inputs as given (set by open_context)

    def task_names(self) -> list[str]:
        """Names of the fine-tuned models, as a ``{task: λ}`` hyperparameter names them (see
        `merging.sources.default_task_names`: a single-task model folder's task, else the path's name)."""
        return default_task_names(self.finetuned) if len(self.finetuned) == self.T else [f"task{t}" for t in range(self.T)]

    # -- workspaces ---------------------------------------------------------------------------------
    def buffer(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor reused from key to key (sized once for the largest merged tensor).

        Fresh multi-megabyte tensors for every key and task cost page faults and unmapping in the
        kernel — more than the arithmetic. Contents are undefined; a name is one live buffer.
        """
        n = 1
        for d in shape:
            n *= d
        buf = self._ws.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, self._ws_numel), dtype=dtype)
            self._ws[(name, dtype)] = buf
        return buf[:n].view(tuple(shape))

    # -- reading ------------------------------------------------------------------------------------
    def _read(self, i: int, key: str) -> tuple[torch.Tensor, bool]:
        """Tensor of source i in compute dtype, and whether it is a fresh copy (safe to modify)."""
        x = self.sources[i].get(key)
        cd = self.plan.compute.get(key, x.dtype)
        fresh = x.dtype != cd
        if fresh:
            x = x.to(cd)
        if self.check_finite and not self.check_outputs_only and x.is_floating_point() and (i, key) not in self._checked:
            self._validate(x, i, key)
            self._checked.add((i, key))
        return x, fresh

    def _validate(self, x: torch.Tensor, i: int, key: str) -> None:
        check_input_finite(x, key, self.sources[i].label_of(key))

    def check_output(self, key: str, out: torch.Tensor) -> None:
        """A non-finite output (in the output dtype: a cast can overflow too) is traced back to the input
        at fault, or reported as an overflow."""
        if self.check_finite and out.is_floating_point() and not all_finite(out):
            self.trace_nonfinite(key)

    def trace_nonfinite(self, key: str) -> None:
        """The output for `key` is non-finite: raise naming the input at fault (or an overflow)."""
        for i, src in enumerate(self.sources):
            x = src.get(key)
            self._validate(x.to(self.plan.compute.get(key, x.dtype)), i, key)
        info = self.plan.infos.get(key)
        raise overflow_error(key, info.dtype if info else None)

    def pre(self, key: str) -> torch.Tensor:
        """θ0[key] in compute dtype. Read-only: may share memory with the input."""
        return self._read(0, key)[0]

    def ft(self, key: str, t: int) -> torch.Tensor:
        """θ_t[key] in compute dtype. Read-only: may share memory with the input."""
        return self._read(t + 1, key)[0]

    def tv(self, key: str, t: int, pre: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """τ_t[key] = θ_t − θ0, into `out` if given, else a new tensor (the caller may modify either)."""
        if pre is None:
            pre = self.pre(key)
        x, fresh = self._read(t + 1, key)
        if out is not None:
            return torch.sub(x, pre, out=out)
        return x.sub_(pre) if fresh else torch.sub(x, pre)

    def average(self, key: str) -> torch.Tensor:
        """Mean of the fine-tuned models' `key` in compute dtype (BN statistics under bn="average")."""
        out = torch.zeros(self.plan.infos[key].shape, dtype=self.plan.compute[key])
        for t in range(self.T):
            out.add_(self.ft(key, t))
        return out.div_(self.T)

    def raw_pre(self, key: str) -> torch.Tensor:
        return self.sources[0].get(key)

    def prefetch(self, key: str) -> None:
        """Hint file sources to read `key` ahead, from a background thread: on inputs already in page
        cache the hint is pure kernel work (~12 % of a cached task-arithmetic merge), which this
        keeps off the merging thread."""
        if self._prefetcher is None:
            from concurrent.futures import ThreadPoolExecutor

            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="mtl-prefetch")
        self._prefetcher.submit(self._prefetch_now, key)

    def _prefetch_now(self, key: str) -> None:
        for s in self.sources:
            try:
                s.prefetch(key)
            except OSError:  # a hint: the read itself reports a real problem
                pass

    def iter_keys(self, keys: Sequence[str]) -> Iterator[str]:
        """Iterate keys, hinting file sources to read the next key while this one is computed."""
        for i, k in enumerate(keys):
            if i + 1 < len(keys):
                self.prefetch(keys[i + 1])
            yield k

    def close(self) -> None:
        self._ws.clear()
        if self._prefetcher is not None:  # no hint may touch a file after it is closed
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
            self._prefetcher = None
        for s in self.sources:
            s.close()


def open_context(pretrained, finetuned, opts: KeyOptions, min_models: int, what: str, keep_base: bool = False,
                 base_among: bool = False, index_first: bool = False) -> Context:
    """``base_among``: the pretrained model may be one of ``finetuned`` (a method merging models, not task vectors);
    ``index_first``: see `merging.sources.weights_file`."""
    if isinstance(finetuned, Iterator):  # read once, for the sources and the task names alike
        finetuned = list(finetuned)
    pre, fts = open_sources(pretrained, finetuned, base_among, index_first)
    if len(fts) < min_models:
        raise MergeInputError(
            f"{what} needs at least {min_models} fine-tuned model{'s' if min_models > 1 else ''}, got {len(fts)}"
        )
    plan = plan_keys(
        pre, fts, include=opts["include"], exclude=opts["exclude"], task_keys=opts["task_keys"],
        unshared=opts["unshared"], bn=opts["bn"], keep_base=keep_base,
    )
    ctx = Context(pre, fts, plan, check_finite=opts["check_finite"])
    ctx.finetuned = list(finetuned)
    try:
        check_expansion_points(ctx)
    except BaseException:
        ctx.close()
        raise
    return ctx


def check_headers(pretrained, finetuned: Sequence, options: dict, keep_base: bool = False,
                  index_first: bool = False) -> None:
    """`open_context`'s key plan (key sets, shapes, dtypes under the key options in `options`; the rest as there)
    from the inputs' safetensors headers alone, so that a job refuses mismatched inputs before its run folder. Skipped
    when a torch checkpoint is among them (only loading it gives its keys); the merge checks everything again."""
    opts, _ = KeyOptions.split(dict(options))
    sources: list[StateSource] = []
    try:
        for path in [pretrained, *finetuned]:
            src = header_source(weights_file(path, index_first))
            if src is None:
                return
            sources.append(src)
        plan_keys(sources[0], sources[1:], include=opts["include"], exclude=opts["exclude"],
                  task_keys=opts["task_keys"], unshared=opts["unshared"], bn=opts["bn"], keep_base=keep_base,
                  say_skipped=False)
    finally:
        for src in sources:
            src.close()


def check_expansion_points(ctx: Context) -> None:
    """Linearized (tangent-space) models are expanded around θ0 (their `theta0.` buffers); the merge copies
    θ0's point, so a fine-tune expanded around another point would be merged as if it were not."""
    is_point = re.compile(EXPANSION_POINT).match
    for key in ctx.plan.copy:
        if not is_point(key):
            continue
        ref = ctx.sources[0].get(key).clone()  # a source may reuse its buffer on the next read
        for src in ctx.sources[1:]:
            x = src.get(key)
            if not torch.equal(x, ref):
                diff = float((x.float() - ref.float()).abs().max())
                raise MergeInputError(
                    f"{src.label} is linearized around another point than {ctx.sources[0].label}: its expansion "
                    f"point {key!r} differs by up to {diff:.3g}; tangent-space task vectors add up only around one "
                    "θ0 (fine-tune each model from the same linearized θ0)")


def produce(method, ctx: Context, fused: Callable[[str], object] | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield `(key, tensor)` in output order, each in the pretrained model's dtype.

    A yielded tensor may be a workspace reused for the next key, or share memory with an input:
    consume it (write it out, or clone it) before asking for the next one. With `fused`, merged keys
    yield `fused(key)` instead (a `merging.kernels.Streamed`, produced chunk by chunk).
    """
    plan = ctx.plan
    propagates = getattr(method, "propagates_nonfinite", False)
    for key in ctx.iter_keys(plan.order):
        kind = plan.kind[key]
        dtype = plan.infos[key].dtype
        is_variance = kind == "merge" and is_bn_variance(key)
        if kind == "merge" and fused is not None and not is_variance:  # a variance is small: checked whole
            yield key, fused(key)
            continue
        if kind == "merge":
            ctx.check_outputs_only = propagates
            out = method.merge_tensor(ctx, key)
            ctx.check_outputs_only = False
        elif kind == "copy":
            out = ctx.raw_pre(key)
        else:  # "average": BN statistics under bn="average"
            out = ctx.average(key)
        out = to_output_dtype(out, dtype)
        ctx.check_output(key, out)  # every method's output, after the cast (an fp16 output can overflow there)
        if is_variance:
            check_merged_variance(key, out)
        yield key, out


def check_merged_variance(key: str, out: torch.Tensor, model: str = "") -> None:
    """bn="merge" merges BN variances like any float; θ0 + Σ λ τ can then fall below zero, and a
    negative variance makes BatchNorm return NaN (the square root of a negative number). `model` names
    the merged model `out` belongs to where a merge makes several (TALL's task models)."""
    low = float(out.min()) if out.numel() else 0.0
    if low < 0:
        raise MergeInputError(
            f"bn='merge' gives the BatchNorm variance {key!r}{' ' + model if model else ''} negative entries "
            f"(down to {low:.3g}), which "
            "BatchNorm turns into NaN outputs: use bn='average' or 'pretrained', re-estimate the statistics "
            "(bn='recompute' / merging.recompute_bn), or lower the merge coefficients")
