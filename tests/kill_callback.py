"""A callback that SIGKILLs its own process (no cleanup runs), for the resume tests."""
import os
import signal

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
