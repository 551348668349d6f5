"""``pruning.prune(model, method, calib=..., **hparams) -> (pruned_model, report)``."""
from __future__ import annotations

import copy
import inspect
import logging
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mtl.flops import count_flops, count_params
from mtl.registry import meant
from mtl.models.surgery import diff_plan, snapshot
from mtl.modes import modes_restored
from pruning.calib import as_batches, task_losses
from pruning.graph import LayerGraph, PruningError, check_prunable
from pruning.methods import METHODS, check_ratio, check_round_to, percent, percent_beside, say_shortfall

log = logging.getLogger(__name__)

#: hyperparameters that shrink per round when a method runs in several rounds (a loss budget: measured on the model
#: as the round finds it). ``ratio`` and ``flops_target`` grow instead, counted on the original model
#: (`_cumulative_ratio`, `_round_flops_target`)
_PER_ROUND = {
    "budget": lambda v, k: (1 + v) ** (1 / k) - 1,
}


def _cumulative_ratio(ratio: float, r: int, rounds: int) -> float:
    """Round ``r`` (1-based) of ``rounds`` removes up to 1 − (1 − ratio)^(r/rounds) of each original width (the
    earlier rounds' units included), so kept counts are rounded against one target and the last round keeps exactly
    what one pass keeps; a ratio split per round and rounded each round kept ever more (16 channels, ratio 0.5,
    round_to=8, 2 rounds: 16 kept, not 8)."""
    return ratio if r == rounds else 1 - (1 - ratio) ** (r / rounds)


def _round_flops_target(target: float, r: int, rounds: int, first: float, now: float) -> float:
    """The reduction of the FLOPs round ``r`` finds (``now``, estimated) that brings the first round's ``first`` down by
    1 − (1 − target)^(r/rounds): each round aims at the cumulative target, so a round that overshot (kept counts round
    up to round_to) is made up by the next instead of compounding (≤ 0: reached already)."""
    return 1 - (1 - _cumulative_ratio(target, r, rounds)) * first / now


def _round_hparams(hparams: dict[str, Any], r: int, rounds: int, first: float, now: float) -> dict[str, Any]:
    if rounds == 1:
        return dict(hparams)
    out = {key: (None if v is None else _cumulative_ratio(v, r, rounds) if key == "ratio"
                 else _PER_ROUND[key](v, rounds) if key in _PER_ROUND else v) for key, v in hparams.items()}
    if out.get("flops_target") is not None:
        out["flops_target"] = _round_flops_target(out["flops_target"], r, rounds, first, now)
    return out


