"""mergekit YAML recipes: parameters reach the merge as mergekit reads them (per-model values over the
top-level ones, the base model left out), checked against hand-computed merges; unsupported parts refused."""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging
from merging.job import run

BASE = torch.zeros(4)
A = torch.tensor([1.0, 2.0, -3.0, 4.0])
B = torch.tensor([2.0, -2.0, 1.0, 0.0])
C = torch.tensor([-0.5, -2.5, 1.5, 0.25])  # distinct magnitudes: the trim is unambiguous


def _folder(path, w, dtype=torch.float32):
    path.mkdir(parents=True)
    save_file({"layer.weight": w.to(dtype).contiguous()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": str(dtype)[6:]}))
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.fixture()
def models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # mergekit reads model paths from the current directory
    for name, w in (("base", BASE), ("a", A), ("b", B), ("c", C)):
        _folder(tmp_path / name, w)
    return tmp_path


def _yaml(tmp_path, text, name="merge.yml"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


def _merged(out):
    return load_file(str(out / "model.safetensors"))["layer.weight"]


def test_task_arithmetic_per_model_weight_over_the_top_level_one(models):
    cfg = _yaml(models, """
merge_method: task_arithmetic
base_model: base
models:
  - model: base
  - model: a
    parameters: {weight: 1.0}
  - model: b
parameters: {weight: 0.5, normalize: true, lambda: 2.0}
dtype: float32
""")
    plan = merging.read_mergekit_yaml(cfg)
    assert [p.name for p in plan.finetuned] == ["a", "b"]  # the base model is no task vector
    assert plan.hparams == {"weight": [1.0, 0.5], "normalize": True, "lam": 2.0}
    out = merging.merge_mergekit_yaml(cfg, models / "out")
    # θ0 + λ Σ w_t τ_t / Σ w_t = 2 (A + 0.5 B) / 1.5
    assert torch.allclose(_merged(out), torch.tensor([8 / 3, 4 / 3, -10 / 3, 16 / 3]))
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "mergekit_config.yml").read_text() == cfg.read_text()  # mergekit keeps the recipe there too


def test_a_failed_recipe_run_leaves_no_output_and_no_recipe_copy(models):
    _folder(models / "bad", torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    cfg = _yaml(models, "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: a}, {model: bad}]\n"
                        "parameters: {weight: 1}\n")
    with pytest.raises(ValueError, match="NaN"):
        merging.merge_mergekit_yaml(cfg, models / "out")
    assert not (models / "out").exists()


def test_ties_density_trims_per_model_and_elects_the_sign(models):
    cfg = _yaml(models, """
merge_method: ties
base_model: ./base
models:
  - model: a
    parameters: {density: 0.5, weight: 1.0}
  - model: c
    parameters: {density: 0.5, weight: 2.0}
""")
    out = merging.merge_mergekit_yaml(cfg, models / "out")
    # a keeps its 2 largest |τ| (−3, 4), c its (−2.5, 1.5); Σ w τ̂ = [0, −5, −3 + 3, 4] elects [+, −, +, +]
    # (a zero sum elects +): index 2 keeps c's 1.5 (weight 2) and drops a's −3; normalize (mergekit's TIES
    # default) divides by the agreeing weights: [0, −5/2, 3/2, 4/1]
    assert torch.equal(_merged(out), torch.tensor([0.0, -2.5, 1.5, 4.0]))


def test_linear_needs_no_base_and_averages_the_listed_models(models):
    cfg = _yaml(models, """
merge_method: linear
models:
  - model: a
    parameters: {weight: 3.0}
  - model: b
    parameters: {weight: 1.0}
""")
    plan = merging.read_mergekit_yaml(cfg)
    assert plan.pretrained.name == "a" and [p.name for p in plan.finetuned] == ["a", "b"]
    out = merging.merge_mergekit_yaml(cfg, models / "out")
    assert torch.allclose(_merged(out), (3 * A + B) / 4)


def test_dare_with_a_seed_repeats(models):
    cfg = _yaml(models, """
merge_method: dare_linear
base_model: base
models:
  - model: a
  - model: b
parameters: {weight: 1.0, density: 0.5}
""")
    one = _merged(merging.merge_mergekit_yaml(cfg, models / "one", seed=3))
    two = _merged(merging.merge_mergekit_yaml(cfg, models / "two", seed=3))
    assert torch.equal(one, two)
    with pytest.raises(ValueError, match="ties draws nothing"):
        merging.merge_mergekit_yaml(_yaml(models, cfg.read_text().replace("dare_linear", "ties"), "t.yml"),
                                    models / "three", seed=3)


@pytest.mark.parametrize("text, match", [
    ("merge_method: slerp\nbase_model: base\nmodels: [{model: a}]", r"merge_method: 'slerp' is not one mtlkit runs"),
    ("merge_method: ties\nslices: []", r"slices: layer slices"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: [0, 1]}}]",
     r"models\[0\]\.parameters\.weight: \[0, 1\] is a gradient"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: [{filter: mlp, value: 1}]}}]",
     r"is a tensor filter list"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1, normalize: true}}]",
     r"models\[0\]\.parameters: normalize is a merge-level parameter"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: a}]", r"models\[0\]: parameters\.weight is required"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]", r"base_model: ties merges task vectors"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: org/name, parameters: {weight: 1}}]",
     r"models\[0\]\.model: 'org/name' is not a folder \(a Hugging Face Hub id\?"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1, epsilon: 0.1}}]",
     r"epsilon is not a parameter of this merge_method"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1, density: 0.5}}]",
     r"density is not a parameter of this merge_method; valid: weight, normalize"),
    ("merge_method: ties\nbase_model: base\ntokenizer_source: union\nmodels: [{model: a, parameters: {weight: 1}}]",
     r"tokenizer_source: 'union' is not supported"),
    ("merge_method: ties\nbase_model: base\nmodel: [{model: a}]", r"unknown key 'model'; valid: merge_method"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: base}]", r"nothing to merge besides the base model"),
    ("merge_method: ties\nbase_model: base\ndtype: bf16\nmodels: [{model: a, parameters: {weight: 1}}]",
     r"dtype: 'bf16' is not a dtype mergekit takes; valid: float32, float16, bfloat16, float64"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1}}, {model: ./a}]",
     r"models\[1\]\.model: './a' is models\[0\] again; mergekit refuses a model listed twice"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: ./base}, {model: a, parameters: {weight: 1}}]",
     r"models\[0\]\.model: './base' is base_model \('base'\) spelled differently"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1, density: 0}}]",
     r"models\[0\]\.parameters\.density: 0 would drop every entry"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1}}]\nparameters: {normalize: 2}",
     r"parameters\.normalize: expected true or false, got 2"),
    ("merge_method: linear\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1}}]",
     r"base_model \(linear averages it in as one more model\): parameters\.weight is required"),
])
def test_what_mtlkit_does_not_run_is_refused_by_name(models, text, match):
    cfg = _yaml(models, text)
    with pytest.raises(ValueError, match=match) as e:
        merging.merge_mergekit_yaml(cfg, models / "out")
    assert str(cfg) in str(e.value)
    assert not (models / "out").exists()


