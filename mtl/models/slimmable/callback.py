"""After testing, evaluate the width grid on the validation and test splits and score the controller.

Writes into the run folder: ``width_table.json`` (validation: the table the search reads),
``width_table_test.json`` (where the chosen configurations are scored, so the controllability of a
search that reads validation metrics is measured on images it never saw), ``controllability.json``
(the ``search_method``'s held-out score on top, plus both methods held out and in sample) and
``slimmable_control.png``; prints a short summary.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L

from mtl.models.slimmable.control import SEARCH_METHODS, budgets_between, plot_choices, score_controller, search
from mtl.models.slimmable.table import build_width_table
from mtl.registry import check_int

log = logging.getLogger(__name__)


class WidthTableCallback(L.Callback):
    def __init__(self, budgets: int = 8, preferences: int = 64, max_batches: int | None = None, seed: int = 0,
                 search_method: str = "measured"):
        if search_method not in SEARCH_METHODS:
            raise ValueError(f"callbacks.width_table.search_method must be one of {SEARCH_METHODS}, got {search_method!r}")
        # checked when the run starts: a bad value found after testing would fail a trained run
        # one budget or one preference vector would always score 0, which reads like a measurement
        notes = {"budgets": " (one budget is the smallest configuration's FLOPs, where only it fits)",
                 "preferences": " (a rank correlation over one preference vector is undefined)"}
        for key, value, low in (("budgets", budgets, 2), ("preferences", preferences, 2), ("max_batches", max_batches, 0),
                                ("seed", seed, 0)):
            if value is not None or key != "max_batches":  # max_batches=null: the trainer's limits
                check_int(f"callbacks.width_table.{key}", value, low=low, note=notes.get(key, ""))
        self.budgets, self.preferences, self.max_batches, self.seed = budgets, preferences, max_batches, seed
        self.search_method = search_method
        self.deferred_error: BaseException | None = None
        self._said_skipped = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning skips a test limited to 0 batches with its hooks, on_test_end included, so the warning in
        # _build would never come: said here, at the start
        limit = trainer.limit_test_batches
        if not self._said_skipped and isinstance(limit, (int, float)) and limit <= 0:
            self._said_skipped = True
            _warn_skipped(["test"], trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs inside testing, before the model folder is written: an error is kept for after the save
        # (mtl.train raises it then), so a failed analysis never loses the trained model
        try:
            self._build(trainer, pl_module)
        except Exception as e:  # noqa: BLE001  (re-raised by mtl.train once the model is saved)
            log.error("width table failed after testing (%s); the model folder and metrics are still written", e)
            self.deferred_error = e

    def _build(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        loaders = {"val": trainer.datamodule.val_dataloader(), "test": trainer.datamodule.test_dataloader()}
        caps = {split: self._cap(getattr(trainer, f"limit_{split}_batches"), loader) for split, loader in loaders.items()}
        off = [split for split, cap in caps.items() if cap == 0]
        if off:  # the search reads validation and is scored on test: without either there is nothing to build
            _warn_skipped(off, trainer, "callbacks.width_table.max_batches" if self.max_batches is not None else None)
            return
        # every process evaluates its shard (under DDP the metrics gather across processes); one writes
        table = build_width_table(model, loaders["val"], max_batches=caps["val"], progress=trainer.is_global_zero,
                                  split="val")
        test = build_width_table(model, loaders["test"], max_batches=caps["test"], progress=trainer.is_global_zero,
                                 split="test")
        if not trainer.is_global_zero:
            return
        run_dir = Path(trainer.default_root_dir)
        table.save(run_dir / "width_table.json")
        test.save(run_dir / "width_table_test.json")
        report = score_controller(table, test, self.budgets, self.preferences, self.seed, self.search_method)
        report["settings"] = self.settings()  # as scripts/bench_slimmable.py --part control records them
        from mtl.io import write_json

        write_json(run_dir / "controllability.json", report)
        plot_choices(table, budgets_between(table, self.budgets), run_dir / "slimmable_control.png",
                     method=self.search_method, scores=test)
        print_report(table, report)


    def settings(self) -> dict:
        """The scoring settings and where each came from: the run's own callbacks.width_table."""
        keys = ("budgets", "preferences", "search_method", "seed")
        return {**{k: getattr(self, k) for k in keys},
                "source": {k: f"config.yaml callbacks.width_table.{k}" for k in keys}}

    def _cap(self, limit, loader) -> int | None:
        """Batches of a split the grid evaluates: ``max_batches`` if set, else the trainer's limit for that
        split (debug runs cap validation and testing; so does the grid), a fraction taken of the loader."""
        if self.max_batches is not None:
            return int(self.max_batches)
        if isinstance(limit, float) and limit < 1.0:
            return 0 if limit <= 0 else max(1, int(limit * len(loader)))
        return int(limit) if isinstance(limit, int) else None


