"""PAGCP: performance-aware global channel pruning for multi-task models (Ye et al., TPAMI 2023).

Sequential greedy search over layers, heaviest (FLOPs) first, on the model as pruned so far:

* each layer's units are ranked by a saliency covering the layer and its consumers (group L1, or the
  multi-task Taylor score with ``importance="taylor"``, combined by max so a channel any task relies
  on ranks high);
* ratios 0.05, 0.10, ... 0.95 of the layer's units are tried in turn (with ``round_to``, each ratio's
  unit count is first rounded so the kept count is a multiple of it; duplicates are tried once); a
  performance-aware oracle rejects a ratio as soon as *any* task's calibration loss exceeds (1 + δ_k) × its reference value, and
  the previous ratio is committed (the task that refused is logged as the layer's limiting task);
* δ_k = δ_0 · γ^k shrinks geometrically with k, the number of layers pruned so far (as in the authors'
  code, a layer refused outright does not use up the budget; that code advances only after a committed
  layer's refusal, mtlkit after every committed layer; ``decay_on="visited"`` counts every visited layer), with δ_0 chosen so that Π (1 + δ_k) over as many terms as there
  are layers is 1 + ``budget``: no task's loss may grow by more than ``budget`` over the whole pass;
* a task's reference loss is the largest it has had in the pass (its start, or a later accepted one:
  ``reference="running_max"``, the authors' code), so a layer that happened to lower a task's loss
  does not tighten every later layer's test for it; ``reference="last"`` uses the last accepted loss;
* of the layers that were pruned, only the ``keep_fraction`` with the lowest loss increase per FLOP
  removed keep their pruning (the others return to full width).

Trials zero the units' weights (exactly what removal computes for BatchNorm/ReLU networks), so a trial
costs one calibration pass and no graph rebuild. ``flops_target`` searches ``budget`` instead.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pruning.calib import task_losses
from pruning.graph import LayerGraph, PruningError
from pruning.importance import l1_layer_scores, taylor_scores
from pruning.methods import METHODS, check_ratio, check_round_to, percent, percent_beside, reduction, round_removed

log = logging.getLogger(__name__)

DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def layer_thresholds(n_layers: int, budget: float, shrink: float) -> list[float]:
    """δ_k = δ_0 · shrink^k for k < n_layers, with Π_k (1 + δ_k) = 1 + budget (δ_0 by bisection)."""
    if budget <= 0 or not math.isfinite(budget):
        raise ValueError(f"budget must be a positive number, got {budget!r}")
    if not 0 < shrink <= 1:
        raise ValueError(f"shrink must be in (0, 1], got {shrink!r}")
    target = math.log1p(budget)
    prod = lambda d0: sum(math.log1p(d0 * shrink ** l) for l in range(n_layers))  # noqa: E731
    lo, hi = 0.0, max(budget, 1.0)
    while prod(hi) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if prod(mid) < target else (lo, mid)
    return [hi * shrink ** l for l in range(n_layers)]


class Oracle:
    """Accepts a trial when no task's loss exceeds (1 + δ) × its reference loss."""

    def __init__(self, losses: Callable[[nn.Module], dict[str, float]]):
        self.losses = losses

    @staticmethod
    def violations(trial: dict[str, float], reference: dict[str, float], delta: float) -> dict[str, float]:
        """{task: trial/reference} for every task over its threshold; a NaN trial loss (a broken network)
        is over every threshold (ratio inf), where `nan > x` alone would accept it."""
        return {t: trial[t] / reference[t] if reference[t] > 0 and not math.isnan(trial[t]) else math.inf
                for t in reference if not trial[t] <= (1 + delta) * reference[t]}


