"""What pruning covers: frozen parameters are still pruned (and stay frozen); grouped convolutions and
GroupNorm layers are left whole (listed as skipped), never mis-pruned or crashing; slimmable layers and
unusual BatchNorm statistics are refused by name up front; the Taylor score's per-batch sum."""
import copy

import pytest
import torch
from torch import nn

import pruning
from mtl.flops import count_flops
from pruning.graph import LayerGraph, PruningError

from pruning_toys import toy_batches, toy_model


def _removal_equals_masking(model, graph, x) -> None:
    """Removing unit 0 of each layer (of two units or more) computes what zeroing it computes."""
    for layer in graph.layers:
        if layer.size < 2:
            continue
        masked = copy.deepcopy(model)
        graph.mask(masked, layer, [0])
        removed, _ = graph.remove({layer.name: [0]})
        with torch.no_grad():
            want, got = masked.eval()(x), removed.eval()(x)
        for t in want:
            assert torch.allclose(got[t], want[t], atol=1e-4), (layer.name, t)


def test_frozen_parameters_do_not_hide_layers():
    batches = toy_batches()
    x = batches[0]["image"]
    model = toy_model()
    for p in model.backbone.parameters():
        p.requires_grad_(False)  # e.g. left frozen by a probe phase
    layers = {l.name for l in LayerGraph(model, x).layers}
    assert any(n.startswith("backbone.") for n in layers)
    assert all(not p.requires_grad for p in model.backbone.parameters())  # flags restored
    pruned, report = pruning.prune(model, "l1", ratio=0.5, calib=batches)
    assert report["flops"]["after"] < 0.5 * report["flops"]["before"]


@pytest.mark.parametrize("backbone, module_type", [("test_nfnet", nn.Conv2d), ("test_efficientnet_gn", nn.GroupNorm)])
def test_grouped_convs_and_groupnorm_are_skipped_and_removal_equals_masking(backbone, module_type):
    batches = toy_batches()
    x = batches[0]["image"]
    model = toy_model(backbone)
    graph = LayerGraph(model, x)
    assert any(module_type.__name__ in why or "grouped convolution" in why for why in graph.skipped.values())
    pruned, report = pruning.prune(model, "l1", ratio=0.5, calib=batches)
    assert count_flops(pruned, x) < count_flops(model, x)
    assert set(report["rounds"][0]["skipped_layers"]) == set(graph.skipped)
    _removal_equals_masking(model, graph, x)  # every layer that is pruned


def test_a_depthwise_conv_with_a_channel_multiplier_is_left_whole():
    # Conv2d(4, 8, groups=4): input j feeds outputs 2j and 2j+1; treated as depthwise, removal cut its input
    # side to 0 channels and masking zeroed the wrong rows
    from pruning_toys import TinyMultiTask

    body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.ReLU())
    model = TinyMultiTask(body, {"a": nn.Conv2d(8, 2, 1)}).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = LayerGraph(model, x)
    assert [l.name for l in graph.layers] == ["body.0"]
    assert "channel multiplier 2" in graph.skipped["body.3"]
    pruned, report = pruning.prune(model, "l1", example=x, ratio=0.5)
    assert pruned.body[6].weight.shape == (8, 1, 3, 3) and pruned.body[0].weight.shape[0] == 3
    assert "body.3" in report["rounds"][0]["skipped_layers"]
    _removal_equals_masking(model, graph, x)
    alone = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(PruningError, match="left whole: body.0: touches grouped convolution 'body.0'.*multiplier 2"):
        LayerGraph(TinyMultiTask(alone, {"a": nn.Conv2d(8, 2, 1)}).eval(), torch.randn(2, 4, 8, 8))


class _Conv1dBody(nn.Module):
    """Conv2d(3, 6), Conv2d(6, 4), then a grouped Conv1d(4, cout, groups) run along each image row."""

    def __init__(self, cout, groups):
        super().__init__()
        self.pre = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 4, 3, padding=1)
        self.dw = nn.Conv1d(4, cout, 3, padding=1, groups=groups)

    def forward(self, x):
        y = self.a(torch.relu(self.pre(x)))
        n, c, h, w = y.shape
        z = self.dw(y.permute(0, 2, 1, 3).reshape(n * h, c, w))
        return z.reshape(n, h, -1, w).permute(0, 2, 1, 3)


