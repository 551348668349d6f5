"""Input kinds, what merges (key filters, heads, buffers, BN rule), unchanged inputs, and bad input."""
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import merging
from merging_toys import assert_same, clone_all, make_models, save_models

ALL = [
    ("average", {}),
    ("task_arithmetic", {}),
    ("ties", {}),
    ("ties", {"trim": "per_tensor"}),
    ("dare", {"base": "ties"}),
    ("consensus", {}),
]


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_inputs_are_never_modified():
    pre, fts = make_models(T=3)
    pre0, fts0 = clone_all(pre), clone_all(fts)
    for m, hp in ALL:
        merging.merge(m, pre, fts, **hp)
        merging.merge(m, pre, fts, select="radix", **hp)
    merging.tall_masks(pre, fts, mtv="ties")
    merging.task_vector(pre, fts[0])
    assert_same(pre, pre0)
    for a, b in zip(fts, fts0):
        assert_same(a, b)


def test_outputs_share_no_memory_with_inputs():
    pre, fts = make_models(T=2)
    out = merging.merge("task_arithmetic", pre, fts)
    ptrs = {v.data_ptr() for sd in [pre, *fts] for v in sd.values()}
    assert not any(v.data_ptr() in ptrs for v in out.values())


def test_modules_and_parameter_dicts():
    # nn.Modules, and dicts holding nn.Parameters (requires_grad), merge like plain state dicts.
    models = [_mlp(s) for s in range(4)]
    sd = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    ref = merging.merge("ties", sd[0], sd[1:], bn="merge")
    assert_same(merging.merge("ties", models[0], models[1:], bn="merge"), ref)
    params = [dict(m.named_parameters()) for m in models]
    out = merging.merge("task_arithmetic", params[0], params[1:])
    assert all(not v.requires_grad for v in out.values())
    tall = merging.tall_masks(params[0], params[1:])
    assert set(tall.masks[0]) == set(params[0])


def test_all_source_kinds_agree(tmp_path):
    pre, fts = make_models(T=2)
    ref = merging.merge("ties", pre, fts)
    (tmp_path / "f").mkdir()
    (tmp_path / "s").mkdir()
    folder_pre, folder_fts = save_models(tmp_path / "f", pre, fts)
    file_pre, file_fts = save_models(tmp_path / "s", pre, fts, folders=False)
    torch.save(pre, tmp_path / "pre.pt")
    torch.save({"state_dict": fts[0], "epoch": 3}, tmp_path / "ft0.ckpt")  # Lightning-style nesting
    torch.save(fts[1], tmp_path / "ft1.pt")
    # a sharded folder (Hugging Face index)
    sh = tmp_path / "sharded"
    sh.mkdir()
    keys = list(fts[1])
    save_file({k: fts[1][k] for k in keys[:4]}, str(sh / "model-00001-of-00002.safetensors"))
    save_file({k: fts[1][k] for k in keys[4:]}, str(sh / "model-00002-of-00002.safetensors"))
    wm = {k: ("model-00001-of-00002.safetensors" if i < 4 else "model-00002-of-00002.safetensors") for i, k in enumerate(keys)}
    (sh / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    for p, f in [
        (folder_pre, folder_fts),
        (file_pre, file_fts),
        (tmp_path / "pre.pt", [tmp_path / "ft0.ckpt", tmp_path / "ft1.pt"]),
        (str(folder_pre), [fts[0], sh]),
    ]:
        assert_same(merging.merge("ties", p, f), ref)


def test_what_merges_heads_buffers_and_bn_rule():
    pre, fts = make_models(T=3)
    out = merging.merge("task_arithmetic", pre, fts, lam=0.3)
    assert not any(k.startswith("heads.") for k in out)  # task heads are not merged
    assert torch.equal(out["backbone.bn.num_batches_tracked"], pre["backbone.bn.num_batches_tracked"])
    for stat in ("running_mean", "running_var"):  # default bn="pretrained"
        assert torch.equal(out[f"backbone.bn.{stat}"], pre[f"backbone.bn.{stat}"])
    avg = merging.merge("task_arithmetic", pre, fts, bn="average")
    torch.testing.assert_close(avg["backbone.bn.running_var"], sum(f["backbone.bn.running_var"] for f in fts) / 3)
    mer = merging.merge("task_arithmetic", pre, fts, bn="merge", lam=0.3)
    v = "backbone.bn.running_var"
    torch.testing.assert_close(mer[v], pre[v] + 0.3 * sum(f[v] - pre[v] for f in fts), rtol=0, atol=1e-6)
    plan = merging.plan_keys(merging.open_source(pre), [merging.open_source(f) for f in fts])
    assert plan.task_specific[1] == ["heads.task1.weight", "heads.task1.bias"]
    assert plan.kind["backbone.bn.num_batches_tracked"] == "copy"


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "average", "dare", "consensus"])
def test_a_complex_tensor_is_refused_not_copied_from_theta0(method):
    # spectral weights are trained: θ0's value would silently drop the fine-tunes' changes (1+2j here)
    pre = {"w": torch.zeros(2), "spec": torch.zeros(3, dtype=torch.complex64)}
    fts = [{"w": torch.ones(2), "spec": torch.full((3,), 1 + 2j, dtype=torch.complex64)} for _ in range(3)]
    with pytest.raises(merging.MergeInputError, match=r"'spec' is a complex64 tensor in .*exclude"):
        merging.merge(method, pre, fts)
    out = merging.merge("task_arithmetic", pre, fts, lam=0.5, exclude="spec")
    assert list(out) == ["w"] and torch.equal(out["w"], torch.full((2,), 1.5))


