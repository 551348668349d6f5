"""The width controller (ECMT, Aich et al. 2023): (FLOPs budget, task preferences) -> configuration,
and how controllable the result is.

``search`` keeps ECMT's two rules: a more preferred task never gets a narrower decoder than a less
preferred one, and the encoder takes the widest width that keeps the total within the budget. Among
the decoder assignments that obey them it picks

* ``method="measured"`` (default): the one whose *measured* validation metrics maximise the
  preference-weighted utility ``sum_t p_t u_t`` (``u_t``: task ``t``'s primary metric min-max scaled
  over the table, so tasks in different units weigh alike);
* ``method="rule"``: the fixed quantile rule (task ``t`` gets the width-set entry at ``p_t / max(p)``,
  the most preferred at full width; if no encoder width fits, the least preferred decoder narrows one
  step at a time). It ignores the metrics, so on a model whose tasks gain more from encoder width
  than from their own decoder, a preferred task can end up *worse* (its wide decoder squeezes the
  encoder): the measured search was added for that.

``controllability``: over preference vectors, the Spearman rank correlation between a task's
preference and its achieved performance (primary metric, signed so higher is better), averaged over
tasks; plus budget adherence, the share of choices whose FLOPs are within the budget. The achieved
performance can come from a second table (``achieved=``, e.g. the test split) so that a search that
reads validation metrics is scored on data it never saw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from mtl.models.slimmable.table import WidthTable, wkey
from mtl.registry import is_real

PREF_TOL = 1e-6


class NoScoredChoice(ValueError):
    """The measured search found configurations within the budget, but none with every preferred task scored."""


@dataclass
class Choice:
    config: dict[str, Any]
    flops: int
    expected: dict[str, dict[str, float]]
    skipped: int = 0  # configurations the measured search passed over: a task's primary metric is missing there


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
        if not is_real(preference[t]):
            raise ValueError(f"preference of task {t!r} is {preference[t]!r}; preferences are numbers >= 0")
        v = float(preference[t])
        if not math.isfinite(v) or v < -PREF_TOL:  # the sum's tolerance: 1 - p1 - p2 may round to -1e-16
            raise ValueError(f"preference of task {t!r} is {preference[t]!r}; preferences must be >= 0")
        pref[t] = max(v, 0.0)
    total = sum(pref.values())
    if abs(total - 1.0) > PREF_TOL:
        raise ValueError(f"preference values sum to {total:g}, not 1 ({pref}); they are not renormalised for you")
    return pref


_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}


def parse_budget(budget: float | str) -> float:
    """FLOPs from a number or a string such as ``"4.2e7"`` or ``"42M"`` (k, M, G)."""
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a number of FLOPs such as 4.2e7 or '42M', got {budget!r}")
    if not isinstance(budget, str):
        return float(budget)
    t = budget.strip().lower()
    scale = _SUFFIX.get(t[-1:], 1.0)
    try:
        return float(t[:-1] if t[-1:] in _SUFFIX else t) * scale
    except ValueError:
        raise ValueError(f"budget must be a number of FLOPs such as 4.2e7 or '42M', got {budget!r}") from None


def check_budget(table: WidthTable, budget: float | str) -> float:
    b = parse_budget(budget)
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"budget must be a positive number of FLOPs, got {budget!r}")
    floor = min_flops(table)
    if b < floor:
        raise ValueError(f"budget {b:,.0f} FLOPs is below the smallest reachable configuration "
                         f"({floor:,} FLOPs, every width at {table.width_set[0]:g})")
    return b


SEARCH_METHODS = ("measured", "rule")


def search(table: WidthTable, budget: float | str, preference: Mapping[str, float], method: str = "measured") -> Choice:
    if method not in SEARCH_METHODS:
        raise ValueError(f"search method must be one of {SEARCH_METHODS}, got {method!r}")
    budget = check_budget(table, budget)
    pref = check_preference(table, preference)
    return _rule(table, budget, pref) if method == "rule" else _measured(table, budget, pref)


def _fill_encoder(table: WidthTable, decoders: dict[str, float], budget: float) -> tuple[float, int] | None:
    """The widest encoder width that fits ``budget`` with these decoders, and the total FLOPs."""
    for we in reversed(table.width_set):
        k = wkey(we)
        flops = table.encoder_flops[k] + sum(table.head_flops[t][k][wkey(w)] for t, w in decoders.items())
        if flops <= budget:
            return we, flops
    return None


def _rule(table: WidthTable, budget: float, pref: dict[str, float]) -> Choice:
    ws, k = table.width_set, len(table.width_set)
    top = max(pref.values())
    level = {t: min(k - 1, max(0, math.ceil(p / top * k - 1e-9) - 1)) for t, p in pref.items()}
    # least preferred first when something has to give (ties: the table's task order, reversed)
    shrink_order = sorted(table.tasks, key=lambda t: (pref[t], -table.tasks.index(t)))
    while True:
        decoders = {t: ws[level[t]] for t in table.tasks}
        fit = _fill_encoder(table, decoders, budget)
        if fit is not None:
            cfg = {"encoder": fit[0], "decoders": decoders}
            return Choice(cfg, fit[1], table.expected(cfg))
        narrower = [t for t in shrink_order if level[t] > 0]
        if not narrower:  # unreachable after check_budget, kept as a guard
            raise ValueError(f"no configuration fits budget {budget:,.0f} FLOPs")
        level[narrower[0]] -= 1


def ordered_assignments(tasks: Sequence[str], pref: Mapping[str, float], n_levels: int):
    """Every decoder level assignment in which a strictly more preferred task has a level >= a less
    preferred one's (equal preferences: free)."""
    order = sorted(tasks, key=lambda t: -pref[t])

    def extend(i: int, levels: dict[str, int], cap: int, group_min: int):
        if i == len(order):
            yield dict(levels)
            return
        t = order[i]
        new_group = i > 0 and pref[t] < pref[order[i - 1]]
        cap_here = min(cap, group_min) if new_group else cap
        for lvl in range(cap_here + 1):
            levels[t] = lvl
            yield from extend(i + 1, levels, cap_here, lvl if new_group else min(group_min, lvl))
        del levels[t]

    yield from extend(0, {}, n_levels - 1, n_levels - 1)