@pytest.mark.parametrize("cout, groups, why", [(8, 4, "multiplier 2"), (4, 2, "groups=2, 4 in, 4 out)")])
def test_a_grouped_conv1d_is_left_whole_like_a_conv2d(cout, groups, why):
    # only nn.Conv2d was checked: a grouped Conv1d was pruned, and its group structure broke the
    # removal (torch: "Given groups=4, weight of size [4, 0, 3] ...")
    from pruning_toys import TinyMultiTask

    torch.manual_seed(0)
    model = TinyMultiTask(_Conv1dBody(cout, groups), {"a": nn.Conv2d(cout, 2, 1)}).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = LayerGraph(model, x)
    assert [l.name for l in graph.layers] == ["body.pre"]
    assert why in graph.skipped["body.a"] and "grouped convolution 'body.dw'" in graph.skipped["body.a"]
    pruned, report = pruning.prune(model, "l1", example=x, ratio=0.5)
    assert pruned.body.dw.weight.shape == model.body.dw.weight.shape
    assert pruned.body.a.weight.shape[0] == 4 and pruned.body.pre.weight.shape[0] < 6
    assert "body.a" in report["rounds"][0]["skipped_layers"]
    _removal_equals_masking(model, graph, x)


def test_taylor_unit_score_is_the_whole_first_order_change_of_its_coupled_weights():
    """Σ|w·∂L/∂w| over the unit's filter, its BN affine and the next conv's input slice — summed as they
    are, not each member divided by its mean (which made every layer's per-task share alike)."""
    from pruning.importance import _member_scores

    batches = toy_batches()
    model = toy_model()
    graph = LayerGraph(model, batches[0]["image"])
    layer = graph.by_name["backbone.body.layer1.0.conv1"]
    task = model.tasks["depth"]
    model.zero_grad()
    task.loss(model(batches[0]["image"], tasks=["depth"])["depth"], batches[0]["depth"]).backward()
    block = model.backbone.body.layer1[0]
    wg = lambda p: (p.detach() * p.grad).abs()  # noqa: E731
    hand = (wg(block.conv1.weight).flatten(1).sum(1) + wg(block.bn1.weight) + wg(block.bn1.bias)
            + wg(block.conv2.weight).transpose(0, 1).flatten(1).sum(1))
    got = _member_scores(layer, model, lambda p: None if p.grad is None else wg(p), per_member_mean=False)
    assert torch.allclose(got, hand, rtol=1e-5)


def _dot_model(seed: int):
    """Linear(4→3) body, Linear(3→1) head of one task whose loss Σ t·y has gradients linear in the target:
    (model, hidden, head, x (5, 4, 1, 1), t (5, 1))."""
    from pruning_toys import TinyMultiTask

    class Dot:
        target_key = "t"

        def loss(self, out, target):
            return (out * target).sum()

    torch.manual_seed(seed)
    hidden, head = nn.Linear(4, 3, bias=False), nn.Linear(3, 1, bias=False)
    model = TinyMultiTask(nn.Sequential(nn.Flatten(), hidden), {"a": nn.Sequential(head)}, {"a": Dot()})
    return model, hidden, head, torch.randn(5, 4, 1, 1), torch.randn(5, 1)


def test_taylor_scores_each_batch_gradient_before_summing():
    """Two batches whose gradients cancel exactly (same images, targets of opposite sign): averaging the
    gradients first scores every unit 0; the per-batch score Σ_b Σ|w·g_b| is the hand formula below."""
    from pruning.importance import taylor_scores

    model, hidden, head, x, t = _dot_model(0)
    batches = [{"image": x, "t": t}, {"image": x, "t": -t}]
    graph = LayerGraph(model, x)
    grad = hidden.weight.grad = torch.ones(3, 4)  # the caller's gradient comes back untouched
    _, per_task = taylor_scores(graph, model, batches)
    assert hidden.weight.grad is grad and torch.equal(grad, torch.ones(3, 4))
    # by hand: L = Σ_i t_i·W2·W1·x_i, so ∂L/∂W1 = W2ᵀ·Σ_i t_i x_iᵀ and ∂L/∂W2 = Σ_i t_i (W1 x_i)ᵀ
    w1, w2, xf = hidden.weight.detach(), head.weight.detach(), x.flatten(1)
    hand = torch.zeros(3)
    for tb in (t, -t):
        g1, g2 = w2.T @ (tb.T @ xf), tb.T @ (xf @ w1.T)
        hand += (w1 * g1).abs().sum(1) + (w2 * g2).abs().sum(0)  # unit u: row u of W1, column u of W2
    torch.testing.assert_close(per_task["a"]["body.1"], hand / hand.sum())