def test_an_output_file_that_is_an_input_is_called_a_file(tmp_path):
    pre, fts = make_models(T=2)
    pre_f, ft_fs = save_models(tmp_path, pre, fts, folders=False)
    with pytest.raises(ValueError, match=r"is the input file .*; write the result elsewhere"):
        merging.merge_to_file("task_arithmetic", pre_f, ft_fs, ft_fs[0], overwrite=True)


@pytest.mark.parametrize("fused", [True, False])
def test_bn_merge_refuses_a_negative_merged_variance(tmp_path, fused):
    # θ0 has variance 1, both fine-tunes 0.1: λ = 1 gives 1 + 2·(0.1 − 1) = −0.8, which BatchNorm turns into NaN
    pre, fts = make_models(T=2)
    v = "backbone.bn.running_var"
    pre[v] = torch.ones_like(pre[v])
    for f in fts:
        f[v] = torch.full_like(f[v], 0.1)
    with pytest.raises(merging.MergeInputError, match=r"bn='merge' gives the BatchNorm variance 'backbone.bn.running_var' negative.*-0.8"):
        merging.merge("task_arithmetic", pre, fts, bn="merge", lam=1.0)
    pre_f, ft_fs = save_models(tmp_path, pre, fts, folders=False)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(merging.MergeInputError, match="negative"):
        merging.merge_to_file("task_arithmetic", pre_f, ft_fs, out, bn="merge", lam=1.0, fused=fused)
    assert not out.exists()  # no half-written output
    ok = merging.merge("task_arithmetic", pre, fts, bn="merge", lam=0.5)  # 1 − 0.9 = 0.1: fine
    torch.testing.assert_close(ok[v], torch.full_like(ok[v], 0.1))


def test_include_exclude_filters():
    pre, fts = make_models(T=2)
    bb = merging.merge("average", pre, fts, include="backbone.")
    assert bb and all(k.startswith("backbone.") for k in bb)
    no_dec = merging.merge("average", pre, fts, exclude=[r"decoder\.", r".*\.bias$"])
    assert "decoder.proj.weight" not in no_dec and not any(k.endswith(".bias") for k in no_dec)
    assert "backbone.conv.weight" in no_dec
    only = merging.merge("average", pre, fts, include=lambda k: k == "decoder.proj.weight")
    assert list(only) == ["decoder.proj.weight"]
    with pytest.raises(merging.MergeInputError, match="nothing to merge"):
        merging.merge("average", pre, fts, include="nothing.")


def test_compose_attaches_each_task_head():
    pre, fts = make_models(T=2)
    merged = merging.merge("task_arithmetic", pre, fts)
    full = merging.compose(merged, fts[1])
    assert set(full) == set(fts[1])
    assert torch.equal(full["heads.task1.weight"], fts[1]["heads.task1.weight"])
    assert torch.equal(full["backbone.conv.weight"], merged["backbone.conv.weight"])


def test_task_vector_and_apply():
    pre, fts = make_models(T=1)
    tau = merging.task_vector(pre, fts[0])
    assert "heads.task0.weight" not in tau and "backbone.bn.num_batches_tracked" not in tau
    torch.testing.assert_close(tau["backbone.conv.weight"], fts[0]["backbone.conv.weight"] - pre["backbone.conv.weight"])
    back = merging.apply_task_vector(pre, tau, lam=1.0)
    torch.testing.assert_close(back["backbone.conv.weight"], fts[0]["backbone.conv.weight"], rtol=0, atol=1e-6)


def test_apply_task_vector_checks_its_inputs_as_a_merge_does():
    """It returned NaN for λ = NaN, Inf for an fp16 overflow, a raw torch size error naming no key, and
    'argument alpha must be Number' for a list."""
    pre = {"w": torch.full((6,), 100.0, dtype=torch.float16), "steps": torch.tensor(3)}
    tau = {"w": torch.ones(6)}
    got = merging.apply_task_vector(pre, tau, lam=np.float32(0.5))  # θ0 + λτ, by hand
    assert got["w"].dtype == torch.float16 and got["w"].tolist() == [100.5] * 6 and got["steps"] == 3
    # a 0-d tensor (a learned coefficient) is a number too, as torch.add's alpha took it before these checks
    assert merging.apply_task_vector(pre, tau, lam=torch.tensor(0.5))["w"].tolist() == [100.5] * 6
    for lam, match in ((float("nan"), r"^lam must be a finite number, got nan$"), ("x", r"^lam must be a finite number"),
                       ([0.1, 0.2], r"^lam must be one finite number \(one λ for one task vector; one λ per model: "
                                    r"merging.merge\('task_arithmetic', ..., lam=\[...\]\)\), got \[0.1, 0.2\]$")):
        with pytest.raises(ValueError, match=match):
            merging.apply_task_vector(pre, tau, lam=lam)
    with pytest.raises(merging.MergeInputError, match=r"^task vector and pretrained model do not match: 'w' has shape "
                                                      r"\(6\) in pretrained but \(5\) in the task vector$"):
        merging.apply_task_vector(pre, {"w": torch.ones(5)})
    with pytest.raises(merging.MergeInputError, match=r"'head.w' is in the task vector but missing from pretrained"):
        merging.apply_task_vector(pre, {**tau, "head.w": torch.ones(2)})
    big = {"w": torch.full((6,), 65500.0)}  # 65600 > fp16's 65504
    with pytest.raises(merging.MergeInputError, match=r"^θ0 \+ λ·τ tensor 'w' overflowed \(inputs are finite\): its "
                                                      r"values exceed what torch.float16 holds"):
        merging.apply_task_vector(pre, big)
    assert torch.isinf(merging.apply_task_vector(pre, big, check_finite=False)["w"]).all()  # asked for: written
    with pytest.raises(merging.MergeInputError, match=r"tensor 'w' in the task vector has non-finite values \(1 NaN, 0 Inf\)"):
        merging.apply_task_vector(pre, {"w": torch.tensor([float("nan"), 0, 0, 0, 0, 0])})
    with pytest.raises(merging.MergeInputError, match=r"tensor 'w' in pretrained has non-finite values \(0 NaN, 1 Inf\)"):
        merging.apply_task_vector({"w": torch.tensor([float("inf"), 0.0])}, {"w": torch.ones(2)})