def utilities(table: WidthTable) -> dict[str, dict[str, dict[str, float]]]:
    """Each task's primary score at every (encoder, decoder) width, min-max scaled to [0, 1] over the
    table's finite scores; a cell without a finite score stays NaN."""
    out = {}
    for t in table.tasks:
        raw = {a: {b: table.score(t, float(a), float(b)) for b in row} for a, row in table.metrics[t].items()}
        finite = [v for row in raw.values() for v in row.values() if math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        span = hi - lo

        def scaled(v: float) -> float:
            return math.nan if not math.isfinite(v) else (v - lo) / span if span > 0 else 0.0

        out[t] = {a: {b: scaled(v) for b, v in row.items()} for a, row in raw.items()}
    return out


def _measured(table: WidthTable, budget: float, pref: dict[str, float]) -> Choice:
    ws = table.width_set
    util = utilities(table)
    best, skipped = None, 0
    for levels in ordered_assignments(table.tasks, pref, len(ws)):
        decoders = {t: ws[levels[t]] for t in table.tasks}
        fit = _fill_encoder(table, decoders, budget)
        if fit is None:
            continue
        we, flops = fit
        u = sum(pref[t] * util[t][wkey(we)][wkey(w)] for t, w in decoders.items() if pref[t] > 0)
        if math.isnan(u):  # a weighed task's metric is missing there: its utility is unknown, not low
            skipped += 1
            continue
        key = (round(u, 12), flops, we)  # equal utility: the choice that uses more of the budget
        if best is None or key > best[0]:
            best = (key, {"encoder": we, "decoders": decoders}, flops)
    if best is None:
        missing = "; ".join(f"{t} at " + ", ".join(f"({a}, {b})" for a, b in cells)
                            for t, cells in table.missing_cells().items())
        raise NoScoredChoice(f"no configuration within budget {budget:,.0f} FLOPs has a finite primary metric for every "
                         f"preferred task ({skipped} skipped; missing at (encoder, decoder) widths: {missing})")
    _, cfg, flops = best
    return Choice(cfg, flops, table.expected(cfg), skipped)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the ranks (ties share their average rank); 0 when either
    side does not vary (no ordering to follow); NaN when a value is NaN or infinite (a missing score has no rank)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} and {len(y)} values")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
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


