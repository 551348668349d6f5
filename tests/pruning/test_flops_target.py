"""flops_target is met in the FLOPs the report counts (torch.utils.flop_counter), attention products
of a ViT included: the search's estimate counts them, and a pruned model short of it is an error."""
import pytest

import pruning
from mtl.flops import count_flops
from pruning.graph import LayerGraph, PruningError

from pruning_toys import toy_batches, toy_model

VIT = {"name": "test_vit", "img_size": 32, "patch_size": 4}


@pytest.fixture(scope="module")
def vit():
    return toy_model(VIT)


def test_vit_estimate_counts_attention_and_equals_the_count(vit):
    x = toy_batches(1)[0]["image"][:2]
    graph = LayerGraph(vit, x)
    assert graph.total_flops() == count_flops(vit, x[:1])
    body = vit.backbone.body.model
    tokens = (32 // 4) ** 2 + body.num_prefix_tokens
    for i, block in enumerate(body.blocks):
        attn = block.attn
        # q·kᵀ and attn·v: N² multiply-adds per head channel each, 2 FLOPs per multiply-add
        want = 2 * 2 * tokens ** 2 * attn.num_heads * attn.head_dim
        assert graph.estimate.attn[f"backbone.body.model.blocks.{i}.attn.qkv"] == want
    qkv, fc1 = "backbone.body.model.blocks.0.attn.qkv", "backbone.body.model.blocks.1.mlp.fc1"
    removed = {qkv: [0], fc1: list(range(0, graph.by_name[fc1].size, 2))}
    pruned, _ = graph.remove(removed)
    assert graph.flops_after({k: set(v) for k, v in removed.items()}) == pytest.approx(count_flops(pruned, x[:1]))


@pytest.mark.parametrize("method,hp", [("taylor", {}), ("l1_global", {}), ("pagcp", {"search_steps": 2})])
def test_vit_flops_target_is_met_in_counted_flops(vit, method, hp):
    pruned, report = pruning.prune(vit, method, calib=toy_batches(1), flops_target=0.5, **hp)
    assert report["flops"]["reduction"] >= 0.5
    x = toy_batches(1)[0]["image"][:1]
    assert 1 - count_flops(pruned, x) / count_flops(vit, x) >= 0.5


def test_a_target_missed_in_counted_flops_is_an_error(monkeypatch):
    """An estimate that promises 10 % more reduction than removal gives: the count tells, and the
    pruned model is not returned as if it met the target."""
    exact = LayerGraph.flops_after
    monkeypatch.setattr(LayerGraph, "flops_after", lambda self, removed: 0.9 * exact(self, removed))
    with pytest.raises(PruningError, match=r"flops_target 50\.0% not met: .* fell by \d+\.\d% only"):
        pruning.prune(toy_model(), "l1", calib=toy_batches(1), flops_target=0.5)
