"""mergekit's conventions (`convention="mergekit"`): the same outputs as mergekit's methods, bit for bit.

mergekit (Goddard et al. 2024) applies every method per tensor and differs from the papers' rules:

- trimming keeps k = max(1, ⌊density·n⌋) entries per tensor (the papers: ⌈k%·n⌉ over the model), the
  largest |δ| as ranked by `torch.argsort(descending=True)` (its order among equal magnitudes is
  torch's, so the same call is made here); density ≥ 1 keeps everything;
- each δ_t = θ_t − θ0 is multiplied by its model's `weight` before the sign election;
- the elected sign is + where Σ_t w_t δ_t ≥ 0 (a zero sum gives +, not 0), and only entries whose
  sign equals it are kept (zeros never agree);
- `normalize` divides by the sum of the kept weights (ties; a zero sum divides by 1) or of all
  weights (task arithmetic; |Σ w| < 1e-8 divides by 1; linear refuses weights whose sum, in its
  float32 or float64 arithmetic, is exactly 0 or overflows, where mergekit would write inf/NaN; a tiny
  non-zero sum divides as mergekit does); `lambda` scales the mixed δ;
- DARE draws `torch.bernoulli(density)` from torch's global generator, model by model, and with
  `rescale` matches the L1 norm of the kept δ to the original's (not 1/density). With `seed` (ours;
  mergekit's runs are not repeatable) each (model, tensor) draws the seeded keep mask (`dare_mask`) the
  paper convention's DARE does, so a merge repeats whatever the reading order or thread count;
- linear: Σ_t w_t θ_t / Σ_t w_t (`addcmul` in float32, float64 for float64 inputs), as mergekit 0.1.5
  does; older releases summed a stacked product, which can differ in the last bit. With mergekit's
  `dtype` (`dtype="bfloat16"`), each input is first rounded to it and the sum returned in it, as mergekit
  loads and returns them.

Arithmetic runs in float32 (float64 for float64 inputs) and the result takes θ0's dtype: this equals
mergekit run with `dtype: float32` and `out_dtype` set to the inputs' dtype. The operations are the
ones mergekit calls, in its order, so results agree bit for bit under the same torch and thread count.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from mtl.registry import Registry

from .dare import dare_mask
from .engine import Context
from .methods import MergeMethod, _check_lam, _per_task

__all__ = ["MERGEKIT", "create_mergekit_method", "from_paper_hparams", "magnitude_mask", "elect_mask"]

log = logging.getLogger(__name__)

MERGEKIT: Registry[type["MergekitMethod"]] = Registry("mergekit-convention method")
#: our method names (and their hyperparameters) that map onto mergekit's
ALIASES = {"average": "linear", "dare": None}


def create_mergekit_method(name: str, **hparams: Any) -> "MergekitMethod":
    if name == "dare":  # our dare + base → mergekit's two DARE methods
        base = hparams.pop("base", "ties")
        if base not in ("ties", "task_arithmetic"):
            raise ValueError(f"dare: base must be 'ties' or 'task_arithmetic', got {base!r}")
        name = "dare_ties" if base == "ties" else "dare_linear"
    return MERGEKIT.get(ALIASES.get(name) or name)(**hparams)


#: the papers' hyperparameters with no mergekit counterpart, and why (`from_paper_hparams`)
_NO_MERGEKIT_MEANING = {
    "k": "mergekit's DARE does not trim by magnitude",
    "merge_func": "mergekit's switch between the disjoint mean and the sum is `normalize`",
    "trim": "mergekit always trims per tensor",
    "tie_rule": "mergekit elects + where the sum is zero",
}


#: each convention's keys the other does not take: {key: {method: this convention's counterpart}} ("*": any
#: method); a method not listed is told it has none
_COUNTERPARTS = {
    "paper": {  # mergekit's keys, given to a paper-convention method
        "density": {"ties": "k (the percent kept: k = 100·density)", "dare": "p (the drop probability: p = 1 − density)",
                    "consensus": "ties_k with base='ties' (the percent kept)"},
        "weight": {"task_arithmetic": "one λ per model (lam=[...])",
                   "dare": "one λ per model (lam=[...]) with base='task_arithmetic'"},
        "normalize": {"ties": "merge_func ('mean': divided by the agreeing models; 'sum')",
                      "dare": "merge_func with base='ties' ('mean' or 'sum')"},
        "rescale": {"dare": "none (DARE always rescales the kept entries by 1/(1 − p))"},
        "dtype": {"*": "none (the arithmetic is float32, float64 for float64 inputs)"},
    },
    "mergekit": {  # the papers' keys, given to a mergekit-convention method
        "k": {"ties": "density (the kept fraction per tensor: density = k/100)",
              "dare_ties": f"none ({_NO_MERGEKIT_MEANING['k']})"},
        "p": {"dare_ties": "density (the keep probability: density = 1 − p)",
              "dare_linear": "density (the keep probability: density = 1 − p)"},
        "merge_func": {"*": "normalize (true: the mean over the agreeing models; false: the sum)"},
        "trim": {"*": f"none ({_NO_MERGEKIT_MEANING['trim']})"},
        "tie_rule": {"*": f"none ({_NO_MERGEKIT_MEANING['tie_rule']})"},
    },
}
_APPLIES = {"paper": "only with convention='mergekit' (mtl-merge: merge.convention=mergekit)",
            "mergekit": "only with convention='paper'"}


def convention_note(method: str, convention: str, keys: Sequence[str]) -> str:
    """For each of `keys` that belongs to the other convention, where it applies and this convention's
    counterpart ("; density applies only with convention='mergekit' ...; the paper convention's counterpart:
    k ..."); "" when none does."""
    notes = []
    for key in keys:
        methods = _COUNTERPARTS.get(convention, {}).get(key)
        if methods is not None:
            counterpart = methods.get(method) or methods.get("*") or f"none for {method}"
            whose = "the paper convention" if convention == "paper" else "mergekit"
            notes.append(f"; {key} applies {_APPLIES[convention]}; {whose}'s counterpart: {counterpart}")
    return "".join(notes)


def from_paper_hparams(name: str, hp: dict[str, Any]) -> dict[str, Any]:
    """`hp` (for `ties` or `dare`, as mtl-merge's configs give them: with the papers' `k`,
    `merge_func`, `p`, `seed`) in mergekit's terms: the kept fraction becomes `density` (TIES: k/100,
    the same fraction ranked per tensor; DARE: 1 − p) unless `density` is given; a paper
    hyperparameter still at the paper's default is dropped; one set otherwise, with no mergekit
    meaning (or beside `density`), is an error naming it."""
    from .methods import METHODS

    hp = dict(hp)
    if name not in ("ties", "dare"):
        return hp
    paper = {**METHODS.get("ties").defaults, **METHODS.get("dare").own}
    kept = {"ties": ("k", lambda k: k / 100), "dare": ("p", lambda p: 1 - p)}.get(name)
    if kept is not None and kept[0] in hp:
        key, to_density = kept
        value = hp.pop(key)
        if "density" not in hp:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: {key} must be a number, got {value!r}")
            hp["density"] = to_density(value)
        elif value != paper[key]:
            raise ValueError(f"{name}: {key}={value!r} and density={hp['density']!r} are both set; under "
                             f"convention=mergekit the kept fraction is density: set only density")
    for key in [k for k in _NO_MERGEKIT_MEANING if k in hp]:
        value = hp.pop(key)
        if value != paper[key]:
            raise ValueError(f"{name}: {key}={value!r} has no meaning under convention=mergekit "
                             f"({_NO_MERGEKIT_MEANING[key]}); remove it or use convention=paper")
    return hp


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """mergekit's magnitude sparsification mask (in δ's dtype), or None when everything is kept."""
    if density >= 1:
        return None
    k = max(1, int(density * delta.numel()))
    # the mask is allocated after the sort (whose own temporaries are the peak) and |δ| freed before it
    order = torch.argsort(delta.abs().reshape(-1), descending=True)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[order[:k]] = 1
    return mask.reshape_as(delta)


def _rescaled(delta: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def elect_mask(deltas: torch.Tensor) -> torch.Tensor:
    """mergekit's "sum" consensus: keep entries whose sign equals + where Σ δ ≥ 0, else −."""
    sign = deltas.sign()
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return sign == majority


def _check_density(density: Any) -> None:
    values = density if isinstance(density, Sequence) and not isinstance(density, str) else [density]
    for d in values:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d <= 1):
            raise ValueError(f"density must be in (0, 1], got {d!r}")


class MergekitMethod(MergeMethod):
    """One of mergekit's generalized task-arithmetic methods, per tensor."""

    convention = "mergekit"
    sparsify: ClassVar[str | None] = None   # "magnitude" or "random"
    consensus: ClassVar[bool] = False
    defaults = {"weight": 1.0, "density": 1.0, "lam": 1.0, "normalize": False, "rescale": False}

    def validate(self) -> None:
        _check_lam("weight", self.hp["weight"], allow_list=True)
        _check_lam("lam", self.hp["lam"], allow_list=False,
                   list_hint="mergekit's lambda scales the mixed task vector; one factor per model is weight=[...]")
        _check_density(self.hp["density"])
        seed = self.hp.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None (torch's global generator, as mergekit), got {seed!r}")
        dens = self.hp["density"]
        if not self.sparsify and (any(d != 1 for d in (dens if isinstance(dens, Sequence) else [dens]))
                                  or self.hp["rescale"]):
            # accepted as mergekit accepts them, but they change nothing: say so rather than look applied
            log.warning("%s (convention=mergekit) does not sparsify: density and rescale are ignored, as in "
                        "mergekit; use ties, dare_ties or dare_linear to trim or drop entries", self.name)
        if self.sparsify and all(d >= 1 for d in (dens if isinstance(dens, Sequence) else [dens])):
            log.warning("%s (convention=mergekit) at density 1.0 (mergekit's default) keeps every entry: nothing "
                        "is %s; pass density=<kept fraction> (a mergekit YAML: parameters.density)", self.name,
                        "dropped" if self.sparsify == "random" else "trimmed")

    def bind(self, T: int) -> None:
        super().bind(T)
        self.weights = _per_task("weight", self.hp["weight"], T)
        self.densities = _per_task("density", self.hp["density"], T)

    def _delta(self, ctx: Context, key: str, t: int, pre: torch.Tensor) -> torch.Tensor:
        delta = ctx.tv(key, t, pre)
        if self.sparsify == "magnitude":
            mask = magnitude_mask(delta, self.densities[t])
            work = delta
        elif self.sparsify == "random" and self.densities[t] < 1:
            # mergekit draws (and rescales) in float32 on the CPU, also for float64 inputs
            if self.hp.get("seed") is None:  # mergekit's own draw, from the global generator
                mask = torch.bernoulli(torch.full_like(delta, self.densities[t], dtype=torch.float32))
            else:  # the paper convention's seeded keep mask: one stream per (seed, model, tensor)
                mask = dare_mask(delta.shape, 1 - self.densities[t], self.hp["seed"], t, key).to(torch.float32)
            work = delta.to(torch.float32)
        else:
            return delta
        if mask is None:
            return delta
        masked = work * mask
        return (_rescaled(work, masked) if self.hp["rescale"] else masked).to(delta.dtype)

    def merge_tensor(self, ctx: Context, key: str) -> torch.Tensor:
        pre = ctx.pre(key)
        deltas = pre.new_empty((ctx.T, *pre.shape))
        for t in range(ctx.T):
            deltas[t] = self._delta(ctx, key, t, pre)
        weights = torch.tensor(self.weights, dtype=deltas.dtype)
        while deltas.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas.mul_(weights)
        if self.consensus:  # in place where mergekit makes new tensors: the same products, T fewer temporaries
            mask = elect_mask(deltas).to(deltas.dtype)
            mixed = deltas.mul_(mask).sum(dim=0)
            divisor = mask.mul_(weights).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if self.hp["normalize"]:
            mixed /= divisor
        if self.hp["lam"] != 1:
            mixed *= self.hp["lam"]
        return mixed.add_(pre)  # pre + mixed, bit for bit (addition commutes)


@MERGEKIT.register("task_arithmetic")
class TaskArithmetic(MergekitMethod):
    name = "task_arithmetic"


@MERGEKIT.register("ties")
class Ties(MergekitMethod):
    name = "ties"
    sparsify, consensus = "magnitude", True
    defaults = {**MergekitMethod.defaults, "normalize": True}


@MERGEKIT.register("dare_ties")
class DareTies(MergekitMethod):
    name = "dare_ties"
    sparsify, consensus = "random", True
    defaults = {**MergekitMethod.defaults, "rescale": True, "seed": None}


@MERGEKIT.register("dare_linear")
class DareLinear(MergekitMethod):
    name = "dare_linear"
    sparsify = "random"
    defaults = {**MergekitMethod.defaults, "rescale": True, "seed": None}


#: mergekit's `dtype` names (a YAML recipe's `dtype`, `torch.` prefix allowed there)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    """mergekit's name of a dtype (`bfloat16`, not `torch.bfloat16`)."""
    return str(dtype).removeprefix("torch.")


@MERGEKIT.register("linear")
class Linear(MergeMethod):
    """Σ_t w_t θ_t / Σ_t w_t over the fine-tuned models (θ0 only fixes keys and dtypes). `dtype` is
    mergekit's: its loader converts every input to it, and linear returns its float32 sum in it."""

    name = "linear"
    convention = "mergekit"
    uses_task_vectors = False
    defaults = {"weight": 1.0, "normalize": True, "dtype": None}

    def validate(self) -> None:
        _check_lam("weight", self.hp["weight"], allow_list=True)
        if self.hp["dtype"] is not None and self.hp["dtype"] not in DTYPES:
            raise ValueError(f"linear: dtype must be one of {', '.join(DTYPES)} or None (the inputs' own), "
                             f"got {self.hp['dtype']!r}")

    def bind(self, T: int) -> None:
        super().bind(T)
        self.weights = _per_task("weight", self.hp["weight"], T)
        # refused here (before any input is read) when Σw is bad whatever the models' dtype; else in prepare
        self._check_divisor({self._sum_dtype(torch.float32), self._sum_dtype(torch.float64)}, every=True)

    def prepare(self, ctx: Context, select: str) -> None:
        super().prepare(ctx, select)
        plan = ctx.plan
        self._check_divisor({self._sum_dtype(plan.compute[k]) for k in plan.order if plan.kind[k] == "merge"})

    def _check_divisor(self, dtypes: set[torch.dtype], every: bool = False) -> None:
        """Refuse normalize=true when Σw, summed as mergekit sums it, is 0 or overflows in one of `dtypes`
        (in each of them with `every`): only these make mergekit write inf/NaN tensors; a tiny Σw divides."""
        if not self.hp["normalize"]:
            return
        bad = []
        for dtype in sorted(dtypes, key=str):
            total = float(torch.tensor([self.weights], dtype=dtype).sum(dim=1))  # merge_tensor's divisor
            if total == 0 or not math.isfinite(total):
                bad.append((dtype, total))
        if bad and (not every or len(bad) == len(dtypes)):
            dtype, total = bad[0]
            raise ValueError(f"linear: the weights {self.weights} sum to {total:g} in {dtype_name(dtype)}, so "
                             f"normalize=true would divide by {total:g} (mergekit writes inf/NaN tensors); "
                             "change the weights or pass normalize=false (a mergekit YAML: "
                             "parameters.normalize: false)")

    def _sum_dtype(self, compute: torch.dtype) -> torch.dtype:
        """mergekit's arithmetic dtype: float64 for float64 inputs (or dtype), else float32."""
        given = DTYPES.get(self.hp["dtype"])
        return torch.float64 if (compute if given is None else given) == torch.float64 else torch.float32

    def merge_tensor(self, ctx: Context, key: str) -> torch.Tensor:
        given = DTYPES.get(self.hp["dtype"])
        first = ctx.ft(key, 0)
        dtype = self._sum_dtype(first.dtype)
        if given is None:  # the compute dtype is already float32, or float64 for float64 inputs
            read = lambda t: ctx.ft(key, t)  # noqa: E731
        else:  # inputs rounded to `dtype` as mergekit loads them; its float32 sum, float64 for float64
            read = lambda t: ctx.ft(key, t).to(given).to(dtype)  # noqa: E731
        weight = torch.tensor([self.weights], dtype=dtype)
        result = torch.zeros_like(first, dtype=dtype)
        ones = [1] * first.ndim
        for t, coefficient in enumerate(weight.unbind(1)):
            result.addcmul_(read(t), coefficient.reshape(ones))
        if self.hp["normalize"]:
            result.div_(weight.sum(dim=1).reshape(ones))
        return result if given is None else result.to(given)  # mergekit's `result.to(first.dtype)`

