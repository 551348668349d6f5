import json
import re
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

import mtl
from mtl.io import ModelFolderError, atomic_path, write_json


def test_model_folder_round_trip_identical_outputs(tiny_model, tmp_path):
    tiny_model.eval()
    folder = mtl.save_model(tiny_model, tmp_path / "model", meta={"note": "x"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = mtl.load_model(folder)
    x = torch.randn(2, 3, 32, 32)
    a, b = tiny_model(x), loaded(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.meta == {"note": "x"}
    assert [t.to_config() for t in loaded.tasks.values()] == [t.to_config() for t in tiny_model.tasks.values()]


def test_a_reloaded_model_saved_again_keeps_its_meta_unless_told_otherwise(tiny_model, tmp_path):
    mtl.save_model(tiny_model, tmp_path / "a", meta={"data": {"name": "scenes"}})
    again = mtl.load_model(tmp_path / "a")
    mtl.save_model(again, tmp_path / "b")
    assert mtl.load_model(tmp_path / "b").meta == {"data": {"name": "scenes"}}
    mtl.save_model(again, tmp_path / "c", meta={})
    assert mtl.load_model(tmp_path / "c").meta == {}


def test_a_hugging_face_folder_is_named_as_one(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    save_file({"model.norm.weight": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFolderError, match="a Hugging Face model config \\(model_type='llama'\\), not an mtlkit "
                                               "model folder; merge such checkpoints with merging.merge / "
                                               "merging.merge_to_file or mtl-merge eval=none"):
        mtl.load_model(tmp_path)


def test_model_files_get_the_usual_permissions(tiny_model, tmp_path):
    """safetensors creates its file 0600; a shipped folder must be as readable as any file we write."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        folder = mtl.save_model(tiny_model, tmp_path / "model")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}


@pytest.mark.parametrize("text,kind", [('[{"format": "mtlkit.model/1", "model": {}}]', "list"), ("null", "null"),
                                       ('"x"', "str")])
def test_a_config_that_is_no_json_object_is_named_as_such(tiny_model, tmp_path, text, kind):
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    (folder / "config.json").write_text(text)
    with pytest.raises(ModelFolderError, match=re.escape(f"{folder / 'config.json'}: must be a JSON object, got {kind}")):
        mtl.load_model(folder)


def test_keys_that_are_no_strings_are_refused_naming_them(tiny_model, tmp_path):
    for meta, where in (({1: 2, "1": 3}, r"meta\[1\]"), ({"a": {2.5: "x"}}, r"meta.a\[2.5\]")):
        with pytest.raises(TypeError, match=rf"^{where}: JSON object keys are strings, got (int|float)"):
            mtl.save_model(tiny_model, tmp_path / "m", meta=meta)
    assert not (tmp_path / "m").exists()
    with pytest.raises(TypeError, match=r"^r.json\[1\]: .* \(clashes with key '1'\)"):
        write_json(tmp_path / "r.json", {"1": 3, 1: 2})  # a run record: a lost value is refused too
    write_json(tmp_path / "r.json", {1: 2})  # one that loses nothing is written as JSON writes it
    assert json.loads((tmp_path / "r.json").read_text()) == {"1": 2}


def test_missing_files_are_named(tiny_model, tmp_path):
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="model.safetensors: file not found"):
        mtl.load_model(folder)
    (folder / "model.safetensors").mkdir()
    with pytest.raises(ModelFolderError, match=re.escape(f"{folder / 'model.safetensors'} is a folder, not a "
                                                         "safetensors file")):
        mtl.load_model(folder)
    folder = mtl.save_model(tiny_model, tmp_path / "m2")
    (folder / "config.json").unlink()  # weights alone, as `mtl-merge eval=none` writes them
    with pytest.raises(ModelFolderError, match=re.escape(f"{folder} holds weights (model.safetensors) but no "
                                                         "config.json: a bare state dict (as `mtl-merge eval=none` "
                                                         "writes), not a model folder")):
        mtl.load_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="config.json: file not found"):
        mtl.load_model(folder)
    run = tmp_path / "run"  # a training run folder: its model is in run/model
    mtl.save_model(tiny_model, run / "model")
    with pytest.raises(ModelFolderError, match=re.escape(f"{run} is a run folder, not a model folder; did you mean {run / 'model'}?")):
        mtl.load_model(run)
    with pytest.raises(ModelFolderError, match=re.escape(f"{tmp_path / 'typo'}: no such folder")):
        mtl.load_model(tmp_path / "typo")
    with pytest.raises(ModelFolderError, match=re.escape(f"{run / 'config.yaml'}: not a model folder")):
        (run / "config.yaml").write_text("x: 1")
        mtl.load_model(run / "config.yaml")


def test_corrupt_files_are_named(tiny_model, tmp_path):
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ModelFolderError, match="model.safetensors: corrupt"):
        mtl.load_model(folder)
    folder = mtl.save_model(tiny_model, tmp_path / "m2")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="config.json: not valid JSON"):
        mtl.load_model(folder)



def test_json_nested_too_deep_for_the_parser_is_not_valid_json(tiny_model, tmp_path):
    """'[' * 200000 raised a raw RecursionError from json.loads: a config.json, a pool manifest."""
    from merging.pool import manifest_paths

    deep = "[" * 200_000 + "]" * 200_000
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    (folder / "config.json").write_text(deep)
    with pytest.raises(ModelFolderError, match=rf"{folder / 'config.json'}: not valid JSON \(maximum recursion depth"):
        mtl.load_model(folder)
    (tmp_path / "pool.json").write_text(deep)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'pool.json'}: not valid JSON"):
        manifest_paths(tmp_path / "pool.json")


def test_shape_mismatch_and_missing_key_are_named(tiny_model, tmp_path):
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    key = "decoder.heads.depth.body.1.weight"
    state[key] = torch.zeros(2, 2, 1, 1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelFolderError, match=f"{key}.*shape"):
        mtl.load_model(folder)
    del state[key]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelFolderError, match=f"missing key '{key}'"):
        mtl.load_model(folder)


def test_config_with_bad_task_is_named(tiny_model, tmp_path):
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    good = json.loads((folder / "config.json").read_text())
    cfg = json.loads(json.dumps(good))
    cfg["model"]["tasks"][0]["kind"] = "sky"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="config.json.*sky"):
        mtl.load_model(folder)
    cfg["model"]["tasks"] = []
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=r"config.json: key 'model.tasks' is empty"):
        mtl.load_model(folder)
    cfg = json.loads(json.dumps(good))
    gone = cfg["model"]["tasks"].pop(0)["name"]  # a task deleted from the config: said so, not "kind None"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=rf"config.json has no task '{gone}', but .*model.safetensors has it"):
        mtl.load_model(folder)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_removes_the_parent_folders_it_created_on_error(tmp_path):
    (tmp_path / "a").mkdir()
    for target in (tmp_path / "a" / "new" / "sub" / "out.txt", tmp_path / "a" / "new" / "sub" / "folder"):
        with pytest.raises(RuntimeError):
            with atomic_path(target) as tmp:
                tmp.write_text("half")
                raise RuntimeError("interrupted")
        assert [p.name for p in tmp_path.iterdir()] == ["a"] and list((tmp_path / "a").iterdir()) == []


def test_atomic_path_keeps_created_parents_that_are_no_longer_empty(tmp_path):
    target = tmp_path / "new" / "sub" / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target):
            (tmp_path / "new" / "other.txt").write_text("someone else's")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["other.txt"]  # sub/ (empty) went
    with atomic_path(target) as tmp:  # on success the created folders stay, holding the output
        tmp.write_text("done")
    assert target.read_text() == "done"


def test_atomic_path_refuses_existing_without_overwrite(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_path(target, overwrite=False):
            pass
    assert target.read_text() == "old"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_on_save_not_on_load(tiny_model, tmp_path, dtype):
    """save_model once wrote fp16/bf16 folders that load_model always refused."""
    with pytest.raises(ValueError, match=rf"save_model: key '[\w.]+' is {dtype}; model folders hold float32 weights"):
        mtl.save_model(tiny_model.to(dtype), tmp_path / "half")
    assert not (tmp_path / "half").exists()
    folder = mtl.save_model(tiny_model.float(), tmp_path / "full")
    assert all(v.dtype == torch.float32 for v in load_file(str(folder / "model.safetensors")).values() if v.is_floating_point())
    assert next(mtl.load_model(folder).parameters()).dtype == torch.float32
    # a folder whose weights were cast afterwards is still refused, naming the key
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelFolderError, match=rf"model.safetensors: key '[\w.]+' has dtype {dtype}, the model expects torch.float32"):
        mtl.load_model(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_on_save_not_on_load(tiny_model, tmp_path, bad):
    """save_model wrote them and load_model then refused the folder."""
    key = next(k for k, v in tiny_model.state_dict().items() if v.is_floating_point())
    earlier = mtl.save_model(tiny_model, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    tiny_model.state_dict()[key].view(-1)[0] = bad
    for target in (tmp_path / "new", earlier):
        with pytest.raises(ValueError, match=rf"save_model: key '{re.escape(key)}' holds NaN or infinite values"):
            mtl.save_model(tiny_model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before


def test_an_edited_config_names_the_key_that_differs(tiny_model, tmp_path):
    """The error once named only 'model' for any edit of config.json."""
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    original = (folder / "config.json").read_text()
    edits = {"model.decoder.channels": lambda m: m["decoder"].update(channels=8),
             "model.mean[1]": lambda m: m["mean"].__setitem__(1, 0.5),
             "model.extra": lambda m: m.update(extra=1),
             "model.backbone.out_indices[0]": lambda m: m["backbone"]["out_indices"].__setitem__(0, 2),
             "model.tasks[0].weight": lambda m: m["tasks"][0].update(weight=2.0),
             # true == 1 in Python, not in JSON
             "model.tasks[0].num_classes": lambda m: m["tasks"][0].update(num_classes=True)}
    for key, edit in edits.items():
        cfg = json.loads(original)
        edit(cfg["model"])
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelFolderError, match=rf"config.json: key '{re.escape(key.strip())}' "
                                                   "differs from the config .*model.safetensors was saved with"):
            mtl.load_model(folder)


def _as_jq_writes(v):
    """What `jq .` makes of Python's JSON: integral floats as integers (1.0 -> 1); keys reordered below."""
    if isinstance(v, dict):
        return {k: _as_jq_writes(v[k]) for k in reversed(list(v))}
    if isinstance(v, list):
        return [_as_jq_writes(x) for x in v]
    return int(v) if isinstance(v, float) and v.is_integer() else v


def test_a_config_rewritten_without_a_change_of_value_still_loads(tiny_model, tmp_path):
    """`jq '.meta.note = "x"' config.json` wrote 1.0 as 1, and the unchanged model no longer loaded."""
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["meta"]["note"] = "x"
    rewritten = json.dumps(_as_jq_writes(cfg), indent=4)
    assert '"weight": 1,' in rewritten and rewritten != (folder / "config.json").read_text()
    (folder / "config.json").write_text(rewritten)
    loaded = mtl.load_model(folder)
    assert loaded.meta["note"] == "x"
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # the other way round (16 -> 16.0) is no change either; the model is built from the saved 16
    cfg["model"]["decoder"]["channels"] = 16.0
    (folder / "config.json").write_text(json.dumps(cfg))
    assert mtl.load_model(folder).config["decoder"]["channels"] == 16


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_a_config_edited_with_jq_still_loads(tiny_model, tmp_path):
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    file = folder / "config.json"
    edited = subprocess.run(["jq", '.meta.note = "x"', str(file)], capture_output=True, text=True, check=True).stdout
    file.write_text(edited)
    assert mtl.load_model(folder).meta["note"] == "x"


def test_saving_over_a_file_is_refused_by_name(tiny_model, tmp_path):
    target = tmp_path / "m"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"save_model: {re.escape(str(target))} is a file, not a model folder"):
        mtl.save_model(tiny_model, target)
    assert target.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_saving_over_a_folder_that_is_not_a_model_folder_is_refused(tiny_model, tmp_path):
    """overwrite replaces an earlier model folder, never a folder of something else."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=rf"save_model: {re.escape(str(victim))} exists and is not a model folder"):
        mtl.save_model(tiny_model, victim)
    assert (victim / "keep.txt").read_text() == "precious" and (victim / "sub").is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    mtl.save_model(tiny_model, empty)  # an empty folder, and an earlier model folder, are replaced
    mtl.save_model(tiny_model, empty)
    assert sorted(p.name for p in empty.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("attr, value", [("forward", 1), ("training", 5), ("in_channels", "x"), ("in_channels", [1.5])])
def test_a_structural_plan_only_sets_integer_sizes(tiny_model, attr, value):
    """A plan (config.json's pruning entry) resizes modules; any other attribute it names is refused."""
    from mtl.models.surgery import apply_plan

    name = next(n for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError, match=rf"plan sets {re.escape(name)}\.{attr} to .*only changes integer sizes"):
        apply_plan(tiny_model, {"modules": {name: {"attrs": {attr: value}}}})
    apply_plan(tiny_model, {"modules": {name: {"attrs": {"in_channels": 3}}}})  # an integer size is taken


def test_save_model_refuses_a_foreign_module_and_keeps_config_json_strict(tmp_path):
    import json

    import mtl

    with pytest.raises(TypeError, match="save_model takes an mtlkit model .* got Linear"):
        mtl.save_model(torch.nn.Linear(2, 2), tmp_path / "x")
    model = mtl.create_model(["depth"], backbone="test_resnet")
    with pytest.raises(TypeError, match=r"meta.test\.depth\[1\]: cannot store object in JSON"):
        mtl.save_model(model, tmp_path / "bad", meta={"test": {"depth": [1.0, object()]}})
    assert not (tmp_path / "bad").exists()
    folder = mtl.save_model(model, tmp_path / "m", meta={"test": {"rmse": float("nan"), "n": torch.tensor(3)}})
    text = (folder / "config.json").read_text()
    cfg = json.loads(text, parse_constant=lambda c: pytest.fail(f"config.json holds {c}, not strict JSON"))
    assert cfg["meta"]["test"] == {"rmse": None, "n": 3}  # JSON has no NaN: null
    assert mtl.load_model(folder).meta["test"]["rmse"] is None


def test_read_json_of_a_folder_names_the_json_files_it_holds(tmp_path):
    from mtl.io import read_json

    (tmp_path / "width_table.json").write_text("{}")
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path} is a folder, not a JSON file; it holds width_table.json"):
        read_json(tmp_path)


def test_two_saves_of_one_model_are_the_same_bytes(tiny_model, tmp_path):
    """safetensors writes the header metadata in hash-map order, which differs between processes."""
    import subprocess
    import sys

    mtl.save_model(tiny_model, tmp_path / "m", meta={})
    code = ("import sys, mtl; m = mtl.load_model(sys.argv[1]); mtl.save_model(m, sys.argv[2], meta={})")
    for i in range(2):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / f"c{i}")], check=True)
    want = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert all((tmp_path / f"c{i}" / "model.safetensors").read_bytes() == want for i in range(2))
    with open(tmp_path / "m" / "model.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        keys = list(json.loads(f.read(n))["__metadata__"])
    assert keys == sorted(keys)
    mtl.load_model(tmp_path / "c0")


def test_wrong_argument_types_are_named(tiny_model):
    with pytest.raises(TypeError, match="load_model takes the path of a model folder, got MultiTaskModel "
                                        r"\(already a model: use it as it is\)"):
        mtl.load_model(tiny_model)
    with pytest.raises(TypeError, match=r"extract takes a model \(nn.Module\), got str; load a model folder"):
        mtl.extract("some/folder", widths={"encoder": 0.5})
    from mtl.flops import model_stats

    with pytest.raises(TypeError, match=r"model_stats takes a model \(nn.Module\), got str; load a model folder"):
        model_stats("some/folder", torch.zeros(1, 3, 32, 32))
    with pytest.raises(TypeError, match="model_stats takes an input batch x"):
        model_stats(tiny_model, [1, 2])


def _path_callers():
    import merging
    from mtl.models import linearize

    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    return {"count_flops": lambda m: mtl.count_flops(m, x),
            "recompute_bn": lambda m: merging.recompute_bn(m, [x], task="depth"),
            "bn_statistics": lambda m: merging.bn_statistics(m, [x]),
            "linearize": linearize,
            r"merging.learn\(model=...\)": lambda m: merging.learn("adamerging", {}, [{}], unlabeled={"depth": [x]},
                                                                  model=m, tasks=["depth"]),
            "save_model": lambda m: mtl.save_model(m, "unused")}


@pytest.mark.parametrize("fn", list(_path_callers()))
def test_a_folder_path_given_for_a_model_names_load_model(fn, tmp_path):
    call = _path_callers()[fn]
    with pytest.raises(TypeError, match=rf"^{fn} takes .*, got (str|PosixPath); load a model folder with "
                                        r"mtl.load_model\(path\) first$"):
        call(str(tmp_path))
    with pytest.raises(TypeError, match=rf"^{fn} takes .*, got PosixPath; load a model folder"):
        call(tmp_path)


def test_write_json_is_strict_json_with_non_finite_floats_as_null(tmp_path):
    from mtl.io import write_json
    path = tmp_path / "metrics.json"
    write_json(path, {"test": {"loss": float("nan"), "rmse": float("inf"), "per_class": torch.tensor([float("-inf"), 0.5])},
                      "steps": torch.tensor(3)})

    def refuse(name):
        raise AssertionError(f"bare {name} in {path.name}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "test": {"loss": None, "rmse": None, "per_class": [None, 0.5]}, "steps": 3}
    with pytest.raises(TypeError, match=r"metrics.json.bad: cannot store object in JSON"):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text())["steps"] == 3  # a refused write leaves the old file whole


def test_a_number_whose_tolist_is_itself_is_stored_as_a_json_number(tmp_path):
    """np.longdouble.tolist() returns itself: strict_json recursed until RecursionError, e.g. in save_model for
    a backbone setting (backbone settings are not type-checked)."""
    import fractions

    import numpy as np

    from mtl.models import create_model

    write_json(tmp_path / "x.json", {"a": np.longdouble(0.5), "b": fractions.Fraction(1, 4), "c": np.float32(2)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 0.5, "b": 0.25, "c": 2.0}
    model = create_model(["semseg"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3],
                                               "drop_path_rate": np.longdouble(0.0)},
                         decoder={"name": "hps", "channels": 8})
    mtl.save_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["backbone"]["drop_path_rate"] == 0.0


@pytest.mark.parametrize("key, value", [("pretrained", True), ("checkpoint_path", "/etc/passwd")])
def test_a_config_naming_initial_weights_is_refused_before_any_fetch(tiny_model, tmp_path, monkeypatch, key, value):
    """An untrusted config.json must not make timm reach the Hub or read another file: the folder's own
    weights are the model's."""
    import timm

    folder = mtl.save_model(tiny_model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"]["backbone"][key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ModelFolderError, match=rf"config.json: key 'model.backbone.{key}' makes the model read "
                                               "initial weights .* remove the key"):
        mtl.load_model(folder)


def test_a_folder_saved_with_a_pretrained_cfg_overlay_still_loads(tmp_path, monkeypatch):
    """Before the overlay joined INIT_ONLY, save_model kept it: alone (pretrained dropped) it reads nothing."""
    import mtl.models.multitask as mm
    from mtl.models import create_model

    monkeypatch.setattr(mm, "INIT_ONLY", ("pretrained", "checkpoint_path"))  # the older save
    model = create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3],
                                              "pretrained_cfg_overlay": {"file": str(tmp_path / "nowhere.safetensors")}})
    folder = mtl.save_model(model, tmp_path / "old")
    assert "pretrained_cfg_overlay" in json.loads((folder / "config.json").read_text())["model"]["backbone"]
    monkeypatch.undo()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(mtl.load_model(folder)(x)["depth"], model.eval()(x)["depth"])


