"""Decoder registry. A decoder takes the backbone's feature maps and produces one output per task.

Interface: ``decoder(in_channels, tasks, **kwargs)`` with ``shared(feats) -> z`` (the representation
every task head reads) and ``head(task, z, out_size) -> prediction``; its per-task modules live in
``decoder.heads[task]`` so parameter groups and merging can tell shared from task-specific weights.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from mtl.registry import Registry, check_kwargs

DECODERS: "Registry[type[nn.Module]]" = Registry("decoder")


def create_decoder(name: str, in_channels: list[int], tasks, **kwargs) -> nn.Module:
    """``tasks``: Task objects, as a list or as ``model.tasks`` holds them ({name: Task})."""
    if isinstance(tasks, Mapping):
        tasks = list(tasks.values())
    cls = DECODERS.get(name)
    check_kwargs(cls, kwargs, "decoder")
    return cls(in_channels, tasks, **kwargs)
