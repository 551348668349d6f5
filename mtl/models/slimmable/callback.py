"""After testing, evaluate the width grid on the validation split and score the controller.

Writes into the run folder: ``width_table.json`` (the table the search reads), ``controllability.json``
and ``slimmable_control.png``; prints a short summary.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L

from mtl.models.slimmable.control import budgets_between, control_report, plot_choices, search
from mtl.models.slimmable.table import build_width_table


class WidthTableCallback(L.Callback):
    def __init__(self, budgets: int = 8, preferences: int = 64, max_batches: int | None = None, seed: int = 0):
        self.budgets, self.preferences, self.max_batches, self.seed = int(budgets), int(preferences), max_batches, seed

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = pl_module.model
        limit = self.max_batches
        if limit is None and isinstance(trainer.limit_val_batches, int):
            limit = trainer.limit_val_batches  # debug runs cap validation; so does the grid
        loader = trainer.datamodule.val_dataloader()
        table = build_width_table(model, loader, max_batches=limit)
        run_dir = Path(trainer.default_root_dir)
        table.save(run_dir / "width_table.json")
        budgets = budgets_between(table, self.budgets)
        report = control_report(table, budgets, self.preferences, self.seed)
        from mtl.io import write_json

        write_json(run_dir / "controllability.json", report)
        plot_choices(table, budgets, run_dir / "slimmable_control.png")
        print_report(table, report)


def print_report(table, report) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title="width controller (validation split, equal preferences)")
    for col in ("budget MFLOPs", "encoder", "decoders", "MFLOPs", *[f"{t} {table.primary[t]}" for t in table.tasks]):
        out.add_column(col)
    pref = {t: 1.0 / len(table.tasks) for t in table.tasks}
    pref[table.tasks[-1]] = 1.0 - sum(pref[t] for t in table.tasks[:-1])
    for row in report["per_budget"]:
        c = search(table, row["budget"], pref)
        out.add_row(f"{row['budget'] / 1e6:.1f}", f"{c.config['encoder']:g}",
                    "/".join(f"{w:g}" for w in c.config["decoders"].values()), f"{c.flops / 1e6:.1f}",
                    *[f"{c.expected[t][table.primary[t]]:.4f}" for t in table.tasks])
    console = Console()
    console.print(out)
    console.print(f"controllability (mean Spearman, {report['n_preferences']} preference vectors x "
                  f"{len(report['per_budget'])} budgets): {report['controllability']:+.3f}; "
                  f"budget adherence {100 * report['adherence']:.1f}%")
