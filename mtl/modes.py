"""Train/eval modes that come back as they were: every module's own flag, not only the top one.

``model.train(was)`` after a pass would flatten a mixed model (a frozen-BN backbone in eval under a
model in train mode) into one mode; these context managers restore each module's flag, also on errors.
``eval_mode`` is how a measuring forward runs on a user's live model (FLOPs, calibration, extraction,
evaluation), so it also puts back what a module's forward overwrites besides its output: the attributes
its class names in ``FORWARD_STATE`` (a task-routed MoE's last routing statistics, i.e. its pending
``aux_loss()``).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "forward_state_restored", "modes_restored"]


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
def forward_state_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Every module's ``FORWARD_STATE`` attributes as on entry once the block ends, however it ends."""
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in getattr(type(m), "FORWARD_STATE", ())]
    try:
        yield model
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; every module's own mode and forward state come back afterwards."""
    with modes_restored(model), forward_state_restored(model):
        model.eval()
        yield model
