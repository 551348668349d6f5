"""StepTimer: a Lightning callback timing training steps (used by scripts/bench_balancers.py).

Not imported by ``mtl.balancers`` so that importing the balancers does not pull in Lightning.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from mtl.io import write_json


class StepTimer(Callback):
    """Wall time of every training step (forward + balancer + optimiser), warm-up steps excluded;
    writes ``step_time.json`` (median/mean seconds) to the run folder at the end of fit."""

    def __init__(self, warmup: int = 3, filename: str = "step_time.json"):
        super().__init__()
        self.warmup, self.filename = int(warmup), filename
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)

    def summary(self) -> dict[str, float]:
        times = self.times[self.warmup:] or self.times
        if not times:
            return {}
        return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "steps": len(times)}

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.times:
            write_json(Path(trainer.default_root_dir) / self.filename, self.summary())
