"""Small mtlkit-shaped state dicts (backbone / decoder / heads, BN buffers) for the merging tests."""
from __future__ import annotations

import copy

import torch
from safetensors.torch import save_file


def make_models(T: int = 3, seed: int = 0, heads: bool = True, dtype=torch.float32, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    pre = {
        "backbone.conv.weight": rnd(8, 3, 3, 3),
        "backbone.bn.weight": rnd(8),
        "backbone.bn.bias": rnd(8),
        "backbone.bn.running_mean": rnd(8),
        "backbone.bn.running_var": torch.rand(8, generator=g).to(dtype) + 0.5,
        "backbone.bn.num_batches_tracked": torch.tensor(100),
        "backbone.blocks.0.weight": rnd(16, 8),
        "backbone.blocks.0.bias": rnd(16),
        "decoder.proj.weight": rnd(12, 16),
    }
    fts = []
    for t in range(T):
        ft = {}
        for k, v in pre.items():
            if v.is_floating_point():
                ft[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype)
            else:
                ft[k] = v + 10 * (t + 1)
        ft["backbone.bn.running_var"] = pre["backbone.bn.running_var"] * (0.5 + torch.rand(8, generator=g)).to(dtype)
        if heads:
            ft[f"heads.task{t}.weight"] = rnd(t + 2, 12)
            ft[f"heads.task{t}.bias"] = rnd(t + 2)
        fts.append(ft)
    return pre, fts


def save_models(tmp_path, pre, fts, folders: bool = True):
    """Write θ0 and the fine-tunes as model folders (model.safetensors inside) or bare files."""
    paths = []
    for name, sd in [("pre", pre)] + [(f"ft{t}", ft) for t, ft in enumerate(fts)]:
        if folders:
            d = tmp_path / name
            d.mkdir()
            save_file(sd, str(d / "model.safetensors"))
            paths.append(d)
        else:
            p = tmp_path / f"{name}.safetensors"
            save_file(sd, str(p))
            paths.append(p)
    return paths[0], paths[1:]


def clone_all(sds):
    return copy.deepcopy(sds)


def assert_same(a: dict, b: dict):
    assert list(a) == list(b) or set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
