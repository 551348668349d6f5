"""A Hydra callback: a multirun (``-m``, sweeps) ends, like every run, with its folder as the last line.

Each job prints its own ``run_dir:``; a sweeper may print more after the last job (Optuna's best value),
so the sweep folder — the jobs' parent, with Hydra's sweep files — is printed once the sweep is done.
"""
from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback


class PrintSweepDir(Callback):
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from mtl.cli.common import finish

        finish(config.hydra.sweep.dir)
