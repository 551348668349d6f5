"""Pruning methods: each decides which units of which layer go; ``pruning.prune`` removes them.

A method is ``fn(model, graph, batches, **hparams) -> (removed, info)`` with ``removed`` =
{layer name: [unit indices]} and ``info`` extra report data (per-layer notes, searched knobs).
Every method accepts ``flops_target`` (a FLOPs reduction in (0, 1)) instead of its own knob: the knob
is then searched until the estimated FLOPs (``pruning.flops``: conv/linear, attention products, the
rest of the counted FLOPs) fall by at least that fraction.

Every method also accepts ``round_to`` (Torch-Pruning's name): each pruned layer keeps a multiple of
``round_to`` channels (the removed count shrinks until it does, so the kept count rounds *up*; a layer
never drops to 0). Vectorised conv kernels run channel blocks of 8/16, so odd widths waste lanes.
"""
from __future__ import annotations

import logging
import math
from decimal import Decimal
from typing import Any, Callable

import torch
from torch import nn

from mtl.registry import Registry
from pruning.graph import Layer, LayerGraph, PruningError
from pruning.importance import l1_scores, taylor_scores

METHODS: "Registry[Callable[..., tuple[dict[str, list[int]], dict[str, Any]]]]" = Registry("pruning method")
MAX_LAYER_RATIO = 0.95
SHORTFALL_SAID = 0.1  # with round_to, a shortfall over this fraction of the asked units is warned of
log = logging.getLogger(__name__)


def check_ratio(name: str, value: float, open_low: bool = False) -> float:
    """A fraction in [0, 1) — or (0, 1) with ``open_low`` (a target of 0 would prune nothing while seeming to)."""
    low_ok = (lambda v: v > 0) if open_low else (lambda v: v >= 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low_ok(value) and value < 1):
        raise ValueError(f"{name} must be a number in {'(' if open_low else '['}0, 1), got {value!r}")
    return float(value)


def percent(fraction: float) -> str:
    """A fraction as given, written as an exact percentage (0.9999 -> '99.99%': never rounded to '100.0%')."""
    return f"{Decimal(repr(float(fraction))).scaleb(2).normalize():f}%"


def percent_beside(measured: float, target: float) -> str:
    """A measured fraction as a percentage: 2 decimals, or as many more as keep it on its side of ``target``
    (a reduction short of 99.99 % must not read 99.99 %)."""
    exact = Decimal(repr(float(target))).scaleb(2)
    for decimals in range(2, 12):
        shown = Decimal(f"{100 * measured:.{decimals}f}")
        if (shown < exact) == (measured < target):
            break
    return f"{shown}%"


def check_round_to(value: Any, name: str = "round_to") -> int | None:
    """``None`` (no rounding) or a positive integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (kept channels per layer become multiples of it) "
                         f"or null for no rounding, got {value!r}")
    return value


def unit_step(layer: Layer, round_to: int | None) -> int:
    """Kept units must be a multiple of this so that the kept *channels* are a multiple of ``round_to``
    (an attention head is ``head_dim`` channels wide: heads rarely need rounding)."""
    if not round_to or round_to == 1:
        return 1
    width = layer.channels_per_unit // 3 if layer.unit == "heads" else layer.channels_per_unit  # q, k, v rows
    return round_to // math.gcd(round_to, width)


def round_removed(layer: Layer, n: int, round_to: int | None) -> int:
    """The largest count ≤ ``n`` of removed units whose kept count is a multiple of the layer's step
    (Torch-Pruning rounds the same way: kept rounds up); 0 when no multiple fits below the layer size."""
    step = unit_step(layer, round_to)
    n = min(max(int(n), 0), layer.size - 1)
    if step == 1:
        return n
    kept = -(-(layer.size - n) // step) * step
    return max(layer.size - kept, 0)


def _rounded(round_to: int | None) -> int | None:
    return round_to if round_to and round_to > 1 else None


def reduction(graph: LayerGraph, removed: dict[str, list[int]]) -> float:
    total = graph.total_flops()
    return 1 - graph.flops_after({k: set(v) for k, v in removed.items()}) / total if total else 0.0


def uniform(graph: LayerGraph, scores: dict[str, torch.Tensor], ratio: float,
            round_to: int | None = None) -> dict[str, list[int]]:
    """The ``ratio`` least important units of every layer (at least one unit stays; kept counts rounded).
    ``ratio`` is a fraction of each layer's original width: units earlier rounds removed count towards it."""
    out = {}
    for layer in graph.layers:
        n = round_removed(layer, math.floor(ratio * layer.original_size + 1e-9) - layer.removed_before, round_to)
        out[layer.name] = torch.argsort(scores[layer.name], stable=True)[:n].tolist()
    return out


def global_threshold(graph: LayerGraph, scores: dict[str, torch.Tensor], ratio: float,
                     max_layer_ratio: float = MAX_LAYER_RATIO, round_to: int | None = None) -> dict[str, list[int]]:
    """The ``ratio`` least important units over all layers by one ranking (scores are comparable:
    each layer's are normalised by their mean), each layer keeping ≥ 1 − max_layer_ratio of its units;
    with ``round_to`` each layer then gives back its most important picks until its kept count rounds.
    ``ratio`` and the cap count original widths: units earlier rounds removed count towards both."""
    entries = sorted((float(s), l.name, u) for l in graph.layers for u, s in enumerate(scores[l.name].tolist()))
    budget = units_asked(graph, ratio, global_units=True) - sum(l.removed_before for l in graph.layers)
    cap = {l.name: min(int(math.floor(max_layer_ratio * l.original_size)) - l.removed_before, l.size - 1)
           for l in graph.layers}
    out: dict[str, list[int]] = {l.name: [] for l in graph.layers}
    for _, name, u in entries:
        if budget <= 0:
            break
        if len(out[name]) < cap[name]:
            out[name].append(u)
            budget -= 1
    if round_to and round_to > 1:
        out = {l.name: out[l.name][:round_removed(l, len(out[l.name]), round_to)] for l in graph.layers}
    return out


