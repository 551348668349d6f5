"""Every module's own train/eval mode comes back after a pass that needs eval mode (a frozen-BN
backbone under a model in train mode stays so), also when the pass fails."""
import pytest
import torch

import mtl
from mtl.modes import eval_mode, modes_restored


def _modes(m):
    return {name: mod.training for name, mod in m.named_modules()}


def _mixed(m):
    m.train()
    m.backbone.eval()  # e.g. a frozen-BN backbone while the heads fine-tune
    return _modes(m)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mtl.create_model(["semseg", "depth"], backbone="test_resnet")


def test_eval_mode_puts_every_module_in_eval_and_restores_each_flag_even_on_error(model):
    before = _mixed(model)
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not any(_modes(model).values())
            raise RuntimeError("boom")
    assert _modes(model) == before
    with modes_restored(model):
        model.train()
    assert _modes(model) == before


@pytest.mark.parametrize("fn", ["count_flops", "model_stats"])
def test_flops_keep_mixed_modes(model, fn):
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    before = _mixed(model)
    getattr(mtl, fn)(model, x)
    assert _modes(model) == before