def _saved(model: nn.Module, graph: LayerGraph, layer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for dep in layer.deps:
        for p in model.get_submodule(dep.module).parameters(recurse=False):
            out.append((p, p.detach().clone()))
    return out


@torch.no_grad()
def _restore(saved) -> None:
    for p, v in saved:
        p.copy_(v)


DECAY_ON = ("pruned", "visited")
REFERENCES = ("running_max", "last")


def search(model: nn.Module, graph: LayerGraph, batches: list[dict[str, torch.Tensor]], budget: float,
           shrink: float = 0.9, ratios: Sequence[float] = DEFAULT_RATIOS, keep_fraction: float = 1.0,
           importance: str = "l1", round_to: int | None = None, decay_on: str = "pruned",
           reference: str = "running_max") -> tuple[dict[str, list[int]], list[dict[str, Any]]]:
    """One PAGCP pass on a masked copy of ``model``; returns ({layer: removed units}, per-layer log)."""
    import copy

    if decay_on not in DECAY_ON:
        raise ValueError(f"decay_on must be one of {DECAY_ON}, got {decay_on!r}")
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    round_to = check_round_to(round_to)
    ratios = sorted(float(r) for r in ratios)
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ValueError(f"ratios must lie in (0, 1), got {list(ratios)}")
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
    if importance not in ("l1", "taylor"):
        raise ValueError(f"importance must be 'l1' or 'taylor', got {importance!r}")
    work = copy.deepcopy(model).eval()
    order = sorted(graph.layers, key=lambda l: -l.flops)
    deltas = layer_thresholds(len(order), budget, shrink)
    oracle = Oracle(lambda m: task_losses(m, batches))
    current = oracle.losses(work)
    removed: dict[str, list[int]] = {}
    steps: list[dict[str, Any]] = []
    flops_now = graph.total_flops()
    committed = 0
    for i, layer in enumerate(order):
        delta = deltas[committed if decay_on == "pruned" else i]
        if importance == "l1":
            scores = l1_layer_scores(layer, work)
        else:
            scores = taylor_scores(graph, work, batches, "max")[0][layer.name]
        ranked = torch.argsort(scores, stable=True).tolist()
        saved = _saved(work, graph, layer)
        accepted_n, accepted_losses, limiting, tried = 0, current, None, []
        for r in ratios:
            n = round_removed(layer, math.floor(r * layer.size + 1e-9), round_to)
            if n <= accepted_n:
                continue
            graph.mask(work, layer, ranked[:n])
            trial = oracle.losses(work)
            _restore(saved)
            over = Oracle.violations(trial, current, delta)
            tried.append({"ratio": r, "units": n, "accepted": not over})
            if over:
                limiting = max(over, key=over.get)
                break
            accepted_n, accepted_losses = n, trial
        if accepted_n:
            graph.mask(work, layer, ranked[:accepted_n])
            removed[layer.name] = ranked[:accepted_n]
        flops_after = graph.flops_after({k: set(v) for k, v in removed.items()})
        increase = max((accepted_losses[t] / current[t] - 1) if current[t] > 0 else 0.0 for t in current)
        steps.append({"layer": layer.name, "order": i, "delta": delta, "size": layer.size, "removed": accepted_n,
                      "limiting_task": limiting, "loss_increase": increase, "flops_removed": flops_now - flops_after,
                      "tried": tried})
        log.info("pagcp %d/%d %s: %d/%d %s removed (δ=%.4f, limited by %s)", i + 1, len(order), layer.name,
                 accepted_n, layer.size, layer.unit, delta, limiting or "max ratio")
        committed += bool(accepted_n)
        flops_now = flops_after
        current = {t: max(current[t], accepted_losses[t]) for t in current} if reference == "running_max" \
            else accepted_losses
    pruned = [s for s in steps if s["removed"]]
    keep = math.ceil(keep_fraction * len(pruned))
    ranked_steps = sorted(pruned, key=lambda s: max(s["loss_increase"], 0.0) / max(s["flops_removed"], 1e-12))
    kept = {s["layer"] for s in ranked_steps[:keep]}
    for s in steps:
        s["kept"] = s["layer"] in kept
    return {k: v for k, v in removed.items() if k in kept}, steps


@METHODS.register("pagcp")
def pagcp(model: nn.Module, graph: LayerGraph, batches, budget: float = 0.1, shrink: float = 0.9,
          ratios: Sequence[float] = DEFAULT_RATIOS, keep_fraction: float = 1.0, importance: str = "l1",
          flops_target: float | None = None, max_budget: float = 8.0, search_steps: int = 6,
          round_to: int | None = None, decay_on: str = "pruned", reference: str = "running_max"):
    """PAGCP (see the module docstring); with ``flops_target``, ``budget`` is searched (log bisection)."""
    if not batches:
        raise ValueError("pagcp needs calibration batches (calib=...) for its performance-aware oracle")
    kw = dict(shrink=shrink, ratios=ratios, keep_fraction=keep_fraction, importance=importance,
              round_to=check_round_to(round_to), decay_on=decay_on, reference=reference)
    if flops_target is None:
        removed, steps = search(model, graph, batches, budget, **kw)
        return removed, {"budget": budget, "steps": steps}
    check_ratio("flops_target", flops_target)
    removed, steps = search(model, graph, batches, max_budget, **kw)
    best = reduction(graph, removed)
    if best < flops_target:
        raise PruningError(f"a FLOPs reduction of {percent(flops_target)} is not reachable with budget ≤ {max_budget}: "
                           f"the best reachable is {percent_beside(best, flops_target)} (raise max_budget, or lower flops_target)")
    lo, hi, found = math.log(1e-4), math.log(max_budget), (max_budget, removed, steps)
    for _ in range(search_steps):
        mid = (lo + hi) / 2
        r, s = search(model, graph, batches, math.exp(mid), **kw)
        got = reduction(graph, r)
        log.info("pagcp budget %.4g -> FLOPs reduction %s (target %s)", math.exp(mid), percent_beside(got, flops_target),
                 percent(flops_target))
        if got >= flops_target:
            hi, found = mid, (math.exp(mid), r, s)
        else:
            lo = mid
    budget, removed, steps = found
    log.info("pagcp: budget %.4g chosen (the smallest tried that reaches the target); its layer decisions are "
             "the report's rounds[].steps, not necessarily the last pass logged above", budget)
    removed = trim_to_target(graph, removed, steps, flops_target, kw["round_to"])
    return removed, {"budget": budget, "flops_target": flops_target, "steps": steps}


def trim_to_target(graph: LayerGraph, removed: dict[str, list[int]], steps: list[dict[str, Any]],
                   target: float, round_to: int | None = None) -> dict[str, list[int]]:
    """Give layers back (worst loss increase per FLOP first) while the reduction stays ≥ ``target``, then
    units of the layers still pruned (same order; the most important removed units first, kept counts
    rounded as ``round_to`` asks), so that methods compare at matched FLOPs: whole layers alone overshoot
    when one layer holds most of the removed FLOPs."""
    out = dict(removed)
    worst_first = sorted((s for s in steps if s["layer"] in out),
                         key=lambda s: -max(s["loss_increase"], 0.0) / max(s["flops_removed"], 1e-12))
    for s in worst_first:
        trial = {k: v for k, v in out.items() if k != s["layer"]}
        if reduction(graph, trial) >= target:
            out = trial
            s["kept"] = False
    layers = {layer.name: layer for layer in graph.layers}
    for s in worst_first:
        name = s["layer"]
        if name not in out:
            continue
        units = out[name]  # ascending importance: the tail is given back first
        lo, hi = 0, len(units)  # the fewest removed units (after rounding) that still meet the target
        while lo < hi:
            mid = (lo + hi) // 2
            if reduction(graph, {**out, name: units[:round_removed(layers[name], mid, round_to)]}) >= target:
                hi = mid
            else:
                lo = mid + 1
        n = round_removed(layers[name], hi, round_to)
        if n < len(units) and reduction(graph, {**out, name: units[:n]}) >= target:
            out[name] = units[:n]
            s["removed"], s["given_back_units"] = n, len(units) - n
            if n == 0:
                del out[name]
                s["kept"] = False
    for s in worst_first:  # what a trimmed layer's remaining units remove from the final model (the pass measured more)
        if s.get("given_back_units") and s["layer"] in out:
            rest = {k: set(v) for k, v in out.items() if k != s["layer"]}
            s["flops_removed"] = graph.flops_after(rest) - graph.flops_after({**rest, s["layer"]: set(out[s["layer"]])})
    log.info("pagcp: layers and units given back down to a FLOPs reduction of %s (target %s)",
             percent_beside(reduction(graph, out), target), percent(target))
    return out
