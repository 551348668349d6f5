"""FLOPs counting against hand counts (one multiply-add = 2 FLOPs)."""
import torch
from torch import nn

from mtl.flops import count_flops


class _Attn(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        from timm.layers import Attention

        self.attn = Attention(64, num_heads=2)
        self.attn.fused_attn = fused

    def forward(self, x):
        return self.attn(x)


def test_attention_counts_its_matmuls_on_cpu_whatever_the_kernel():
    """On CPU timm's fused attention runs a kernel torch's FLOP registry lacks; it must not count as 0."""
    n, d = 64, 64
    linear = 2 * n * d * (3 * d) + 2 * n * d * d   # qkv and proj
    attention = 2 * (2 * n * n * d)                # Q Kᵀ and A V over both heads
    x = torch.randn(1, n, d)
    for fused in (True, False):
        assert count_flops(_Attn(fused).eval(), x) == linear + attention, fused


def test_a_single_task_may_be_given_by_name():
    import mtl

    model = mtl.create_model(["depth", "semseg"], backbone="test_resnet")
    x = torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)
    assert count_flops(model, x, "depth") == count_flops(model, x, ["depth"]) < count_flops(model, x)
