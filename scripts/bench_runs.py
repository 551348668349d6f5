"""Reusing the training runs of an earlier benchmark invocation, only when they ran the same recipe.

Each benchmark script trains its runs into `<out>/...` and reuses a finished one when it is run again
(a long benchmark can be resumed). A finished run of *other* overrides (another --epochs, --smoke, zoo
or learning rate) is refused rather than reused: its numbers would be reported under the new recipe.
The overrides a run was trained with are recorded beside it in `bench_recipe.json`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

RECIPE = "bench_recipe.json"


class RecipeMismatch(SystemExit):
    """A finished run of other overrides where this invocation would write: exits with one line."""

    def __init__(self, run_dir: Path, stored: list[str], wanted: list[str]):
        only_old = [o for o in stored if o not in wanted]
        only_new = [o for o in wanted if o not in stored]
        super().__init__(f"error: {run_dir} holds a finished run of other overrides (it has {only_old}, this run "
                         f"asks for {only_new}); use another --out, or remove that folder to retrain it")


def finished_run(run_dir: Path) -> bool:
    """`run_dir` holds a finished run with its metrics.json: not FAILED, not killed after writing it
    (`mtl.cli.failures.holds_finished_run`; a run writes metrics.json before steps that can still fail)."""
    from mtl.cli.failures import holds_finished_run

    return (Path(run_dir) / "metrics.json").is_file() and holds_finished_run(run_dir)


def reusable(run_dir: Path, overrides: Sequence[str], finished: Callable[[Path], bool] = finished_run) -> bool:
    """True when `run_dir` holds a finished run of exactly `overrides` (reuse it); False when it holds no
    finished run (train it, then `record`); a finished run of other overrides raises `RecipeMismatch`.
    A finished run from before recipes were recorded is reused with a warning."""
    run_dir = Path(run_dir)
    if not finished(run_dir):
        return False
    path = run_dir / RECIPE
    if not path.is_file():
        print(f"[bench] {run_dir}: reusing a finished run that records no recipe ({RECIPE}); not verified", flush=True)
        return True
    stored = json.loads(path.read_text())
    if stored != list(overrides):
        raise RecipeMismatch(run_dir, stored, list(overrides))
    return True


def record(run_dir: Path, overrides: Sequence[str]) -> None:
    from mtl.io import write_json

    write_json(Path(run_dir) / RECIPE, list(overrides))  # atomic: a kill never leaves half a recipe


def single_task_baselines(path: Path, tasks: Sequence[str], train: Callable[[str], dict]) -> Path:
    """The baselines JSON at `path`, built from one single-task run per task: `train(task)` trains that
    task's run or reuses a finished one of the same recipe (`reusable`: a run of other settings, e.g.
    another --epochs, is refused with `RecipeMismatch`) and returns its metrics. An existing `path` is
    never trusted on its own: it is rewritten from the runs' test metrics once every run is checked, so
    it cannot report baselines of another recipe."""
    from mtl.evaluation import save_baselines

    path = Path(path)
    tests: dict = {}
    for task in tasks:
        tests.update(train(task)["test"])
    path.unlink(missing_ok=True)  # only the runs just checked, no task of an earlier invocation
    save_baselines(path, tests)
    return path
