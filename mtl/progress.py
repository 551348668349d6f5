"""Progress that reaches log files and CI logs too.

Rich's live bar draws nothing when stdout is not a terminal, so a job under ``nohup``, SLURM or CI
would run silently for hours. For training, ``create_progress_bar`` keeps Rich's bar on a terminal and
otherwise returns ``TextProgressBar``: one plain line every ``every_seconds`` (and at each epoch's end)
with step, percentage, rate, ETA and the latest losses, formatted by ``mtl.progress_log.progress_line``
(which plain loops such as mtl-merge's use through ``ProgressLog``, without importing Lightning).
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from mtl.progress_log import emit, format_duration, progress_line


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _count(counts: Any, index: int) -> int | None:
    """A dataloader's batch count from Lightning's per-dataloader list (inf or missing: unknown)."""
    try:
        n = counts[index]
    except (IndexError, TypeError, KeyError):
        return None
    return int(n) if n != float("inf") else None


def create_progress_bar(style: str = "auto", every_seconds: float = 30.0, leave: bool = True) -> ProgressBar:
    """``style``: ``auto`` (Rich on a terminal, text lines otherwise), ``rich`` or ``text``."""
    if style not in ("auto", "rich", "text"):
        raise ValueError(f"progress bar style must be auto, rich or text, got {style!r}")
    if style == "rich" or (style == "auto" and _is_tty(sys.stdout)):
        return RichProgressBar(leave=leave)
    return TextProgressBar(every_seconds=every_seconds)


class TextProgressBar(ProgressBar):
    """Plain-text progress lines: ``[train] epoch 2/6 step 40/100 (40%) 3.1 it/s eta 0:00:19 train/loss 0.53``."""

    def __init__(self, every_seconds: float = 30.0, stream: TextIO | None = None):
        super().__init__()
        if every_seconds < 0:
            raise ValueError(f"every_seconds must be >= 0, got {every_seconds}")
        self.every_seconds = float(every_seconds)
        self.stream = stream
        self._enabled = True
        self._last = 0.0
        self._epoch_start = 0.0
        self._eval_start_time = self._eval_last = 0.0

    # the ProgressBar interface Lightning calls
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            emit(text, self.stream)

    def _metrics(self, trainer, prefix: str) -> str:
        """Up to 4 losses, the aggregate ``<prefix>loss`` first (the module logs it after the tasks')."""
        items = []
        keys = sorted(trainer.callback_metrics, key=lambda k: k != f"{prefix}loss")  # stable: the rest keep their order
        for key in keys:
            value = trainer.callback_metrics[key]
            if key.startswith(prefix) and key.endswith("loss"):
                try:
                    items.append(f"{key} {float(value):.4g}")
                except (TypeError, ValueError):
                    continue
        return " ".join(items[:4])

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        total = self.total_train_batches
        done = batch_idx + 1
        if now - self._last < self.every_seconds and done != 1:
            return
        self._last = now
        max_epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self._print(trainer, progress_line(f"[train] epoch {trainer.current_epoch + 1}{max_epochs} step", done,
                                           total if isinstance(total, int) else None, now - self._epoch_start,
                                           note=self._metrics(trainer, "train/")))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self._epoch_start
        self._print(trainer, f"[train] epoch {trainer.current_epoch + 1} done in {format_duration(seconds)} "
                             f"{self._metrics(trainer, 'train/')}".rstrip())

    # evaluation: the same rate-limited lines (a large validation set on a CPU runs for minutes)
    def _eval_start(self) -> None:
        self._eval_start_time = self._eval_last = time.perf_counter()

    def _eval_batch(self, trainer, prefix: str, batch_idx: int, total: Any) -> None:
        now, done = time.perf_counter(), batch_idx + 1
        if now - self._eval_last < self.every_seconds or (done == 1 and now - self._eval_start_time < 1.0):
            return  # rate-limited; and no line at all for an evaluation that takes about a second
        self._eval_last = now
        self._print(trainer, progress_line(prefix, done, total if isinstance(total, int) else None,
                                           now - self._eval_start_time, unit="batches"))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._eval_start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._eval_batch(trainer, f"[val] epoch {trainer.current_epoch + 1} batch", batch_idx,
                             _count(trainer.num_val_batches, dataloader_idx))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        seconds = time.perf_counter() - self._eval_start_time
        self._print(trainer, f"[val] epoch {trainer.current_epoch + 1} done in {format_duration(seconds)} "
                             f"{self._metrics(trainer, 'val/')}".rstrip())

    def on_test_start(self, trainer, pl_module) -> None:
        self._eval_start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, "[test] batch", batch_idx, _count(trainer.num_test_batches, dataloader_idx))

    def on_test_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self._eval_start_time
        self._print(trainer, f"[test] done in {format_duration(seconds)}")
