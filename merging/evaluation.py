"""Evaluation for ``mtl-merge``: every pool task on its own data, scored against its fine-tuned model."""
from __future__ import annotations

import logging
import statistics
from typing import Any

import torch

from mtl.models import MultiTaskModel
from mtl.progress_log import ProgressLog

from .pool import ModelPool, evaluate, member_datamodule, normalized, normalized_undefined, resolve_device, score

__all__ = ["Evaluator", "ImageBatches"]

log = logging.getLogger(__name__)

Metrics = dict[str, float]


class Evaluator:
    """Evaluates models on every pool task, each on the data its fine-tune was trained on.

    Data modules are built once. `individual[t][split]` holds each fine-tuned model's own metrics,
    the reference every merged score is normalized by (merged / individual, direction-aware).
    With `progress`, a line per evaluated model and task (`mtl.progress_log.ProgressLog`).
    """

    def __init__(self, pool: ModelPool, max_batches: int | None = None, data_overrides: dict[str, Any] | None = None,
                 device: str = "cpu", progress: bool = True):
        self.pool, self.progress = pool, progress
        self.device = resolve_device(device)
        self.max_batches = max_batches
        self.tasks = {t.name: t for t in pool.tasks()}
        self.names = pool.task_names
        self._owner = {t: m for m in pool.members for t in m.tasks}
        self._dms = {id(m): member_datamodule(m, data_overrides or {}) for m in pool.members}
        # tasks whose data serves its test split as val (nyuv2/cityscapes at val_fraction=0): "val" scores are test's
        self.val_is_test = [t for t in self.names if getattr(self.datamodule(t), "val_is_test", False)]
        self.individual: dict[str, dict[str, Metrics]] = {}
        self.scored: dict[str, dict[str, int]] = {"val": {}, "test": {}}  # per split and task (the same for every model)
        bar = ProgressLog("[eval] fine-tuned models", len(pool.members), unit="models", every_seconds=0,
                          enabled=progress)
        for i, m in enumerate(pool.members):
            model = pool.member_model(i).to(self.device)
            for t in m.tasks:
                self.individual[t] = {s: self.run(model, t, s) for s in ("val", "test")}
            del model
            bar.update(i + 1, " ".join(f"{t} val {self._primary(t, self.individual[t]['val'])}" for t in m.tasks))

    def datamodule(self, task: str):
        """The task's data module (set up for val/test; methods that learn from data may use its loaders)."""
        return self._dms[id(self._owner[task])]

    def run(self, model: MultiTaskModel, task: str, split: str) -> Metrics:
        tally: dict[str, int] = {}
        out = evaluate(model, task, self.datamodule(task), split, self.max_batches, self.device, tally)
        self.scored.setdefault(split, {})[task] = tally["samples"]
        return out

    def record(self) -> dict[str, Any]:
        """How the scores were measured, for metrics.json and the merged folder's meta: a capped evaluation
        (`max_batches`) scored part of each split, and says so. `selection_split` is "test" where every task's val
        split is its test split ({task: split} where only some are)."""
        on_test = set(self.val_is_test)
        selection = ("val" if not on_test else "test" if on_test == set(self.names)
                     else {t: "test" if t in on_test else "val" for t in self.names})
        return {"split": "test", "selection_split": selection, "max_batches": self.max_batches,
                "scored_samples": {s: dict(n) for s, n in self.scored.items() if n}}

    def warn_selection_on_test(self) -> None:
        """After a search scored on val: a warning where the chosen hyperparameters were chosen on test data."""
        if self.val_is_test:
            log.warning("hyperparameters were chosen on the TEST split of task(s) %s: their data has no validation "
                        "split of its own (val is the test set: data.val_fraction=0, the nyuv2/cityscapes default), "
                        "so the test scores are optimistic; metrics.json records selection_split. To select on "
                        "held-out data, fine-tune with data.val_fraction>0 (the merge reads it from each fine-tune's "
                        "meta.data), or pass 'eval.data={val_fraction: 0.1}' (carved from train, which fine-tunes "
                        "trained at val_fraction=0 have seen)", ", ".join(self.val_is_test))

    def run_all(self, model: MultiTaskModel, split: str) -> dict[str, Metrics]:
        bar = ProgressLog(f"[eval] {split}", len(self.names), unit="tasks", every_seconds=0, enabled=self.progress)
        out = {}
        for i, t in enumerate(self.names):
            out[t] = self.run(model, t, split)
            bar.update(i + 1, f"{t} {self._primary(t, out[t])}")
        return out

    def _primary(self, task: str, metrics: Metrics) -> str:
        return f"{self.tasks[task].primary} {score(self.tasks[task], metrics):.4g}"

    def normalized(self, task: str, metrics: Metrics, split: str) -> float:
        """The task's primary metric relative to its fine-tuned model's on the same split."""
        t = self.tasks[task]
        return normalized(t, score(t, metrics), score(t, self.individual[task][split]))

    def normalized_mean(self, results: dict[str, Metrics], split: str) -> float:
        return statistics.fmean(self.normalized(t, results[t], split) for t in self.names)

    def undefined(self, task: str, metrics: Metrics | None, split: str) -> str | None:
        """Why the task's normalized score on `split` is undefined (pool.normalized_undefined), or None;
        `metrics=None`: for any merged model (its fine-tune's reference score alone)."""
        t = self.tasks[task]
        return normalized_undefined(t, None if metrics is None else score(t, metrics),
                                    score(t, self.individual[task][split]))

    def undefined_mean(self, results: dict[str, Metrics], split: str) -> str | None:
        """Why `normalized_mean` is undefined (each task at fault, on `split`), or None."""
        why = [f"{t}: {w}" for t in self.names if (w := self.undefined(t, results[t], split))]
        return f"undefined on {split}: " + "; ".join(why) if why else None

    def require_references(self, split: str, search: str) -> None:
        """Before a λ search: refuse one whose every candidate would score NaN because a fine-tune's own
        `split` score (the reference) leaves its task's normalized score undefined."""
        for t in self.names:
            why = self.undefined(t, None, split)
            if why:
                raise ValueError(f"{search} cannot rank its candidates: task {t}: {why} on {split}, so its normalized "
                                 "score is undefined for every candidate; check that fine-tune and its data "
                                 "(eval.max_batches, eval.data), or set merge.lam to merge without a search")


class ImageBatches:
    """Seeded, shuffled batches of a split's images only: `dataset.tensors["image"]` is the one column read."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, task: str = "?"):
        images = dataset.tensors["image"]
        if len(images) == 0:
            raise ValueError(f"task {task!r}: the split has no images to learn from")
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"task {task!r}: batch_size must be ≥ 1, got {batch_size!r}")
        self.images, self.batch_size = images, int(batch_size)
        self.gen = torch.Generator().manual_seed(int(seed))

    def __iter__(self):
        order = torch.randperm(len(self.images), generator=self.gen)
        for i in range(0, len(order), self.batch_size):
            yield self.images[order[i:i + self.batch_size]]
