"""A Hydra callback for multiruns (``-m``, sweeps): a sweep folder holding another sweep's results is
refused before the sweeper writes into it, and a multirun ends, like every run, with its folder as the
last line.

Each job prints its own ``run_dir:``; a sweeper may print more after the last job (Optuna's best value),
so the sweep folder — the jobs' parent, with Hydra's sweep files — is printed once the sweep is done.
"""
from __future__ import annotations

import atexit
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mtl.cli.failures import FAILED, SWEEPING, RunFolderTaken, claim, release


def jobs_not_failed(sweep_dir: str | Path) -> list[str]:
    """Job folders of an earlier sweep in ``sweep_dir`` that did not fail (finished or still running);
    empty when there was no sweep there (no ``multirun.yaml``) or every job failed."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "multirun.yaml").is_file():
        return []
    return sorted(p.name for p in sweep_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and not (p / FAILED).exists())


class PrintSweepDir(Callback):
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        # Hydra's sweeper rewrites <sweep dir>/multirun.yaml before any job runs (and so before a job
        # refuses a finished folder): the earlier sweep's record would be lost. Hydra turns a callback's
        # exception into a warning, so exit here (nothing is written yet: no run_dir line).
        sweep_dir = Path(config.hydra.sweep.dir)
        # a sweep running into this folder now (it has not written its multirun.yaml record yet, or its
        # jobs are still running): two sweeps would interleave their job folders and records
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            claim(sweep_dir / SWEEPING, f"hydra.sweep.dir {sweep_dir}", "hydra.sweep.dir", holder="sweep")
        except RunFolderTaken as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        atexit.register(release, sweep_dir / SWEEPING)  # also when a job's failure ends the sweep early
        kept = jobs_not_failed(sweep_dir)
        if kept:
            release(sweep_dir / SWEEPING)
            shown = ", ".join(kept[:5]) + (", ..." if len(kept) > 5 else "")
            print(f"error: hydra.sweep.dir {sweep_dir} holds an earlier sweep (multirun.yaml; job folders that did "
                  f"not fail: {shown}); pick a new folder (the default is a new timestamped one)",
                  file=sys.stderr, flush=True)
            sys.exit(1)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from mtl.cli.common import finish

        release(Path(config.hydra.sweep.dir) / SWEEPING)
        finish(config.hydra.sweep.dir)