def _warn_skipped(splits: list[str], trainer: L.Trainer, key: str | None = None) -> None:
    limits = f"{key}=0" if key else " and ".join(f"trainer.limit_{s}_batches={getattr(trainer, f'limit_{s}_batches')}"
                                                 for s in splits)
    log.warning("width tables skipped: %s (the grid reads validation and is scored on test); the model folder is still "
                "written: build width_table.json, width_table_test.json and controllability.json later with "
                "scripts/bench_slimmable.py --part control --runs %s", limits, trainer.default_root_dir)


#: the override that adds this callback to a run that lacks it (configs/experiment/scenes_slimmable.yaml has it)
OVERRIDE = f"+callbacks.width_table._target_={WidthTableCallback.__module__}.{WidthTableCallback.__qualname__}"


def note_without_callback(callbacks: list, run_dir) -> None:
    """At the end of a slimmable run without this callback (only experiment=scenes_slimmable adds it): say that
    no width table was written and how to get one, instead of leaving the run folder silently without it."""
    if not any(isinstance(c, WidthTableCallback) for c in callbacks):
        log.warning("no width table: this slimmable run has no callbacks.width_table (experiment=scenes_slimmable "
                    "adds it), so width_table.json, controllability.json and slimmable_control.png were not written; "
                    "build the first two (and width_table_test.json) with scripts/bench_slimmable.py --part control "
                    "--runs %s, or add %s to the run", run_dir, OVERRIDE)


def print_report(table, report) -> None:
    from mtl.progress_log import summary_console
    from rich.table import Table

    out = Table(title="width controller (validation split, equal preferences)")
    for col in ("budget MFLOPs", "encoder", "decoders", "MFLOPs", *[f"{t} {table.primary[t]}" for t in table.tasks]):
        out.add_column(col)
    pref = {t: 1.0 / len(table.tasks) for t in table.tasks}
    pref[table.tasks[-1]] = 1.0 - sum(pref[t] for t in table.tasks[:-1])
    for row in report["per_budget"]:
        c = search(table, row["budget"], pref, report["method"])
        out.add_row(f"{row['budget'] / 1e6:.1f}", f"{c.config['encoder']:g}",
                    "/".join(f"{w:g}" for w in c.config["decoders"].values()), f"{c.flops / 1e6:.1f}",
                    *[f"{c.expected[t][table.primary[t]]:.4f}" for t in table.tasks])
    console = summary_console()
    console.print(out)
    console.print(f"controllability ({report['method']} search on validation, scored on test; mean Spearman, "
                  f"{report['n_preferences']} preference vectors x {len(report['per_budget'])} budgets): "
                  f"{signed(report['controllability'])}; budget adherence {100 * report['adherence']:.1f}%")
    if "note" in report:
        console.print(f"  {report['note']}")
    console.print("  " + "; ".join(f"{k} {signed(v['controllability'])}" for k, v in report.get("compare", {}).items()))


def signed(v: float | None) -> str:
    """A controllability as printed: undefined ones are NaN in memory and null in controllability.json."""
    return "undefined" if v is None or not math.isfinite(v) else f"{v:+.3f}"