def search_ratio(graph: LayerGraph, select: Callable[[float], dict[str, list[int]]], target: float,
                 hi: float = MAX_LAYER_RATIO) -> tuple[float, dict[str, list[int]]]:
    """Smallest ratio in [0, hi] whose selection removes at least ``target`` of the FLOPs (bisection)."""
    best = select(hi)
    reachable = reduction(graph, best)
    if reachable < target:
        raise PruningError(f"a FLOPs reduction of {percent(target)} is not reachable: the most this method removes "
                           f"(ratio {hi}) is {percent_beside(reachable, target)}")
    lo = 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if reduction(graph, select(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return hi, select(hi)


def _run(graph: LayerGraph, select: Callable[[float], dict[str, list[int]]], ratio: float | None,
         flops_target: float | None, hi: float = 0.999, global_units: bool = False, rounded: int | None = None
         ) -> tuple[dict[str, list[int]], dict[str, Any]]:
    if flops_target is not None:
        check_ratio("flops_target", flops_target, open_low=True)
        ratio, removed = search_ratio(graph, select, flops_target, hi)
        return removed, {"ratio": ratio, "flops_target": flops_target}
    if ratio is None:
        raise ValueError("give ratio (fraction of channels to remove) or flops_target")
    removed = select(check_ratio("ratio", ratio))
    total = sum(layer.original_size for layer in graph.layers)
    asked = units_asked(graph, ratio, global_units)
    got = sum(layer.removed_before for layer in graph.layers) + sum(map(len, removed.values()))
    info = {"ratio": ratio, "units_removed": got, "units_asked": asked}
    # rounding kept counts up removes a little less by design; the per-layer cap any shortfall
    why: list[str] = []
    if got < asked and (not rounded or got < (1 - SHORTFALL_SAID) * asked):
        why = [f"round_to={rounded} keeps multiples of it (kept counts round up)"] if rounded else []
        why += ["max_layer_ratio caps each layer: raise max_layer_ratio"] if global_units else []
    if why:
        info["shortfall"] = (f"ratio {ratio:g} asks for {asked} of {total} units; {got} went ({100 * got / total:.1f}%): "
                             f"{'; '.join(why)}; or use flops_target")
    return removed, info


def units_asked(graph: LayerGraph, ratio: float, global_units: bool) -> int:
    """Units ``ratio`` asks for over the original widths: of all layers together (one global ranking) or of
    each layer (a uniform ratio)."""
    sizes = [layer.original_size for layer in graph.layers]
    return int(math.floor(ratio * sum(sizes) + 1e-9)) if global_units else sum(int(math.floor(ratio * n + 1e-9)) for n in sizes)


def say_shortfall(info: dict[str, Any], final: bool) -> None:
    """Warn (after the last round only: a later round makes an earlier one's shortfall up) when far fewer units went
    than ``ratio`` asked; the note stays out of the report, whose ``units_asked``/``units_removed`` say it."""
    note = info.pop("shortfall", None)
    if note and final:
        log.warning(note)


@METHODS.register("l1")
def l1(model: nn.Module, graph: LayerGraph, batches, ratio: float | None = None, flops_target: float | None = None,
       round_to: int | None = None):
    """The same fraction of every layer, least group-L1 magnitude first (Li et al., ICLR 2017)."""
    round_to = check_round_to(round_to)
    scores = l1_scores(graph, model)
    return _run(graph, lambda r: uniform(graph, scores, r, round_to), ratio, flops_target, rounded=_rounded(round_to))


@METHODS.register("l1_global")
def l1_global(model: nn.Module, graph: LayerGraph, batches, ratio: float | None = None,
              flops_target: float | None = None, max_layer_ratio: float = MAX_LAYER_RATIO, round_to: int | None = None):
    """One global group-L1 ranking over all layers (each layer's scores normalised by their mean)."""
    round_to = check_round_to(round_to)
    scores = l1_scores(graph, model)
    check_ratio("max_layer_ratio", max_layer_ratio)
    return _run(graph, lambda r: global_threshold(graph, scores, r, max_layer_ratio, round_to), ratio, flops_target,
                global_units=True, rounded=_rounded(round_to))


@METHODS.register("taylor")
def taylor(model: nn.Module, graph: LayerGraph, batches, ratio: float | None = None, flops_target: float | None = None,
           combine: str = "sum", scope: str = "global", max_layer_ratio: float = MAX_LAYER_RATIO,
           round_to: int | None = None, criterion: str = "abs"):
    """Multi-task Taylor importance (per-task scores combined by sum or max), global or per-layer ranking;
    ``criterion``: ``abs`` Σ|w·g| per unit or ``squared`` (Σ w·g)² (Molchanov et al. 2019)."""
    round_to = check_round_to(round_to)
    if not batches:
        raise ValueError("taylor needs calibration batches (calib=...) to compute per-task gradients")
    if scope not in ("global", "uniform"):
        raise ValueError(f"scope must be 'global' or 'uniform', got {scope!r}")
    scores, _ = taylor_scores(graph, model, batches, combine, criterion)
    if scope == "uniform":
        return _run(graph, lambda r: uniform(graph, scores, r, round_to), ratio, flops_target, rounded=_rounded(round_to))
    check_ratio("max_layer_ratio", max_layer_ratio)
    return _run(graph, lambda r: global_threshold(graph, scores, r, max_layer_ratio, round_to), ratio, flops_target,
                global_units=True, rounded=_rounded(round_to))
