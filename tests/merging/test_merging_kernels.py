"""The chunked kernels (`merge_to_file(fused=True)`): bit-identical to the whole-tensor kernels."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging
from merging.kernels import Chunks, fused_kernel
from merging.methods import create_method
from merging.sources import open_source

# A chunk of 1024 entries splits every tensor below into several chunks plus a ragged tail.
SHAPES = {"a.weight": (37, 111), "b.weight": (3001,), "c.weight": (5, 7, 3, 3), "d.bias": (9,), "e.weight": (64, 260)}
CASES = [
    ("task_arithmetic", {"lam": 0.3}),
    ("task_arithmetic", {"lam": [0.2, -0.5, 1.1]}),
    ("average", {}),
    ("ties", {}),
    ("ties", {"trim": "per_tensor", "k": 10}),
    ("ties", {"k": 35, "merge_func": "sum", "lam": 0.7}),
    ("ties", {"trim": "per_tensor", "k": 50, "select": "kthvalue"}),
    ("ties", {"tie_rule": "fusionbench", "k": 30}),
    ("ties", {"tie_rule": "fusionbench", "trim": "per_tensor", "merge_func": "sum"}),
    ("task_arithmetic", {"convention": "mergekit", "weight": [0.3, 1.0, 0.6]}),
    ("task_arithmetic", {"convention": "mergekit", "weight": 0.3, "normalize": True, "lam": 0.8}),
]


def _models(folder, dtype, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    # bf16/fp16-rounded deltas make exact ties in |τ| (the trimming threshold's hard case)
    sds = [pre] + [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(T)]
    paths = []
    for i, sd in enumerate(sds):
        p = folder / f"m{i}.safetensors"
        save_file({k: v.to(dtype) for k, v in sd.items()}, str(p))
        paths.append(p)
    return paths[0], paths[1:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("method,hp", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_fused_equals_whole_tensor_path(method, hp, dtype, tmp_path):
    kwargs = {k: v for k, v in hp.items() if k != "select"}
    assert fused_kernel(create_method(method, **kwargs)) is not None  # the chunked path is the one tested
    pre, fts = _models(tmp_path, dtype)
    whole = merging.merge_to_file(method, pre, fts, tmp_path / "whole.safetensors", fused=False, **hp)
    fused = merging.merge_to_file(method, pre, fts, tmp_path / "fused.safetensors", chunk=1024, threads=1, **hp)
    assert fused.read_bytes() == whole.read_bytes()
    # chunks on three worker threads: the same bytes
    pooled = merging.merge_to_file(method, pre, fts, tmp_path / "pooled.safetensors", chunk=1024, threads=3, **hp)
    assert pooled.read_bytes() == whole.read_bytes()
    out = load_file(str(fused))
    assert out["a.weight"].dtype == dtype and not all(torch.equal(out[k], load_file(str(pre))[k]) for k in SHAPES)


def test_fused_task_arithmetic_formula_and_threads(tmp_path):
    pre, fts = _models(tmp_path, torch.float32, T=2)
    a, b, c = (load_file(str(p)) for p in (pre, *fts))
    out = load_file(str(merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "o.safetensors", lam=0.5,
                                              chunk=1024, threads=2)))
    for k in SHAPES:  # θ0 + λ((θ1 − θ0) + (θ2 − θ0)), the same float32 operations
        assert torch.equal(out[k], a[k] + 0.5 * ((b[k] - a[k]) + (c[k] - a[k])))


def test_fused_mergekit_task_arithmetic_of_one_model(tmp_path):
    pre, fts = _models(tmp_path, torch.float32, T=1)
    a, b = (load_file(str(p)) for p in (pre, *fts))
    out = load_file(str(merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "o.safetensors", chunk=1024,
                                              convention="mergekit", weight=0.5, lam=2.0)))
    for k in SHAPES:  # θ0 + λ w (θ1 − θ0), in mergekit's order of operations
        assert torch.equal(out[k], a[k] + ((b[k] - a[k]) * 0.5) * 2.0)


def test_read_into_matches_slices(tmp_path):
    pre, _ = _models(tmp_path, torch.bfloat16, T=1)
    ref = load_file(str(pre))["e.weight"].reshape(-1)
    src = open_source(pre)
    buf = torch.empty(1000, dtype=torch.bfloat16)
    for start in (0, 1, 999, ref.numel() - 1000):
        assert torch.equal(src.read_into("e.weight", start, buf), ref[start : start + 1000])
    dict_src = open_source(load_file(str(pre)))
    assert torch.equal(dict_src.read_into("e.weight", 7, buf), ref[7:1007])
    transposed = open_source({"w": ref.reshape(64, 260).t()})  # not contiguous
    assert torch.equal(transposed.read_into("w", 5, buf), ref.reshape(64, 260).t().reshape(-1)[5:1005])
    with pytest.raises(IndexError, match="e.weight"):
        src.read_into("e.weight", ref.numel() - 10, buf)
    src.close()


def test_fused_non_finite_input_is_named(tmp_path):
    pre, fts = _models(tmp_path, torch.float32)
    bad = load_file(str(fts[1]))
    bad["e.weight"][40, 7] = math.nan
    save_file(bad, str(fts[1]))
    for method in ("ties", "task_arithmetic"):
        with pytest.raises(merging.MergeInputError, match=r"'e.weight' in .*m2.safetensors has non-finite values \(1 NaN"):
            merging.merge_to_file(method, pre, fts, tmp_path / f"{method}.safetensors", chunk=1024, threads=2)
        assert not (tmp_path / f"{method}.safetensors").exists()


def test_bad_chunk_is_refused(tmp_path):
    pre, fts = _models(tmp_path, torch.float32, T=1)
    with pytest.raises(ValueError, match="chunk"):
        merging.merge_to_file("ties", pre, fts, tmp_path / "o.safetensors", chunk=10)
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(ValueError, match="threads"):
        merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "o.safetensors", threads=0)
    with pytest.raises(ValueError, match="chunk"):
        Chunks(None, chunk=True)
    with pytest.raises(ValueError, match="workers"):
        Chunks(None, workers=0)
    with pytest.raises(ValueError, match="depth"):
        Chunks(None, workers=2, depth=0)


def test_fused_in_memory_inputs_equal_merge(tmp_path):
    g = torch.Generator().manual_seed(5)
    pre = {"w": torch.randn(300, 50, generator=g).t(), "b": torch.randn(3000, generator=g)}  # w not contiguous
    fts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    for method, hp in (("ties", {"trim": "per_tensor"}), ("task_arithmetic", {"lam": 0.4})):
        ref = merging.merge(method, pre, fts, **hp)
        out = load_file(str(merging.merge_to_file(method, pre, fts, tmp_path / f"{method}.safetensors", chunk=1024,
                                                  threads=2, **hp)))
        assert all(torch.equal(out[k], ref[k]) for k in ref)
