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
            torch.save(checkpoint, tmp)