def controllability(table: WidthTable, budget: float, preferences: Sequence[Mapping[str, float]],
                    method: str = "measured", achieved: WidthTable | None = None) -> dict[str, Any]:
    """At one budget: per-task Spearman(preference, achieved score), their mean, and budget adherence.

    ``table`` is what the search reads; ``achieved`` (default: the same table) is where the chosen
    configurations' scores are looked up — pass the test split's table for a held-out score."""
    achieved = table if achieved is None else _same_grid(table, achieved)
    if len(preferences) < 2:
        raise ValueError(f"controllability needs at least 2 preference vectors (a rank correlation over "
                         f"{len(preferences)} is undefined)")
    choices: list[Choice | None] = []
    for p in preferences:
        try:
            choices.append(search(table, budget, p, method))
        except NoScoredChoice:  # every fitting configuration lacks a preferred task's metric: no choice to score
            choices.append(None)
    per_task, unscored = {}, {}
    for t in table.tasks:
        prefs = [p[t] for p in preferences]
        scores = [math.nan if c is None else achieved.score(t, c.config["encoder"], c.config["decoders"][t])
                  for c in choices]
        # one task: its preference is always 1.0, so nothing can follow it (undefined, not 0)
        per_task[t] = spearman(prefs, scores) if len(table.tasks) > 1 else math.nan
        missing = sum(not math.isfinite(v) for v in scores)
        if missing:
            unscored[t] = missing
    made = [c for c in choices if c is not None]
    within = sum(c.flops <= budget for c in made)
    row = {"budget": float(budget), "spearman": per_task, "controllability": float(np.mean(list(per_task.values()))),
           "adherence": within / len(made) if made else math.nan, "n": len(choices)}
    if unscored:  # choices whose achieved metric is missing: no rank, so no controllability at this budget
        row["unscored"] = unscored
    if len(made) < len(choices):
        row["no_choice"] = len(choices) - len(made)
    return row


def _same_grid(table: WidthTable, other: WidthTable) -> WidthTable:
    if other.tasks != table.tasks or other.width_set != table.width_set or other.primary != table.primary:
        raise ValueError(f"the achieved-score table (tasks {other.tasks}, widths {other.width_set}) does not match the "
                         f"search's table (tasks {table.tasks}, widths {table.width_set})")
    return other


def budgets_between(table: WidthTable, n: int) -> list[float]:
    """``n`` budgets evenly spaced from the smallest to the largest configuration's FLOPs."""
    if n < 2:  # one budget would be the smallest configuration's FLOPs, where one configuration fits
        raise ValueError(f"budgets={n}: give at least 2 (budgets run from the smallest configuration's FLOPs, "
                         "where only that configuration fits, to the largest's)")
    lo, hi = min_flops(table), table.flops(table.uniform(1.0))
    return [float(v) for v in np.linspace(lo, hi, n)]