@pytest.mark.parametrize("tau_dtype", [torch.bfloat16, torch.float16])
def test_apply_task_vector_does_not_round_theta0_to_a_narrower_task_vector(tau_dtype):
    """θ0 was cast to τ's dtype before the sum: a bf16/fp16 τ of zeros changed a float32 θ0 (1.0001 -> 1.0)."""
    pre = {"w": torch.tensor([1.0001, 3.0001]), "h": torch.tensor([2.0, 4.0], dtype=torch.float16)}
    got = merging.apply_task_vector(pre, {"w": torch.zeros(2, dtype=tau_dtype), "h": torch.zeros(2)}, lam=1.0)
    assert torch.equal(got["w"], pre["w"]) and torch.equal(got["h"], pre["h"]) and got["h"].dtype == torch.float16
    step = merging.apply_task_vector(pre, {"w": torch.full((2,), 0.5, dtype=tau_dtype)}, lam=2.0)["w"]
    assert torch.equal(step, pre["w"] + 1.0) and step.dtype == torch.float32


def test_apply_task_vector_keeps_theta0_for_an_integer_entry_as_a_merge_does():
    """An integer key in τ (BatchNorm's num_batches_tracked) failed in torch.add with a RuntimeError naming no key."""
    pre = {"w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(7)}
    got = merging.apply_task_vector(pre, {"w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(3)}, lam=0.5)
    assert got["w"].tolist() == [1.5, 1.5] and got["bn.num_batches_tracked"].item() == 7



def test_apply_task_vector_takes_a_float8_task_vector():
    """A τ stored in float8_e4m3fn (as its θ0) is added in float32: torch has no float8 addition."""
    e4 = torch.float8_e4m3fn
    pre, tau = {"w": torch.full((4,), 96.0, dtype=e4)}, {"w": torch.full((4,), 16.0, dtype=e4)}
    got = merging.apply_task_vector(pre, tau, lam=0.5)["w"]
    assert got.dtype == e4 and got.float().tolist() == [104.0] * 4
    with pytest.raises(merging.MergeInputError, match=r"θ0 \+ λ·τ tensor 'w' overflowed"):
        merging.apply_task_vector(pre, {"w": torch.full((4,), 448.0, dtype=e4)})

# -- bad input ----------------------------------------------------------------------------------------
def test_shape_mismatch_lists_key_and_files(tmp_path):
    pre, fts = make_models(T=2, heads=False)
    fts[1]["decoder.proj.weight"] = torch.zeros(12, 17)
    pre_dir, ft_dirs = save_models(tmp_path, pre, fts)
    with pytest.raises(merging.MergeInputError) as e:
        merging.merge("average", pre_dir, ft_dirs)
    msg = str(e.value)
    assert "decoder.proj.weight" in msg and "(12, 16)" in msg and "(12, 17)" in msg
    assert str(pre_dir / "model.safetensors") in msg and str(ft_dirs[1] / "model.safetensors") in msg


def test_missing_key_lists_files_and_skip_option(caplog):
    pre, fts = make_models(T=2, heads=False)
    del fts[0]["backbone.blocks.0.bias"]
    with pytest.raises(merging.MergeInputError, match=r"'backbone.blocks.0.bias' is in pretrained but missing from finetuned\[0\]"):
        merging.merge("task_arithmetic", pre, fts)
    with caplog.at_level("INFO", logger="merging.keys"):
        out = merging.merge("task_arithmetic", pre, fts, unshared="skip")
    assert "backbone.blocks.0.bias" not in out and "backbone.blocks.0.weight" in out
    assert "unshared='skip': 1 key(s) not in every model left out of the merge: backbone.blocks.0.bias" in caplog.text


def test_mtl_merge_eval_none_says_the_skipped_keys_once(tmp_path, caplog):
    """The header check before the run folder planned the keys as the merge does, and both logged the keys
    unshared=skip leaves out: the line came twice (console and merge.log). The merge says it."""
    from merging.job import run

    pre, fts = make_models(T=2, heads=False)
    del fts[0]["backbone.blocks.0.bias"]
    pre_dir, ft_dirs = save_models(tmp_path, pre, fts)
    with caplog.at_level("INFO", logger="merging.keys"):
        run(["eval=none", "merge=task_arithmetic", "merge.lam=0.3", "+merge.unshared=skip", f"pretrained={pre_dir}",
             f"models=[{ft_dirs[0]},{ft_dirs[1]}]", f"output={tmp_path / 'out'}"], run_dir=tmp_path / "run")
    said = [r.getMessage() for r in caplog.records if "not in every model left out" in r.getMessage()]
    assert said == ["unshared='skip': 1 key(s) not in every model left out of the merge: backbone.blocks.0.bias"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_name_tensor_and_file(tmp_path, bad):
    pre, fts = make_models(T=2)
    fts[1]["backbone.blocks.0.weight"][3, 2] = bad
    pre_dir, ft_dirs = save_models(tmp_path, pre, fts)
    for method in ("task_arithmetic", "ties", "consensus"):
        with pytest.raises(merging.MergeInputError, match="non-finite") as e:
            merging.merge_to_file(method, pre_dir, ft_dirs, tmp_path / "out")
        assert "backbone.blocks.0.weight" in str(e.value) and str(ft_dirs[1]) in str(e.value)
        assert not (tmp_path / "out").exists()
    with pytest.raises(merging.MergeInputError, match="NaN" if bad != bad else "Inf"):
        merging.merge("average", pre, fts)


def test_too_few_models_and_wrong_container():
    pre, fts = make_models(T=2)
    with pytest.raises(merging.MergeInputError, match="at least 1"):
        merging.merge("ties", pre, [])
    with pytest.raises(merging.MergeInputError, match="at least 3"):
        merging.merge("consensus", pre, fts, k=3)
    with pytest.raises(TypeError, match="list of models"):
        merging.merge("average", pre, "some/folder")
    with pytest.raises(TypeError, match="list of models"):
        merging.merge("average", pre, fts[0])


def test_unreadable_inputs(tmp_path):
    pre, fts = make_models(T=1)
    with pytest.raises(merging.MergeInputError, match="no such file"):
        merging.merge("average", pre, [tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(merging.MergeInputError, match="model.safetensors"):
        merging.merge("average", pre, [tmp_path / "empty"])
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(merging.MergeInputError, match="safetensors"):
        merging.merge("average", pre, [tmp_path / "junk.safetensors"])
    with pytest.raises(merging.MergeInputError, match="not a tensor"):
        merging.merge("average", pre, [{"a": 3}])


def _run_folder(root, name):
    """A training run's folder as mtl-train (and mtl-merge debug=smoke's pool) leaves it: the model in model/."""
    (root / name / "model").mkdir(parents=True)
    (root / name / "model" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, root / name / "model" / "model.safetensors")
    return root / name


def test_a_run_folder_input_points_to_its_model_folder_as_load_model_does(tmp_path):
    pre, ft = _run_folder(tmp_path, "pretrained"), _run_folder(tmp_path, "semseg")
    hint = f"{pre} is a run folder, not a model folder; did you mean {pre / 'model'}?"
    with pytest.raises(merging.MergeInputError, match=f"^{re.escape(hint)}$"):
        merging.merge("task_arithmetic", pre, [ft])
    with pytest.raises(merging.MergeInputError, match=f"^{ft} is a run folder.*did you mean {ft / 'model'}"):
        merging.merge("task_arithmetic", pre / "model", [ft])


@pytest.mark.parametrize("extra", [[], ["eval=none"]])
def test_mtl_merge_refuses_a_run_folder_input_in_the_same_words_before_its_run_folder(tmp_path, extra):
    from merging.job import run

    pre, ft = _run_folder(tmp_path, "pretrained"), _run_folder(tmp_path, "semseg")
    with pytest.raises(ValueError, match=f"^pretrained: {re.escape(str(pre))} is a run folder, not a model folder; "
                                         f"did you mean {re.escape(str(pre / 'model'))}\\?$"):
        run(["merge=task_arithmetic", f"pretrained={pre}", f"models=[{ft}]", *extra], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bin_checkpoint_folders_say_what_to_do(tmp_path):
    """A folder of pytorch_model.bin: its file path is the way in; sharded .bin folders are not read."""
    pre, fts = make_models(T=1)
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    one.mkdir()
    sharded.mkdir()
    torch.save(fts[0], one / "pytorch_model.bin")
    torch.save(fts[0], sharded / "pytorch_model-00001-of-00001.bin")
    (sharded / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: "pytorch_model-00001-of-00001.bin" for k in fts[0]}}))
    with pytest.raises(merging.MergeInputError, match=f"{one}: found pytorch_model.bin but no model.safetensors: "
                                                      f"pass the file path {one / 'pytorch_model.bin'}, or convert"):
        merging.merge("average", pre, [one])
    with pytest.raises(merging.MergeInputError, match=f"{sharded}: found sharded pytorch_model-.*not supported; convert"):
        merging.merge("average", pre, [sharded])
    assert_same(merging.merge("average", pre, [one / "pytorch_model.bin"]), merging.merge("average", pre, [fts[0]]))


def test_truncated_safetensors_input_names_the_file(tmp_path):
    """A truncated copy is refused when opened, naming the file (safetensors' own error did not)."""
    pre, fts = make_models(T=2)
    pre_dir, ft_dirs = save_models(tmp_path, pre, fts)
    weights = ft_dirs[0] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    want = rf"{weights}: truncated safetensors file: its header needs {len(data)} bytes, the file has {len(data) // 2}"
    for run in (lambda: merging.merge("ties", pre_dir, ft_dirs),
                lambda: merging.merge_to_file("task_arithmetic", pre_dir, ft_dirs, tmp_path / "out"),
                lambda: merging.tall_masks(pre_dir, ft_dirs),
                lambda: merging.write_tall_store(pre_dir, ft_dirs, tmp_path / "store")):
        with pytest.raises(merging.MergeInputError, match=want):
            run()
    store = merging.write_tall_store(pre, fts, tmp_path / "good")
    data = store.read_bytes()
    store.write_bytes(data[:-8])
    with pytest.raises(merging.MergeInputError, match=rf"{store}: truncated safetensors file"):
        merging.load_task_model(store, 0)


def test_malformed_safetensors_header_entry_names_file_and_tensor(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(merging.MergeInputError, match=rf"{path}: tensor 'w' has a malformed header entry"):
        merging.merge("average", {"w": torch.zeros(2)}, [path])


def test_negative_tall_lambda_is_refused_by_consensus_as_by_tall_masks():
    pre, fts = make_models(T=2)
    for lam in (-0.1, [0.3, -1]):
        with pytest.raises(ValueError, match=r"tall_lam must be ≥ 0"):
            merging.merge("consensus", pre, fts, tall_lam=lam)
        with pytest.raises(ValueError, match=r"lam must be ≥ 0"):
            merging.tall_masks(pre, fts, lam=lam)


def test_an_edited_model_folder_is_refused_as_load_model_refuses_it(tmp_path):
    """A save_model file records a digest of its tensors: an edited copy (header kept) used as θ0 or as a
    member of a streaming merge is refused naming the file, never merged into a silently wrong model."""
    from safetensors import safe_open

    import mtl
    from mtl.io import ModelFolderError, load_state

    torch.manual_seed(0)
    model = mtl.create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    good = mtl.save_model(model, tmp_path / "good")
    import shutil

    bad = tmp_path / "edited"
    shutil.copytree(good, bad)
    with safe_open(str(bad / "model.safetensors"), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state["backbone.body.conv1.0.weight"] = state["backbone.body.conv1.0.weight"] + 0.5
    save_file(state, str(bad / "model.safetensors"), metadata=meta)
    want = rf"{bad / 'model.safetensors'}: weights differ from the digest in its header"
    for pre, fts in ((bad, [good]), (good, [bad])):
        with pytest.raises(merging.MergeInputError, match=want):
            merging.merge("task_arithmetic", pre, fts)
        out = tmp_path / "out"
        with pytest.raises(merging.MergeInputError, match=want):
            merging.merge_to_file("task_arithmetic", pre, fts, out)
        assert not out.exists()
    with pytest.raises(ModelFolderError, match=want):
        load_state(bad)
    shutil.copytree(good, tmp_path / "copy")  # θ0 itself as a fine-tune is refused: its copy stands in
    assert merging.merge("task_arithmetic", good, [tmp_path / "copy"])  # the untouched folder still merges


def _raw_safetensors(path, header, data: bytes):
    """A safetensors file written byte by byte, with any header (the format: 8-byte LE length + JSON + data)."""
    import struct

    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("entries, extra, why", [
    ('"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}',
     b"", r"tensor 'b' \(data_offsets \[0, 16\]\) overlaps the tensor before it"),
    ('"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 32]}',
     b"", r"tensor 'a' has data_offsets \[0, 8\] \(8 bytes\) but its shape \[4\] and dtype need 16"),
    ('"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}',
     b"", r"tensor 'a' has a malformed header entry"),
    ('"a": {"dtype": "F32", "shape": [4], "data_offsets": [-8, 8]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}',
     b"", r"tensor 'a' has a malformed header entry"),
    ('"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}, '
     '"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}', b"", r"tensor 'a' is listed twice in the safetensors header"),
    ('"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}',
     b"\0" * 8, r"8 bytes after the last tensor"),
    ('"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}',
     b"\0" * 8, r"tensor 'b' \(data_offsets \[24, 40\]\) leaves a gap at byte 16"),
    *((f'"__metadata__": {meta}, "a": {{"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, '
       '"b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}', b"",
       r"not a valid safetensors file: its header's __metadata__ must be an object mapping names to strings")
      for meta in ('"x"', "5", '{"k": 5}', "[]", "0", "false", '""')),  # falsy ones were taken for {}
])
def test_a_malformed_safetensors_header_is_refused_by_every_reader(tmp_path, entries, extra, why):
    """Offsets that would hand one tensor another's (or the header's) bytes: refused naming the file and
    tensor by the streaming reader, which `pread`s without safe_open, as safe_open refuses them."""
    pre = {"a": torch.zeros(4), "b": torch.zeros(4)}
    good = tmp_path / "pre.safetensors"
    save_file(pre, str(good))
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes() + extra
    bad = _raw_safetensors(tmp_path / "bad.safetensors", ("{" + entries + "}").encode(), data[:40])
    for run in (lambda: merging.merge_to_file("task_arithmetic", good, [bad], tmp_path / "out", lam=1.0),
                lambda: merging.merge_to_file("ties", good, [bad], tmp_path / "out", lam=1.0),
                lambda: merging.merge("task_arithmetic", good, [bad], lam=1.0)):
        with pytest.raises(merging.MergeInputError, match=rf"{bad}: .*{why}"):
            run()
        assert not (tmp_path / "out").exists()


def test_a_malformed_shard_index_is_refused_naming_it(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": torch.zeros(2)}, str(folder / "s1.safetensors"))
    index = folder / "model.safetensors.index.json"
    for weight_map, why in [([["a", "s1.safetensors"]], "\"weight_map\" must map tensor names to shard file names"),
                            (None, "\"weight_map\" must map"), ({"a": 1}, "\"weight_map\" must map"),
                            ({"a": "../s1.safetensors"}, "shard file '../s1.safetensors' lies outside the index's folder"),
                            ({"a": str(folder / "s1.safetensors")}, "lies outside the index's folder")]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(merging.MergeInputError, match=rf"{index}: .*{why}"):
            merging.merge("average", {"a": torch.zeros(2)}, [folder])


def test_a_shard_that_is_a_folder_is_called_a_folder_not_missing(tmp_path):
    """A shard path that is a folder (in the index's weight_map, or given itself) was said not to exist, or to be a
    model folder without model.safetensors."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": torch.zeros(2)}, str(folder / "model-00001-of-00002.safetensors"))
    (folder / "model-00002-of-00002.safetensors").mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    pre = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(merging.MergeInputError, match=rf"^{index}: shard file model-00002-of-00002\.safetensors "
                                                      r"listed in the index is a folder, not a file$"):
        merging.merge("average", pre, [folder])
    shard = folder / "model-00002-of-00002.safetensors"
    with pytest.raises(merging.MergeInputError, match=rf"^{shard} is a folder, not a file$"):
        merging.merge("average", pre, [shard])


def _hf_cache_revision(cache, rev, shards, index_blob):
    """snapshots/<rev>/ as the Hugging Face cache lays it out: links into blobs/, one per file."""
    snap = cache / "snapshots" / rev
    snap.mkdir(parents=True)
    for i, tensors in enumerate(shards):
        blob = cache / "blobs" / f"{rev}-{i}"
        save_file(tensors, str(blob))
        (snap / f"model-0000{i + 1}-of-0000{len(shards)}.safetensors").symlink_to(blob)
    (snap / "model.safetensors.index.json").symlink_to(index_blob)
    return snap


def test_two_cache_revisions_sharing_one_index_blob_are_two_models(tmp_path):
    """Two revisions of a sharded repo often have byte-identical indexes, stored as one blob both link to: they were
    refused as one model ('finetuned[1] ... is finetuned[0] ... again'), compared on the index, not the shards."""
    cache = tmp_path / "hub"
    (cache / "blobs").mkdir(parents=True)
    index = cache / "blobs" / "index"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    pre = {"a": torch.zeros(2), "b": torch.zeros(2)}
    revs = [_hf_cache_revision(cache, f"rev{r}", [{"a": torch.full((2,), r + 1.0)}, {"b": torch.full((2,), -r - 1.0)}],
                               index) for r in range(2)]
    merged = merging.merge("task_arithmetic", pre, revs, lam=1.0)
    assert torch.equal(merged["a"], torch.full((2,), 3.0)) and torch.equal(merged["b"], torch.full((2,), -3.0))
    # one revision reached twice (a link to its snapshot folder) is still one model
    (tmp_path / "again").symlink_to(revs[0])
    with pytest.raises(merging.MergeInputError, match=r"^finetuned\[1\] .* is finetuned\[0\] .* again"):
        merging.merge("task_arithmetic", pre, [revs[0], tmp_path / "again"], lam=1.0)


def test_a_header_length_past_the_end_of_the_file_names_the_file(tmp_path):
    """The data was read (and parsed) as the header: 'Unterminated string' or a utf-8 decode error, no file named."""
    import struct

    good = tmp_path / "pre.safetensors"
    save_file({"a": torch.zeros(4)}, str(good))
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", n + 1000) + data[8:])
    with pytest.raises(merging.MergeInputError, match=rf"{bad}: truncated or not a safetensors file: its header length "
                                                      rf"{n + 1000} runs past the end of the file \({len(data)} bytes\)"):
        merging.merge("task_arithmetic", good, [bad], lam=1.0)
    with pytest.raises(merging.MergeInputError, match=rf"{bad}: truncated or not a safetensors file"):
        merging.merge_to_file("task_arithmetic", good, [bad], tmp_path / "out", lam=1.0)
    assert not (tmp_path / "out").exists()



def test_a_safetensors_header_nested_too_deep_names_the_file(tmp_path):
    """A header of '[' * 200000 raised a raw RecursionError from json.loads."""
    good = tmp_path / "pre.safetensors"
    save_file({"a": torch.zeros(4)}, str(good))
    bad = _raw_safetensors(tmp_path / "bad.safetensors", ("[" * 200_000 + "]" * 200_000).encode(), b"")
    with pytest.raises(merging.MergeInputError, match=rf"{bad}: cannot read safetensors header: maximum recursion depth"):
        merging.merge("task_arithmetic", good, [bad], lam=1.0)


class _Evil:
    def __reduce__(self):
        import os

        return (os.getpid, ())


def test_a_pickle_beyond_tensors_is_refused_naming_file_and_global(tmp_path):
    """torch's refusal began with its advice to rerun with weights_only=False, and the reason (the blocked global)
    was cut off; one line names the file and the global now, with no such advice."""
    pre = tmp_path / "pre.pt"
    torch.save({"a": torch.zeros(2)}, pre)
    evil = tmp_path / "evil.pt"
    torch.save({"a": torch.zeros(2), "b": _Evil()}, evil)
    with pytest.raises(merging.MergeInputError) as e:
        merging.merge("task_arithmetic", pre, [evil], lam=1.0)
    assert str(e.value) == (f"{evil}: refused, it needs unpickling beyond tensors and plain data (unsupported GLOBAL "
                            "posix.getpid; a weights-only torch.load blocks it)")


def test_a_text_file_given_as_a_checkpoint_is_said_to_be_no_checkpoint(tmp_path):
    """Every UnpicklingError read as a blocked global: a text file (its 'n' is no pickle opcode) was 'refused, it
    needs unpickling beyond tensors' (Unsupported operand 110); only an unsupported global means that."""
    pre = tmp_path / "pre.pt"
    torch.save({"a": torch.zeros(2)}, pre)
    text = tmp_path / "x.ckpt"
    text.write_text("not a ckpt\n")
    with pytest.raises(merging.MergeInputError) as e:
        merging.merge("task_arithmetic", pre, [text], lam=1.0)
    assert str(e.value) == f"{text}: not a PyTorch/Lightning checkpoint (Unsupported operand 110)"


@pytest.mark.parametrize("bad, why", [
    ({"a": torch.zeros(2, 2).to_sparse()}, r"tensor 'a' is torch.sparse_coo; merges take dense tensors"),
    ({"a": torch.zeros(2, 2), 3: torch.zeros(2)}, r"keys must be strings \(tensor names\); key 3 is a int"),
])
def test_a_torch_file_with_a_sparse_tensor_or_a_non_string_key_names_file_and_key(tmp_path, bad, why):
    """Raw 'add(sparse, dense) is not supported' and 'expected string or bytes-like object, got 'int''."""
    pre = tmp_path / "pre.pt"
    torch.save({"a": torch.zeros(2, 2)}, pre)
    ft = tmp_path / "ft.pt"
    torch.save(bad, ft)
    with pytest.raises(merging.MergeInputError, match=rf"^{ft}: {why}"):
        merging.merge("task_arithmetic", pre, [ft], lam=1.0)
    with pytest.raises(merging.MergeInputError, match=rf"^{ft}: {why}"):
        merging.merge_to_file("task_arithmetic", pre, [ft], tmp_path / "out", lam=1.0)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_more_inputs_than_open_files_allowed_says_to_raise_ulimit(tmp_path):
    """merge_to_file holds every input open: past `ulimit -n` it failed with a bare Errno 24."""
    import resource

    files = []
    for i in range(40):
        files.append(tmp_path / f"{i}.safetensors")
        save_file({"a": torch.full((4,), float(i))}, str(files[-1]))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 20, hard))
    try:
        with pytest.raises(OSError, match=r"too many open files \(\d+ allowed\) opening .*: a streaming merge holds every "
                                          r"input open at once; raise the limit \(ulimit -n\)"):
            merging.merge_to_file("task_arithmetic", files[0], files[1:], tmp_path / "out.safetensors", lam=0.1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not (tmp_path / "out.safetensors").exists()


def test_mtl_merge_names_an_input_that_will_not_open_before_its_run_folder(tmp_path, monkeypatch):
    """eval=none reads any weights: an input that exists but cannot be read (a file without read permission, a
    folder named like a checkpoint) was found by the merge, after the run folder; now it is named before it."""
    import builtins

    from merging.job import run

    pre, fts = make_models(T=2)
    torch.save(pre, tmp_path / "base.pt")
    torch.save(fts[0], tmp_path / "a.pt")
    (tmp_path / "x.ckpt").mkdir()
    args = ["eval=none", "merge=task_arithmetic", f"pretrained={tmp_path / 'base.pt'}",
            f"output={tmp_path / 'out.safetensors'}"]
    with pytest.raises(merging.MergeInputError, match=rf"^models: {tmp_path / 'x.ckpt'} is a folder, not a file$"):
        run([*args, f"models=[{tmp_path / 'a.pt'},{tmp_path / 'x.ckpt'}]"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()

    real_open = builtins.open  # tests run as root, who reads a chmod 000 file: its PermissionError, simulated

    def no_read(file, *a, **k):
        if str(file) == str(tmp_path / "a.pt"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", no_read)
    with pytest.raises(merging.MergeInputError, match=rf"^models: {tmp_path / 'a.pt'}: cannot be read "
                                                      r"\(Permission denied\)$"):
        run([*args, f"models=[{tmp_path / 'a.pt'}]"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("kind", ["missing_shard", "empty_folder_weights", "empty_safetensors", "text_file"])
def test_mtl_merge_names_an_input_that_is_not_what_its_name_says_before_its_run_folder(tmp_path, kind):
    """check_readable only opened the file: a shard index naming a missing shard, a 0-byte safetensors file or a
    text file given as a checkpoint were found by the merge after start_run, leaving a FAILED run folder."""
    from merging.job import run

    pre, fts = make_models(T=1)
    torch.save(pre, tmp_path / "base.pt")
    torch.save(fts[0], tmp_path / "a.pt")
    bad, want = tmp_path / "bad", ""
    if kind == "missing_shard":
        bad.mkdir()
        save_file({k: v.contiguous() for k, v in fts[0].items()}, str(bad / "model-00001-of-00002.safetensors"))
        weight_map = {k: "model-00001-of-00002.safetensors" for k in fts[0]} | {"extra": "model-00002-of-00002.safetensors"}
        (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        want = r"model.safetensors.index.json: shard file\(s\) model-00002-of-00002.safetensors listed in the index do not exist"
    elif kind == "empty_folder_weights":
        bad.mkdir()
        (bad / "model.safetensors").write_bytes(b"")
        want = "model.safetensors: cannot read safetensors header"
    elif kind == "empty_safetensors":
        bad = tmp_path / "empty.safetensors"
        bad.write_bytes(b"")
        want = "empty.safetensors: cannot read safetensors header"
    else:
        bad = tmp_path / "model.txt"
        bad.write_text("not weights\n")
        want = r"model.txt: not a PyTorch/Lightning checkpoint \(neither a zip archive nor a pickle"
    with pytest.raises(merging.MergeInputError, match=rf"^models: {re.escape(str(tmp_path))}/.*{want}"):
        run(["eval=none", "merge=task_arithmetic", f"pretrained={tmp_path / 'base.pt'}",
             f"models=[{tmp_path / 'a.pt'},{bad}]", f"output={tmp_path / 'out.safetensors'}"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("kind", ["safetensors_index", "bin_index", "bin_shard", "npz_as_pt"])
def test_mtl_merge_refuses_a_file_named_as_no_whole_model_before_its_run_folder(tmp_path, kind):
    """A shard index or one .bin shard given as a file passed check_readable (an index was even parsed in full) and
    was refused by open_source only after start_run, without the key; a zip that is no torch.save archive passed the
    magic check. Each is now one line naming the key and the file, with no run folder."""
    from merging.job import run

    pre, fts = make_models(T=1)
    torch.save(pre, tmp_path / "base.pt")
    torch.save(fts[0], tmp_path / "a.pt")
    folder = tmp_path / "sharded"
    folder.mkdir()
    if kind == "safetensors_index":
        save_file({k: v.contiguous() for k, v in fts[0].items()}, str(folder / "model-00001-of-00001.safetensors"))
        bad = folder / "model.safetensors.index.json"
        bad.write_text(json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in fts[0]}}))
        want = rf"{re.escape(str(bad))} is a Hugging Face shard index, not a model: pass its folder {re.escape(str(folder))}$"
    elif kind == "bin_index":
        torch.save(fts[0], folder / "pytorch_model-00001-of-00001.bin")
        bad = folder / "pytorch_model.bin.index.json"
        bad.write_text(json.dumps({"weight_map": {k: "pytorch_model-00001-of-00001.bin" for k in fts[0]}}))
        want = rf"{re.escape(str(bad))} is a Hugging Face shard index, not a model: sharded pytorch_model-\*\.bin"
    elif kind == "bin_shard":
        bad = folder / "pytorch_model-00001-of-00002.bin"
        torch.save(fts[0], bad)
        want = rf"{re.escape(str(bad))}: one shard of a sharded pytorch_model-\*\.bin checkpoint"
    else:
        bad = tmp_path / "w.pt"
        np.savez(tmp_path / "w.npz", a=np.zeros(4))
        (tmp_path / "w.npz").rename(bad)
        want = rf"{re.escape(str(bad))}: not a PyTorch/Lightning checkpoint \(a zip archive without the data.pkl"
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(merging.MergeInputError, match=rf"^models: {want}"):
        run(["eval=none", "merge=task_arithmetic", f"pretrained={tmp_path / 'base.pt'}",
             f"models=[{tmp_path / 'a.pt'},{bad}]", f"output={tmp_path / 'out.safetensors'}"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.safetensors").exists()
    assert sorted(p.name for p in folder.iterdir()) == before and bad.is_file()
    api = want if kind != "npz_as_pt" else rf"{re.escape(str(bad))}: not a PyTorch/Lightning checkpoint"  # torch's words
    with pytest.raises(merging.MergeInputError, match=rf"^{api}"):  # the API refuses it alike
        merging.merge("task_arithmetic", tmp_path / "base.pt", [bad])


def _slim_states(T=2):
    """θ0 and T fine-tunes of a tiny slimmable model, each with its own (per-width) BN statistics."""
    from mtl.models import create_model

    torch.manual_seed(0)
    m = create_model(["depth"], backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16], "depths": [1, 1],
                                          "out_indices": [1, 2]}, decoder={"name": "slimmable", "channels": 8},
                     family="slimmable")
    pre = {k: v.clone() for k, v in m.state_dict().items()}
    fts = []
    for _ in range(T):
        ft = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in pre.items()}
        for k in ft:
            if k.endswith("running_vars"):
                ft[k] = 0.1 * torch.rand_like(ft[k]) + 0.05  # valid variances, far below θ0's 1
        fts.append(ft)
    return pre, fts


def test_slimmable_per_width_bn_statistics_follow_the_bn_rule():
    """SwitchableBatchNorm2d keeps one row of running statistics per width (`running_means`/`running_vars`): they
    are BN statistics, not weights, so the bn rule applies to them as to `running_mean`/`running_var`."""
    pre, fts = _slim_states()
    stats = [k for k in pre if k.endswith(("running_means", "running_vars")) and ".heads." not in k]  # heads: own
    assert stats and "backbone.stem.1.running_vars" in stats
    out = merging.merge("task_arithmetic", pre, fts, lam=0.3)  # default bn="pretrained": θ0's statistics
    for k in stats:
        assert torch.equal(out[k], pre[k]), k
    avg = merging.merge("task_arithmetic", pre, fts, lam=0.3, bn="average")
    for k in stats:
        torch.testing.assert_close(avg[k], sum(f[k] for f in fts) / len(fts))
    v = "backbone.stem.1.running_vars"  # θ0: 1; fine-tunes < 0.15: λ = 1 gives 1 + 2·(v − 1) < 0
    with pytest.raises(merging.MergeInputError, match=r"bn='merge' gives the BatchNorm variance '.*running_vars' negative"):
        merging.merge("task_arithmetic", pre, fts, bn="merge", lam=1.0)
    mer = merging.merge("task_arithmetic", pre, fts, bn="merge", lam=0.3)
    torch.testing.assert_close(mer[v], pre[v] + 0.3 * sum(f[v] - pre[v] for f in fts))
