"""mtl-prune end to end: the job on a model folder, its outputs and its refusals; the real CLI (slow)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import mtl
from mtl.flops import count_params
from mtl.io import save_model
from mtl.models import create_model
from pruning.job import run

DATA = {"name": "scenes", "size": 32, "n_train": 32, "n_val": 16, "n_test": 16, "batch_size": 8}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An (untrained) model folder that knows its data, as mtl-train writes it."""
    torch.manual_seed(0)
    m = create_model(["semseg", "depth", "classification"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    path = tmp_path_factory.mktemp("src") / "model"
    save_model(m, path, meta={"data": DATA})
    return path


def test_job_writes_a_reloadable_smaller_folder_and_report(folder, tmp_path):
    report = run(["prune=l1", f"model={folder}", "prune.ratio=0.5", "calib.batches=1", "eval.max_batches=1",
                  "eval.latency_repeats=2", "data={batch_size: 4}"], run_dir=tmp_path / "run")  # the documented override
    out = tmp_path / "run"
    assert report["run_dir"] == str(out.resolve())  # the in-process report says where the run is
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors"]
    pruned = mtl.load_model(out / "model")
    assert count_params(pruned) == report["params"]["after"] < report["params"]["before"]
    # the data override is this run's, not the training data's record
    assert pruned.meta["prune"]["data"] == {"batch_size": 4}
    assert pruned.meta["data"] == mtl.load_model(folder).meta["data"]
    assert report["reload_max_abs_diff"] == 0.0
    assert json.loads((out / "metrics.json").read_text())["method"] == "l1"
    for png in ("kept_channels.png", "delta_m_vs_flops.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert set(report["metrics"]["after"]) == {"semseg", "depth", "classification"}
    assert report["latency_ms"]["threads"] == 1 and report["latency_ms"]["after"] > 0
    assert pruned.meta["data"]["name"] == "scenes" and pruned.meta["pruned_from"] == str(folder)


def test_calibrating_on_the_test_split_is_refused_before_the_run_folder(folder, tmp_path):
    """calib.* were checked after the model and its data were loaded, leaving a FAILED run folder."""
    with pytest.raises(ValueError, match="calib.split must be train or val .*got 'test'"):
        run(["prune=l1", f"model={folder}", "calib.split=test"], run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="calib.batches must be an int >= 1, got 0"):
        run(["prune=l1", f"model={folder}", "calib.batches=0"], run_dir=tmp_path / "run0")
    with pytest.raises(ValueError, match="calib.batches must be an int >= 1, got 1.5"):  # ran on 1 batch
        run(["prune=taylor", f"model={folder}", "calib.batches=1.5"], run_dir=tmp_path / "run15")
    assert sorted(tmp_path.iterdir()) == []


def test_one_ignored_layer_name_is_that_layer_not_its_characters(folder, tmp_path):
    """ignored_layers=<name> was split into characters ('unknown module(s) ['b', 'a', ...]') after loading the model;
    one name is a one-element list, as pruning.prune takes it, and a list of non-names is refused before any folder."""
    before = mtl.load_model(folder).backbone.body.conv1[0].out_channels
    report = run(["prune=l1", f"model={folder}", "prune.ratio=0.5", "ignored_layers=backbone.body.conv1.0",
                  "calib.batches=1", "eval.max_batches=1", "eval.latency_repeats=1"], run_dir=tmp_path / "run")
    pruned = mtl.load_model(tmp_path / "run" / "model")
    assert pruned.backbone.body.conv1[0].out_channels == before  # left whole, with every channel it touches
    assert "backbone.body.conv1.0" not in [layer["layer"] for layer in report["layers"]]
    assert report["params"]["after"] < report["params"]["before"]  # the other layers were pruned
    for bad in ("ignored_layers=[backbone.body.conv1.0,3]", "ignored_layers=null", "ignored_layers=[[a]]"):
        with pytest.raises(ValueError, match=r"ignored_layers must be a module name or a list of them"):
            run(["prune=l1", f"model={folder}", bad], run_dir=tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_a_pruning_in_rounds_records_the_finetunes_learning_rate(folder, tmp_path):
    """meta.prune kept finetune_steps but not finetune.lr, which changes the weights later rounds rank."""
    report = run(["prune=l1", f"model={folder}", "prune.ratio=0.3", "rounds=2", "finetune.steps=1",
                  "finetune.lr=5e-4", "seed=3", "calib.batches=1", "eval.max_batches=1", "eval.latency_repeats=1"],
                 run_dir=tmp_path / "run")
    meta = mtl.load_model(tmp_path / "run" / "model").meta
    record = meta["prune"]
    # the seed orders the fine-tuning's batches, so it changes the result; meta's own seed stays the parent's
    assert (record["rounds"], record["finetune_steps"], record["finetune_lr"], record["seed"]) == (2, 1, 5e-4, 3)
    assert meta.get("seed") == mtl.load_model(folder).meta.get("seed") and report["seed"] == 3


def test_folder_without_data_config_is_refused_and_nothing_written(tmp_path):
    m = create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    save_model(m, tmp_path / "nodata")
    with pytest.raises(ValueError, match=r"nodata/config.json has no meta.data"):
        run(["prune=l1", f"model={tmp_path / 'nodata'}"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()


def test_a_config_json_nested_too_deep_is_not_valid_json_naming_the_file(tmp_path):
    """With a data.<key> given, the data check read config.json first and let a RecursionError escape bare."""
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match=rf"^model: {deep / 'config.json'}: not valid JSON \("):
        run(["prune=l1", f"model={deep}", "+data.batch_size=4"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()


def test_bad_ratio_is_refused_before_any_work(folder, tmp_path):
    with pytest.raises(ValueError, match=r"prune.ratio must be a number in \[0, 1\)"):
        run(["prune=l1", f"model={folder}", "prune.ratio=1.0"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("where,how", [(".", "is"), ("..", "holds"), ("pruned", "lies inside")])
def test_output_over_the_input_folder_is_refused_before_any_work(folder, tmp_path, where, how):
    """overwrite=true replaces the output folder whole: over the input folder it would destroy it."""
    import shutil

    src = tmp_path / "in" / "model"
    shutil.copytree(folder, src)
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    output = (src / where) if where != "." else src
    with pytest.raises(ValueError, match=rf"output=.* {how} the input model folder .*in/model"):
        run(["prune=l1", f"model={src}", f"output={output}", "overwrite=true", "prune.ratio=0.5"],
            run_dir=tmp_path / "run")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == files
    assert not (tmp_path / "run").exists()


def test_every_job_refuses_an_output_over_any_of_its_inputs(tmp_path):
    """mtl-merge, mtl-export and mtl-extract share the check: merge's pretrained and models too."""
    from omegaconf import OmegaConf

    from mtl.cli.jobs import start_run

    for folder in ("base", "ft/a"):  # inputs must exist (any weights: an eval=none merge's)
        (tmp_path / folder).mkdir(parents=True)
    cfg = OmegaConf.create({"pretrained": str(tmp_path / "base"), "models": [str(tmp_path / "ft" / "a")],
                            "output": str(tmp_path / "ft"), "overwrite": True})
    with pytest.raises(ValueError, match=r"output=.*/ft holds the input model folder .*/ft/a"):
        start_run(cfg, tmp_path / "run", any_weights=True)
    start_run(OmegaConf.merge(cfg, {"output": str(tmp_path / "merged")}), tmp_path / "run", any_weights=True)  # elsewhere: fine


def test_overwrite_never_deletes_a_folder_that_is_not_a_model_folder(folder, tmp_path):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="exists and is not a model folder"):
        run(["prune=l1", f"model={folder}", f"output={victim}", "overwrite=true", "prune.ratio=0.5",
             "calib.batches=1", "eval.max_batches=1", "eval.latency_repeats=1"], run_dir=tmp_path / "run")
    assert (victim / "keep.txt").read_text() == "precious" and (victim / "sub").is_dir()
    # an output holding this run's own folder would delete its config.yaml and log
    with pytest.raises(ValueError, match="is or holds this run's folder"):
        run(["prune=l1", f"model={folder}", f"output={tmp_path / 'runs'}", "overwrite=true"], run_dir=tmp_path / "runs" / "r1")


def test_meta_records_the_settings_used_and_unknown_options_fail_first(folder, tmp_path, monkeypatch):
    import pruning
    import pruning.job as job

    model = mtl.load_model(folder)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pruned, report = pruning.prune(model, "l1", example=x, flops_target=0.2)
    # the target decides (ratio is searched): the record names no ratio
    assert pruned.meta["prune"] == {"method": "l1", "flops_target": 0.2, "round_to": None, "rounds": 1} == {
        "method": "l1", **report["hparams"], "rounds": 1}
    assert pruned.pruning_plan["hparams"] == {"flops_target": 0.2, "round_to": None}
    with pytest.raises(TypeError, match=r"prune method 'l1' has no option\(s\) \['foo'\]; its options: ratio, "):
        pruning.prune(model, "l1", example=x, ratio=0.5, foo=1)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(job, "load_model", no_load)
    with pytest.raises(TypeError, match=r"prune=l1: prune method 'l1' has no option\(s\) \['foo'\]"):
        run(["prune=l1", f"model={folder}", "+prune.foo=1"], run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"prune.flops_target must be a number in \(0, 1\), got 1"):
        run(["prune=l1", f"model={folder}", "+prune.flops_target=1"], run_dir=tmp_path / "run2")


def test_an_unknown_ignored_layer_is_refused_before_the_run_folder_naming_a_close_module(folder, tmp_path, monkeypatch):
    """An unknown name was refused only once the model and its calibration data were loaded, leaving a FAILED run
    folder, and named no module. The names are the folder's model's, built from its config on the meta device."""
    import pruning.job

    monkeypatch.setattr(pruning.job, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for bad, close in (("backbone.nope", "backbone.body"), ("decoder.neck.refine.7", "decoder.neck.refine.0 or decoder.neck.refine.1 or "
                                                                            "decoder.neck.refine.2"), ("backbone.body.conv1.O", "backbone.body.conv1.0")):
        with pytest.raises(ValueError, match=rf"^ignored_layers names unknown module\(s\) \['{bad}'\] "
                                             rf"\(did you mean {close}\?\); the model's module names are those of "
                                             r"model.named_modules\(\)"):
            run(["prune=l1", f"model={folder}", f"ignored_layers=[backbone.body.conv1.0,{bad}]"], run_dir=tmp_path / "r")
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override, match", [
    ("eval.latency_batch=0", r"eval.latency_batch must be an int >= 1, got 0"),
    ("eval.latency_repeats=0", r"eval.latency_repeats must be an int >= 1, got 0"),
    ("eval.latency_threads=0", r"eval.latency_threads must be an int >= 1, got 0"),
    ("eval.max_batches=0", r"eval.max_batches must be an int >= 1, got 0"),
    ("rounds=1.5", r"rounds must be an int >= 1, got 1.5"),
    ("finetune.steps=-3", r"finetune.steps must be an int >= 0, got -3"),
    ("seed=1.7", r"seed must be an int in \[0, 2\*\*64 - 1\], got 1.7"),  # was truncated to 1
    ("seed=null", r"seed must be an int in \[0, 2\*\*64 - 1\], got None"),  # was a bare int() TypeError
    ("seed=18446744073709551616", r"seed must be an int in \[0, 2\*\*64 - 1\], got 18446744073709551616"),  # torch's
    # "Overflow when unpacking long long", after the run folder was made
])
def test_job_settings_are_refused_before_the_model_is_written(folder, tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        run(["prune=l1", f"model={folder}", "prune.ratio=0.3", "calib.batches=1", override], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("method, knob", [("l1", "ratio"), ("taylor", "ratio"), ("pagcp", "budget")])
def test_a_knob_given_beside_flops_target_is_refused_not_dropped(folder, tmp_path, method, knob, monkeypatch):
    import pruning
    import pruning.job as job

    model = mtl.load_model(folder)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    value = 0.9 if knob == "ratio" else 5.0
    with pytest.raises(ValueError, match=rf"^{knob}={value} and flops_target=0.2 both given: flops_target searches "):
        pruning.prune(model, method, example=x, flops_target=0.2, **{knob: value})
    monkeypatch.setattr(job, "load_model", lambda *a: (_ for _ in ()).throw(AssertionError("model loaded first")))
    for typed in ([f"prune.{knob}={value}", "prune.flops_target=0.2"], ["prune.flops_target=0.2", f"++prune.{knob}={value}"]):
        with pytest.raises(ValueError, match=rf"^prune.{knob}={value} and prune.flops_target=0.2 both given"):
            run([f"prune={method}", f"model={folder}", *typed], run_dir=tmp_path / "run")
        assert not (tmp_path / "run").exists()  # refused from the command line alone: no run folder


def test_an_option_the_method_lacks_is_named_so_beside_flops_target(folder, tmp_path):
    """+prune.budget=5 with a flops_target for l1 was refused as 'budget and flops_target both given'."""
    with pytest.raises(TypeError, match=r"^prune=l1: prune method 'l1' has no option\(s\) \['budget'\]; its options: "):
        run(["prune=l1", f"model={folder}", "prune.flops_target=0.2", "+prune.budget=5"], run_dir=tmp_path / "run")


def test_the_config_files_knob_gives_way_to_a_typed_flops_target(folder, tmp_path):
    # configs/prune/l1.yaml's ratio: 0.3 is not the user's: a target alone on the command line replaces it
    report = run(["prune=l1", f"model={folder}", "prune.flops_target=0.2", "calib.batches=1", "eval.max_batches=1",
                  "eval.latency_repeats=1"], run_dir=tmp_path / "run")
    assert report["hparams"] == {"flops_target": 0.2, "round_to": None}
    assert report["flops"]["reduction"] >= 0.2


@pytest.mark.parametrize("overrides, match", [
    (["finetune.lr=-1"], r"^finetune.lr must be a positive finite number, got -1$"),
    (["finetune.lr=nan"], r"^finetune.lr must be a positive finite number, got nan$"),
    (["finetune.lr=inf"], r"^finetune.lr must be a positive finite number, got inf$"),
    (["finetune.lr=fast"], r"^finetune.lr must be a positive finite number, got 'fast'$"),
    # lr 0: AdamW's step and weight decay are both scaled by lr, so no weight would change
    (["finetune.lr=0"], r"^finetune.lr must be a positive finite number, got 0 \(finetune.steps > 0 runs AdamW "),
    (["finetune.lr=-1", "finetune.steps=0"], r"^finetune.lr must be a positive finite number, got -1$"),
])
def test_finetune_lr_is_refused_by_its_key_before_the_model_loads(folder, tmp_path, overrides, match, monkeypatch):
    import pruning.job as job

    monkeypatch.setattr(job, "load_model", lambda *a: (_ for _ in ()).throw(AssertionError("model loaded first")))
    with pytest.raises(ValueError, match=match):
        run(["prune=l1", f"model={folder}", "rounds=2", "finetune.steps=1", *overrides], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()


def test_finetune_lr_zero_is_accepted_where_no_finetune_step_runs():
    import pruning.job as job

    assert job.check_finetune_lr(0, steps_run=False) == 0.0
    with pytest.raises(ValueError, match=r"finetune.lr must be a positive finite number, got 0"):
        job.finetune_steps(torch.nn.Linear(1, 1), None, steps=2, lr=0)  # the Python entry checks too, before any step


@pytest.mark.parametrize("override, match", [
    ("prune.max_budget=-1", r"prune.max_budget must be a positive number, got -1"),
    ("prune.budget=-1", r"prune.budget must be a positive number, got -1"),
    ("prune.search_steps=1.5", r"prune.search_steps must be an int >= 0, got 1.5"),
    ("prune.search_steps=-2", r"prune.search_steps must be an int >= 0, got -2"),
    ("prune.shrink=0", r"prune.shrink must be a number in \(0, 1\], got 0"),
    ("prune.keep_fraction=2", r"prune.keep_fraction must be a number in \(0, 1\], got 2"),
    ("prune.importance=grad", r"prune.importance must be 'l1' or 'taylor', got 'grad'"),
    ("prune.decay_on=layers", r"prune.decay_on must be 'pruned' or 'visited', got 'layers'"),
    ("prune.reference=first", r"prune.reference must be 'running_max' or 'last', got 'first'"),
    ("+prune.ratios=[0.5,1.5]", r"prune.ratios must be a non-empty list of numbers in \(0, 1\)"),
])
def test_pagcp_settings_are_named_with_their_cli_key_before_any_work(folder, tmp_path, override, match, monkeypatch):
    import pruning.job as job

    monkeypatch.setattr(job, "load_model", lambda *a: (_ for _ in ()).throw(AssertionError("model loaded first")))
    with pytest.raises(ValueError, match=match):
        run(["prune=pagcp", f"model={folder}", override], run_dir=tmp_path / "run")


@pytest.mark.parametrize("override, match", [
    ("prune.combine=min", r"prune.combine must be 'sum' or 'max', got 'min'"),
    ("prune.scope=layer", r"prune.scope must be 'global' or 'uniform', got 'layer'"),
    ("prune.criterion=l2", r"prune.criterion must be 'abs' or 'squared', got 'l2'"),
    ("prune.max_layer_ratio=1", r"prune.max_layer_ratio must be a number in \(0, 1\), got 1"),
])
def test_taylor_settings_are_named_with_their_cli_key_before_any_work(folder, tmp_path, override, match, monkeypatch):
    import pruning.job as job

    monkeypatch.setattr(job, "load_model", lambda *a: (_ for _ in ()).throw(AssertionError("model loaded first")))
    with pytest.raises(ValueError, match=match):
        run(["prune=taylor", f"model={folder}", override], run_dir=tmp_path / "run")


def test_relative_paths_are_recorded_absolute(folder, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(folder, tmp_path / "norun")
    monkeypatch.chdir(tmp_path)
    report = run(["prune=l1", "model=norun", "output=rel_out", "prune.ratio=0.5", "calib.batches=1",
                  "eval.max_batches=1", "eval.latency_repeats=1"], run_dir=tmp_path / "run")
    assert report["model"] == str(tmp_path / "norun") and report["output"] == str(tmp_path / "rel_out")
    assert mtl.load_model(tmp_path / "rel_out").meta["pruned_from"] == str(tmp_path / "norun")


def test_pruned_from_is_the_parents_run_when_it_has_one(folder, tmp_path):
    import shutil

    src = tmp_path / "parent_run" / "model"
    shutil.copytree(folder, src)
    parent = mtl.load_model(src)
    save_model(parent, src, meta={**parent.meta, "run_dir": str(src.parent)})
    run(["prune=l1", f"model={src}", "prune.ratio=0.5", "calib.batches=1", "eval.max_batches=1",
         "eval.latency_repeats=1"], run_dir=tmp_path / "run")
    meta = mtl.load_model(tmp_path / "run" / "model").meta
    assert meta["pruned_from"] == str(src.parent) and meta["run_dir"] == str(tmp_path / "run")
    assert meta["prune"] == {"method": "l1", "ratio": 0.5, "flops_target": None, "round_to": None, "rounds": 1}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l1", "l1_global", "taylor", "pagcp"])
def test_cli_smoke_every_method(method, tmp_path):
    env = {**os.environ, "MTL_OUTPUT_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "pruning.cli", f"prune={method}", "debug=smoke",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last == f"run_dir: {tmp_path / 'run'}"
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["params"]["after"] < report["params"]["before"] and report["reload_max_abs_diff"] == 0.0
    if method == "pagcp":  # fine-tuning trains the pruned architecture
        from mtl.train import run as train

        tuned = train(["experiment=scenes_hps", "debug=smoke", "task=[semseg,depth,classification]", "logger=none",
                       "viz.num_samples=0", f"init_from={tmp_path / 'run' / 'model'}"], run_dir=tmp_path / "ft")
        assert count_params(mtl.load_model(tuned / "model")) == report["params"]["after"]


def test_cli_bad_input_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pruning.cli", "prune=l1", f"model={tmp_path / 'missing'}",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "missing" in res.stderr


def test_an_output_under_a_file_is_refused_before_the_work(folder, tmp_path, monkeypatch):
    import pruning

    def refuse(*a, **k):
        raise AssertionError("pruned before the output path was checked")

    monkeypatch.setattr(pruning, "prune", refuse)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"output={tmp_path / 'afile' / 'm'}: {tmp_path / 'afile'} is a "
                                                 r"file, not a folder; choose another output path"):
        run(["prune=l1", f"model={folder}", f"output={tmp_path / 'afile' / 'm'}"], run_dir=tmp_path / "run")


def test_delta_m_against_an_unpruned_metric_of_zero_is_null_not_a_failed_run():
    from pruning.job import delta_m_vs
    from mtl.tasks import create_task

    tasks = {"classification": create_task("classification", num_classes=3), "depth": create_task("depth")}
    before = {"classification": {"accuracy": 0.0}, "depth": {"rmse": 1.0, "abs_err": 1.0, "abs_rel": 1.0}}
    after = {"classification": {"accuracy": 0.5}, "depth": {"rmse": 2.0, "abs_err": 2.0, "abs_rel": 2.0}}
    got = delta_m_vs(before, after, tasks)
    assert got == {"after": None, "why": "classification/accuracy of the unpruned model is 0 (Δm's relative change "
                                         "is undefined)"}
    before["classification"]["accuracy"] = 0.5
    assert delta_m_vs(before, after, tasks) == {"after": pytest.approx(-50.0)}  # depth rmse doubled: -100 / 2 tasks
    after["depth"]["rmse"] = float("nan")  # a diverged fine-tune: named as such, not as a zero
    assert delta_m_vs(before, after, tasks)["why"] == "depth/rmse of the pruned model is nan (Δm's relative change is undefined)"
    del after["depth"]["rmse"]  # not an undefined change but a broken report: the run fails
    with pytest.raises(ValueError, match="metric 'rmse' of task 'depth' is missing in the metrics"):
        delta_m_vs(before, after, tasks)


def test_delta_m_vs_baselines_is_null_with_its_reason_for_the_model_whose_metric_is_not_finite():
    from pruning.job import delta_m_vs_baselines
    from mtl.tasks import create_task

    tasks = {"classification": create_task("classification", num_classes=3), "depth": create_task("depth")}
    base = {"classification": {"accuracy": 0.5}, "depth": {"rmse": 1.0}}
    before = {"classification": {"accuracy": 0.5}, "depth": {"rmse": 2.0}}
    after = {"classification": {"accuracy": 0.75}, "depth": {"rmse": float("nan")}}
    got = delta_m_vs_baselines(base, before, after, tasks)
    # before: (100 · 0 / 0.5 − 100 · (2 − 1) / 1) / 2 tasks
    assert got == {"before": pytest.approx(-50.0), "after": None,
                   "why": "depth/rmse of the pruned model is nan (Δm's relative change is undefined)"}
    after["depth"]["rmse"] = 1.0  # accuracy +50 %, rmse as the baseline: +25
    assert delta_m_vs_baselines(base, before, after, tasks) == {"before": pytest.approx(-50.0), "after": pytest.approx(25.0)}


def test_a_non_finite_metric_with_baselines_still_writes_the_pruned_model(folder, tmp_path, monkeypatch):
    """delta_m against the baselines raised on a NaN metric before save_model: a FAILED run without its model."""
    import pruning.job as job

    evaluated = []

    def poisoned(model, *args):  # the second evaluation is the pruned model's: one metric with no valid pixel
        metrics = job_evaluate(model, *args)
        evaluated.append(model)
        if len(evaluated) == 2:
            metrics["depth"]["rmse"] = float("nan")
        return metrics

    job_evaluate = job.evaluate_all
    monkeypatch.setattr(job, "evaluate_all", poisoned)
    baselines = tmp_path / "b.json"
    baselines.write_text(json.dumps({"semseg": {"miou": 0.5}, "depth": {"rmse": 1.0}, "classification": {"accuracy": 0.5}}))
    report = run(["prune=l1", f"model={folder}", "prune.ratio=0.3", "calib.batches=1", "eval.max_batches=1",
                  "eval.latency_repeats=2", f"baselines={baselines}"], run_dir=tmp_path / "run")
    why = "depth/rmse of the pruned model is nan (Δm's relative change is undefined)"
    assert report["delta_m"]["after"] is None and report["delta_m"]["why"] == why
    vs = report["delta_m_vs_baselines"]
    assert vs["after"] is None and vs["why"] == why and isinstance(vs["before"], float)
    assert mtl.load_model(tmp_path / "run" / "model") is not None
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["delta_m_vs_baselines"]["after"] is None


def test_a_bad_baselines_file_is_refused_before_pruning(folder, tmp_path, monkeypatch):
    """The baselines file used to be read after pruning and testing: a typo in it cost the whole run."""
    import pruning

    def never(*args, **kwargs):
        raise AssertionError("pruned before the baselines file was read")

    monkeypatch.setattr(pruning, "prune", never)
    baselines = tmp_path / "b.json"
    baselines.write_text(json.dumps({"semseg": {"miou": 0.5}}))  # depth and classification missing
    with pytest.raises(Exception, match=r"b\.json.*depth|depth.*b\.json"):
        run(["prune=l1", f"model={folder}", "calib.batches=1", f"baselines={baselines}"], run_dir=tmp_path / "run")
    # read before the run folder was made, not after loading the model: no FAILED run folder is left
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=rf"^cannot read baselines file {tmp_path}/missing\.json: No such file"):
        run(["prune=l1", f"model={folder}", f"baselines={tmp_path}/missing.json"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_diverged_finetune_fails_naming_the_tensor_before_writing_the_model(folder, tmp_path):
    """It wrote model/ with NaN weights, which the reload check (and every later load_model) then refused."""
    with pytest.raises(ValueError, match=r"finetune: tensor '[\w.]+' of the pruned model holds NaN or infinite values "
                                         r"after 3 step\(s\) at finetune.lr=1e\+12; lower finetune.lr"):
        run(["prune=l1", f"model={folder}", "prune.ratio=0.3", "calib.batches=1", "rounds=2", "finetune.steps=3",
             "finetune.lr=1e12", "eval.max_batches=1"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()


def test_first_non_finite_names_a_buffer_too():
    from pruning.job import first_non_finite

    m = create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    assert first_non_finite(m) is None
    key = next(k for k, t in m.state_dict().items() if k.endswith("running_var"))
    m.state_dict()[key][0] = float("inf")  # state_dict shares storage with the module
    assert first_non_finite(m) == key


def test_the_prune_table_gives_the_reason_of_a_null_delta_m(capsys):
    from pruning.job import print_table

    before, after = {"classification": {"accuracy": 0.8}}, {"classification": {"accuracy": float("nan")}}
    why = "classification/accuracy of the pruned model is nan (Δm's relative change is undefined)"
    print_table({"method": "l1", "hparams": {}, "metrics": {"before": before, "after": after},
                 "delta_m": {"after": None, "why": why},
                 "flops": {"before": 10**6, "after": 5 * 10**5, "reduction": .5},
                 "params": {"before": 10, "after": 5, "reduction": .5},
                 "latency_ms": {"before": 1.0, "after": 1.0, "speedup": 1.0, "threads": 1}})
    out = capsys.readouterr().out  # the summary console is 160 columns wide off a TTY: one table row
    assert f"n/a: {why}" in out and "unpruned model is 0" not in out, out


def test_the_prune_cli_shows_its_phases_and_pagcps_decisions_on_stdout(tmp_path):
    """PAGCP's layer-by-layer lines went to prune.log only: 17 s of silence on the console."""
    import os

    out = subprocess.run([sys.executable, "-m", "pruning.cli", "prune=pagcp", "debug=smoke", "prune.flops_target=0.4",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(ln.startswith("[prune] pagcp on 2 calibration batch(es)") for ln in lines)
    assert any(ln.startswith("pagcp 1/") and "channels removed" in ln for ln in lines)
    assert any(ln.startswith("[prune] CPU latency") for ln in lines) and lines[-1] == f"run_dir: {tmp_path / 'run'}"


def test_report_measurements_give_every_module_its_own_mode_back():
    """evaluate_all and latency_ms left a train-mode model in eval mode (dropout off, BN frozen for the caller)."""
    from types import SimpleNamespace

    from pruning.report import evaluate_all, latency_ms

    torch.manual_seed(0)
    model = create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": 8})
    model.train()
    model.decoder.eval()  # a mixed-mode model comes back mixed
    before = [(n, m.training) for n, m in model.named_modules()]
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    batches = [{"image": x, "depth": torch.rand(2, 1, 32, 32)}]
    dm = SimpleNamespace(val_dataloader=lambda: batches, test_dataloader=lambda: batches)
    evaluate_all(model, dm, "test")
    latency_ms(model, x, repeats=1, warmup=0)
    hook.remove()
    assert seen == [False, False]  # measured in eval mode
    assert [(n, m.training) for n, m in model.named_modules()] == before


def test_an_overwrite_rerun_without_delta_m_keeps_no_earlier_delta_m_plot(folder, tmp_path, monkeypatch):
    """Δm undefined (no plot this time): the earlier run's delta_m_vs_flops.png stayed beside the new metrics.json."""
    import pruning.job

    args = [f"model={folder}", "prune.ratio=0.5", "calib.batches=1", "eval.max_batches=1", "eval.latency_repeats=1"]
    run(["prune=l1", *args], run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "delta_m_vs_flops.png").is_file()
    monkeypatch.setattr(pruning.job, "delta_m_vs", lambda *a: {"after": None, "why": "undefined here"})
    report = run(["prune=l1", *args, "overwrite=true"], run_dir=tmp_path / "run")
    assert report["delta_m"]["after"] is None and not (tmp_path / "run" / "delta_m_vs_flops.png").exists()


def _nyu_mat_model(tmp_path):
    """A model folder whose meta records a NYUv2 .mat data config (empty stand-in files: refusals come first)."""
    for name in ("a.mat", "b.mat", "splits.json", "c40.mat"):
        (tmp_path / name).write_text("")
    m = create_model(["semseg", "depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    save_model(m, tmp_path / "model", meta={"data": {"name": "nyuv2", "root": str(tmp_path / "a.mat"),
                                                     "splits_file": str(tmp_path / "splits.json"),
                                                     "class_mapping": str(tmp_path / "c40.mat")}})


def test_a_data_override_is_judged_over_the_recorded_data_settings_before_the_run_folder(tmp_path):
    """A new .mat data.root keeps the folder's recorded splits_file and class_mapping (datamodule_for merges them):
    judging the override alone would refuse it for a missing splits_file."""
    _nyu_mat_model(tmp_path)
    from pruning.job import _check_data_settings
    from omegaconf import OmegaConf

    _check_data_settings(OmegaConf.create({"model": str(tmp_path / "model"), "data": {"root": str(tmp_path / "b.mat")}}))
    with pytest.raises(FileNotFoundError, match=r"^nyuv2: data.class_mapping '.*none\.mat' does not exist"):
        _check_data_settings(OmegaConf.create({"model": str(tmp_path / "model"),
                                               "data": {"class_mapping": str(tmp_path / "none.mat")}}))


def test_a_data_override_repeating_the_recorded_name_is_judged_over_the_recorded_settings(tmp_path):
    """data.name equal to the recorded one (a whole 'data={name: nyuv2, root: ...}') is still the recorded config
    updated (`rebuild_config`, as datamodule_for builds it): its splits_file and class_mapping count; another name is
    judged alone."""
    _nyu_mat_model(tmp_path)
    from pruning.job import _check_data_settings
    from omegaconf import OmegaConf

    model = str(tmp_path / "model")
    _check_data_settings(OmegaConf.create({"model": model, "data": {"name": "nyuv2", "root": str(tmp_path / "b.mat")}}))
    with pytest.raises(FileNotFoundError, match=r"^nyuv2: data.class_mapping '.*none\.mat' does not exist"):
        _check_data_settings(OmegaConf.create({"model": model, "data": {"name": "nyuv2",
                                                                        "class_mapping": str(tmp_path / "none.mat")}}))
    with pytest.raises(TypeError, match=r"unknown setting data.sise \(did you mean data.size\?\)"):
        _check_data_settings(OmegaConf.create({"model": model, "data": {"name": "scenes", "sise": 8}}))


def test_a_pruned_or_unprunable_folder_is_refused_before_the_run_folder(folder, tmp_path, monkeypatch):
    """An mtl-prune output given as model= was refused only after the run folder was made and the model and its
    calibration data loaded (a FAILED run folder left); the folder's config says it (its "pruning" plan, its family)."""
    import pruning
    import pruning.job as job

    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pruned, _ = pruning.prune(mtl.load_model(folder), "l1", example=x, ratio=0.5)
    save_model(pruned, tmp_path / "pruned", meta={"data": DATA})
    slim = create_model(["semseg", "depth"], family="slimmable", decoder={"name": "slimmable", "channels": 12},
                        backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16], "depths": [1, 1],
                                  "out_indices": [1, 2]})
    save_model(slim, tmp_path / "slim", meta={"data": DATA})
    monkeypatch.setattr(job, "load_model", lambda *a: (_ for _ in ()).throw(AssertionError("model loaded first")))
    for name, says in (("pruned", r"this model was pruned already"), ("slim", r"model family 'slimmable' .*cannot be pruned yet")):
        with pytest.raises(ValueError, match=rf"^model={tmp_path / name}: {says}"):
            run(["prune=l1", f"model={tmp_path / name}", "prune.ratio=0.5"], run_dir=tmp_path / "run")
        assert not (tmp_path / "run").exists()
