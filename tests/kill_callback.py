"""Callbacks that stop or spoil a run at a chosen point (a SIGKILL: no cleanup runs), for the resume and
failure tests."""
import os
import signal
from pathlib import Path

import lightning as L


class KillAtEpoch(L.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAtEpoch(L.Callback):
    """In-process stand-in for a kill at the same point: the run stops with whatever is on disk."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise InterruptedError(f"stopped at the start of epoch {self.epoch}")


class RecordLR(L.Callback):
    """Appends (global step, lr of the first parameter group) before every training step to `path`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {trainer.optimizers[0].param_groups[0]['lr']!r}\n")


class MakeFileAtTestEnd(L.Callback):
    """Writes a regular file at `path` once testing ends: a path checked before training goes bad afterwards."""

    def __init__(self, path: str):
        self.path = path

    def on_test_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text("x")


class SigtermAt(L.Callback):
    """Sends this process a SIGTERM at ``hook`` ("train_end": the fit's last epoch, after its loop's last check;
    "test_end"), where Lightning's own handler is installed and only notes it."""

    def __init__(self, hook: str):
        self.hook = hook

    def on_train_end(self, trainer, pl_module) -> None:
        if self.hook == "train_end":
            os.kill(os.getpid(), signal.SIGTERM)

    def on_test_end(self, trainer, pl_module) -> None:
        if self.hook == "test_end":
            os.kill(os.getpid(), signal.SIGTERM)
