"""Which keys merge: key filters, task-specific keys, batch-norm statistics, and model-compatibility checks.

Rules (documented in docs/merging.md):
- a key is *considered* when it passes `include` (if given) and not `exclude`;
- considered keys matching `task_keys` (default: any `heads.` path component) are task-specific: never
  merged, listed per fine-tuned model so callers can attach each task's own head;
- every other considered key must be in every model with the same shape and dtype (`unshared="skip"` drops keys
  missing somewhere instead of failing);
- floating-point tensors merge; integer/bool buffers are copied from the pretrained model;
- a linearised model's expansion point (`theta0.` buffers, `mtl.models.LinearizedModel`) is copied from the
  pretrained model: it is θ0 in every model of a linearised pool, never a weight a fine-tune moved, so it
  must not count toward TIES' top-k share, TALL/Consensus statistics or learned coefficients;
- batch-norm running statistics (`running_mean`/`running_var`, and the slimmable family's per-width
  `running_means`/`running_vars`) follow `bn`: "pretrained" (default: copied from θ0 — always a valid
  variance, and what parameter-only merging gives), "average" (plain mean of the fine-tuned statistics,
  still valid since it is convex), or "merge" (treated like any float, as the method says; with
  λ·T > 1 task arithmetic can push a variance negative). "recompute" re-estimates them on data with
  the merged model (`merging.bn`), which a state-dict merge alone cannot: `mtl-merge` and
  `merging.learn` do it, a state-dict merge refuses it.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch

from .sources import MergeInputError, StateSource, TensorInfo

log = logging.getLogger(__name__)

__all__ = ["KeyPattern", "KeyPlan", "plan_keys", "compile_pattern", "BN_STATS", "DEFAULT_TASK_KEYS", "EXPANSION_POINT"]

KeyPattern = Union[str, Sequence[str], Callable[[str], bool], None]

DEFAULT_TASK_KEYS = r"(.*\.)?heads\."
#: BN running statistics: torch's `running_mean`/`running_var`, and the slimmable family's per-width rows
#: `running_means`/`running_vars` (SwitchableBatchNorm2d; its `num_batches_tracked` is an integer, copied anyway)
BN_STATS = r"(.*\.)?running_(mean|var)s?$"
_BN_VARIANCE = re.compile(r"(.*\.)?running_vars?$")
#: a linearised model's expansion point (mtl.models.linearized stores θ0 as `theta0.<name>` buffers)
EXPANSION_POINT = r"theta0\."
BN_RULES = ("pretrained", "average", "merge")
#: every value of the `bn` option: the state-dict rules above, and re-estimation on data (merging.bn)
BN_OPTIONS = (*BN_RULES, "recompute")
_MAX_LISTED = 8


def is_bn_variance(key: str) -> bool:
    """A BN running variance (of `BN_STATS`): merged, it must stay >= 0."""
    return _BN_VARIANCE.match(key) is not None


def compile_pattern(pat: KeyPattern, name: str = "pattern") -> Callable[[str], bool] | None:
    """Regexes matched at the start of the key (`re.match`), so a plain prefix like "backbone." works.
    ``name`` is the option the patterns came from, for the error a bad regex gets."""
    if pat is None:
        return None
    if callable(pat):
        return pat
    pats = [pat] if isinstance(pat, str) else list(pat)
    rx = []
    for p in pats:
        try:
            rx.append(re.compile(p))
        except (re.error, TypeError) as e:
            raise ValueError(f"{name}: {p!r} is not a valid regular expression ({e})") from None
    return lambda k: any(r.match(k) for r in rx)


@dataclass
class KeyPlan:
    """Where every key goes. `order` is the output order (the pretrained model's order)."""

    merge: list[str]
    copy: list[str]
    average: list[str]
    task_specific: list[list[str]]
    skipped: list[str]
    infos: dict[str, TensorInfo]
    kind: dict[str, str] = field(default_factory=dict)
    compute: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def order(self) -> list[str]:
        return list(self.kind)

    @property
    def num_merged_params(self) -> int:
        return sum(self.infos[k].numel for k in self.merge)


def _fmt_shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, s)) + ")"


