"""Root channels tied through another member (GhostNet's cheap branch feeds two channels of a residual
from one index of the primary conv): they form one unit, and removal takes exactly what the plan says."""
import copy

import pytest
import torch
from torch import nn

from pruning.graph import LayerGraph, PruningError

from pruning_toys import GhostResidual, TinyMultiTask


def _model():
    torch.manual_seed(0)
    m = TinyMultiTask(GhostResidual(), {"a": nn.Sequential(nn.Conv2d(6, 2, 1))}).eval()
    for bn in (m.body.stem[1], m.body.ghost.primary[1], m.body.ghost.cheap[1], m.body.dw[1]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m


X = torch.randn(2, 3, 8, 8)


def _conv_flops(cout, cin, k):  # per sample on the 8x8 input: 2 FLOPs per multiply-add
    return 2 * 64 * cout * cin * k * k


def test_tied_channels_form_one_unit_and_removal_takes_exactly_them():
    model = _model()
    graph = LayerGraph(model, X)
    layer = graph.by_name["body.dw.0"]
    # channel j and j + 3 both come from the primary conv's index j: 3 units of 2 channels
    assert (layer.unit, layer.size, layer.channels_per_unit) == ("channel sets", 3, 2)
    assert layer.channel_idxs([0]) == [0, 3]
    pruned, plan = graph.remove({"body.dw.0": [0]})
    body = pruned.body
    assert body.stem[0].out_channels == body.stem[1].num_features == 4
    assert body.ghost.primary[0].in_channels == 4 and body.ghost.primary[0].out_channels == 2
    assert body.ghost.cheap[0].out_channels == body.ghost.cheap[0].groups == 2
    assert body.dw[0].out_channels == body.dw[0].groups == body.dw[1].num_features == 4
    assert pruned.decoder.heads.a[0].in_channels == 4
    assert plan["layers"]["body.dw.0"]["kept"] == [1, 2]
    assert model.body.stem[0].out_channels == 6  # the input model is untouched
    # the estimate against the hand count: stem 3x3 from RGB, primary 1x1, cheap 3x3 depthwise,
    # dw 3x3 depthwise, head 1x1
    full = (_conv_flops(6, 3, 3) + _conv_flops(3, 6, 1) + _conv_flops(3, 1, 3) + _conv_flops(6, 1, 3)
            + _conv_flops(2, 6, 1))
    after = (_conv_flops(4, 3, 3) + _conv_flops(2, 4, 1) + _conv_flops(2, 1, 3) + _conv_flops(4, 1, 3)
             + _conv_flops(2, 4, 1))
    assert graph.total_flops() == full
    assert graph.flops_after({"body.dw.0": {0}}) == pytest.approx(after, rel=1e-12)
    # zeroing the unit's weights computes what removing it computes
    masked = copy.deepcopy(model)
    graph.mask(masked, layer, [0])
    with torch.no_grad():
        torch.testing.assert_close(pruned(X)["a"], masked(X)["a"], rtol=1e-5, atol=1e-6)


def test_a_removal_that_takes_more_than_the_plan_is_an_error(monkeypatch):
    """Without the tie check the layer would list 6 one-channel units; removal must then refuse."""
    from pruning import ties

    monkeypatch.setattr(ties, "untangle", lambda dg, root, name, deps, n, names, dep: (deps, 1))
    graph = LayerGraph(_model(), X)
    assert graph.by_name["body.dw.0"].size == 6
    with pytest.raises(PruningError, match=r"layer 'body.dw.0' removed 2 output channels of 'body.dw.0' "
                                           r"where the plan removes 1"):
        graph.remove({"body.dw.0": [0]})


@pytest.mark.slow
def test_timm_ghostnet_estimate_equals_the_count_and_removal_equals_masking():
    from mtl.flops import count_flops
    from mtl.models import create_model

    from pruning_toys import TASKS, toy_batches

    torch.manual_seed(0)
    model = create_model(TASKS, backbone="ghostnet_050", decoder={"name": "hps", "channels": 8}).eval()
    x = toy_batches(n=1)[0]["image"][:2]
    graph = LayerGraph(model, x)
    assert any(l.unit == "channel sets" for l in graph.layers)
    removed = {l.name: list(range(l.size // 2)) for l in graph.layers}
    pruned, _ = graph.remove(removed)
    estimate = graph.flops_after({k: set(v) for k, v in removed.items()})
    assert estimate == pytest.approx(count_flops(pruned, x[:1]), rel=1e-9)
    masked = copy.deepcopy(model)
    for l in graph.layers:
        graph.mask(masked, l, removed[l.name])
    with torch.no_grad():
        want, got = masked(x), pruned(x)
    for t in want:
        torch.testing.assert_close(got[t], want[t], rtol=1e-4, atol=1e-4)
