"""Checkpoints written like every other output: to a temporary sibling, then renamed (`mtl.atomic`).

Lightning's own save goes through fsspec, which writes under ``$TMPDIR`` and moves the file into place:
across file systems that move is a copy straight into the final path, so a full disk or a kill left a
truncated ``last.ckpt`` under its name (and a copy over an existing one destroys the previous resume point).
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mtl.atomic import atomic_path

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported by mtlkit's checkpoint writer")
        with atomic_path(path) as tmp:
            _save(checkpoint, tmp)


class _KeepsWriteErrors:
    """A binary file that keeps its write error: torch's zip writer turns an OSError (a full disk) into a
    bare RuntimeError ("unexpected pos ..."), which neither names the file nor says why."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _save(obj: Any, path) -> None:
    """``torch.save`` through a file we close ourselves (so a failed write frees its disk space at once,
    not when the exception is collected), raising the OSError itself (``atomic_path`` names the output)."""
    sink = None
    try:
        with open(path, "wb") as f:
            sink = _KeepsWriteErrors(f)
            torch.save(obj, sink)
    except RuntimeError as e:
        if sink is not None and sink.error is not None:
            raise sink.error from e
        raise
