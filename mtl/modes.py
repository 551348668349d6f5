"""Train/eval modes that come back as they were: every module's own flag, not only the top one.

``model.train(was)`` after a pass would flatten a mixed model (a frozen-BN backbone in eval under a
model in train mode) into one mode; these context managers restore each module's flag, also on errors.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "modes_restored"]


@contextmanager
def modes_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Every module's ``training`` flag as on entry once the block ends, however it ends."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, training in saved:  # the flag itself: a module's train() override may recurse or refuse
            m.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; every module's own mode comes back afterwards."""
    with modes_restored(model):
        model.eval()
        yield model