def control_report(table: WidthTable, budgets: Sequence[float], n_preferences: int = 64, seed: int = 0,
                   method: str = "measured", achieved: WidthTable | None = None) -> dict[str, Any]:
    prefs = sample_preferences(table.tasks, n_preferences, seed)
    rows = [controllability(table, b, prefs, method, achieved) for b in budgets]
    report = {"controllability": float(np.mean([r["controllability"] for r in rows])),
              "adherence": float(np.nanmean([r["adherence"] for r in rows])) if any(
                  math.isfinite(r["adherence"]) for r in rows) else math.nan,
              "n_preferences": n_preferences, "method": method, "held_out": achieved is not None, "per_budget": rows}
    unscored = [r["budget"] for r in rows if "unscored" in r]
    if len(table.tasks) < 2:
        report["note"] = (f"controllability undefined: it needs at least 2 tasks (the preference of the only task, "
                          f"{table.tasks[0]!r}, is always 1.0)")
    elif unscored:
        report["note"] = (f"controllability undefined: at {len(unscored)} of {len(rows)} budgets some choices land on "
                          "configurations whose primary metric is missing (not finite) in the "
                          f"{'achieved-score' if achieved is not None else 'search'} table (per_budget[].unscored), or "
                          "no configuration within the budget has every preferred task scored (per_budget[].no_choice)")
    return report


def score_controller(table: WidthTable, test: WidthTable, budgets: int = 8, preferences: int = 64, seed: int = 0,
                     method: str = "measured") -> dict[str, Any]:
    """``method``'s held-out report (search on ``table``, scores from ``test``) with a summary of every
    method held out and in sample under ``compare``."""
    at = budgets_between(table, budgets)
    report, compare = None, {}
    for m in SEARCH_METHODS:
        for name, achieved in (("held_out", test), ("in_sample", None)):
            r = control_report(table, at, preferences, seed, m, achieved=achieved)
            compare[f"{m}/{name}"] = {"controllability": r["controllability"], "adherence": r["adherence"]}
            if m == method and achieved is not None:
                report = r
    if report is None:
        raise ValueError(f"search method must be one of {SEARCH_METHODS}, got {method!r}")
    return {**report, "compare": compare}


def choice_curves(table: WidthTable, budgets: Sequence[float], preference: Mapping[str, float] | None = None,
                  method: str = "measured", scores: WidthTable | None = None) -> dict[str, tuple[list[float], list[float]]]:
    """{task: (FLOPs of the search's choice at each budget, the task's primary metric there relative to the
    full-width model, higher = better)}. The search reads ``table``; the metrics come from ``scores`` (the test
    table, as controllability is scored) when given. NaN where a ratio to or of 0 says nothing."""
    pref = dict(preference or {t: 1.0 / len(table.tasks) for t in table.tasks})
    if preference is None:
        pref[table.tasks[-1]] = 1.0 - sum(v for t, v in pref.items() if t != table.tasks[-1])
    choices = [search(table, b, pref, method) for b in budgets]
    scored = scores if scores is not None else table
    curves = {}
    for t in table.tasks:
        full = scored.score(t, 1.0, 1.0)
        rel = []
        for c in choices:
            s = scored.score(t, c.config["encoder"], c.config["decoders"][t])
            if full == 0 or s == 0:
                rel.append(float("nan"))
            else:  # scores of lower-is-better metrics are negated, so full / s is their ratio too
                rel.append(s / full if table.higher_is_better[t] else full / s)
        curves[t] = ([c.flops for c in choices], rel)
    return curves


def plot_choices(table: WidthTable, budgets: Sequence[float], path, preference: Mapping[str, float] | None = None,
                 method: str = "measured", scores: WidthTable | None = None, scores_split: str = "test") -> None:
    """PNG of `choice_curves`, one line per task (``scores_split`` names the table the metrics come from)."""
    from matplotlib.figure import Figure

    from mtl.io import atomic_path

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for t, (flops, rel) in choice_curves(table, budgets, preference, method, scores).items():
        # a task whose ratios are all undefined keeps its legend entry, saying why it has no line
        note = "" if any(r == r for r in rel) else ", no line: its metric is 0"
        ax.plot([f / 1e6 for f in flops], rel, marker="o", label=f"{t} ({table.primary[t]}{note})")
    ax.set_xlabel("FLOPs of the chosen configuration (M, per image)")
    split = f" ({scores_split} split)" if scores is not None else ""
    ax.set_ylabel(f"primary metric relative to full width{split}\n(higher = better)")
    ax.set_title("search's choices across budgets (equal preferences)" if preference is None else "search's choices")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
