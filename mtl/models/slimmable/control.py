"""The width controller (ECMT, Aich et al. 2023): (FLOPs budget, task preferences) -> configuration,
and how controllable the result is.

``search``: a more preferred task gets a wider decoder (task ``t`` gets the width-set entry at the
quantile ``p_t / max(p)``, so the most preferred task runs at full width); the encoder then takes the
widest width that keeps the total within the budget. If no encoder width fits, the least preferred
task's decoder narrows one step at a time until one does.

``controllability``: over preference vectors, the Spearman rank correlation between a task's
preference and its achieved performance (primary metric, signed so higher is better), averaged over
tasks; plus budget adherence, the share of choices whose FLOPs are within the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from mtl.models.slimmable.table import WidthTable

PREF_TOL = 1e-6


@dataclass
class Choice:
    config: dict[str, Any]
    flops: int
    expected: dict[str, dict[str, float]]


def min_flops(table: WidthTable) -> int:
    return table.flops(table.uniform(table.width_set[0]))


def check_preference(table: WidthTable, preference: Mapping[str, float]) -> dict[str, float]:
    unknown = [t for t in preference if t not in table.tasks]
    if unknown:
        raise KeyError(f"preference names unknown task(s) {unknown}; tasks: {', '.join(table.tasks)}")
    missing = [t for t in table.tasks if t not in preference]
    if missing:
        raise ValueError(f"preference misses task(s) {missing}; give every task a value (they sum to 1)")
    pref = {}
    for t in table.tasks:
        v = float(preference[t])
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"preference of task {t!r} is {preference[t]!r}; preferences must be >= 0")
        pref[t] = v
    total = sum(pref.values())
    if abs(total - 1.0) > PREF_TOL:
        raise ValueError(f"preference values sum to {total:g}, not 1 ({pref}); they are not renormalised for you")
    return pref


def check_budget(table: WidthTable, budget: float) -> float:
    b = float(budget)
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"budget must be a positive number of FLOPs, got {budget!r}")
    floor = min_flops(table)
    if b < floor:
        raise ValueError(f"budget {b:,.0f} FLOPs is below the smallest reachable configuration "
                         f"({floor:,} FLOPs, every width at {table.width_set[0]:g})")
    return b


def search(table: WidthTable, budget: float, preference: Mapping[str, float]) -> Choice:
    budget = check_budget(table, budget)
    pref = check_preference(table, preference)
    ws, k = table.width_set, len(table.width_set)
    top = max(pref.values())
    level = {t: min(k - 1, max(0, math.ceil(p / top * k - 1e-9) - 1)) for t, p in pref.items()}
    # least preferred first when something has to give (ties: the table's task order, reversed)
    shrink_order = sorted(table.tasks, key=lambda t: (pref[t], -table.tasks.index(t)))
    while True:
        decoders = {t: ws[level[t]] for t in table.tasks}
        for we in reversed(ws):
            cfg = {"encoder": we, "decoders": decoders}
            flops = table.flops(cfg)
            if flops <= budget:
                return Choice(cfg, flops, table.expected(cfg))
        narrower = [t for t in shrink_order if level[t] > 0]
        if not narrower:  # unreachable after check_budget, kept as a guard
            raise ValueError(f"no configuration fits budget {budget:,.0f} FLOPs")
        level[narrower[0]] -= 1


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the ranks (ties share their average rank); 0 when either
    side does not vary (no ordering to follow)."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if len(rx) != len(ry):
        raise ValueError(f"spearman: {len(rx)} and {len(ry)} values")
    dx, dy = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((dx ** 2).sum() * (dy ** 2).sum()))
    return 0.0 if den == 0 else float((dx * dy).sum() / den)


def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    for v in np.unique(a):  # average rank for ties
        same = a == v
        ranks[same] = ranks[same].mean()
    return ranks


def sample_preferences(tasks: Sequence[str], n: int, seed: int = 0) -> list[dict[str, float]]:
    """``n`` preference vectors drawn uniformly from the simplex (Dirichlet(1)), summing to 1."""
    rng = np.random.default_rng(seed)
    out = []
    for row in rng.dirichlet(np.ones(len(tasks)), size=n):
        p = [float(v) for v in row]
        p[-1] = 1.0 - sum(p[:-1])  # exact sum despite float rounding
        out.append(dict(zip(tasks, p)))
    return out


def controllability(table: WidthTable, budget: float, preferences: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """At one budget: per-task Spearman(preference, achieved score), their mean, and budget adherence."""
    choices = [search(table, budget, p) for p in preferences]
    per_task = {}
    for t in table.tasks:
        prefs = [p[t] for p in preferences]
        scores = [table.score(t, c.config["encoder"], c.config["decoders"][t]) for c in choices]
        per_task[t] = spearman(prefs, scores)
    within = sum(c.flops <= budget for c in choices)
    return {"budget": float(budget), "spearman": per_task, "controllability": float(np.mean(list(per_task.values()))),
            "adherence": within / len(choices), "n": len(choices)}


def budgets_between(table: WidthTable, n: int) -> list[float]:
    """``n`` budgets evenly spaced from the smallest to the largest configuration's FLOPs."""
    lo, hi = min_flops(table), table.flops(table.uniform(1.0))
    return [float(v) for v in np.linspace(lo, hi, n)]


def control_report(table: WidthTable, budgets: Sequence[float], n_preferences: int = 64, seed: int = 0) -> dict[str, Any]:
    prefs = sample_preferences(table.tasks, n_preferences, seed)
    rows = [controllability(table, b, prefs) for b in budgets]
    return {"controllability": float(np.mean([r["controllability"] for r in rows])),
            "adherence": float(np.mean([r["adherence"] for r in rows])),
            "n_preferences": n_preferences, "per_budget": rows}


def plot_choices(table: WidthTable, budgets: Sequence[float], path, preference: Mapping[str, float] | None = None) -> None:
    """PNG: each task's primary metric, relative to the full-width model (higher = better), of the
    search's choice at each budget, against that choice's FLOPs."""
    from matplotlib.figure import Figure

    from mtl.io import atomic_path

    pref = dict(preference or {t: 1.0 / len(table.tasks) for t in table.tasks})
    if preference is None:
        pref[table.tasks[-1]] = 1.0 - sum(v for t, v in pref.items() if t != table.tasks[-1])
    choices = [search(table, b, pref) for b in budgets]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for t in table.tasks:
        full = table.score(t, 1.0, 1.0)
        rel = []
        for c in choices:
            s = table.score(t, c.config["encoder"], c.config["decoders"][t])
            if full == 0 or s == 0:
                rel.append(float("nan"))  # a ratio to or of zero says nothing
            else:  # scores of lower-is-better metrics are negated, so full / s is their ratio too
                rel.append(s / full if table.higher_is_better[t] else full / s)
        ax.plot([c.flops / 1e6 for c in choices], rel, marker="o", label=f"{t} ({table.primary[t]})")
    ax.set_xlabel("FLOPs of the chosen configuration (M, per image)")
    ax.set_ylabel("primary metric relative to full width\n(higher = better)")
    ax.set_title("search's choices across budgets (equal preferences)" if preference is None else "search's choices")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
