"""Pruning methods: each decides which units of which layer go; ``pruning.prune`` removes them.

A method is ``fn(model, graph, batches, **hparams) -> (removed, info)`` with ``removed`` =
{layer name: [unit indices]} and ``info`` extra report data (per-layer notes, searched knobs).
Every method accepts ``flops_target`` (a FLOPs reduction in (0, 1)) instead of its own knob: the knob
is then searched until the estimated conv/linear FLOPs fall by at least that fraction.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from mtl.registry import Registry
from pruning.graph import LayerGraph, PruningError
from pruning.importance import l1_scores, taylor_scores

METHODS: "Registry[Callable[..., tuple[dict[str, list[int]], dict[str, Any]]]]" = Registry("pruning method")
MAX_LAYER_RATIO = 0.95


def check_ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def reduction(graph: LayerGraph, removed: dict[str, list[int]]) -> float:
    total = graph.total_flops()
    return 1 - graph.flops_after({k: set(v) for k, v in removed.items()}) / total if total else 0.0


def uniform(graph: LayerGraph, scores: dict[str, torch.Tensor], ratio: float) -> dict[str, list[int]]:
    """The ``ratio`` least important units of every layer (at least one unit stays)."""
    out = {}
    for layer in graph.layers:
        n = min(int(math.floor(ratio * layer.size + 1e-9)), layer.size - 1)
        out[layer.name] = torch.argsort(scores[layer.name], stable=True)[:n].tolist()
    return out


def global_threshold(graph: LayerGraph, scores: dict[str, torch.Tensor], ratio: float,
                     max_layer_ratio: float = MAX_LAYER_RATIO) -> dict[str, list[int]]:
    """The ``ratio`` least important units over all layers by one ranking (scores are comparable:
    each layer's are normalised by their mean), each layer keeping ≥ 1 − max_layer_ratio of its units."""
    entries = sorted((float(s), l.name, u) for l in graph.layers for u, s in enumerate(scores[l.name].tolist()))
    budget = int(math.floor(ratio * len(entries) + 1e-9))
    cap = {l.name: min(int(math.floor(max_layer_ratio * l.size)), l.size - 1) for l in graph.layers}
    out: dict[str, list[int]] = {l.name: [] for l in graph.layers}
    for _, name, u in entries:
        if budget <= 0:
            break
        if len(out[name]) < cap[name]:
            out[name].append(u)
            budget -= 1
    return out


def search_ratio(graph: LayerGraph, select: Callable[[float], dict[str, list[int]]], target: float,
                 hi: float = MAX_LAYER_RATIO) -> tuple[float, dict[str, list[int]]]:
    """Smallest ratio in [0, hi] whose selection removes at least ``target`` of the FLOPs (bisection)."""
    best = select(hi)
    reachable = reduction(graph, best)
    if reachable < target:
        raise PruningError(f"a FLOPs reduction of {target:.1%} is not reachable: the most this method removes "
                           f"(ratio {hi}) is {reachable:.1%}")
    lo = 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if reduction(graph, select(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return hi, select(hi)


def _run(graph: LayerGraph, select: Callable[[float], dict[str, list[int]]], ratio: float | None,
         flops_target: float | None, hi: float = MAX_LAYER_RATIO) -> tuple[dict[str, list[int]], dict[str, Any]]:
    if flops_target is not None:
        check_ratio("flops_target", flops_target)
        if flops_target == 0:
            raise ValueError("flops_target must be in (0, 1), got 0")
        ratio, removed = search_ratio(graph, select, flops_target, hi)
        return removed, {"ratio": ratio, "flops_target": flops_target}
    if ratio is None:
        raise ValueError("give ratio (fraction of channels to remove) or flops_target")
    return select(check_ratio("ratio", ratio)), {"ratio": ratio}


@METHODS.register("l1")
def l1(model: nn.Module, graph: LayerGraph, batches, ratio: float | None = None, flops_target: float | None = None):
    """The same fraction of every layer, least group-L1 magnitude first (Li et al., ICLR 2017)."""
    scores = l1_scores(graph, model)
    return _run(graph, lambda r: uniform(graph, scores, r), ratio, flops_target)


@METHODS.register("l1_global")
def l1_global(model: nn.Module, graph: LayerGraph, batches, ratio: float | None = None,
              flops_target: float | None = None, max_layer_ratio: float = MAX_LAYER_RATIO):
    """One global group-L1 ranking over all layers (each layer's scores normalised by their mean)."""
    scores = l1_scores(graph, model)
    check_ratio("max_layer_ratio", max_layer_ratio)
    return _run(graph, lambda r: global_threshold(graph, scores, r, max_layer_ratio), ratio, flops_target, hi=0.999)


@METHODS.register("taylor")
def taylor(model: nn.Module, graph: LayerGraph, batches, ratio: float | None = None, flops_target: float | None = None,
           combine: str = "sum", scope: str = "global", max_layer_ratio: float = MAX_LAYER_RATIO):
    """Multi-task Taylor importance (per-task scores combined by sum or max), global or per-layer ranking."""
    if not batches:
        raise ValueError("taylor needs calibration batches (calib=...) to compute per-task gradients")
    if scope not in ("global", "uniform"):
        raise ValueError(f"scope must be 'global' or 'uniform', got {scope!r}")
    scores, _ = taylor_scores(graph, model, batches, combine)
    if scope == "uniform":
        return _run(graph, lambda r: uniform(graph, scores, r), ratio, flops_target)
    check_ratio("max_layer_ratio", max_layer_ratio)
    return _run(graph, lambda r: global_threshold(graph, scores, r, max_layer_ratio), ratio, flops_target, hi=0.999)