def test_saved_configs_leave_initial_weight_sources_out(tmp_path):
    from mtl.models import create_model

    model = create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3], "pretrained": False,
                                              "checkpoint_path": None, "pretrained_cfg_overlay": {}})
    cfg = json.loads((mtl.save_model(model, tmp_path / "m") / "config.json").read_text())
    assert not {"pretrained", "checkpoint_path", "pretrained_cfg_overlay"} & set(cfg["model"]["backbone"])
    mtl.load_model(tmp_path / "m")


@pytest.mark.parametrize("meta", ["hello", [1], 3])
def test_a_config_whose_meta_is_not_an_object_is_refused(tiny_model, tmp_path, meta):
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["meta"] = meta
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=rf"config.json: key 'meta' must be an object, got {type(meta).__name__}"):
        mtl.load_model(folder)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(model=[1]), r"config\.json: key 'model' must be an object, got list$"),
    (lambda c: c.update(model=None), r"config\.json: key 'model' must be an object, got null$"),
    (lambda c: c.pop("model"), r"config\.json: missing key 'model'$"),
    (lambda c: c.pop("format"), r"config\.json: missing key 'format' \(this mtlkit reads 'mtlkit\.model/"),
])
def test_a_config_whose_model_is_no_object_or_lacks_format_says_so(tiny_model, tmp_path, edit, match):
    """model=[1] read 'missing key model', and a missing format 'key format is None'."""
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=match):
        mtl.load_model(folder)