def _bin_only(models):
    folder = models / "binonly"
    folder.mkdir()
    torch.save({"layer.weight": A}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("ref, where", [("binonly", "models[1].model"), ("binonly/pytorch_model.bin", "models[1].model")])
def test_a_bin_checkpoint_is_pointed_to_safetensors_naming_the_yaml_and_the_model(models, ref, where):
    _bin_only(models)
    cfg = _yaml(models, f"merge_method: ties\nbase_model: base\nmodels: [{{model: a}}, {{model: {ref}}}]\n"
                        "parameters: {weight: 1}\n")
    with pytest.raises(ValueError) as e:
        merging.merge_mergekit_yaml(cfg, models / "out")
    msg = str(e.value)
    assert msg.startswith(f"{cfg}: {where}: {ref!r} ") and "convert it to safetensors" in msg
    assert "pass the file path" not in msg and "Hub id" not in msg
    assert not (models / "out").exists()


def test_a_base_folder_of_bin_checkpoints_is_named_as_base_model(models):
    _bin_only(models)
    cfg = _yaml(models, "merge_method: ties\nbase_model: binonly\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    with pytest.raises(ValueError, match=rf"^{cfg}: base_model: 'binonly' holds pytorch_model\*\.bin checkpoints "
                                         r"but no model\.safetensors; .*convert it to safetensors"):
        merging.read_mergekit_yaml(cfg)


@pytest.mark.parametrize("method, reason", [
    ("linear", "the base averaged in twice"),
    ("task_arithmetic", "a zero task vector, whose weight counts in the divisor when normalize is true"),
    ("dare_linear", "a zero task vector, whose weight counts in the divisor when normalize is true"),
    ("ties", "a zero task vector, which never enters the sign-masked sum or divisor"),
    ("dare_ties", "a zero task vector, which never enters the sign-masked sum or divisor"),
])
def test_the_base_spelled_differently_is_refused_with_what_it_would_do_to_this_method(models, method, reason):
    params = "{weight: 1}" if method in ("linear", "task_arithmetic") else "{weight: 1, density: 0.5}"
    cfg = _yaml(models, f"merge_method: {method}\nbase_model: base\nparameters: {params}\n"
                        "models: [{model: ./base}, {model: a}]\n")
    with pytest.raises(ValueError, match=rf"models\[0\]\.model: './base' is base_model \('base'\) spelled "
                                         rf"differently; mergekit would merge it as one more model \({reason}"):
        merging.read_mergekit_yaml(cfg)


def test_a_directory_given_as_the_recipe_is_said_to_be_one(models):
    with pytest.raises(IsADirectoryError, match=rf"^{models / 'a'}: is a directory, not a mergekit configuration "):
        merging.read_mergekit_yaml(models / "a")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        run([f"mergekit_yaml={models / 'a'}", f"output={models / 'out'}"], run_dir=models / "run")


def test_a_path_beside_the_yaml_is_named_when_the_current_directory_differs(models, tmp_path_factory, monkeypatch):
    cfg = _yaml(models, "merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1}}]")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    with pytest.raises(ValueError, match=r"a folder of that name is beside merge.yml"):
        merging.read_mergekit_yaml(cfg)


def test_out_dtype_must_be_the_base_models(models, caplog):
    cfg = _yaml(models, "merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1}}]\n"
                        "dtype: bfloat16\n")
    with pytest.raises(ValueError, match=r"asks for bfloat16 weights; mtlkit writes the base model's dtype "
                                         r"\(float32\) and does not convert: set out_dtype: float32, or remove "
                                         r"dtype and out_dtype$"):
        merging.merge_mergekit_yaml(cfg, models / "out")
    cfg.write_text(cfg.read_text() + "out_dtype: torch.float32\n")  # compute dtype differs, output dtype agrees
    with caplog.at_level(logging.WARNING, logger="merging.mergekit_yaml"):
        merging.merge_mergekit_yaml(cfg, models / "out")
    assert "mergekit computes this recipe in bfloat16 (its dtype) and mtlkit in float32" in caplog.text


def test_a_base_with_mixed_dtypes_is_told_to_remove_dtype_and_the_advice_runs(tmp_path, monkeypatch):
    # bf16 weights with a float32 norm weight, as some HF checkpoints store them: no one out_dtype is the
    # base's, so the advice is to remove dtype and out_dtype; then each tensor keeps its own dtype
    monkeypatch.chdir(tmp_path)
    for name, w in (("base", BASE), ("a", A), ("b", B)):
        (tmp_path / name).mkdir()
        save_file({"layer.weight": w.to(torch.bfloat16), "norm.weight": w + 1}, str(tmp_path / name / "model.safetensors"))
    recipe = "merge_method: ties\nbase_model: base\nmodels: [{model: a}, {model: b}]\nparameters: {weight: 1.0}\n"
    for extra in ("dtype: float32\n", "dtype: float32\nout_dtype: bfloat16\n", "out_dtype: float32\n"):
        cfg = _yaml(tmp_path, recipe + extra)
        with pytest.raises(ValueError) as e:
            merging.merge_mergekit_yaml(cfg, tmp_path / "out")
        assert "the base model's tensors have several dtypes (bfloat16, float32)" in str(e.value)
        assert str(e.value).endswith("remove dtype and out_dtype") and not (tmp_path / "out").exists()
    out = merging.merge_mergekit_yaml(_yaml(tmp_path, recipe), tmp_path / "out")  # the advice followed
    got = load_file(str(out / "model.safetensors"))
    assert got["layer.weight"].dtype == torch.bfloat16 and got["norm.weight"].dtype == torch.float32
    # TIES at density 1 with weight 1: θ0 + Σ of the δ agreeing with the sign of Σ δ, over the models agreeing
    for key, base, a, b in (("norm.weight", BASE + 1, A + 1, B + 1), ("layer.weight", BASE, A, B)):
        d = torch.stack([a - base, b - base]).float()
        keep = (d.sign() == torch.where(d.sum(0) >= 0, 1.0, -1.0)) & (d != 0)
        want = base.float() + (d * keep).sum(0) / keep.sum(0).clamp(min=1)
        assert torch.equal(got[key].float(), want.to(got[key].dtype).float())


@pytest.mark.parametrize("method, warned", [("ties", True), ("linear", False)])
def test_unset_dtype_on_bf16_models_is_mergekits_bf16_arithmetic(tmp_path, monkeypatch, caplog, method, warned):
    monkeypatch.chdir(tmp_path)
    for name, w in (("base", BASE), ("a", A)):
        _folder(tmp_path / name, w, torch.bfloat16)
    cfg = _yaml(tmp_path, f"merge_method: {method}\nbase_model: base\nmodels: [{{model: a}}]\nparameters: {{weight: 1}}")
    with caplog.at_level(logging.WARNING, logger="merging.mergekit_yaml"):
        merging.merge_mergekit_yaml(cfg, tmp_path / "out")
    # mergekit's linear computes in float32 whatever the dtype; its other methods in the models' dtype
    assert ("in bfloat16 (dtype unset: the models' own) and mtlkit in float32" in caplog.text) == warned


def test_linear_under_a_narrower_dtype_averages_the_rounded_inputs_as_mergekit_loads_them(models):
    # mergekit converts each input to `dtype` when it loads it, sums in float32 and returns the sum in
    # `dtype`; out_dtype then writes it as float32
    fine = torch.tensor([1.0 + 2 ** -10, 3.0009, -0.30001, 7.77])  # not bf16 values
    _folder(models / "fine", fine)
    cfg = _yaml(models, """
merge_method: linear
models:
  - model: fine
    parameters: {weight: 2.0}
  - model: a
    parameters: {weight: 1.0}
dtype: bfloat16
out_dtype: float32
""")
    bf = lambda x: x.to(torch.bfloat16).to(torch.float32)  # noqa: E731
    want = bf((2 * bf(fine) + bf(A)) / 3)
    got = _merged(merging.merge_mergekit_yaml(cfg, models / "out"))
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_linear_averages_a_base_model_it_does_not_list_as_the_last_input(models):
    cfg = _yaml(models, """
merge_method: linear
base_model: base
models:
  - model: a
    parameters: {weight: 2.0}
  - model: b
parameters: {weight: 1.0}
""")
    plan = merging.read_mergekit_yaml(cfg)
    assert [p.name for p in plan.finetuned] == ["a", "b", "base"] and plan.hparams["weight"] == [2.0, 1.0, 1.0]
    assert torch.allclose(_merged(merging.merge_mergekit_yaml(cfg, models / "out")), (2 * A + B + BASE) / 4)


def test_yaml_values_mergekits_parsing_accepts(models):
    # YAML 1.1 reads 5e-1 (no dot) as a string; pydantic converts it; 1 is a bool; density above 1 keeps all
    cfg = _yaml(models, """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 1, density: 5e-1}
  - model: c
    parameters: {weight: 2, density: 1.5}
parameters: {normalize: 1}
""")
    plan = merging.read_mergekit_yaml(cfg)
    assert plan.hparams == {"weight": [1.0, 2.0], "density": [0.5, 1.0], "normalize": True}


@pytest.mark.parametrize("given, read", [
    ('"false"', False), ('"TRUE"', True), ('"0"', False), ('"1"', True), ("'yes'", True), ("'No'", False),
    ("'on'", True), ("'off'", False), ("'t'", True), ("'F'", False), ("'y'", True), ("'n'", False),
    ("1.0", True), ("0.0", False), ("off", False),  # YAML 1.1 reads a bare off as false already
])
def test_quoted_booleans_read_as_mergekits_pydantic_reads_them(models, given, read):
    # pydantic v2's lax bool: these strings (any case), 0/1 and 0.0/1.0
    cfg = _yaml(models, f"merge_method: ties\nbase_model: base\nmodels: [{{model: a, parameters: {{weight: 1}}}}]\n"
                        f"parameters: {{normalize: {given}}}\n")
    assert merging.read_mergekit_yaml(cfg).hparams["normalize"] is read


@pytest.mark.parametrize("given", ['"2"', '" true"', '""', '"1.0"', "0.5", '"nope"'])
def test_what_pydantic_does_not_read_as_a_boolean_is_refused_by_name(models, given):
    cfg = _yaml(models, f"merge_method: ties\nbase_model: base\nmodels: [{{model: a, parameters: {{weight: 1}}}}]\n"
                        f"parameters: {{rescale: {given}}}\n")
    with pytest.raises(ValueError, match=r"merge\.yml: parameters\.rescale: expected true or false, got "):
        merging.read_mergekit_yaml(cfg)


def test_cli_runs_the_recipe_and_refuses_other_merge_settings(models):
    cfg = _yaml(models, """
merge_method: task_arithmetic
base_model: base
models: [{model: a}, {model: b}]
parameters: {weight: 1.0, lambda: 0.5}
""")
    report = run([f"mergekit_yaml={cfg}", f"output={models / 'merged'}"], run_dir=models / "run")
    assert report["evaluated"] is False and report["selected"]["lam"] == 0.5
    assert torch.allclose(_merged(models / "merged"), 0.5 * (A + B))
    assert json.loads((models / "run" / "metrics.json").read_text())["mergekit_yaml"] == str(cfg)
    assert (models / "run" / "mergekit_config.yml").read_text() == cfg.read_text()
    assert (models / "merged" / "mergekit_config.yml").read_text() == cfg.read_text()
    with pytest.raises(ValueError, match="drop merge= and merge"):
        run([f"mergekit_yaml={cfg}", "merge=ties", f"output={models / 'm2'}"], run_dir=models / "run2")
    with pytest.raises(ValueError, match="drop pretrained="):
        run([f"mergekit_yaml={cfg}", "pretrained=base", f"output={models / 'm3'}"], run_dir=models / "run3")


@pytest.mark.parametrize("setting, named", [
    ("store=true", "store=True"), ("eval.device=cuda", "eval.device='cuda'"), ("eval.max_batches=3", "eval.max_batches=3"),
    ("learn_max_steps=5", "learn_max_steps=5"), ("smoke_pool=true", "smoke_pool=True"),
    ("bn_stats.batch_size=8", "bn_stats.batch_size=8"), ("+eval.data.batch_size=256", "eval.data.batch_size=256"),
])  # an added top-level key (+extra=1) is refused by every CLI first: tests/test_early_config_checks.py
def test_cli_refuses_settings_a_recipe_run_does_not_read(models, setting, named):
    cfg = _yaml(models, "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: a}]\nparameters: {weight: 1}\n")
    with pytest.raises(ValueError, match=rf"^{named.replace('.', '[.]')} is not read by a mergekit_yaml= run"):
        run([f"mergekit_yaml={cfg}", setting, f"output={models / 'out'}"], run_dir=models / "run")
    assert not (models / "run").exists() and not (models / "out").exists()


@pytest.mark.parametrize("more", [[], ["eval=none"]])
def test_cli_debug_smoke_runs_the_recipe_as_it_is(models, more):
    cfg = _yaml(models, "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: a}]\nparameters: {weight: 1}\n")
    report = run([f"mergekit_yaml={cfg}", "debug=smoke", *more, "seed=3", f"output={models / 'out'}"],
                 run_dir=models / "run")
    assert report["evaluated"] is False and torch.equal(_merged(models / "out"), A)
    assert not (models / "run" / "smoke_pool").exists()


@pytest.mark.parametrize("seed", ["null", "1.7", "-1", "true"])
def test_cli_refuses_a_seed_that_is_no_int_before_writing_anything(models, seed):
    cfg = _yaml(models, "merge_method: dare_linear\nbase_model: base\nmodels: [{model: a}]\n"
                        "parameters: {weight: 1, density: 0.5}\n")
    with pytest.raises(ValueError, match=r"^seed must be an int >= 0, got "):
        run([f"mergekit_yaml={cfg}", f"seed={seed}", f"output={models / 'out'}"], run_dir=models / "run")
    assert not (models / "run").exists() and not (models / "out").exists()


def test_a_hugging_face_merge_with_overwrite_replaces_an_earlier_recipe_output(models):
    """overwrite=True replaces an earlier merge's folder: a merge_mergekit_yaml output's recipe (beside its mtlkit
    card) was refused as a file 'this merge does not write'; a recipe beside anyone else's README still is."""
    cfg = _yaml(models, "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n")
    out = merging.merge_mergekit_yaml(cfg, models / "out")
    merging.merge_to_file("task_arithmetic", models / "base", [models / "a"], out, overwrite=True, lam=0.5)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "tokenizer_config.json"]
    assert "task_arithmetic" in (out / "README.md").read_text() and torch.equal(_merged(out), A * 0.5)
    (out / "mergekit_config.yml").write_text(cfg.read_text())
    (out / "README.md").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"holds README.md, mergekit_config.yml, which this merge does not write"):
        merging.merge_to_file("task_arithmetic", models / "base", [models / "a"], out, overwrite=True, lam=0.5)
    assert (out / "README.md").read_text() == "my notes"


