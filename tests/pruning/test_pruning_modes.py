"""Pruning reads the caller's model in eval mode and gives every module its own mode back: a
frozen-BN backbone under a model in train mode stays so, also when pruning fails."""
import pytest
import torch

import pruning
from pruning.calib import task_losses
from pruning.graph import LayerGraph, PruningError

from pruning_toys import toy_batches, toy_model


def _modes(m):
    return {name: mod.training for name, mod in m.named_modules()}


def _mixed(m):
    m.train()
    m.backbone.eval()
    return _modes(m)


@pytest.fixture(scope="module")
def model():
    return toy_model()


@pytest.mark.parametrize("method,hp", [("l1", {"ratio": 0.3}), ("taylor", {"ratio": 0.3})])
def test_prune_keeps_mixed_modes(model, method, hp):
    before = _mixed(model)
    pruning.prune(model, method, calib=toy_batches(1), **hp)
    assert _modes(model) == before


def test_a_failed_prune_and_task_losses_keep_mixed_modes(model):
    batches = toy_batches(1)
    before = _mixed(model)
    with pytest.raises(PruningError):
        pruning.prune(model, "l1", calib=batches, ratio=0.3, ignored_layers=["no.such.layer"])
    assert _modes(model) == before
    task_losses(model, batches)
    assert _modes(model) == before
    with pytest.raises(KeyError):
        task_losses(model, [{"image": batches[0]["image"]}])
    assert _modes(model) == before


@pytest.mark.parametrize("modes", ["train", "mixed"])
def test_layer_graph_leaves_state_and_modes_as_they_were(model, modes):
    before = _mixed(model) if modes == "mixed" else _modes(model.train())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    LayerGraph(model, toy_batches(1)[0]["image"][:2])
    assert _modes(model) == before
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