def plan_keys(
    pre: StateSource,
    fts: Sequence[StateSource],
    include: KeyPattern = None,
    exclude: KeyPattern = None,
    task_keys: KeyPattern = DEFAULT_TASK_KEYS,
    unshared: str = "error",
    bn: str = "pretrained",
    keep_base: bool = False,
    say_skipped: bool = True,
) -> KeyPlan:
    """`keep_base`: the output must hold every tensor of θ0 (a Hugging Face folder, whose config.json
    is θ0's): one of them left out by the filters or by `unshared="skip"` is an error. `say_skipped=False`: a
    check before the merge, which says the keys `unshared="skip"` leaves out itself."""
    if unshared not in ("error", "skip"):
        raise ValueError(f"unshared must be 'error' or 'skip', got {unshared!r}")
    if bn == "recompute":
        raise ValueError("bn='recompute' re-estimates the BatchNorm statistics on data with the merged model, which "
                         "a state-dict merge does not have: merge with bn='pretrained', then call "
                         "merging.recompute_bn(model, batches); or use mtl-merge +merge.bn=recompute (evaluated "
                         "runs) or merging.learn(..., bn='recompute')")
    if bn not in BN_RULES:
        raise ValueError(f"bn must be one of {', '.join(map(repr, BN_OPTIONS))}, got {bn!r}")
    inc, exc, task = (compile_pattern(include, "include"), compile_pattern(exclude, "exclude"),
                      compile_pattern(task_keys, "task_keys"))
    is_bn = re.compile(BN_STATS).match
    is_expansion_point = re.compile(EXPANSION_POINT).match

    def considered(k: str) -> bool:
        return (inc is None or inc(k)) and not (exc is not None and exc(k))

    models = [pre, *fts]
    key_lists = [m.keys() for m in models]
    key_sets = [set(ks) for ks in key_lists]
    # Output order: pretrained's order, then keys first seen in later models.
    seen: dict[str, None] = {}
    for ks in key_lists:
        for k in ks:
            seen.setdefault(k, None)

    task_specific = [[k for k in ks if considered(k) and task is not None and task(k)] for ks in key_lists[1:]]
    missing, mismatched, skipped, complex_keys = [], [], [], []
    linear_only = []  # labels of the models whose expansion-point buffers (theta0.*) others lack
    plan = KeyPlan([], [], [], task_specific, skipped, {})
    filtered, base_missing = [], False
    for k in seen:
        required = keep_base and k in key_sets[0]
        if not considered(k) or (task is not None and task(k)):
            if required:
                filtered.append(repr(k))
            continue
        absent = [m.label for m, ks in zip(models, key_sets) if k not in ks]
        if absent and is_expansion_point(k):
            linear_only += [m.label for m, ks in zip(models, key_sets) if k in ks and m.label not in linear_only]
        if absent:
            base_missing = base_missing or required
            if unshared == "skip" and not required:
                skipped.append(k)
            else:
                present = next(m.label for m, ks in zip(models, key_sets) if k in ks)
                missing.append(f"{k!r} is in {present} but missing from {', '.join(absent)}")
            continue
        infos = [m.info(k) for m in models]
        ref = infos[0]
        bad = [(m, i) for m, i in zip(models[1:], infos[1:]) if i.shape != ref.shape]
        if bad:
            m, i = bad[0]
            mismatched.append(f"{k!r} has shape {_fmt_shape(ref.shape)} in {pre.label_of(k)} but "
                              f"{_fmt_shape(i.shape)} in {m.label_of(k)}")
            continue
        other = next((m for m, i in zip(models[1:], infos[1:]) if i.dtype != ref.dtype), None)
        if other is not None:  # merging bf16 into fp32 (or back) would silently change a model's precision
            mismatched.append(f"{k!r} is {ref.dtype} in {pre.label_of(k)} but {other.info(k).dtype} in "
                              f"{other.label_of(k)}")
            continue
        if ref.dtype.is_complex:  # not a buffer to copy: complex weights (spectral layers) are trained
            complex_keys.append(k)
            continue
        plan.infos[k] = ref
        plan.compute[k] = compute_dtype([i.dtype for i in infos])
        if not ref.dtype.is_floating_point or is_expansion_point(k):
            kind = "copy"
        elif is_bn(k) and bn != "merge":
            kind = "copy" if bn == "pretrained" else "average"
        else:
            kind = "merge"
        plan.kind[k] = kind
        getattr(plan, kind).append(k)

    if linear_only:  # whatever `unshared` says: skipping the buffers would merge tangent-space fine-tunes as plain
        plain = [m.label for m in models if m.label not in linear_only]
        raise MergeInputError(
            f"{', '.join(linear_only)} {'is a linearized (tangent-space) model' if len(linear_only) == 1 else 'are linearized (tangent-space) models'} "
            f"and {', '.join(plain)} {'is' if len(plain) == 1 else 'are'} not: merge linearized fine-tunes with "
            "their linearized θ0 (mtl.save_model(linearize(load_model(θ0)), ...); build_zoo.py --linear writes "
            "pretrain/model_linearized), never across the two forms")
    if filtered:
        raise MergeInputError(
            f"the key filters leave out {', '.join(filtered[:_MAX_LISTED])}" + (" ..." if len(filtered) > _MAX_LISTED else "")
            + f" of the base model {pre.label}, but a Hugging Face folder holds every tensor of its base model "
            "(its config.json is the base's); widen include/exclude/task_keys or write a .safetensors file")
    if complex_keys:
        raise MergeInputError(
            f"{complex_keys[0]!r} is a {str(pre.info(complex_keys[0]).dtype).removeprefix('torch.')} tensor in "
            f"{pre.label_of(complex_keys[0])}" + (f" (and {len(complex_keys) - 1} more)" if len(complex_keys) > 1 else "")
            + ": the merge methods here are defined on real tensors (TIES, DARE and TALL rank magnitudes and "
            "elect signs), and copying θ0's value would drop the fine-tunes' changes; leave it out with an "
            "exclude pattern, or merge its real and imaginary parts as separate real tensors")
    problems = mismatched + missing
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        if base_missing:  # skipping would write a folder whose config.json describes a tensor it lacks
            hint = ("; a Hugging Face folder holds every tensor of its base model (its config.json is the base's; "
                    "transformers would initialise a missing one at random), so it cannot be skipped: save each "
                    "model with it (a tied lm_head.weight: save it untied, a copy of the input embedding)")
        elif missing:
            hint = "; pass unshared='skip' or an include/exclude/task_keys filter to merge only shared keys"
        else:
            hint = ""
        raise MergeInputError(
            "models do not match: " + "; ".join(problems[:_MAX_LISTED]) + more + hint
        )
    if not plan.merge:
        raise MergeInputError(
            "nothing to merge: no floating-point tensor is shared by every model after the key filters"
        )
    if skipped and say_skipped:  # documented, but an LLM user wants to see which fine-tuned changes were dropped
        log.info("unshared='skip': %d key(s) not in every model left out of the merge: %s%s", len(skipped),
                 ", ".join(skipped[:_MAX_LISTED]), " ..." if len(skipped) > _MAX_LISTED else "")
    return plan


def compute_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precisions and float8 are widened)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