def test_a_single_file_merge_deletes_no_recipe_without_weights_to_replace(models):
    """A recipe folder whose weights are gone (card, config, recipe): merging into it without overwrite=True
    deleted mergekit_config.yml; the recipe goes only with the weights it made, which need overwrite=True."""
    cfg = _yaml(models, "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n")
    out = merging.merge_mergekit_yaml(cfg, models / "out")
    (out / "model.safetensors").unlink()
    recipe = (out / "mergekit_config.yml").read_text()
    merging.merge_to_file("task_arithmetic", models / "base" / "model.safetensors", [models / "a" / "model.safetensors"],
                          out, lam=0.5)
    assert (out / "mergekit_config.yml").read_text() == recipe and torch.equal(_merged(out), A * 0.5)


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("named", ["folder", "file"])
def test_a_single_file_merge_over_a_recipe_output_removes_the_stale_recipe(models, named, sharded):
    """The same refusal and clean-up whether `out` names the folder or its model.safetensors (the file name
    skipped both: no overwrite needed, the old shards, index, recipe and card kept beside the new weights)."""
    cfg = _yaml(models, "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {density: 0.5, weight: 1.0}\n"
                        "  - model: b\n    parameters: {density: 0.5, weight: 1.0}\n")
    if sharded:  # two tensors, so two shards
        for name, w in (("base", BASE), ("a", A), ("b", B)):
            save_file({"layer.weight": w, "layer.bias": w[:2].clone()}, str(models / name / "model.safetensors"))
    out = merging.merge_mergekit_yaml(cfg, models / "out", shard_size=8 if sharded else None)
    assert (out / "mergekit_config.yml").is_file() and (out / "model.safetensors.index.json").is_file() == sharded
    before = sorted(p.name for p in out.iterdir())
    args = ("task_arithmetic", models / "base" / "model.safetensors", [models / "a" / "model.safetensors"],
            out if named == "folder" else out / "model.safetensors")
    with pytest.raises(FileExistsError, match="holds sharded weights" if sharded else "exists; pass overwrite=True"):
        merging.merge_to_file(*args, lam=0.5)
    assert sorted(p.name for p in out.iterdir()) == before
    merging.merge_to_file(*args, overwrite=True, lam=0.5)
    # the folder once held task-arithmetic weights beside the ties recipe that did not make them
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "tokenizer_config.json"]
    assert "task_arithmetic" in (out / "README.md").read_text() and torch.equal(_merged(out), A * 0.5)