def test_taylor_squared_criterion_squares_each_batch_group_sum():
    """Molchanov et al. (2019): a unit's score is (Σ_s w_s·g_s)² over its whole group, per batch, then
    summed over batches; signed products inside a unit cancel (unlike Σ|w·g|)."""
    from pruning.importance import taylor_scores

    model, hidden, head, x, t = _dot_model(1)
    t2 = torch.randn(5, 1)
    batches = [{"image": x, "t": t}, {"image": x, "t": t2}]
    graph = LayerGraph(model, x)
    _, sq = taylor_scores(graph, model, batches, criterion="squared")
    _, ab = taylor_scores(graph, model, batches, criterion="abs")
    w1, w2, xf = hidden.weight.detach(), head.weight.detach(), x.flatten(1)
    hand_sq, hand_abs = torch.zeros(3), torch.zeros(3)
    for tb in (t, t2):
        g1, g2 = w2.T @ (tb.T @ xf), tb.T @ (xf @ w1.T)
        hand_sq += ((w1 * g1).sum(1) + (w2 * g2).sum(0)) ** 2
        hand_abs += (w1 * g1).abs().sum(1) + (w2 * g2).abs().sum(0)
    torch.testing.assert_close(sq["a"]["body.1"], hand_sq / hand_sq.sum())
    torch.testing.assert_close(ab["a"]["body.1"], hand_abs / hand_abs.sum())
    assert not torch.allclose(sq["a"]["body.1"], ab["a"]["body.1"])
    with pytest.raises(ValueError, match="criterion must be one of"):
        taylor_scores(graph, model, batches, criterion="l2")


def test_taylor_squared_criterion_prunes_through_the_public_api():
    batches = toy_batches()
    pruned, report = pruning.prune(toy_model(), "taylor", ratio=0.3, calib=batches, criterion="squared")
    assert report["flops"]["after"] < report["flops"]["before"]
    with pytest.raises(ValueError, match="criterion"):
        pruning.prune(toy_model(), "taylor", ratio=0.3, calib=batches, criterion="cube")


def test_slimmable_layers_are_refused_by_name_before_any_search():
    """Slimmable layers inside a plain-family model (create_model refuses that pairing; a hand-built
    model can still hold them)."""
    from mtl.models import MultiTaskModel
    from mtl.tasks import create_task

    from pruning_toys import TASKS

    torch.manual_seed(0)
    model = MultiTaskModel([create_task(**t) if isinstance(t, dict) else create_task(t) for t in TASKS],
                           {"name": "slim_resnet", "stem": 8, "channels": [8, 16], "out_indices": [1, 2]},
                           {"name": "hps", "channels": 8}).eval()
    with pytest.raises(PruningError, match=r"'backbone\.stem\.0' \(SlimConv2d\) is a slimmable layer.*"
                                           r"ignored_layers=\['backbone\.stem\.0'\]"):
        LayerGraph(model, toy_batches(1)[0]["image"][:2])


def test_a_batchnorm_with_other_running_statistics_is_refused_by_name():
    """SwitchableBatchNorm2d is a _BatchNorm whose running_mean is None (it keeps one row per width):
    the pruner would fail on it only after the whole search."""
    from mtl.models.slimmable.layers import SwitchableBatchNorm2d

    model = toy_model()
    block = model.backbone.body.layer1[0]
    block.bn1 = SwitchableBatchNorm2d(block.bn1.num_features).eval()
    with pytest.raises(PruningError, match=r"'backbone\.body\.layer1\.0\.bn1' \(SwitchableBatchNorm2d\) keeps running "
                                           r"statistics the pruner does not resize.*ignored_layers="):
        LayerGraph(model, toy_batches(1)[0]["image"][:2])


def test_frozen_parameters_stay_frozen_in_the_pruned_model():
    """Removal replaces each shrunk tensor with a new (trainable) parameter; the flags must survive it,
    also between rounds, where fine-tuning would otherwise train the frozen backbone."""
    model = toy_model()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    frozen_between = []

    def finetune(m):
        frozen_between.append([p.requires_grad for p in m.backbone.parameters()])

    pruned, _ = pruning.prune(model, "l1", ratio=0.5, calib=toy_batches(1), rounds=2, finetune=finetune)
    assert frozen_between and not any(frozen_between[0])
    assert not any(p.requires_grad for p in pruned.backbone.parameters())
    assert all(p.requires_grad for p in pruned.decoder.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())  # the input's flags too


def test_a_vit_with_layerscale_prunes_without_listing_every_block():
    """timm's LayerScale (test_vit2: ls1/ls2 in every block) scales the residual stream, which is never pruned:
    it used to be refused until each block's ls1 and ls2 were passed as ignored_layers."""
    from mtl.models import create_model
    from mtl.tasks import create_task

    torch.manual_seed(0)
    model = create_model([create_task("depth"), create_task("classification")],
                         backbone={"name": "test_vit2", "img_size": 32, "patch_size": 4},
                         decoder={"name": "hps", "channels": 8}).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    graph = LayerGraph(model, x)
    scales = [n for n in graph.skipped if n.endswith((".ls1", ".ls2"))]
    assert len(scales) == 2 * len(model.backbone.body.model.blocks)
    _removal_equals_masking(model, graph, x)  # heads included