def test_atomic_path_never_replaces_an_output_another_writer_made_meanwhile(tmp_path):
    """Two writers of one new output (overwrite=False): the second to finish is refused, not swapped in."""
    for kind in ("file", "folder"):
        path = tmp_path / kind
        with pytest.raises(FileExistsError, match=rf"{path} appeared while this output was written"):
            with atomic_path(path, overwrite=False) as tmp:
                tmp.mkdir() if kind == "folder" else tmp.write_text("mine")
                path.mkdir() if kind == "folder" else path.write_text("theirs")
        assert (path.is_dir() and not any(path.iterdir())) if kind == "folder" else path.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # no temporary left


def test_overwrite_never_replaces_a_folder_with_a_file(tmp_path):
    import merging

    folder = tmp_path / "c.safetensors"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(IsADirectoryError, match=rf"{folder} is a folder; refusing to replace it with a file"):
        with atomic_path(folder, overwrite=True) as tmp:
            tmp.write_text("file")
    with pytest.raises(IsADirectoryError, match=rf"{folder} is a folder; a .safetensors output is a file"):
        merging.merge_to_file("average", {"a": torch.zeros(2)}, [{"a": torch.ones(2)}], folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "precious"


def test_a_full_disk_is_named_by_the_output_not_a_hidden_temporary(tiny_model, tmp_path, monkeypatch):
    import errno

    import mtl.io as io
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(OSError, match=rf"{tmp_path / 'm'}: cannot write this output \(No space left on device\)") as e:
        mtl.save_model(tiny_model, tmp_path / "m")
    assert e.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EROFS", "EFBIG", "EACCES", "EPERM"])
def test_safetensors_printing_only_the_reason_is_read_as_each_errno_atomic_path_names_the_output_by(tmp_path, code):
    import errno
    import os

    from mtl.io import safetensors_os_error
    from safetensors import SafetensorError

    code = getattr(errno, code)
    assert safetensors_os_error(SafetensorError(f"I/O error: {os.strerror(code)}")).errno == code
    with pytest.raises(OSError, match=rf"^\[Errno {code}\] {tmp_path / 'out'}: cannot write this output"):
        with atomic_path(tmp_path / "out"):
            raise safetensors_os_error(SafetensorError(f"I/O error: {os.strerror(code)}"))


def test_a_dangling_link_is_replaced_as_before(tmp_path):
    link = tmp_path / "out.json"
    link.symlink_to(tmp_path / "gone")
    with atomic_path(link, overwrite=False) as tmp:
        tmp.write_text("{}")
    assert not link.is_symlink() and link.read_text() == "{}"


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_link_at_the_output_is_replaced_never_its_target(tiny_model, tmp_path, overwrite):
    target = mtl.save_model(tiny_model, tmp_path / "a")
    before = (target / "config.json").read_bytes()
    link, dangling = tmp_path / "link", tmp_path / "dangling"
    link.symlink_to(target)
    dangling.symlink_to(tmp_path / "gone")
    mtl.save_model(tiny_model, dangling, overwrite=overwrite)
    assert not dangling.is_symlink() and mtl.load_model(dangling).tasks.keys() == tiny_model.tasks.keys()
    if overwrite:
        mtl.save_model(tiny_model, link, meta={"new": 1})
        assert not link.is_symlink() and json.loads((link / "config.json").read_text())["meta"] == {"new": 1}
    else:
        with pytest.raises(FileExistsError, match="link exists"):
            mtl.save_model(tiny_model, link, overwrite=False)
    assert (target / "config.json").read_bytes() == before and not list(tmp_path.glob(".*"))


def test_an_output_under_a_file_is_named_not_its_temporary(tiny_model, tmp_path):
    (tmp_path / "x.log").write_text("log")
    for out in (tmp_path / "x.log" / "out", tmp_path / "x.log" / "sub" / "out"):
        with pytest.raises(NotADirectoryError, match=rf"{out}: cannot write this output \(.*x.log is a file") as e:
            mtl.save_model(tiny_model, out)
        assert ".tmp-" not in str(e.value)
        with pytest.raises(NotADirectoryError, match=rf"{out}: cannot write"):
            write_json(out, {"a": 1})


@pytest.mark.parametrize("name", [".", "", "./", "nosub/.."])
def test_save_model_to_the_current_folder(tiny_model, tmp_path, monkeypatch, name):
    here = tmp_path / "here"
    here.mkdir()  # an empty folder is replaced, as when it is named by its absolute path
    monkeypatch.chdir(here)
    mtl.save_model(tiny_model, name)
    assert mtl.load_model(here).tasks.keys() == tiny_model.tasks.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_load_model_expands_home_and_names_unknown_keys_and_newer_writers(tiny_model, tmp_path, monkeypatch, caplog):
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert list(mtl.load_model("~/m").tasks) == list(tiny_model.tasks)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["metadata"] = {"note": "misspelt meta"}
    cfg["mtlkit_version"] = "99.0.0"
    (folder / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        mtl.load_model(folder)
    assert "unknown top-level key(s) ['metadata'] ignored" in caplog.text
    assert "was written by mtlkit 99.0.0, newer than this" in caplog.text


def test_a_config_asking_for_a_huge_head_is_refused_before_any_real_tensor_is_built(tmp_path, monkeypatch):
    """tasks[0].num_classes = 2_000_000 built and randomly initialised the head (+512 MB with resnet18) before the
    shape check refused it; 1e9 would exhaust memory. The shapes are now checked on a meta-device build first."""
    import mtl.models

    folder = mtl.save_model(mtl.create_model(["semseg"], backbone="test_resnet", decoder={"name": "hps", "channels": 16}),
                            tmp_path / "m")
    save_file(load_file(folder / "model.safetensors"), folder / "model.safetensors")  # plain: no config digest
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"]["tasks"][0].update(num_classes=2_000_000, ignore_index=-1)
    (folder / "config.json").write_text(json.dumps(cfg))
    built, real = [], mtl.models.model_from_config
    monkeypatch.setattr(mtl.models, "model_from_config",
                        lambda c: built.append(torch.empty(0).device.type) or real(c))
    with pytest.raises(ModelFolderError, match=r"model.safetensors: key 'decoder\.heads\.semseg\..*' has shape .*, the config "
                                               r"in .*config.json expects \(2000000, "):
        mtl.load_model(folder)
    assert built == ["meta"]


def test_model_folder_and_atomic_writers_expand_a_leading_tilde(tmp_path, monkeypatch, home_and_cwd):
    """save_model("~/m") wrote ./~/m in the working directory while load_model("~/m") read $HOME/m; atomic_path (every
    JSON, plot and file writer) made ./~ too. Each writer takes ~ as $HOME and returns the path it wrote."""
    from mtl.models import create_model

    home, cwd = home_and_cwd
    m = create_model(tasks=[{"name": "classification", "kind": "classification", "num_classes": 3}],
                     backbone="test_resnet")
    assert mtl.save_model(m, "~/m1") == home / "m1"
    assert set(mtl.load_model("~/m1").tasks) == {"classification"}
    with atomic_path("~/f.txt") as tmp:
        tmp.write_text("x")
    write_json("~/r.json", {"a": 1})
    assert (home / "f.txt").read_text() == "x" and json.loads((home / "r.json").read_text()) == {"a": 1}
    assert list(cwd.iterdir()) == []