@pytest.mark.parametrize("entries, named", [
    ("[{model: a}, {model: lnk}]", r"models\[1\]\.model: 'lnk' is base_model \('base'\)"),
    ("[{model: lnk}, {model: base}]", r"models\[0\]\.model: 'lnk' is base_model \('base'\)"),
])
def test_cli_refuses_the_base_reached_through_a_linked_model_file_before_its_run_folder(models, entries, named):
    """A folder whose model.safetensors links to the base's file is the base: it was refused only by the merge,
    after the run folder, as 'finetuned[1]'; now the recipe reading refuses it, naming the recipe's entry."""
    (models / "lnk").mkdir()
    (models / "lnk" / "model.safetensors").symlink_to(models / "base" / "model.safetensors")
    (models / "lnk" / "config.json").write_text((models / "base" / "config.json").read_text())
    cfg = _yaml(models, f"merge_method: task_arithmetic\nbase_model: base\nmodels: {entries}\nparameters: {{weight: 1}}\n")
    with pytest.raises(ValueError, match=rf"^{cfg}: {named}"):
        run([f"mergekit_yaml={cfg}", f"output={models / 'out'}"], run_dir=models / "run")
    assert not (models / "run").exists() and not (models / "out").exists()


def test_a_model_linked_twice_is_listed_twice(models):
    (models / "lnk").mkdir()
    (models / "lnk" / "model.safetensors").symlink_to(models / "a" / "model.safetensors")
    cfg = _yaml(models, "merge_method: ties\nbase_model: base\nmodels: [{model: a}, {model: lnk}]\n"
                        "parameters: {weight: 1}\n")
    with pytest.raises(ValueError, match=r"models\[1\]\.model: 'lnk' is models\[0\] again"):
        merging.read_mergekit_yaml(cfg)


