"""convention="mergekit" against mergekit itself, byte for byte, on small Llama-shaped bf16 models.

Needs mergekit importable (the `mergekit` extra, or `MTL_MERGEKIT_PATH` pointing at a folder holding it
and its dependencies, so the test environment's torch is not replaced).
"""
import os
import sys

import pytest
import torch

import merging
from merging_toys import write_llama

pytestmark = pytest.mark.slow

if os.environ.get("MTL_MERGEKIT_PATH"):
    sys.path[1:1] = os.environ["MTL_MERGEKIT_PATH"].split(os.pathsep)
mergekit = pytest.importorskip("mergekit.merge")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = write_llama(root / "base", seed=0)
    fts = [root / f"ft{i}" for i in range(3)]
    for i, f in enumerate(fts):
        write_llama(f, seed=i + 1, base=base, scale=0.01)
    return root / "base", fts


def _mergekit(tmp_path, method, base, fts, params):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = {
        "merge_method": method, "dtype": "float32", "out_dtype": "bfloat16",
        "models": [{"model": str(f), "parameters": p} for f, p in zip(fts, params)],
    }
    if method != "linear":
        cfg["base_model"] = str(base)
        cfg["models"].insert(0, {"model": str(base)})
    out = tmp_path / f"mk_{method}"
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=True, quiet=True))
    return merging.load_state_dict(out)


CASES = {
    "ties": ([{"density": 0.3, "weight": 1.0}, {"density": 0.5, "weight": 0.7}, {"density": 0.2, "weight": 1.3}],
             dict(density=[0.3, 0.5, 0.2], weight=[1.0, 0.7, 1.3])),
    "task_arithmetic": ([{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.2}], dict(weight=[0.3, 0.5, 0.2])),
    "linear": ([{"weight": 1.0}, {"weight": 0.7}, {"weight": 0.45}], dict(weight=[1.0, 0.7, 0.45])),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_same_bytes_as_mergekit(llamas, tmp_path, method):
    base, fts = llamas
    mk_params, ours = CASES[method]
    want = _mergekit(tmp_path, method, base, fts, mk_params)
    out = merging.merge_to_file(method, base, fts, tmp_path / "ours", convention="mergekit", **ours)
    got = merging.load_state_dict(out)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype == torch.bfloat16, k
        assert torch.equal(got[k].view(torch.int16), v.view(torch.int16)), k


def test_linear_with_a_tiny_weight_sum_gives_mergekits_bytes(llamas, tmp_path):
    """mergekit divides by Σw however small it is (|Σw| = 3.9e-9 here): no refusal, the same bytes."""
    base, fts = llamas
    weights = [1e-9, 2.5e-9, 4e-10]
    want = _mergekit(tmp_path, "linear", base, fts, [{"weight": w} for w in weights])
    got = merging.load_state_dict(merging.merge_to_file("linear", base, fts, tmp_path / "ours", convention="mergekit",
                                                        weight=weights))
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k].view(torch.int16), v.view(torch.int16)), k


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_same_bytes_as_mergekit_per_tensor(llamas, method):
    """mergekit draws DARE's masks from torch's global generator tensor by tensor, in its own tensor
    order; the kernels are compared tensor by tensor from the same generator state."""
    from mergekit.merge_methods.base import TensorEntry, TensorGroup
    from mergekit.merge_methods import registry

    base, fts = llamas
    pre = merging.load_state_dict(base)
    models = [merging.load_state_dict(f) for f in fts]
    mk = registry.get(method)
    weights, densities = [1.0, 0.6, 1.4], [0.5, 0.4, 0.7]
    for key in ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]:
        group = TensorGroup([TensorEntry("base", pre[key].float(), is_base=True)]
                            + [TensorEntry(i, m[key].float()) for i, m in enumerate(models)])
        params = {"weight": dict(enumerate(weights)), "density": dict(enumerate(densities)),
                  "normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False}
        torch.manual_seed(11)
        want = mk.merge_group(group, **params).to(torch.bfloat16)
        torch.manual_seed(11)
        got = merging.merge(method, {key: pre[key]}, [{key: m[key]} for m in models], convention="mergekit",
                            weight=weights, density=densities)[key]
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), key


def _same_bytes_from_one_yaml(cfg, tmp_path):
    """Write `cfg` as a YAML file, run it through mergekit and merge_mergekit_yaml, compare every tensor's bytes."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(path.read_text())), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=True, quiet=True))
    want = merging.load_state_dict(tmp_path / "mk")
    got = merging.load_state_dict(merging.merge_mergekit_yaml(path, tmp_path / "ours"))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("method", sorted(CASES))
def test_a_mergekit_yaml_gives_mergekits_bytes(llamas, tmp_path, method):
    """The same YAML file, run by mergekit and by merging.merge_mergekit_yaml."""
    base, fts = llamas
    cfg = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16",
           "models": [{"model": str(f), "parameters": p} for f, p in zip(fts, CASES[method][0])]}
    if method != "linear":
        cfg["base_model"] = str(base)
        cfg["models"].insert(0, {"model": str(base)})
    _same_bytes_from_one_yaml(cfg, tmp_path)


def test_a_linear_yaml_with_an_unlisted_base_model_gives_mergekits_bytes(llamas, tmp_path):
    """mergekit averages a base model `linear` does not list in as one more input (top-level weight)."""
    base, fts = llamas
    cfg = {"merge_method": "linear", "base_model": str(base), "parameters": {"weight": 0.5},
           "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0}}, {"model": str(fts[1])}]}
    _same_bytes_from_one_yaml(cfg, tmp_path)


def test_a_linear_yaml_with_a_narrower_dtype_gives_mergekits_bytes(tmp_path):
    """mergekit converts every input to `dtype` as it loads it, then sums in float32: float32 models
    under `dtype: bfloat16` are averaged from their bf16-rounded values and the mean rounded to bf16."""
    from merging_toys import write_llama

    fts = [tmp_path / f"ft{i}" for i in range(2)]
    for i, f in enumerate(fts):
        write_llama(f, seed=i + 1, dtype=torch.float32)
    cfg = {"merge_method": "linear", "dtype": "bfloat16", "out_dtype": "float32",
           "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0}},
                      {"model": str(fts[1]), "parameters": {"weight": 0.7}}]}
    _same_bytes_from_one_yaml(cfg, tmp_path)


def test_a_folder_holding_both_weight_sets_gives_mergekits_bytes(llamas, tmp_path):
    """mergekit reads the shards of a folder's model.safetensors.index.json even beside a model.safetensors; a
    recipe's run read model.safetensors (transformers' rule) and merged another model."""
    import json
    import shutil

    base, fts = llamas
    both = tmp_path / "both"
    shutil.copytree(fts[1], both)  # its model.safetensors: ft1; the shard beside it: ft2
    shutil.copy(fts[2] / "model.safetensors", both / "model-00001-of-00001.safetensors")
    keys = merging.load_state_dict(fts[2])
    (both / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    cfg = {"merge_method": "task_arithmetic", "dtype": "float32", "out_dtype": "bfloat16", "base_model": str(base),
           "models": [{"model": str(base)}, {"model": str(fts[0]), "parameters": {"weight": 0.5}},
                      {"model": str(both), "parameters": {"weight": 0.7}}]}
    _same_bytes_from_one_yaml(cfg, tmp_path)
