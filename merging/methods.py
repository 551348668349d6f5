"""Training-free merge methods, each written per tensor so one code path serves memory and streaming.

θ0 is the pretrained model, θ_t the fine-tuned ones, τ_t = θ_t − θ0 their task vectors (docs/merging.md).

- average:          θ = mean_t θ_t
- task_arithmetic:  θ = θ0 + λ Σ_t τ_t                                           (λ = 0.3; or one λ_t per task)
- ties:             trim each τ_t to its top-k% magnitudes, elect γ = sign(Σ_t τ̂_t), disjoint
                    mean (or sum) over the tasks agreeing with γ; θ = θ0 + λ τ_m   (k = 20, mean, λ = 1)

DARE (dare.py) and Consensus (consensus.py) build on these and register in the same `METHODS`.

Methods never modify their inputs: every in-place operation runs on a fresh τ or an output buffer.
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch

from mtl.io import as_plain
from mtl.registry import Registry, UnknownNameError

from .engine import Context
from .selection import as_threshold, keep_count, kthvalue_threshold, radix_thresholds
from .sources import MergeInputError

log = logging.getLogger(__name__)
_WARNED_K: set[float] = set()

__all__ = [
    "METHODS",
    "MergeMethod",
    "create_method",
    "SELECTS",
]

METHODS: Registry[type["MergeMethod"]] = Registry("merge method")
SELECTS = ("kthvalue", "radix")
#: what γ is where the kept values cancel exactly: 0 (the paper; the entry stays 0) or FusionBench's
#: model-wide majority sign
TIE_RULES = ("paper", "fusionbench")

Transform = Callable[[Context, str, int, torch.Tensor], torch.Tensor]


#: where a list of λ (one per model) is accepted: said when a method that takes one λ is given a list
LAM_LIST_HINT = "one λ per model: task_arithmetic, or dare with base=task_arithmetic"


def _check_lam(name: str, lam: Any, allow_list: bool, list_hint: str = LAM_LIST_HINT) -> None:
    if allow_list and isinstance(lam, Sequence) and not isinstance(lam, str):
        for v in lam:
            _check_lam(name, v, False)
        return
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        what = ("a finite number or one per task (a list, tuple, or 1-d array or tensor of finite numbers)" if allow_list else
                f"one finite number ({list_hint})" if isinstance(lam, (list, tuple)) else "a finite number")
        raise ValueError(f"{name} must be {what}, got {lam!r}")


def _per_task(name: str, value: Any, T: int) -> list[float]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != T:
            raise ValueError(f"{name} has {len(value)} values but there are {T} fine-tuned models")
        return [float(v) for v in value]
    return [float(value)] * T


def unknown_hparams(name: str, convention: str, unknown: Sequence[str], accepted: Iterable[str], what: str = "") -> str:
    """The error for hyperparameters method `name` does not take; a key of the other convention (mergekit's
    `density` given to the papers' TIES) says where it applies and what this convention uses instead."""
    from mtl.registry import meant

    from .mergekit import convention_note

    return (f"{what or name}: unknown hyperparameter(s) {', '.join(unknown)}{meant(unknown, accepted)}; accepted: "
            f"{', '.join(sorted(accepted)) or 'none'}" + convention_note(name, convention, unknown))


class MergeMethod(ABC):
    """A merge method: hyperparameters, an optional global pass (`prepare`) and a per-tensor kernel.

    Kernels keep their temporaries in the context's reusable buffers and may return one of them; the
    engine copies or writes the result before the next key.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    # True when any NaN/Inf input makes the output non-finite, so checking the output is enough.
    propagates_nonfinite: ClassVar[bool] = False
    #: whose rules: "paper", or "mergekit" (merging.mergekit); an unknown key of the other one is explained
    convention: ClassVar[str] = "paper"
    #: False for the methods that merge the models themselves, not their task vectors (θ0 only fixes keys and
    #: dtypes): θ0 may then be one of the merged models (a soup with the base, mergekit's linear)
    uses_task_vectors: ClassVar[bool] = True

    def __init__(self, **hparams: Any):
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise TypeError(unknown_hparams(self.name, self.convention, unknown, self.defaults))
        self.hp = {**self.defaults, **{k: as_plain(v) for k, v in hparams.items()}}
        self.transform: Transform | None = None
        self.T = 0
        self.select = "kthvalue"
        self.validate()

    def __repr__(self) -> str:
        # as create_method would be called to make it
        convention = [] if self.convention == "paper" else [f"convention={self.convention!r}"]
        return f"{type(self).__name__}({', '.join([repr(self.name), *convention, *(f'{k}={v!r}' for k, v in self.hp.items())])})"

    def validate(self) -> None:
        """Check hyperparameter values (the number of models is checked in `bind`)."""

    def min_models(self) -> int:
        return 1

    def bind(self, T: int) -> None:
        if T < self.min_models():
            raise MergeInputError(f"{self.name} needs at least {self.min_models()} fine-tuned models, got {T}")
        self.T = T

    def prepare(self, ctx: Context, select: str) -> None:
        """Global statistics needed before the per-tensor pass (none for most methods)."""
        if select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
        self.select = select
        self.bind(ctx.T)

    def task_vector(self, ctx: Context, key: str, t: int, pre: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """τ_t (after DARE when this method is DARE's base), into `out` if given."""
        tau = ctx.tv(key, t, pre, out=out)
        return tau if self.transform is None else self.transform(ctx, key, t, tau)

    def task_vectors(self, ctx: Context, key: str, pre: torch.Tensor) -> list[torch.Tensor]:
        return [self.task_vector(ctx, key, t, pre, out=ctx.buffer(f"tau{t}", pre.shape, pre.dtype)) for t in range(ctx.T)]

    @abstractmethod
    def merge_tensor(self, ctx: Context, key: str) -> torch.Tensor:
        """Merged tensor for `key` in compute dtype (possibly a context buffer)."""

    def merged_vector(self, ctx: Context, key: str, taus: list[torch.Tensor], inplace: bool) -> torch.Tensor:
        """τ_MTL for one tensor, before the final λ (used by TALL/Consensus); a context buffer.
        `inplace=False` leaves `taus` untouched."""
        raise TypeError(f"{self.name} does not define a merged task vector")


CONVENTIONS = ("paper", "mergekit")


def create_method(name: str, convention: str = "paper", **hparams: Any) -> MergeMethod:
    """The method `name` with its hyperparameters. `convention="mergekit"` gives mergekit's rules
    (`merging.mergekit`: ties, dare, task_arithmetic, linear/average, dare_ties, dare_linear)."""
    if convention == "mergekit":
        from .mergekit import create_mergekit_method

        return create_mergekit_method(name, **hparams)
    if convention != "paper":
        raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    if name in OWN_ENTRY_POINTS:  # an mtl-merge method with its own Python entry point: say which
        raise UnknownNameError(f"{name!r} is not a merge method of merging.merge: {OWN_ENTRY_POINTS[name]}")
    if name in MERGEKIT_ONLY:  # mergekit's names, which mean mergekit's rules
        raise UnknownNameError(f"merge method {name!r} is mergekit's: pass convention=\"mergekit\" (the papers' "
                               f"rules: {MERGEKIT_ONLY[name]})")
    return METHODS.get(name)(**hparams)


#: mtl-merge's methods (`merge=<name>`) that are not state-dict merges, and the Python call that runs them
OWN_ENTRY_POINTS = {"tall_masks": "TALL masks give one model per task; use merging.tall_masks(pretrained, finetuned, "
                                  "lam=...) (.merged is θ0 + τ_MTL, .reconstruct(t) task t's model) or "
                                  "merging.write_tall_store (mtl-merge merge=tall_masks)"}
#: mergekit's method names that exist only under its convention, and the papers' counterpart
MERGEKIT_ONLY = {"linear": "average, unweighted", "dare_ties": "dare with base='ties'",
                 "dare_linear": "dare with base='task_arithmetic'"}


@METHODS.register("average")
class Average(MergeMethod):
    name = "average"
    propagates_nonfinite = True
    uses_task_vectors = False

    def merge_tensor(self, ctx: Context, key: str) -> torch.Tensor:
        info = ctx.plan.infos[key]
        acc = ctx.buffer("acc", info.shape, ctx.plan.compute[key])
        acc.copy_(ctx.ft(key, 0))
        for t in range(1, ctx.T):
            acc.add_(ctx.ft(key, t))
        return acc.div_(ctx.T)


@METHODS.register("task_arithmetic")
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    defaults = {"lam": 0.3}
    propagates_nonfinite = True  # sums of differences (DARE's 0/1 mask keeps NaN·0 = NaN)

    def validate(self) -> None:
        _check_lam("lam", self.hp["lam"], allow_list=True)

    def bind(self, T: int) -> None:
        super().bind(T)
        self.lams = _per_task("lam", self.hp["lam"], T)
        self.scalar = not isinstance(self.hp["lam"], Sequence)

    def merge_tensor(self, ctx: Context, key: str) -> torch.Tensor:
        pre = ctx.pre(key)
        bufs = (ctx.buffer(n, pre.shape, pre.dtype) for n in ("acc", "tau", "out"))
        return self.combine(pre, lambda t, out: self.task_vector(ctx, key, t, pre, out=out), ctx.T, *bufs)

    def combine(self, pre: torch.Tensor, task_vector: Callable[[int, torch.Tensor], torch.Tensor], T: int,
                acc: torch.Tensor, tau: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """θ0 + Σ_t λ_t τ_t in one fixed order of operations; the chunked kernel (merging.kernels) runs
        this same code on each chunk, which is what keeps the two paths bit-identical."""
        for t in range(T):
            x = task_vector(t, acc if t == 0 else tau)
            if self.scalar:
                if t:
                    acc.add_(x)
            elif t:
                acc.add_(x, alpha=self.lams[t])
            else:
                acc.mul_(self.lams[0])
        return torch.add(pre, acc, alpha=self.lams[0], out=out) if self.scalar else torch.add(pre, acc, out=out)

    def merged_vector(self, ctx: Context, key: str, taus: list[torch.Tensor], inplace: bool) -> torch.Tensor:
        acc = ctx.buffer("mtv", taus[0].shape, taus[0].dtype)
        acc.copy_(taus[0])
        for tau in taus[1:]:
            acc.add_(tau)
        return acc


@METHODS.register("ties")
class Ties(MergeMethod):
    name = "ties"
    defaults = {"lam": 1.0, "k": 20, "merge_func": "mean", "trim": "global", "tie_rule": "paper"}

    def validate(self) -> None:
        _check_lam("lam", self.hp["lam"], allow_list=False)
        keep_count(0, self.hp["k"])  # range check
        if 0 < self.hp["k"] < 1 and self.hp["k"] not in _WARNED_K:  # FusionBench's k / mergekit's density: fractions
            _WARNED_K.add(self.hp["k"])  # once per value: a λ grid builds the method once per candidate
            log.warning("ties: k=%g keeps %g%% of the entries (k is a percentage; for a fifth, k=20)",
                        self.hp["k"], self.hp["k"])
        if self.hp["merge_func"] not in ("mean", "sum"):
            raise ValueError(f"merge_func must be 'mean' or 'sum', got {self.hp['merge_func']!r}")
        if self.hp["trim"] not in ("global", "per_tensor"):
            raise ValueError(f"trim must be 'global' or 'per_tensor', got {self.hp['trim']!r}")
        if self.hp["tie_rule"] not in TIE_RULES:
            raise ValueError(f"tie_rule must be one of {TIE_RULES}, got {self.hp['tie_rule']!r}")
        self.thresholds: list[float] | None = None
        self.zero_sign = 0.0

    def prepare(self, ctx: Context, select: str) -> None:
        super().prepare(ctx, select)
        if self.hp["trim"] == "global":
            self.thresholds = global_thresholds(ctx, self, self.hp["k"], select)
        if self.hp["tie_rule"] == "fusionbench":
            self.zero_sign = self._majority_sign(ctx)

    def _majority_sign(self, ctx: Context) -> float:
        """FusionBench's rule: an entry whose kept values cancel exactly takes the sign of Σ γ over the
        whole model (one extra pass over the inputs)."""
        if ctx.chunks is not None and self.transform is None:
            from .kernels import majority_sign

            return majority_sign(self, ctx.chunks)
        total = 0.0
        for key in ctx.iter_keys(ctx.plan.merge):
            pre = ctx.pre(key)
            total += float(self._elected(ctx, key, self.task_vectors(ctx, key, pre), inplace=True)[1].sum(dtype=torch.float64))
        return math.copysign(1.0, total) if total else 0.0

    def _tensor_thresholds(self, ctx: Context, taus: list[torch.Tensor]) -> list[float]:
        if self.thresholds is not None:
            return self.thresholds
        n = keep_count(taus[0].numel(), self.hp["k"])
        mag = ctx.buffer("abs", taus[0].shape, taus[0].dtype)
        if self.select == "radix" and taus[0].dtype in (torch.float32, torch.float64):
            def pieces():
                for t, tau in enumerate(taus):
                    yield t, torch.abs(tau, out=mag)

            return radix_thresholds(pieces, [n] * len(taus), taus[0].dtype)
        return [kthvalue_threshold(torch.abs(tau, out=mag).reshape(-1), n) for tau in taus]

    def _elected(self, ctx: Context, key: str, taus: list[torch.Tensor], inplace: bool):
        """The trimmed task vectors and the elected sign γ (a context buffer)."""
        shape, dt = taus[0].shape, taus[0].dtype
        thr = [as_threshold(v, dt) for v in self._tensor_thresholds(ctx, taus)]
        bufs = (ctx.buffer("abs", shape, dt), ctx.buffer("keep", shape, torch.bool), ctx.buffer("total", shape, dt))
        return self.trim_and_elect(taus, thr, *bufs, None if inplace else lambda t: ctx.buffer(f"trim{t}", shape, dt))

    @staticmethod
    def trim_and_elect(taus, thr, mag: torch.Tensor, keep: torch.Tensor, total: torch.Tensor,
                       trim_out: Callable[[int], torch.Tensor] | None = None):
        """Keep |τ_t| ≥ thr[t] (in place, or into `trim_out(t)`) and elect γ = sign(Σ_t τ̂_t); entries
        where the trimmed vectors cancel exactly get γ = 0. The chunked kernel calls this same code."""
        trimmed = []
        for t, tau in enumerate(taus):
            torch.ge(torch.abs(tau, out=mag), thr[t], out=keep)
            tt = tau.mul_(keep) if trim_out is None else torch.mul(tau, keep, out=trim_out(t))
            trimmed.append(tt)
            if t == 0:
                total.copy_(tt)
            else:
                total.add_(tt)
        return trimmed, total.sign_()

    def merged_vector(self, ctx: Context, key: str, taus: list[torch.Tensor], inplace: bool) -> torch.Tensor:
        shape, dt = taus[0].shape, taus[0].dtype
        trimmed, sign = self._elected(ctx, key, taus, inplace)
        if self.zero_sign:  # FusionBench: γ = 0 takes the model-wide majority sign
            sign.masked_fill_(sign == 0, self.zero_sign)
        mag = ctx.buffer("abs", shape, dt)
        keep = ctx.buffer("keep", shape, torch.bool)
        out = ctx.buffer("mtv", shape, dt).zero_()
        mean = self.hp["merge_func"] == "mean"
        cnt = ctx.buffer("cnt", shape, torch.uint8 if len(taus) < 256 else torch.int32).zero_() if mean else None
        return self.disjoint_merge(trimmed, sign, mag, keep, out, cnt)

    @staticmethod
    def disjoint_merge(trimmed, sign: torch.Tensor, mag: torch.Tensor, keep: torch.Tensor, out: torch.Tensor,
                       cnt: torch.Tensor | None) -> torch.Tensor:
        """Sum (mean when `cnt` is given) of the trimmed task vectors that agree with the elected sign,
        into the zeroed `out`; the chunked kernel calls this same code on each chunk."""
        for tt in trimmed:
            # τ̂_t·γ is |τ̂_t| where task t agrees with γ and ≤ 0 elsewhere, so Σ relu(τ̂_t·γ)·γ is the
            # sum over agreeing tasks (exactly: multiplying by ±1 rounds nothing).
            torch.mul(tt, sign, out=mag).clamp_(min=0)
            if cnt is not None:
                cnt.add_(torch.gt(mag, 0, out=keep))
            out.add_(mag)
        out.mul_(sign)
        return out.div_(cnt.clamp_(min=1)) if cnt is not None else out

    def merge_tensor(self, ctx: Context, key: str) -> torch.Tensor:
        pre = ctx.pre(key)
        mv = self.merged_vector(ctx, key, self.task_vectors(ctx, key, pre), inplace=True)
        return mv.mul_(self.hp["lam"]).add_(pre)


def global_thresholds(ctx: Context, method: MergeMethod, k: float, select: str) -> list[float]:
    """Per-task threshold keeping the top-k% of |τ_t| over the whole (merged part of the) model."""
    keys = ctx.plan.merge
    n = keep_count(ctx.plan.num_merged_params, k)
    if select == "radix" and ctx.chunks is not None and method.transform is None:
        from .kernels import ties_thresholds  # chunked reads: memory bounded by the chunk

        return ties_thresholds(ctx.chunks, keys, n)
    dtype = torch.float64 if any(ctx.plan.compute[key] == torch.float64 for key in keys) else torch.float32
    if select == "radix":

        def pieces():
            for key in ctx.iter_keys(keys):
                pre = ctx.pre(key)
                buf = ctx.buffer("sel", pre.shape, pre.dtype)
                for t in range(ctx.T):
                    yield t, method.task_vector(ctx, key, t, pre, out=buf).abs_().to(dtype)

        return radix_thresholds(pieces, [n] * ctx.T, dtype)
    # Reference path: the straightforward exact answer, one task's magnitudes in memory at a time.
    out = []
    for t in range(ctx.T):
        vals = torch.empty(ctx.plan.num_merged_params, dtype=dtype)
        i = 0
        for key in keys:
            pre = ctx.pre(key)
            a = method.task_vector(ctx, key, t, pre, out=ctx.buffer("sel", pre.shape, pre.dtype)).abs_().reshape(-1)
            vals[i : i + a.numel()] = a
            i += a.numel()
        out.append(kthvalue_threshold(vals, n))
        del vals
    return out