@pytest.mark.parametrize("named", ["folder", "file"])
def test_a_single_file_merge_keeps_a_recipe_that_no_mtlkit_merge_wrote(models, named):
    """A user's folder (their weights and their own mergekit_config.yml, no mtlkit card): overwrite=True replaces
    model.safetensors but deleted the recipe, which check_replaceable counts as a merge's only beside its card."""
    out = models / "mine"
    out.mkdir()
    save_file({"layer.weight": B}, str(out / "model.safetensors"))
    (out / "mergekit_config.yml").write_text("merge_method: slerp  # my plan\n")
    merging.merge_to_file("task_arithmetic", models / "base" / "model.safetensors", [models / "a" / "model.safetensors"],
                          out if named == "folder" else out / "model.safetensors", overwrite=True, lam=0.5)
    assert (out / "mergekit_config.yml").read_text() == "merge_method: slerp  # my plan\n"
    assert torch.equal(_merged(out), A * 0.5)


@pytest.mark.parametrize("extra, said", [
    *((f"shard_size={s}", rf"^shard_size {q}") for s, q in [("5B", "'5B': sizes are bytes"), ("0.5", "0.5 is 0.5 bytes"),
                                                            ("1.0001KB", "'1.0001KB' is 1000.1 bytes"),
                                                            ("0", "0 is 0 bytes"), ("-1", "-1 is -1 bytes"),
                                                            ("abc", "must be bytes or a size")]),
    ("models=v", r"^models do not match: 'layer\.weight' has shape \(4\) in .*base.* but \(5\) in .*v"),
    ("models=h", r"^models do not match: 'layer\.weight' is torch\.float32 in .*base.* but torch\.bfloat16 in .*h"),
    ("models=m", r"^models do not match: 'layer\.weight' is in base/model\.safetensors but missing from m/model\.safet.*"
                 r"a Hugging Face folder holds every tensor of its base model"),
])
def test_cli_refuses_what_headers_and_settings_show_before_the_run_folder(models, console, capfd, extra, said):
    """A bad shard_size and models whose keys, shapes or dtypes differ were found by the merge, after the run folder
    (an error line, then run_dir: and a FAILED folder): now one error line and no folder."""
    import re

    from tests.test_early_config_checks import _refused_without_folder

    _folder(models / "v", torch.ones(5))
    _folder(models / "h", A, dtype=torch.bfloat16)
    (models / "m").mkdir()
    save_file({"other.weight": A}, str(models / "m" / "model.safetensors"))
    second = extra.removeprefix("models=") if extra.startswith("models=") else "b"
    cfg = _yaml(models, f"merge_method: task_arithmetic\nbase_model: base\nmodels: [{{model: a}}, {{model: {second}}}]\n"
                        "parameters: {weight: 1}\n")
    message = _refused_without_folder(console, capfd, "merging.cli", f"mergekit_yaml={cfg}", f"output={models / 'out'}",
                                      *([extra] if extra.startswith("shard_size") else []))
    assert re.search(said, message), message
    assert not (models / "out").exists()


