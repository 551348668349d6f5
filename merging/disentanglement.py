"""Weight disentanglement of a pool's task vectors (Ortiz-Jiménez et al., NeurIPS 2023, Eq. 4).

Task arithmetic works when adding task t's vector changes the model only on task t's inputs. The
paper measures how far a pool is from that with the disentanglement error of two tasks s, t:

    ξ(α_s, α_t) = Σ_{i ∈ {s, t}} E_{x ~ D_i} [ dist( f_i(x; θ0 + α_i τ_i), f_i(x; θ0 + α_s τ_s + α_t τ_t) ) ]

with dist the prediction disagreement (1 where the predicted classes differ, 0 where they agree) and
f_i the shared network followed by task i's own head. ξ lies in [0, 2]: 0 when the other task's vector
never changes a prediction, 2 when it changes all of them on both tasks. It is 0 at α = (0, 0).

Merged weights are task arithmetic's (`merging.merge("task_arithmetic", ...)`), so BatchNorm running
statistics follow its `bn` rule: θ0's by default, for the single-task and the two-task model alike.

Classification-like heads are supported: `classification` (argmax over classes per image), `semseg`
(argmax per pixel, mean over pixels) and `edges` (logit > 0 per pixel). Regression-like heads predict
no class, so they are refused by name (pass `tasks=` without them).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtl.io import load_state
from mtl.progress_log import ProgressLog

from .api import merge
from .pool import HEAD_PREFIX, ModelPool, member_datamodule, resolve_device

__all__ = ["Disentanglement", "weight_disentanglement", "CLASS_KINDS"]

#: task kinds whose predictions are classes, and how a prediction is read from the head's logits
CLASS_KINDS = {"classification": "argmax", "semseg": "argmax", "edges": "sign"}


@dataclass
class Disentanglement:
    """ξ per task pair and α point. `errors[(s, t)][(α_s, α_t)]` = ξ; `parts` holds its two terms."""

    tasks: list[str]
    alphas: list[tuple[float, float]]
    split: str
    errors: dict[tuple[str, str], dict[tuple[float, float], float]] = field(default_factory=dict)
    parts: dict[tuple[str, str], dict[tuple[float, float], tuple[float, float]]] = field(default_factory=dict)

    def matrix(self, alpha: tuple[float, float]) -> torch.Tensor:
        """(T, T) ξ at one α point, T = len(tasks); symmetric, NaN on the diagonal and for pairs not measured."""
        n = len(self.tasks)
        out = torch.full((n, n), float("nan"))
        for (s, t), by_alpha in self.errors.items():
            if alpha in by_alpha:
                i, j = self.tasks.index(s), self.tasks.index(t)
                out[i, j] = out[j, i] = by_alpha[alpha]
        return out

    def mean(self, alpha: tuple[float, float]) -> float:
        """Mean ξ over the measured pairs at one α point."""
        vals = [by[alpha] for by in self.errors.values() if alpha in by]
        return sum(vals) / len(vals) if vals else float("nan")

    def to_dict(self) -> dict[str, Any]:
        key = lambda a: f"{a[0]:g},{a[1]:g}"  # noqa: E731
        return {"tasks": self.tasks, "split": self.split, "alphas": [list(a) for a in self.alphas],
                "mean": {key(a): self.mean(a) for a in self.alphas},
                "pairs": [{"pair": [s, t], "xi": {key(a): v for a, v in by.items()},
                           "terms": {key(a): list(self.parts[(s, t)][a]) for a in by}}
                          for (s, t), by in self.errors.items()]}


def _alpha_points(alphas: Sequence[float | Sequence[float]]) -> list[tuple[float, float]]:
    if isinstance(alphas, (int, float)):  # one α, as the CLI's --alphas 0.3 reads
        alphas = [alphas]
    points = []
    for a in alphas:
        pair = (float(a), float(a)) if isinstance(a, (int, float)) else tuple(float(v) for v in a)
        if len(pair) != 2 or any(v != v for v in pair):
            raise ValueError(f"alphas: {a!r} is not a number or an (α_s, α_t) pair")
        points.append(pair)
    if not points:
        raise ValueError("alphas: give at least one α (or (α_s, α_t) pair)")
    return points


@torch.no_grad()
def _predictions(model, task: str, rule: str, loader, max_batches: int | None, device) -> torch.Tensor:
    """The classes `model` predicts for `task` on every image of `loader` (labels never read)."""
    out = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(batch["image"].to(device), tasks=[task])[task]
        out.append((logits.argmax(1) if rule == "argmax" else logits > 0).flatten().cpu())
    if not out:
        raise ValueError(f"task {task!r}: its split has no images")
    return torch.cat(out)


def weight_disentanglement(pool: ModelPool | str | Path, alphas: Sequence[float | Sequence[float]] = (0.3, 1.0),
                           tasks: Sequence[str] | None = None, pairs: Sequence[Sequence[str]] | None = None,
                           split: str = "test", max_batches: int | None = None, device: str = "cpu",
                           bn: str = "pretrained", progress: bool = True) -> Disentanglement:
    """ξ (module docstring) for every pair of `tasks` (default: all of the pool's) or the given `pairs`,
    at each α point (a number α means (α, α)). `pool`: a ModelPool or a zoo manifest. Each merged model
    is the pool's task arithmetic (`merging.merge("task_arithmetic", ...)`) with every task's own head."""
    if not isinstance(pool, ModelPool):
        pool = ModelPool.from_manifest(pool)
    if split not in ("val", "test", "train"):
        raise ValueError(f"split={split!r}: use val, test or train")
    points = _alpha_points(alphas)
    if max_batches is not None and (isinstance(max_batches, bool) or int(max_batches) < 1):
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches!r} (None: all batches)")
    owner = {t: m for m in pool.members for t in m.tasks}
    kinds = {t.name: t.kind for t in pool.tasks()}
    if pairs is not None:
        pairs = [tuple(p) for p in pairs]
        bad = [p for p in pairs if len(p) != 2 or p[0] == p[1]]
        if bad:
            raise ValueError(f"pairs: {bad} are not pairs of two different tasks")
        tasks = list(dict.fromkeys(t for p in pairs for t in p))
    tasks = list(tasks) if tasks is not None else pool.task_names
    unknown = [t for t in tasks if t not in owner]
    if unknown:
        raise ValueError(f"task(s) {unknown} are not in the pool; it has {pool.task_names}")
    no_class = [f"{t} ({kinds[t]})" for t in tasks if kinds[t] not in CLASS_KINDS]
    if no_class:
        raise ValueError(f"task(s) {no_class} predict no classes, so prediction disagreement is undefined; "
                         f"supported heads: {', '.join(CLASS_KINDS)} (pass tasks= without them)")
    if pairs is None:
        pairs = list(itertools.combinations(tasks, 2))
    if len(tasks) < 2 or not pairs:
        raise ValueError("weight disentanglement needs at least two tasks")
    multi = [m.path for m in {id(owner[t]): owner[t] for t in tasks}.values() if len(m.tasks) > 1]
    if multi:
        raise ValueError(f"{multi}: a fine-tuned model with several tasks has one task vector for all of them; "
                         "disentanglement is defined per task vector (one task per model)")

    device = resolve_device(device)
    dms = {t: member_datamodule(owner[t]) for t in tasks}
    loaders = {t: getattr(dms[t], f"{split}_dataloader") for t in tasks}
    # one model holding every head; each α point only swaps its shared weights
    theta0 = load_state(pool.pretrained)
    model = pool.merged_model(theta0).to(device)
    shared_keys = [k for k in model.state_dict() if not k.startswith(HEAD_PREFIX)]
    states: dict[str, dict[str, torch.Tensor]] = {}  # each fine-tune read once, not once per α point

    def predict(coeffs: dict[str, float], on: Sequence[str]) -> dict[str, torch.Tensor]:
        names = list(coeffs)
        for t in names:
            if t not in states:
                states[t] = load_state(owner[t].path)
        merged = merge("task_arithmetic", theta0, [states[t] for t in names],
                       lam=[coeffs[t] for t in names], bn=bn)
        model.load_state_dict({k: merged[k] for k in shared_keys}, strict=False)
        return {t: _predictions(model, t, CLASS_KINDS[kinds[t]], loaders[t](), max_batches, device) for t in on}

    singles = {(t, a_t) for s, t in pairs for a_s, a_t in points} | {(s, a_s) for s, t in pairs for a_s, a_t in points}
    result = Disentanglement(list(tasks), points, split)
    bar = ProgressLog("[disentanglement] models", len(singles) + len(pairs) * len(points), unit="models",
                      every_seconds=0, enabled=progress)
    alone: dict[tuple[str, float], torch.Tensor] = {}
    for t, a in sorted(singles):
        alone[(t, a)] = predict({t: a}, [t])[t]
        bar.update(len(alone), f"{t} at α={a:g}")
    done = len(alone)
    for s, t in pairs:
        result.errors[(s, t)], result.parts[(s, t)] = {}, {}
        for a_s, a_t in points:
            both = predict({s: a_s, t: a_t}, [s, t])
            terms = tuple(float((both[i] != alone[(i, a)]).float().mean()) for i, a in ((s, a_s), (t, a_t)))
            result.parts[(s, t)][(a_s, a_t)] = terms
            result.errors[(s, t)][(a_s, a_t)] = terms[0] + terms[1]
            done += 1
            bar.update(done, f"{s}+{t} at α=({a_s:g},{a_t:g}) ξ={terms[0] + terms[1]:.3f}")
    return result