def prune(model: nn.Module, method: str, calib: Any = None, *, example: torch.Tensor | None = None,
          ignored_layers: Sequence[str] | str = (), rounds: int = 1,
          finetune: Callable[[nn.Module], None] | None = None, **hparams: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``model`` (left untouched) with ``method``; returns the physically smaller model and a report.

    ``calib``: a batch or list of batches ({"image": uint8 (B,3,H,W), <task target>: ...}) used for
    importance and the PAGCP oracle (``l1``/``l1_global`` only need ``example`` or one batch).
    ``round_to`` (every method): kept channels per pruned layer are multiples of it.
    ``rounds`` > 1 prunes in steps (budget split evenly in ratio terms; round r of R aims at 1 − (1 − v)^(r/R) of the
    original widths for ``ratio`` and of the original FLOPs for ``flops_target``, so the last aims at the one-pass
    target and rounding does not compound), calling
    ``finetune(model)`` (trains in place) between rounds. The returned model carries
    ``pruning_plan``: ``mtl.io.save_model`` stores it, ``mtl.load_model`` rebuilds the pruned shapes.
    """
    fn = METHODS.get(method)
    effective = effective_hparams(method, hparams)
    if isinstance(ignored_layers, str):  # one module name, not its characters
        ignored_layers = [ignored_layers]
    check_prunable(model)
    batches = as_batches(calib) if calib is not None else []
    if example is None:
        if not batches:
            raise ValueError("give calib= (calibration batches) or example= (an input batch for tracing)")
        example = batches[0]["image"][:2]
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if rounds > 1 and finetune is None:
        log.warning("rounds=%d without finetune: rounds only change which channels the later rounds see", rounds)
    original = snapshot(model)
    before = {"params": count_params(model), "flops": count_flops(model, example[:1])}
    losses_before = task_losses(model, batches) if batches else {}
    current, kept_total, infos, first_flops = model, None, [], 0.0
    with modes_restored(model):
        for k in range(rounds):
            graph = LayerGraph(current, example, ignored_layers, allow_pruned=k > 0)
            for layer in graph.layers:  # what a ratio counts: the original width
                spec = (kept_total or {}).get(layer.name)
                layer.removed_before = spec["size"] - len(spec["kept"]) if spec else 0
            first_flops = first_flops or graph.total_flops()
            hp = _round_hparams(hparams, k + 1, rounds, first_flops, graph.total_flops())
            if hp.get("flops_target") is not None and hp["flops_target"] <= 1e-12:
                removed, info = {}, {"flops_target": hp["flops_target"], "note": "reached by the earlier rounds"}
            else:
                removed, info = fn(current, graph, batches, **hp)
            say_shortfall(info, final=k == rounds - 1)
            pruned, plan = graph.remove(removed)
            kept_total = _compose(kept_total, plan["layers"])
            infos.append({"round": k + 1, "hparams": hp, **info, "skipped_layers": graph.skipped,
                          "protected": graph.protected})
            current = pruned
            if finetune is not None and k < rounds - 1:
                finetune(current)
                current.eval()
    current.pruning_plan = {"method": method, "hparams": _plain(effective), "rounds": rounds,
                            "modules": diff_plan(original, current), "layers": kept_total}
    current.meta = _derived_meta(getattr(model, "meta", None) or {}, method, {**effective, "rounds": rounds})
    after = {"params": count_params(current), "flops": count_flops(current, example[:1])}
    target = hparams.get("flops_target")
    if target is not None and before["flops"] and 1 - after["flops"] / before["flops"] < target - 1e-9:
        raise PruningError(f"flops_target {percent(target)} not met: the pruned model's FLOPs as counted "
                           f"(mtl.count_flops) fell by {percent_beside(1 - after['flops'] / before['flops'], target)} only, "
                           "though the search's estimate reached the target")
    report = {
        "method": method,
        "hparams": _plain(effective),
        "rounds": infos,
        "layers": _layer_rows(kept_total, infos),
        "params": {"before": before["params"], "after": after["params"],
                   "reduction": 1 - after["params"] / before["params"]},
        "flops": {"before": before["flops"], "after": after["flops"],
                  "reduction": 1 - after["flops"] / before["flops"] if before["flops"] else 0.0},
        "calib_loss": {"before": losses_before, "after": task_losses(current, batches) if batches else {}},
    }
    return current, report


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


OPTION_CHECKS: dict[str, tuple[Any, str]] = {
    "budget": (lambda v: _number(v) and v > 0, "a positive number"),
    "max_budget": (lambda v: _number(v) and v > 0, "a positive number"),
    "shrink": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "keep_fraction": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    # 0: no bisection, one pass at max_budget trimmed to the target (what the benchmarks compare against)
    "search_steps": (lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 0, "an int >= 0"),
    "importance": (lambda v: v in ("l1", "taylor"), "'l1' or 'taylor'"),
    "combine": (lambda v: v in ("sum", "max"), "'sum' or 'max'"),
    "criterion": (lambda v: v in ("abs", "squared"), "'abs' or 'squared'"),
    "decay_on": (lambda v: v in ("pruned", "visited"), "'pruned' or 'visited'"),
    "reference": (lambda v: v in ("running_max", "last"), "'running_max' or 'last'"),
    "scope": (lambda v: v in ("global", "uniform"), "'global' or 'uniform'"),
    "ratios": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_number(r) and 0 < r < 1 for r in v),
               "a non-empty list of numbers in (0, 1)"),
}


SEARCHED_KNOBS = ("ratio", "budget")  # what flops_target searches in place of the value given


def check_one_knob(hparams: dict[str, Any], prefix: str = "") -> None:
    """``flops_target`` replaces the method's own knob: a ``ratio`` or ``budget`` given beside it would be
    unused, so both given is refused rather than one of them dropped."""
    if hparams.get("flops_target") is None:
        return
    for knob in SEARCHED_KNOBS:
        if hparams.get(knob) is not None:
            raise ValueError(f"{prefix}{knob}={hparams[knob]!r} and {prefix}flops_target={hparams['flops_target']!r} "
                             f"both given: flops_target searches {knob} itself; give one of them")


def method_options(method: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """The options of ``method`` with their defaults; an unknown name in ``hparams`` is refused, listing them."""
    fn = METHODS.get(method)
    options = {n: p.default for n, p in list(inspect.signature(fn).parameters.items())[3:]}  # after model, graph, batches
    unknown = sorted(set(hparams) - set(options))
    if unknown:
        raise TypeError(f"prune method {method!r} has no option(s) {unknown}{meant(unknown, options)}; its options: "
                        f"{', '.join(options)}")
    return options


def effective_hparams(method: str, hparams: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The settings a prune runs with, checked before any work (errors name a value as ``prefix`` + key,
    e.g. ``prune.ratio`` for the CLI): the method's defaults updated by ``hparams`` (an unknown name is
    refused, listing the method's options). Every option is kept, unset ones as None, so the record says
    what ran; only with ``flops_target`` the knob it searches (``ratio``, PAGCP's ``budget``) is left
    out — the value found is in the report's ``rounds``."""
    options = method_options(method, hparams)
    check_one_knob(hparams, prefix)
    for key in ("ratio", "flops_target", "max_layer_ratio"):  # a target of 0 would prune nothing while seeming to
        if hparams.get(key) is not None:
            check_ratio(prefix + key, hparams[key], open_low=key != "ratio")
    check_round_to(hparams.get("round_to"), prefix + "round_to")
    for key, value in hparams.items():  # PAGCP's own settings, named as the caller passed them
        if value is not None and key in OPTION_CHECKS:
            ok, what = OPTION_CHECKS[key]
            if not ok(value):
                raise ValueError(f"{prefix}{key} must be {what}, got {value!r}")
    out = {**options, **hparams}
    if out.get("flops_target") is not None:
        for knob in SEARCHED_KNOBS:
            out.pop(knob, None)
    return out


def _derived_meta(parent: dict[str, Any], method: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """The parent's provenance (data, seed...) without its run and test metrics, which describe the
    unpruned model; ``pruned_from`` names the parent's run (or what the parent was pruned from)."""
    meta = {k: copy.deepcopy(v) for k, v in parent.items() if k not in ("test", "run_dir")}
    if parent.get("run_dir"):
        meta["pruned_from"] = str(parent["run_dir"])
    meta["prune"] = {"method": method, **_plain(hparams)}
    return meta


def _compose(previous: dict[str, Any] | None, layers: dict[str, Any]) -> dict[str, Any]:
    """Kept units in original indices after one more round (a round's indices refer to its input)."""
    if previous is None:
        return copy.deepcopy(layers)
    out = copy.deepcopy(previous)
    for name, spec in layers.items():
        if name in out:
            out[name]["kept"] = [out[name]["kept"][i] for i in spec["kept"]]
        else:
            out[name] = copy.deepcopy(spec)
    return out


def _layer_rows(kept: dict[str, Any], infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    limiting: dict[str, Any] = {}
    searched: dict[str, int] = {}  # units the search removed from a layer (before any was given back)
    for info in infos:
        for s in info.get("steps", []):
            if s["removed"] or s["limiting_task"]:
                limiting[s["layer"]] = s["limiting_task"]
                searched[s["layer"]] = s["removed"]
    rows = []
    for name, spec in kept.items():
        # a layer the search pruned but keep_fraction / the FLOPs trim gave back whole: no task limited it
        given_back = bool(searched.get(name)) and len(spec["kept"]) == spec["size"]
        rows.append({"layer": name, "unit": spec["unit"], "size": spec["size"], "kept": len(spec["kept"]),
                     "limiting_task": None if given_back else limiting.get(name), **({"given_back": True} if given_back else {})})
    return rows


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if callable(v):
        return getattr(v, "__name__", repr(v))
    return repr(v)