def test_cli_overwrite_refuses_an_output_holding_a_users_file_before_the_run_folder(models, console, capfd):
    """overwrite=true would replace the folder whole: refused naming the file, as before, but now before the run
    folder (it was an error line, then run_dir: and a FAILED folder)."""
    from tests.test_early_config_checks import _refused_without_folder

    cfg = _yaml(models, "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: a}]\nparameters: {weight: 1}\n")
    out = merging.merge_mergekit_yaml(cfg, models / "out")
    (out / "notes.txt").write_text("mine")
    message = _refused_without_folder(console, capfd, "merging.cli", f"mergekit_yaml={cfg}", f"output={out}",
                                      "overwrite=true")
    assert message.startswith(f"{out} holds notes.txt, which this merge does not write"), message
    assert (out / "notes.txt").read_text() == "mine" and torch.equal(_merged(out), A)


def _both(folder, shards_w, single_w):
    """A folder holding two sets of weights: shards listed by model.safetensors.index.json, and model.safetensors."""
    _folder(folder, single_w)
    save_file({"layer.weight": shards_w}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"layer.weight": "model-00001-of-00001.safetensors"}}))
    return folder


def test_a_recipe_reads_a_folder_with_both_weight_sets_as_mergekit_does(models, caplog):
    """mergekit reads the index's shards when a folder holds model.safetensors too (transformers reads
    model.safetensors): a recipe's run read model.safetensors and silently merged another model than mergekit's."""
    _both(models / "both", B, C)
    cfg = _yaml(models, "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: a}, {model: both}]\n"
                        "parameters: {weight: 1}\n")
    with caplog.at_level("WARNING", logger="merging.sources"):
        report = run([f"mergekit_yaml={cfg}", f"output={models / 'out'}"], run_dir=models / "run")
        native = merging.merge_to_file("task_arithmetic", models / "base", [models / "a", models / "both"],
                                       models / "native.safetensors", lam=1.0)
    assert report["evaluated"] is False
    assert torch.equal(_merged(models / "out"), A + B)  # the shards, as mergekit
    assert torch.equal(load_file(str(native))["layer.weight"], A + C)  # a native merge: model.safetensors, as transformers
    said = [r.getMessage() for r in caplog.records if "holds both" in r.getMessage()]
    assert len(said) == 2, said
    assert ("reading the shards both/model.safetensors.index.json lists (as mergekit does; transformers reads "
            "model.safetensors) and ignoring model.safetensors") in said[0]  # the recipe's path, from the cwd
    assert f"reading {models / 'both' / 'model.safetensors'} (as transformers does; mergekit reads the shards" in said[1]


def test_a_recipe_refuses_a_safetensors_file_output_before_the_run_folder(models, console, capfd):
    """A recipe writes a folder: a new .safetensors output was refused by the merge after the run folder (start_run
    ran the output check only on an existing output), in terms of copy_files, which the recipe never set."""
    from tests.test_early_config_checks import _refused_without_folder

    cfg = _yaml(models, "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: a}]\nparameters: {weight: 1}\n")
    out = models / "new.safetensors"
    said = f"{out}: a mergekit recipe writes a Hugging Face folder"
    with pytest.raises(ValueError, match=f"^{said}"):
        merging.merge_mergekit_yaml(cfg, out)
    assert _refused_without_folder(console, capfd, "merging.cli", f"mergekit_yaml={cfg}", f"output={out}").startswith(said)
    assert not out.exists()
