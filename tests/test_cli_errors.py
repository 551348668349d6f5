"""CLI errors: one line naming the problem, exit status 1, the run folder marked FAILED."""
import json
import logging
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from mtl.cli import train as train_cli
from mtl.cli.common import check_group_choices, one_line
from mtl.cli.failures import FAILED


def run_main(monkeypatch, tmp_path, *overrides):
    """mtl-train's console entry in-process; returns (exit code, stderr lines, run folders)."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("MTL_OUTPUT_DIR", str(out))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["mtl-train", "debug=smoke", "logger=none", "viz.num_samples=0", *overrides])
    # console handlers made by an earlier in-process run keep that test's (closed) stderr
    for name in [None, *logging.root.manager.loggerDict]:
        for h in getattr(logging.getLogger(name), "handlers", []):
            if type(h) is logging.StreamHandler:
                monkeypatch.setattr(h, "stream", sys.stderr)
    with pytest.raises(SystemExit) as exc:
        train_cli.main()
    runs = sorted(out.glob("*/runs/*"))  # <name>/runs/<time>: train, or an experiment's name
    return exc.value.code, runs


def bad_splits(tmp_path) -> list[str]:
    """The overrides of a run that fails after its folder is made: a NYUv2 splits file's content is read with the data
    (baselines.variant=bogus was the example: a setting alone, it is refused before any run folder now)."""
    pytest.importorskip("h5py")
    for name, text in (("nyu.mat", ""), ("c40.mat", ""), ("splits.json", '{"trainNdxs": [1]}')):
        (tmp_path / name).write_text(text)
    return ["experiment=nyuv2", f"data.root={tmp_path}/nyu.mat", "task=[bench_semseg,bench_depth]",
            f"data.splits_file={tmp_path}/splits.json", f"data.class_mapping={tmp_path}/c40.mat"]


@pytest.mark.parametrize("overrides, expected", [
    (bad_splits, "nyuv2: splits file '{tmp}/splits.json' has no 'testNdxs'"),
])
def test_error_after_composition_is_one_line_and_marks_the_run_failed(monkeypatch, tmp_path, capfd, overrides, expected):
    expected = expected.format(tmp=tmp_path)
    code, runs = run_main(monkeypatch, tmp_path, *overrides(tmp_path))
    err = capfd.readouterr().err
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err, err
    assert len(runs) == 1
    marker = (runs[0] / FAILED).read_text()
    assert expected in marker and "Traceback" in marker  # the details stay with the run
    assert not (runs[0] / "metrics.json").exists()


@pytest.mark.parametrize("override, expected", [
    ("+trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2 is not supported"),
    ("+trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=1.0: mtlkit clips with optim.grad_clip"),
    # was accepted silently: training went on with norm clipping (optim.grad_clip) or none
    ("+trainer.gradient_clip_algorithm=value", "trainer.gradient_clip_algorithm=value: mtlkit clips only by norm, with "
                                               "optim.grad_clip=<max norm>"),
    ("optim.lr=-1", "optim.lr must be a finite number > 0, got -1"),
    ("optim.lr=abc", "optim.lr must be a finite number > 0, got 'abc' (str)"),
    # were accepted (the check was `not lr > 0`) and failed at step 1 as a non-finite loss
    ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("optim.weight_decay=inf", "optim.weight_decay must be a finite number >= 0, got inf"),
    # named only once the data module was built, leaving a FAILED folder
    ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
    # reached MultiTaskModule as "__init__() got an unexpected keyword argument 'scheduler'" and left a FAILED folder
    ("+optim.scheduler=step", "unknown setting optim.scheduler; the settings here are: lr, weight_decay, warmup_ratio, "
                              "min_lr_ratio, grad_clip"),
    ("+optim.weight_dacay=0", "unknown setting optim.weight_dacay (did you mean optim.weight_decay?)"),
    ("+optim.balancer=uw", "unknown setting optim.balancer; the settings here are: lr,"),  # not MultiTaskModule's own
    # named once the data module was built, after a FAILED folder
    ("data.name=bar", "unknown dataset 'bar'; valid names:"),
    ("+data.augmnt=true", "unknown setting data.augmnt (did you mean data.augment?); the settings here are: size, "
                          "n_train, n_val,"),
    # merged by Hydra into {depth, semseg} without a word
    ("task=[depth,semseg,depth]", "task 'depth' is named twice in 'task=[depth,semseg,depth]'; name each task once"),
    # checked against the built module only, after a FAILED folder
    ("optimized_metric=val/depth/nope", "optimized_metric='val/depth/nope' is not logged; logged: "),
    ("callbacks.model_checkpoint.monitor=val/depth/nope", "callbacks.model_checkpoint.monitor='val/depth/nope' is not "
                                                           "logged; logged: val/loss,"),
    ("callbacks.model_checkpoint.monitor=train/loss", "callbacks.model_checkpoint.monitor='train/loss' is logged per "
                                                       "step"),
    # the model's and balancer's settings: named once the data module was built, after a FAILED folder
    ("backbone.name=resnet_18", "unknown timm backbone 'resnet_18'; similar names: resnet18,"),
    ("balancer.name=foo", "unknown balancer 'foo'; valid names: aligned_mtl,"),
    ('decoder.channels="16"', "decoder.channels must be int, got '16' (str)"),
    ("+decoder.chanels=16", "unknown setting decoder.chanels (did you mean decoder.channels?); the settings here are: "
                            "channels, norm, head,"),
    ("+backbone.drop_pth_rate=0.1", "unknown setting backbone.drop_pth_rate (did you mean backbone.drop_path_rate?)"),
    # the initial-weight keys were left out of the check before the run folder (their weights are not read there)
    ("+backbone.pretrained=no", "backbone.pretrained must be true or false, got 'no'"),
    ("+backbone.checkpoint_path=5", "backbone.checkpoint_path must be a file path, got 5"),  # was Path(5)'s TypeError
    ("experiment=scenes_slimmable +backbone.pretrained=false", "unknown setting backbone.pretrained; the settings "
                                                               "here are: stem,"),
    # the model and the balancer together (was refused by MultiTaskModule, after a FAILED folder)
    ("experiment=scenes_task_moe_vit balancer=upgrad balancer.level=features", "balancer.level=features needs one "
     "representation every task head reads, and family 'task_moe_vit' has none"),
    # a balancer's range error names the full key, as the finiteness check does
    ("balancer=dwa balancer.temperature=-1", "dwa: balancer.temperature must be > 0, got -1"),
    # was "'<' not supported between instances of 'NoneType' and 'int'", naming no key
    ("balancer=cagrad balancer.c=null", "balancer.c must be float, got None"),
])
def test_a_setting_refused_before_the_run_accepts_its_folder_leaves_none(monkeypatch, tmp_path, capfd, override, expected):
    """Refused before config.yaml is written: no FAILED folder without a record of what was asked."""
    code, runs = run_main(monkeypatch, tmp_path, *override.split())
    out, err = capfd.readouterr()
    assert code == 1 and err.strip().startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1, err
    assert runs == [] and "run_dir:" not in out


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_checkpoint_that_needs_unpickling_is_refused(monkeypatch, tmp_path, capfd):
    import torch

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Evil()}, ckpt)
    code, runs = run_main(monkeypatch, tmp_path, f"ckpt_path={ckpt}")
    err = capfd.readouterr()
    assert code == 1 and "unpickled!" not in err.out + err.err
    line = [ln for ln in err.err.splitlines() if ln.startswith("error: ")]
    assert line == [f"error: ckpt_path {ckpt}: refused, it needs unpickling beyond tensors and plain data "
                    "(unsupported GLOBAL print; a weights-only torch.load blocks it)"], err.err


def test_a_zip_that_is_no_torch_checkpoint_is_named_as_such(monkeypatch, tmp_path, capfd):
    """torch's '[enforce fail at inline_container.cc:180] ... not in a subdirectory: a.txt' named neither the file
    nor the setting."""
    import zipfile

    ckpt = tmp_path / "other.zip"
    with zipfile.ZipFile(ckpt, "w") as z:
        z.writestr("a.txt", "x")
    code, _ = run_main(monkeypatch, tmp_path, f"ckpt_path={ckpt}")
    line = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert code == 1 and len(line) == 1 and line[0].startswith(
        f"error: ckpt_path {ckpt}: not a PyTorch/Lightning checkpoint (") and "a.txt" in line[0], line



def test_an_init_from_folder_with_nan_weights_is_refused_before_the_run_folder(monkeypatch, tmp_path, capfd):
    """It loaded silently: the run failed at step 0 blaming a non-finite loss (and balancer.skip_nonfinite=true then
    skipped every step and failed at save)."""
    from safetensors.torch import load_file, save_file

    import mtl

    folder = mtl.save_model(mtl.create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8}),
                            tmp_path / "nanf")
    state = load_file(folder / "model.safetensors")
    state["backbone.body.conv1.0.weight"].view(-1)[0] = float("inf")
    save_file(state, folder / "model.safetensors")  # plain safetensors: no digest
    code, runs = run_main(monkeypatch, tmp_path, f"init_from={folder}")
    line = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert code == 1 and line == [f"error: init_from: {folder / 'model.safetensors'}: key 'backbone.body.conv1.0.weight' "
                                  "holds NaN or infinite values"], line
    assert runs == [] and not (tmp_path / "outputs").exists()


def test_mtl_train_run_refuses_nan_init_from_weights_as_the_cli_does(monkeypatch, tmp_path):
    """The in-process twin never ran the CLI's check: it left a FAILED run folder and a message without
    'init_from:'."""
    from safetensors.torch import load_file, save_file

    import mtl
    import mtl.train

    folder = mtl.save_model(mtl.create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8}),
                            tmp_path / "nanf")
    state = load_file(folder / "model.safetensors")
    state["backbone.body.conv1.0.weight"].view(-1)[0] = float("nan")
    save_file(state, folder / "model.safetensors")
    monkeypatch.setenv("MTL_OUTPUT_DIR", str(tmp_path / "outputs"))
    want = rf"^init_from: {folder / 'model.safetensors'}: key 'backbone.body.conv1.0.weight' holds NaN or infinite"
    with pytest.raises(mtl.io.ModelFolderError, match=want):
        mtl.train.run(["debug=smoke", "logger=none", f"init_from={folder}"])
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(mtl.io.ModelFolderError, match=want):
        mtl.train.run(["debug=smoke", "logger=none", f"init_from={folder}"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_model_file_as_ckpt_path_is_named_for_what_it_is(monkeypatch, tmp_path, capfd):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"{}")
    code, runs = run_main(monkeypatch, tmp_path, f"ckpt_path={weights}")
    err = capfd.readouterr().err.strip()
    assert code == 1 and err == (f"error: ckpt_path {weights}: not a Lightning checkpoint (a torch zip archive such as "
                                 "<run>/checkpoints/last.ckpt); to start from a model folder's weights use init_from=<folder>")


def test_a_run_folder_as_ckpt_path_points_at_its_last_checkpoint(monkeypatch, tmp_path, capfd):
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    code, _ = run_main(monkeypatch, tmp_path, f"ckpt_path={run}")
    err = capfd.readouterr().err.strip()
    assert code == 1 and err == (f"error: ckpt_path {run} is a folder, not a checkpoint file (a Lightning .ckpt, e.g. "
                                 f"<run>/checkpoints/last.ckpt); did you mean {run / 'checkpoints' / 'last.ckpt'}?")


def test_unknown_group_choice_lists_valid_names(monkeypatch, tmp_path, capfd):
    code, runs = run_main(monkeypatch, tmp_path, "task=[semseg,bogus]")
    err = capfd.readouterr().err.strip()
    assert code == 1
    names = sorted(f.stem for f in (Path(__file__).parents[1] / "configs" / "task").glob("*.yaml"))
    assert {"classification", "depth", "semseg"} <= set(names)
    assert err == f"error: unknown task 'bogus' in 'task=[semseg,bogus]'; valid names: {', '.join(names)}"
    assert runs == []  # refused before any folder exists


@pytest.mark.parametrize("override, expected", [
    ("trainer.zzzz=2", "error: Could not override 'trainer.zzzz'; To append to your config use "
                       "+trainer.zzzz=2; Key 'zzzz' is not in struct"),
    ("optim.lr=[1e-3,", "error: cannot parse override 'optim.lr=[1e-3,'; no viable alternative"),
])
def test_hydra_errors_are_one_line_too(monkeypatch, tmp_path, capfd, override, expected):
    """Hydra prints its own errors over several lines; the CLIs print one, like every other error."""
    code, runs = run_main(monkeypatch, tmp_path, override)
    err = capfd.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith(expected), err
    assert runs == []


@pytest.mark.parametrize("cli, args, expected", [
    ("mtl.cli.train", ["experiment=nyuv2"], "required value(s) not set: data.root (pass e.g. data.root=...)"),
    ("mtl.cli.train", ["debug=smoke", "+seeed=3"], "+seeed=3: no setting seeed (did you mean seed?)"),
    ("merging.cli", ["pretrained=???"], "required value(s) not set: pretrained (pass e.g. pretrained=...)"),
    ("pruning.cli", ["model=???"], "required value(s) not set: model (pass e.g. model=...)"),
    ("mtl.cli.export", ["model=???"], "required value(s) not set: model (pass e.g. model=...)"),
    ("mtl.cli.extract", ["model=???"], "required value(s) not set: model (pass e.g. model=...)"),
])
def test_a_command_line_mistake_leaves_no_run_folder(console, capfd, cli, args, expected):
    """An unset ``???`` value left a run folder holding FAILED and an empty log, and a `run_dir:` line for it,
    where a misspelt key leaves none: every command-line mistake is one error line and no folder."""
    code, out = console(cli, *args)
    stdout, err = capfd.readouterr()
    assert code == 1 and err.strip().startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1, err
    assert "run_dir:" not in stdout
    assert not out.exists() or list(out.iterdir()) == [], list(out.rglob("*"))


@pytest.mark.parametrize("cli, args", [
    ("mtl.cli.export", ["model={m0}", "format=timm"]),
    ("merging.cli", ["pretrained={m0}", "models=[{m1}]", "merge=average", "eval=none"]),
])
def test_a_switch_that_is_not_a_bool_is_refused_before_the_output_is_touched(console, capfd, monkeypatch, tmp_path,
                                                                              cli, args):
    """Hydra reads ``overwrite=no``/``maybe`` and ``${oc.env:X}`` as text, and the jobs read a switch with a truth
    test: ``overwrite=no`` replaced an existing output. A switch is a bool or the text true/false (any case)."""
    import torch

    from mtl.io import save_model
    from mtl.models import create_model

    folders = {}
    for name in ("m0", "m1"):
        torch.manual_seed(len(folders))
        model = create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                             decoder={"name": "hps", "channels": 8})
        folders[name] = save_model(model, tmp_path / name)
    args = [a.format(**folders) for a in args] + [f"output={tmp_path / 'result'}"]

    def snapshot():
        return {p: p.read_bytes() for p in sorted((tmp_path / "result").rglob("*")) if p.is_file()}

    def run_folders():
        return {p.parent for p in out.rglob("config.yaml") if p.parent.name != ".hydra"}

    def finishes(*more):  # the console entry, which returns (no exit) when the run finishes
        import importlib

        monkeypatch.setattr(sys, "argv", [cli, *args, *more])
        importlib.import_module(cli).main()
        assert capfd.readouterr().out.strip().splitlines()[-1].startswith("run_dir: ")

    out = tmp_path / "outputs"
    monkeypatch.setenv("MTL_OUTPUT_DIR", str(out))
    finishes()
    before, runs = snapshot(), run_folders()
    capfd.readouterr()
    for value, shown in (("no", "'no'"), ("maybe", "'maybe'"), ("2", "2"), ("1.0", "1.0")):
        code, _ = console(cli, *args, f"overwrite={value}")
        err = capfd.readouterr().err.strip()
        assert code == 1 and err == f"error: overwrite must be true or false, got {shown}", err
    monkeypatch.setenv("OVW", "false")  # an environment variable's text: read as the bool, so the output is kept
    for value in ("${oc.env:OVW}", "0"):  # Hydra's int 0 is false too, as before switches were checked
        code, _ = console(cli, *args, f"overwrite={value}")
        assert code == 1 and "exists; pass overwrite=true to replace it" in capfd.readouterr().err
    assert snapshot() == before and run_folders() == runs  # no output replaced, no run folder
    monkeypatch.setenv("OVW", "TRUE")
    finishes("overwrite=${oc.env:OVW}")
    finishes("overwrite=true")
    finishes("overwrite=1")
    assert len(run_folders()) == len(runs) + 3


@pytest.mark.parametrize("cli, args, key", [
    ("mtl.cli.train", ["debug=smoke", "balancer=pcgrad"], "balancer.skip_nonfinite"),
    ("mtl.cli.train", ["debug=smoke"], "data.augment"),
    ("mtl.cli.train", ["debug=smoke", "experiment=scenes_slimmable"], "strategy.cikd"),
    ("merging.cli", ["merge=adamerging", "pretrained=/nowhere"], "merge.clamp"),
    ("merging.cli", ["merge=concrete_ta", "pretrained=/nowhere"], "merge.rescale"),
])
def test_a_switch_of_a_shared_group_is_a_bool_too(console, capfd, cli, args, key):
    """The shared groups' switches were read with a truth test too: ``balancer.skip_nonfinite=no`` skipped NaN steps,
    ``merge.clamp=no`` clamped. Refused in one line before any run folder; the text true/false is its bool."""
    for value, shown in (("no", "'no'"), ("off", "'off'"), ("2", "2"), ("0.0", "0.0")):
        code, out = console(cli, *args, f"{key}={value}")
        err = capfd.readouterr().err.strip()
        assert code == 1 and err == f"error: {key} must be true or false, got {shown}", err
        assert not out.exists() or list(out.iterdir()) == []


def test_a_switch_takes_the_ints_1_and_0_as_verbose_does():
    """overwrite=1 / overwrite=0 (Hydra ints) worked before switches were checked, then were refused."""
    from mtl.cli.switches import as_switch

    assert [as_switch("k", v) for v in (1, 0, True, False, "TRUE", " false ")] == [True, False, True, False, True, False]
    for bad in (2, -1, 1.0, 0.0, "1", "yes"):
        with pytest.raises(ValueError, match=f"^k must be true or false, got {bad!r}$"):
            as_switch("k", bad)


def test_the_switches_of_other_libraries_groups_are_left_to_them():
    """logger.wandb.log_model takes "all"; trainer and callbacks keys are Lightning's arguments."""
    from mtl.cli.switches import app_switches

    keys = app_switches("mtl.configs")
    assert {"balancer.skip_nonfinite", "merge.clamp", "data.augment", "strategy.cikd"} <= keys
    assert not {k for k in keys if k.split(".")[0] in ("logger", "trainer", "callbacks", "hydra")}, keys


def test_verbose_is_a_bool_too(console, capfd):
    code, out = console("mtl.cli.export", "verbose=no", "model=???")
    assert code == 1 and capfd.readouterr().err.strip() == "error: verbose must be true or false, got 'no'"
    code, _ = console("mtl.cli.export", "verbose=false", "model=???")  # no traceback, the usual one line
    assert code == 1 and capfd.readouterr().err.strip().startswith("error: required value(s) not set: model")
    assert not out.exists() or list(out.iterdir()) == []


def test_a_multirun_job_refused_before_its_folder_keeps_it_marked_failed(console, capfd, tmp_path):
    """A sweep job refused by a check before the job accepts its folder (a missing model=) had its folder removed, as
    a single run's is: the sweep folder showed no trace of it. It stays, holding FAILED with the message."""
    code, out = console("mtl.cli.export", "-m", f"model={tmp_path / 'gone'},{tmp_path / 'lost'}", "format=timm")
    err = capfd.readouterr().err
    assert code == 1 and f"sweep job #0 (model={tmp_path / 'gone'} format=timm) failed: model: " in err, err
    (sweep,) = (out / "export" / "multiruns").iterdir()
    for job, name in (("0", "gone"), ("1", "lost")):
        failed = (sweep / job / FAILED).read_text().splitlines()[0]
        assert failed.startswith(f"ModelFolderError: model: {tmp_path / name}: no such folder"), failed


def test_a_sweep_rerun_in_a_failed_sweeps_folder_sets_its_job_folders_aside(console, capfd, tmp_path):
    """A new sweep in a folder whose jobs all failed reused 0/ and left 1/, the earlier sweep's failed job with its
    own overrides, passing for one of the new sweep's. Each earlier job folder is moved to <n>.failed first."""
    code, out = console("mtl.cli.export", "-m", f"model={tmp_path / 'gone'},{tmp_path / 'lost'}", "format=timm")
    assert code == 1
    (sweep,) = (out / "export" / "multiruns").iterdir()
    capfd.readouterr()
    code, _ = console("mtl.cli.export", "-m", f"model={tmp_path / 'new'}", "format=timm", f"hydra.sweep.dir={sweep}")
    err = capfd.readouterr().err
    assert code == 1 and f"WARNING: hydra.sweep.dir {sweep} held an earlier sweep whose jobs all failed: its job " \
                         "folders were moved to 0.failed, 1.failed" in err, err
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "0.failed", "1.failed",
                                                                                     "multirun.yaml"]
    assert f"{tmp_path / 'new'}: no such folder" in (sweep / "0" / FAILED).read_text()
    for job, name in (("0", "gone"), ("1", "lost")):  # the earlier attempts, kept under a name no job has
        assert f"{tmp_path / name}: no such folder" in (sweep / f"{job}.failed" / FAILED).read_text()


def test_an_early_refusal_keeps_a_folder_that_existed_before_the_run(console, capfd, tmp_path):
    """`mkdir -p $RUN` in a job script, then `hydra.run.dir=$RUN`: the refusal removed the user's folder as if
    Hydra had made it; only the folders the run made go (with the parents made for it), wherever they are."""
    mine = tmp_path / "jobs" / "job1"
    mine.mkdir(parents=True)
    code, _ = console("mtl.cli.train", "experiment=nyuv2", f"hydra.run.dir={mine}")
    assert code == 1 and "required value(s) not set: data.root" in capfd.readouterr().err
    assert mine.is_dir() and list(mine.iterdir()) == []  # as it was: no FAILED, no Hydra log
    new = tmp_path / "jobs" / "new" / "job2"
    code, _ = console("mtl.cli.train", "experiment=nyuv2", f"hydra.run.dir={new}")
    assert code == 1 and not (tmp_path / "jobs" / "new").exists() and mine.is_dir()


@pytest.mark.parametrize("args, expected", [
    (("debug=smoke", "logger=none"), "is not empty (notes.txt) and holds no failed run to retry"),
    (("experiment=nyuv2",), "required value(s) not set: data.root"),  # refused before the folder is looked at
])
def test_a_refused_folder_of_the_users_is_left_byte_for_byte(console, capfd, tmp_path, args, expected):
    """The job log Hydra makes in hydra.run.dir before any check (train.log, empty) stayed in the user's folder."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("hi\n")
    code, _ = console("mtl.cli.train", *args, f"hydra.run.dir={mine}")
    assert code == 1 and expected in capfd.readouterr().err
    assert [(p.name, p.read_bytes()) for p in mine.iterdir()] == [("notes.txt", b"hi\n")]


@pytest.mark.parametrize("in_root", [False, True], ids=["elsewhere", "in-output-root"])
@pytest.mark.parametrize("key, under, multirun", [
    ("hydra.run.dir", "", []), ("hydra.run.dir", "run", []), ("hydra.sweep.dir", "", ["-m", "seed=1,2"]),
    ("hydra.sweep.dir", "sweep", ["-m", "seed=1,2"]),
])
def test_a_file_given_as_the_run_or_sweep_folder_is_named_by_its_key(console, capfd, tmp_path, key, under, multirun,
                                                                      in_root):
    """hydra.run.dir=<an existing file> gave Hydra's bare "[Errno 17] File exists: '<it>'" (a file on the way:
    "[Errno 20] Not a directory"), naming no setting; the key, its value and the file are named, the file kept.
    A file on the way inside MTL_OUTPUT_DIR was blamed on the variable ("MTL_OUTPUT_DIR=... cannot hold run
    folders"), though the folder was the one given on the command line."""
    folder = tmp_path / "outputs" if in_root else tmp_path  # the console fixture's MTL_OUTPUT_DIR
    folder.mkdir(exist_ok=True)
    afile = folder / "afile.txt"
    afile.write_text("x\n")
    given = afile / under if under else afile
    code, out = console("mtl.cli.train", *multirun, "debug=smoke", "logger=none", f"{key}={given}")
    stdout, err = capfd.readouterr()
    said = f"{key}={given}: {afile}" if under else f"{key}={afile}"
    assert code == 1 and err.strip() == f"error: {said} is a file, not a folder; pick a new folder", err
    assert "run_dir:" not in stdout and afile.read_text() == "x\n"
    assert list(out.iterdir()) == [afile] if in_root else not out.exists()  # nothing made


def test_an_in_process_refusal_keeps_a_given_folder_that_existed(monkeypatch, tmp_path):
    from mtl.train import run

    monkeypatch.setenv("MTL_OUTPUT_DIR", str(tmp_path / "outputs"))
    mine = tmp_path / "outputs" / "job1"
    mine.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"required value\(s\) not set: data\.root"):
        run(["experiment=nyuv2"], run_dir=mine)
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_group_choice_check_reads_sweeps_and_ignores_plain_keys():
    mods = ("mtl.configs",)
    assert check_group_choices(["balancer=ew,nashmtl"], mods).startswith("unknown balancer 'nashmtl'")
    assert check_group_choices(["task=[semseg,depth]", "balancer=ew"], mods) is None
    assert check_group_choices(["balancer.name=foo", "seed=3", "+x=1"], mods) is None
    assert check_group_choices(["task=[depth,depth],semseg"], mods) == ("task 'depth' is named twice in "
                                                                      "'task=[depth,depth],semseg'; name each task once")


def test_one_line_takes_the_first_line_and_names_bare_key_errors():
    assert one_line(ValueError("first\n\tsecond")) == "first (…)"
    assert one_line(KeyError("weight")) == "KeyError 'weight'"
    assert one_line(KeyError("unknown task(s) ['x']; valid: a, b")) == "unknown task(s) ['x']; valid: a, b"
    assert one_line(RuntimeError()) == "RuntimeError"
    from hydra.errors import InstantiationException

    try:
        try:
            raise ModuleNotFoundError("Neither `tensorboard` nor `tensorboardX` is available.")
        except ModuleNotFoundError as cause:
            raise InstantiationException("Error in call to target 'lightning.TensorBoardLogger':\nModuleNotFoundError(...)") from cause
    except InstantiationException as e:
        assert one_line(e) == "lightning.TensorBoardLogger: Neither `tensorboard` nor `tensorboardX` is available."


def test_a_verbose_failed_run_still_ends_its_stdout_with_its_folder(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("MTL_VERBOSE", "0")  # cli_main sets it for the process: restored after the test
    monkeypatch.setenv("MTL_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setattr(sys, "argv", ["mtl-train", "debug=smoke", "logger=none", *bad_splits(tmp_path), "verbose=true"])
    with pytest.raises(KeyError, match="has no 'testNdxs'"):  # the traceback itself, not one line
        train_cli.main()
    (run,) = (tmp_path / "outputs" / "nyuv2" / "runs").iterdir()
    assert (run / FAILED).is_file()
    assert capfd.readouterr().out.strip().splitlines()[-1] == f"run_dir: {run}"


@pytest.mark.slow
def test_verbose_switch_shows_the_traceback(tmp_path):
    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "outputs"))
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "mtl.cli.train", "debug=smoke", *bad_splits(tmp_path), "verbose=true"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "has no 'testNdxs'" in proc.stderr
    runs = list((Path(tmp_path) / "outputs" / "nyuv2" / "runs").glob("*"))
    assert len(runs) == 1 and (runs[0] / FAILED).is_file()


def test_interruptions_are_named_with_their_exit_status():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from mtl.cli.failures import interruption

    assert interruption(SIGTERMException()) == ("SIGTERM", 143)
    try:  # Lightning's Ctrl-C: sys.exit(1) while handling the KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)
    except SystemExit as e:
        assert interruption(e) == ("Ctrl-C", 130)
    assert interruption(SystemExit(1)) is None and interruption(ValueError("x")) is None


def test_sigterm_marks_the_run_failed_and_names_the_checkpoint(tmp_path):
    """SLURM preemption / timeout: Lightning's SIGTERM exit has no code and read as success."""
    import signal
    import time

    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "outputs"))
    proc = subprocess.Popen([sys.executable, "-m", "mtl.cli.train", "debug=smoke", "task=[depth]", "logger=none",
                             "viz.num_samples=0", "trainer.max_epochs=1000"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "outputs" / "train" / "runs"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(runs.glob("*/checkpoints/last.ckpt")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    (run,) = runs.iterdir()
    assert out.strip().splitlines()[-1] == f"run_dir: {run}"
    expected = f"interrupted by SIGTERM; resume with ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    assert f"error: {expected}" in err
    assert (run / FAILED).read_text().startswith(expected)


def test_a_sigterm_in_a_multirun_ends_with_the_sweep_folder(tmp_path):
    """The sweeper never returns after an interrupted job: the job's line, then the sweep's, last."""
    import signal
    import time

    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "mtl.cli.train", "-m", "debug=smoke", "task=depth,regression",
                             "logger=none", "viz.num_samples=0", "trainer.max_epochs=1000", f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (sweep / "0" / "checkpoints" / "last.ckpt").exists():
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert out.strip().splitlines()[-2:] == [f"run_dir: {sweep / '0'}", f"run_dir: {sweep}"]
    assert (sweep / "0" / FAILED).read_text().startswith("interrupted by SIGTERM")
    assert not (sweep / "1").exists()


@pytest.mark.slow
def test_a_sigterm_at_test_end_stops_the_multirun_at_that_job(tmp_path):
    """Lightning's test loop only noted it: job 0 finished with exit 0 and job 1 ran on."""
    sweep = tmp_path / "sweep"
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)  # tests/kill_callback.py
    proc = subprocess.run([sys.executable, "-m", "mtl.cli.train", "-m", "debug=smoke", "task=[depth]", "seed=0,1",
                           "logger=none", "viz.num_samples=0", f"hydra.sweep.dir={sweep}",
                           "+callbacks.sig._target_=kill_callback.SigtermAt", "+callbacks.sig.hook=test_end"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "error: interrupted by SIGTERM" in proc.stderr
    assert (sweep / "0" / FAILED).read_text().startswith("interrupted by SIGTERM")
    assert not (sweep / "0" / "metrics.json").exists() and not (sweep / "1").exists()


@pytest.mark.parametrize("module, own, foreign", [
    ("mtl.cli.train", ["balancer:", "backbone:", "experiment:"], ["merge:", "prune:", "merge_app", "export_app"]),
    ("merging.cli", ["merge:", "ties", "eval:"], ["balancer:", "prune:"]),
    ("pruning.cli", ["prune:", "pagcp", "l1_global"], ["balancer:", "merge:"]),
    ("mtl.cli.export", ["format:", "onnx"], ["balancer:", "merge:"]),
])
def test_help_lists_the_apps_own_groups_and_the_composed_config(monkeypatch, capfd, module, own, foreign):
    import importlib

    cli = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", ["prog", "--help", "name=probe"])
    cli.main()  # returns: no run, no SystemExit
    out = capfd.readouterr().out
    groups = out.split("Configuration groups")[1].split("Any other key")[0]
    assert all(g in groups for g in own), groups
    assert not any(g in groups for g in foreign), groups
    assert "name: probe" in out.split("Config (with the overrides given):")[1]  # overrides are applied


def test_merge_and_prune_logs_are_named_after_the_tool():
    from omegaconf import OmegaConf

    for app in ("merge", "prune"):
        cfg = OmegaConf.load(Path(__file__).parents[1] / "mtl" / "configs" / f"{app}_app" / f"{app}.yaml")
        assert cfg.hydra.job.name == app


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs_run", "a/../../b"])
def test_a_run_name_cannot_leave_the_output_root(monkeypatch, tmp_path, capfd, name):
    code, runs = run_main(monkeypatch, tmp_path, f"name={name}")
    err = capfd.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith(f"error: name={name!r} must be a relative folder name"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder made, inside the root or outside it


def test_run_names_nest_inside_the_root_and_in_process_runs_check_them_too(monkeypatch, tmp_path):
    from mtl.cli.common import check_run_name
    from mtl.cli.in_process import default_run_dir

    monkeypatch.setenv("MTL_OUTPUT_DIR", str(tmp_path))
    assert check_run_name("ablations/cikd") == "ablations/cikd"
    assert default_run_dir("ablations/cikd").parent == tmp_path / "ablations" / "cikd" / "runs"
    for bad in ("..", "", "../x", str(tmp_path / "abs")):
        with pytest.raises(ValueError, match="must be a relative folder name"):
            default_run_dir(bad)


def test_an_error_without_a_message_still_says_what_it_is():
    from mtl.cli.common import hydra_message

    assert hydra_message(AssertionError()) == "AssertionError (no message; pass verbose=true for the traceback)"
    try:
        try:
            raise AssertionError()
        except AssertionError as inner:
            raise RuntimeError("") from inner
    except RuntimeError as e:
        assert hydra_message(e).startswith("AssertionError (no message")
    assert one_line(AssertionError()) == "AssertionError"


def test_sigterm_outside_training_marks_the_run_failed(tmp_path):
    """mtl-merge (like prune, export, extract) has no Lightning fit and its SIGTERM handler: Python's
    default would end the process silently, leaving a folder that looks like a run in progress."""
    import signal
    import time

    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "outputs"))
    proc = subprocess.Popen([sys.executable, "-m", "merging.cli", "debug=smoke"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "outputs" / "merge" / "runs"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(runs.glob("*/smoke_pool")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    (run,) = runs.iterdir()
    assert out.strip().splitlines()[-1] == f"run_dir: {run}"
    assert "error: interrupted by SIGTERM" in err
    assert (run / FAILED).read_text().startswith("interrupted by SIGTERM")


@pytest.mark.parametrize("module, group", [("merging.job", "merge"), ("pruning.job", "prune"),
                                           ("mtl.exporters.job", "format"), ("mtl.cli.extract", "calib")])
def test_in_process_runs_check_and_mark_as_their_cli_does(tmp_path, module, group):
    import importlib

    run = importlib.import_module(module).run
    with pytest.raises(TypeError, match=r"overrides must be a list of strings .* got the string 'debug=smoke'"):
        run("debug=smoke", run_dir=tmp_path / "s")
    if group != "calib":  # extract has no config groups of its own
        with pytest.raises(ValueError, match=rf"unknown {group} 'nope'"):
            run([f"{group}=nope"], run_dir=tmp_path / "g")
        assert not (tmp_path / "g").exists()


def test_in_process_merge_failure_leaves_a_failed_marker(tmp_path):
    from merging.job import run

    with pytest.raises(Exception, match="nonexist"):  # refused before the run folder is made
        run(["merge=average", "pretrained=/nonexist", "models=[/nonexist2]"], run_dir=tmp_path / "early")
    assert not (tmp_path / "early").exists()
    import torch

    # readable weights of another shape in torch checkpoints: safetensors headers are compared before the run
    # folder, a torch checkpoint's shapes only by the merge, after it
    for name, n in (("base", 2), ("ft", 3)):
        torch.save({"w": torch.zeros(n)}, tmp_path / f"{name}.pt")
    with pytest.raises(Exception, match="shape"):
        run(["merge=average", "eval=none", f"pretrained={tmp_path / 'base.pt'}", f"models=[{tmp_path / 'ft.pt'}]"],
            run_dir=tmp_path / "r")
    assert (tmp_path / "r" / FAILED).is_file()


class _Interrupting(types.ModuleType):
    """A job module whose import is cut short by Ctrl-C (the seconds torch and timm take to import)."""

    def __getattr__(self, name):
        if name.startswith("__"):  # introspection (inspect, pytest) asks for __file__ and the like
            raise AttributeError(name)
        raise KeyboardInterrupt


@pytest.mark.parametrize("cli, job_module, args, group", [
    ("mtl.cli.train", "mtl.train", ["debug=smoke"], "train"),
    ("merging.cli", "merging.job", ["debug=smoke"], "merge"),
    ("pruning.cli", "pruning.job", ["debug=smoke"], "prune"),
    ("mtl.cli.export", "mtl.exporters.job", ["debug=smoke"], "export"),
])
def test_an_interrupt_while_the_job_is_imported_marks_the_run(monkeypatch, tmp_path, capsys, cli, job_module, args, group):
    import importlib

    out = tmp_path / "outputs"
    monkeypatch.setenv("MTL_OUTPUT_DIR", str(out))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setitem(sys.modules, job_module, _Interrupting(job_module))
    monkeypatch.setattr(sys, "argv", [cli, *args])
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(cli).main()
    (run,) = (out / group / "runs").iterdir()
    captured = capsys.readouterr()
    assert exc.value.code == 130 and captured.out.strip().splitlines()[-1] == f"run_dir: {run}"
    assert captured.err.strip().splitlines()[-1].startswith("error: interrupted by")
    assert (run / FAILED).read_text().startswith("interrupted by")


def test_a_run_folder_in_use_is_refused_and_a_stale_claim_taken_over(monkeypatch, tmp_path, capfd):
    """Two runs given one hydra.run.dir at once would mix logs, model and metrics (one marked FAILED and
    finished both); the second is refused while the first's process lives."""
    from mtl.cli.failures import RUNNING

    folder = tmp_path / "shared"
    folder.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / RUNNING).write_text(str(other.pid))
        code, _ = run_main(monkeypatch, tmp_path, f"hydra.run.dir={folder}")
        err = capfd.readouterr().err.strip().splitlines()[-1]
        assert code == 1 and err == (f"error: run_dir {folder} is in use by another run (pid {other.pid}); give each "
                                     f"run its own folder (hydra.run.dir); if that run is gone, delete {folder / RUNNING}")
        assert (folder / RUNNING).read_text() == str(other.pid)  # the other run's claim and folder stay
        assert not (folder / FAILED).exists() and not (folder / "metrics.json").exists()
    finally:
        other.kill()
        other.wait()
    monkeypatch.setattr(sys, "argv", ["mtl-train", "debug=smoke", "logger=none", "viz.num_samples=0",
                                      f"hydra.run.dir={folder}"])
    train_cli.main()  # its process is gone: the stale claim is taken over and the run finishes
    assert (folder / "metrics.json").is_file() and not (folder / RUNNING).exists()


def test_a_killed_runs_folder_is_a_failed_attempts_and_a_reused_pid_does_not_hold_it(monkeypatch, tmp_path, capfd):
    """A SIGKILLed run leaves .running and no FAILED: the next attempt in its folder used to write its
    checkpoints over the killed run's last.ckpt and restart its curves unseen. Its claim is now read as a
    killed run's: the folder is marked FAILED, so the killed attempt's checkpoints and curves are set aside."""
    import json as _json

    from mtl.cli.failures import RUNNING

    folder = tmp_path / "killed"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"the killed run's resume point")
    (folder / "csv").mkdir()
    (folder / "csv" / "metrics.csv").write_text("epoch\n0\n")
    # pid 1 is alive but started long before this claim: a pid reused after a restart, not the run
    (folder / RUNNING).write_text(_json.dumps({"pid": 1, "host": socket.gethostname(), "start": "-1"}))
    monkeypatch.setattr(sys, "argv", ["mtl-train", "debug=smoke", "logger=csv", "viz.num_samples=0",
                                      f"hydra.run.dir={folder}"])
    train_cli.main()
    assert (folder / "checkpoints.failed" / "last.ckpt").read_bytes() == b"the killed run's resume point"
    assert (folder / "csv.failed" / "metrics.csv").read_text() == "epoch\n0\n"
    assert (folder / "metrics.json").is_file() and not (folder / "FAILED").exists()
    # a claim from another host (a shared file system) cannot be checked: refused, naming the marker to delete
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / RUNNING).write_text(_json.dumps({"pid": 123, "host": "node-17", "start": "5"}))
    code, _ = run_main(monkeypatch, tmp_path, f"hydra.run.dir={other}")
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err == (f"error: run_dir {other} is in use by another run (pid 123 on node-17); give each "
                                 f"run its own folder (hydra.run.dir); if that run is gone, delete {other / RUNNING}")


def test_a_run_killed_after_its_metrics_is_not_finished_and_its_retry_goes_through(monkeypatch, tmp_path, capfd):
    """A SIGKILL after metrics.json but before the plots or the baselines update left metrics.json and a dead
    .running claim: the folder passed for a finished run, a retry was refused and the claim dropped without FAILED.
    A dead claim made before the folder's finishing record is now the run that wrote it, killed unfinished."""
    import json as _json

    from mtl.cli.failures import KILLED, RUNNING, claims_run_folder, holds_finished_run

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / RUNNING).write_text(_json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    (folder / "metrics.json").write_text("{}")
    (folder / "model").mkdir()
    claimed = (folder / "metrics.json").stat().st_mtime_ns - 10**9
    os.utime(folder / RUNNING, ns=(claimed, claimed))  # claimed a second before metrics.json was written
    assert not holds_finished_run(folder)
    monkeypatch.setattr(sys, "argv", ["mtl-train", "debug=smoke", "task=[depth]", "logger=none", "viz.num_samples=0",
                                      f"hydra.run.dir={folder}"])
    train_cli.main()  # retried in its folder, the killed attempt's records set aside
    assert _json.loads((folder / "metrics.failed.json").read_text()) == {} and (folder / "model.failed").is_dir()
    assert holds_finished_run(folder) and not (folder / RUNNING).exists()
    # a dead claim made after the record is a later command's (refused there): the run stays finished, unmarked
    (folder / RUNNING).write_text(_json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert holds_finished_run(folder)
    with claims_run_folder(folder):
        pass
    assert not (folder / FAILED).exists()
    other = tmp_path / "other"  # and with no record at all, as before: marked as a killed run's
    other.mkdir()
    (other / RUNNING).write_text(str(dead.pid))
    with claims_run_folder(other):
        pass
    assert (other / FAILED).read_text() == KILLED.format(pid=dead.pid) + "\n"


def test_an_added_key_that_nearly_matches_a_setting_is_refused():
    from omegaconf import OmegaConf

    from mtl.cli.choices import check_added_keys

    cfg = OmegaConf.create({"seed": 1, "overwrite": False, "seeed": 3, "viz": {"num_samples": 2, "num_sample": 3},
                            "trainer": {"max_epochs": 1, "max_epoch": 2}, "fresh": 1})
    for arg, want in [("+seeed=3", r"\+seeed=3: no setting seeed \(did you mean seed\?\)"),
                      ("+viz.num_sample=3", r"no setting viz.num_sample \(did you mean viz.num_samples\?\)")]:
        with pytest.raises(ValueError, match=want):
            check_added_keys(cfg, [arg])
    # a trainer key is the train job's to judge (Lightning's arguments); without the app's top-level settings an
    # unrelated new key is not judged, nor are a plain override and ++
    check_added_keys(cfg, ["+trainer.max_epoch=2", "+fresh=1", "seed=2", "++seeed=3"])


def test_any_added_eval_key_is_refused_not_only_a_near_miss(tmp_path):
    """mtl-merge's eval lists every key the job reads: +eval.split=val was accepted and ignored."""
    from omegaconf import OmegaConf

    from merging.job import run
    from mtl.cli.choices import check_added_keys

    cfg = OmegaConf.create({"eval": {"enabled": True, "max_batches": None, "split": "val"}})
    with pytest.raises(ValueError, match=r"^\+eval.split=val: no setting eval.split \(eval has enabled, max_batches\); "
                                         r"nothing reads an added eval.split$"):
        check_added_keys(cfg, ["+eval.split=val"])
    check_added_keys(cfg, ["+eval.data.batch_size=4"])  # eval.data is the data config's overrides: open
    with pytest.raises(ValueError, match=r"^\+eval.split=val: no setting eval.split \(eval has data, device, enabled, "
                                         r"max_batches\)"):
        run(["merge=task_arithmetic", "smoke_pool=true", "+eval.split=val"], run_dir=tmp_path / "m")
    assert not (tmp_path / "m" / "smoke_pool").exists()


def test_a_misspelt_added_key_stops_an_in_process_run(tmp_path):
    from mtl.train import run

    with pytest.raises(ValueError, match=r"did you mean viz.num_samples\?"):
        run(["experiment=scenes_hps", "debug=smoke", "+viz.num_sample=3"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_missing_interpolation_names_the_setting_that_reads_it():
    from omegaconf import OmegaConf

    from mtl.cli.common import one_line

    cfg = OmegaConf.create({"decoder": {"widths": "${backbone.widths}"}, "backbone": {}})
    with pytest.raises(Exception) as e:
        cfg.decoder.widths
    assert one_line(e.value) == ("decoder.widths reads ${backbone.widths}, which this config does not have: the group "
                                 "that sets backbone.widths was swapped out or removed, or does not fit this combination")


def test_an_in_process_run_claims_the_new_folder_it_is_given(tmp_path):
    """Two in-process runs given one new run_dir both started and mixed their checkpoints and metrics: the
    folder is now made and claimed at once, and removed again when a refused run leaves it empty."""
    from mtl.cli.failures import RUNNING, RunFolderTaken, claims_run_folder

    folder = tmp_path / "new" / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with claims_run_folder(folder):
            import json

            claim = json.loads((folder / RUNNING).read_text())
            assert claim["pid"] == os.getpid() and claim["host"] == socket.gethostname()
            (folder / RUNNING).write_text(str(other.pid))  # as if another live run held it (an older bare-pid marker)
            with pytest.raises(RunFolderTaken, match=rf"run_dir {folder} is in use by another run \(pid {other.pid}\)"):
                with claims_run_folder(folder):
                    pass
            (folder / RUNNING).write_text(str(os.getpid()))
    finally:
        other.kill()
    assert not (tmp_path / "new").exists()  # made for the run, left empty: removed with its parent


def test_help_on_a_multirun_command_shows_its_first_job():
    """`--help` added to a documented -m command once failed to parse '-m' and the sweep values."""
    from mtl.cli.help import first_job

    assert first_job(["-m", "experiment=scenes_hps", "task=semseg,depth", "seed=1"]) == (
        ["experiment=scenes_hps", "task=semseg", "seed=1"], "swept task")
    assert first_job(["--multirun", "merge.lam=0.6,1.0", "+y=choice(a,b)"]) == (
        ["merge.lam=0.6", "+y=a"], "swept merge.lam, +y")
    assert first_job(["-m", "seed=1"]) == (["seed=1"], "multirun")
    # an Optuna search range has no first value (Hydra cannot enumerate it): the config's own value is shown
    assert first_job(["-m", "balancer=dwa", "balancer.temperature=interval(0.5,4.0)", "optim.lr=tag(log,interval(1e-4,1e-1))",
                      "seed=1,2"]) == (["balancer=dwa", "seed=1"], "swept seed, balancer.temperature searched in an "
                                       "interval (shown: the config's own value), optim.lr searched in an interval "
                                       "(shown: the config's own value)")
    assert first_job(["seed=1"]) == (["seed=1"], "")


def test_help_of_a_multirun_command_prints_the_first_jobs_config(capsys):
    from mtl.cli.help import print_help_if_asked

    assert print_help_if_asked(None, ("mtl.configs",), ["mtl-train", "-m", "--help", "experiment=scenes_hps",
                                                       "task=semseg,depth"])
    out = capsys.readouterr().out
    assert "Config of the sweep's first job (-m: swept task):" in out and "config not shown" not in out


def test_an_added_key_another_setting_reads_is_not_judged():
    from omegaconf import OmegaConf

    from mtl.cli.choices import check_added_keys

    check_added_keys(OmegaConf.create({"seed": "${seed2}", "seed2": 5}), ["+seed2=5", "seed=${seed2}"])


def test_a_config_refusal_leaves_a_finished_runs_folder_as_it_was(tmp_path):
    """The near-miss and group-overwrite checks once wrote FAILED beside a finished run's model."""
    from mtl.train import run

    done = run(["experiment=scenes_hps", "debug=smoke", "logger=none", "viz.num_samples=0", "task=[depth]"],
               run_dir=tmp_path / "r")
    before = sorted(p.name for p in done.iterdir())
    for bad in (["+seeed=3"], ["experiment=scenes_slimmable", "backbone=resnet18"]):
        with pytest.raises(ValueError):
            run(["debug=smoke", *bad], run_dir=done)
        assert sorted(p.name for p in done.iterdir()) == before


def test_a_sweep_running_into_a_folder_refuses_a_second_sweep(tmp_path, capsys):
    """Two sweeps given one hydra.sweep.dir at once interleaved their job folders and records: the second
    is refused before the sweeper writes anything, naming the live sweep and the marker."""
    from omegaconf import OmegaConf

    from mtl.cli.failures import SWEEPING, release
    from mtl.cli.sweep_end import PrintSweepDir

    sweep = tmp_path / "sweep"
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sweep.mkdir()
        (sweep / SWEEPING).write_text(str(other.pid))
        with pytest.raises(SystemExit) as e:
            PrintSweepDir().on_multirun_start(config)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and err == (f"error: hydra.sweep.dir {sweep} is in use by another sweep (pid {other.pid}); "
                                             f"give each sweep its own folder (hydra.sweep.dir); if that sweep is gone, "
                                             f"delete {sweep / SWEEPING}")
    finally:
        other.kill()
        other.wait()
    PrintSweepDir().on_multirun_start(config)  # that sweep is gone: its claim is taken over
    assert json.loads((sweep / SWEEPING).read_text())["pid"] == os.getpid()
    release(sweep / SWEEPING)
    assert not (sweep / SWEEPING).exists()


def test_of_several_runs_taking_over_one_stale_claim_exactly_one_wins(tmp_path):
    """Two runs reading one dead claim at once could both unlink it and start; the takeover now happens under
    a lock on the marker, so the later one finds the first's live claim."""
    from mtl.cli.failures import RUNNING

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / RUNNING).write_text(str(dead.pid))
    code = ("import sys, time; from pathlib import Path; from mtl.cli.failures import claim, RunFolderTaken\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "try:\n    claim(Path(sys.argv[1]), 'run_dir x', 'hydra.run.dir'); print('won', flush=True); time.sleep(3)\n"
            "except RunFolderTaken:\n    print('refused', flush=True)\n")
    start = time.time() + 3  # every process imports first, then all try at once
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / RUNNING), str(start)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["refused", "refused", "refused", "won"], outs
    assert not list(tmp_path.glob(f"{RUNNING}.new-*"))  # no temporary left


def test_a_near_miss_of_a_setting_is_named_not_sent_to_plus(monkeypatch, tmp_path, capfd):
    """Hydra reads `tsk=depth` as a config group and advises `+tsk=depth`, which then fails as an unknown
    setting; the one line names the setting meant."""
    code, _ = run_main(monkeypatch, tmp_path, "tsk=depth")
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err == "error: no setting 'tsk' (did you mean task?)"


def test_a_near_miss_is_named_from_the_apps_own_settings(tmp_path):
    """mtl-extract's setting is `tasks`; mtl-train's group `task` must not be suggested to it."""
    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "out"))
    for arg, want in (("task=depth", "error: no setting 'task' (did you mean tasks?)"),
                      ("tsk=depth", "error: no setting 'tsk' (did you mean tasks?)")):
        proc = subprocess.run([sys.executable, "-m", "mtl.cli.extract", arg], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == want


def test_an_in_process_run_refused_for_an_unset_value_leaves_no_folder(monkeypatch, tmp_path):
    """The in-process twin made its default run folder and marked it FAILED for a command-line mistake."""
    from mtl.train import run

    monkeypatch.setenv("MTL_OUTPUT_DIR", str(tmp_path / "outputs"))
    with pytest.raises(ValueError, match=r"required value\(s\) not set: data\.root"):
        run(["experiment=nyuv2"])
    assert not (tmp_path / "outputs").exists()  # every folder made for the run, the output root too


@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_an_output_root_that_cannot_hold_run_folders_is_named_by_its_variable(console, capfd, monkeypatch, tmp_path,
                                                                              where):
    """MTL_OUTPUT_DIR=<a file> (or /proc/nope) gave a bare "[Errno 20] Not a directory: '<it>/train/runs/...'" that
    never named the variable; every CLI and the in-process twins name it and its value on one line."""
    from mtl.train import run

    if where == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    afile = tmp_path / "afile"
    afile.write_text("x")
    root = {"file": afile, "under_file": afile / "sub", "proc": Path("/proc/nope")}[where]
    monkeypatch.setenv("MTL_OUTPUT_DIR", str(root))  # over the console fixture's own
    code, _ = console("mtl.cli.train", "debug=smoke")
    lines = capfd.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: MTL_OUTPUT_DIR={root} cannot hold run folders ("), lines
    assert (f"{afile} is a file, not a folder" if where != "proc" else "No such file or directory") in lines[0]
    with pytest.raises(OSError, match=rf"^MTL_OUTPUT_DIR={root} cannot hold run folders"):
        run(["debug=smoke"])


@pytest.mark.parametrize("when", ["composing", "checking"])
def test_a_ctrl_c_before_the_job_starts_is_one_line_and_status_130(monkeypatch, tmp_path, capfd, when):
    """A Ctrl-C in the first second (Hydra still composing the config) printed an omegaconf traceback ending in a
    bare KeyboardInterrupt; the job's own handler (run_job) only covers the job."""
    from mtl.cli import common

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setenv("MTL_VERBOSE", "0")  # cli_main sets these for the process: restored after the test
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setenv("MTL_OUTPUT_DIR", str(tmp_path / "outputs"))
    if when == "checking":  # cli_main's own checks, before Hydra runs
        monkeypatch.setattr(common, "check_group_choices", interrupted)
    app = interrupted if when == "composing" else (lambda: pytest.fail("the app ran after the interruption"))
    with pytest.raises(SystemExit) as exit_:
        common.cli_main(app, "mtl.configs", argv=["mtl-train", "debug=smoke"])
    assert exit_.value.code == 130
    assert capfd.readouterr().err.strip().splitlines() == ["error: interrupted by Ctrl-C before the job started"]
    assert not (tmp_path / "outputs").exists()


RANK_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "WORLD_SIZE", "SLURM_NTASKS")


def test_another_ranks_failure_marker_is_its_own_and_leaves_rank_0s(monkeypatch, tmp_path):
    """DDP: every rank marks the run folder; rank N's marker is FAILED.rank<N>, so its own error is kept
    beside rank 0's FAILED (which is often only the lost connection to that rank), never replaced by it."""
    from mtl.cli.failures import marks_failure

    for key in RANK_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError), marks_failure(tmp_path):
        raise ValueError("bad sample on rank 1")
    assert (tmp_path / "FAILED.rank1").read_text().startswith("ValueError: bad sample on rank 1\n")
    assert not (tmp_path / FAILED).exists()
    monkeypatch.setenv("LOCAL_RANK", "0")  # rank 0 then loses its connection to rank 1
    lost = RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:18111. Check the logs of the remote worker")
    with pytest.raises(RuntimeError), marks_failure(tmp_path):
        raise lost
    head = (tmp_path / FAILED).read_text().splitlines()[0]
    assert head.startswith("rank 1 failed: ValueError: bad sample on rank 1 (FAILED.rank1 has its traceback); rank 0: ")
    assert (tmp_path / "FAILED.rank1").read_text().startswith("ValueError: bad sample on rank 1\n")


def test_a_lost_peer_without_a_marker_is_named_and_a_lone_process_is_unchanged(monkeypatch, tmp_path):
    from mtl.cli.rank_failures import peer_failures

    for key in RANK_KEYS:
        monkeypatch.delenv(key, raising=False)
    reset = RuntimeError("[pair.cc:534] Read error [127.0.0.1]:5: Connection reset by peer")
    assert peer_failures(reset, tmp_path, wait=0) == ""  # one process: a network error of its own
    assert peer_failures(ValueError("bad"), tmp_path, wait=0) == ""
    (tmp_path / "train_ddp_process_1.log").write_text("")  # Lightning's local DDP (its environment already undone)
    assert peer_failures(RuntimeError(str(reset)), tmp_path, wait=0).startswith("another rank ended")
    (tmp_path / "train_ddp_process_1.log").unlink()
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    note = peer_failures(RuntimeError(str(reset)), tmp_path, wait=0)  # a rank killed (SIGKILL): no marker of its own
    assert note.startswith("another rank ended without an error of its own") and "train_ddp_process_<N>.log" in note
    assert note.endswith(f"resume with ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}")


def test_another_ranks_error_line_names_its_rank(monkeypatch, tmp_path, capfd):
    """Rank 1's own error reaches stderr (it was printed on rank 0 only, which saw a lost connection)."""
    for key in RANK_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    code, runs = run_main(monkeypatch, tmp_path, "balancer=dwa", "balancer.temperature=-1")
    err = capfd.readouterr().err
    assert code == 1
    assert [ln for ln in err.splitlines() if ln.startswith("error: ")] == [
        "error: rank 1: dwa: balancer.temperature must be > 0, got -1"], err


@pytest.mark.slow
def test_a_failure_on_one_ddp_rank_reaches_the_user(tmp_path):
    """2 gloo processes, rank 1 raises at step 1: its error, not only gloo's 'Connection closed by peer', is on
    stderr, in FAILED.rank1 and in its job log train_ddp_process_1.log; rank 0's FAILED names it first."""
    script = tmp_path / "fail_rank1.py"
    script.write_text(
        "import os, sys\nfrom mtl.module import MultiTaskModule\n_orig = MultiTaskModule.training_step\n"
        "def bad(self, batch, batch_idx):\n"
        "    if os.environ.get('LOCAL_RANK') == '1' and self.global_step >= 1:\n"
        "        raise ValueError('injected bad input on rank 1')\n"
        "    return _orig(self, batch, batch_idx)\n"
        "MultiTaskModule.training_step = bad\nfrom mtl.cli.train import main\nsys.exit(main())\n")
    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), "debug=smoke", "trainer=ddp", "trainer.accelerator=cpu",
                           "trainer.devices=2", "viz.num_samples=0", "logger=none", f"hydra.run.dir={run}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert "error: rank 1: injected bad input on rank 1" in errors, proc.stderr[-3000:]
    assert any(ln.startswith("error: rank 1 failed: ValueError: injected bad input on rank 1 (FAILED.rank1 has its "
                             "traceback); rank 0: ") for ln in errors), errors
    assert (run / "FAILED.rank1").read_text().startswith("ValueError: injected bad input on rank 1\n")
    assert (run / FAILED).read_text().startswith("rank 1 failed: ValueError: injected bad input on rank 1")
    assert "injected bad input on rank 1" in (run / "train_ddp_process_1.log").read_text()


def test_gradient_clip_algorithm_norm_alone_stays_allowed():
    """'norm' is what optim.grad_clip does and alone asks for nothing: it was refused with 'mtlkit clips only by
    norm'; 'value' is refused."""
    from omegaconf import OmegaConf

    from mtl.train_checks import check_trainer

    base = {"max_epochs": 1}
    for norm in ("norm", "NORM"):  # Lightning reads it case-insensitively
        check_trainer(OmegaConf.create({**base, "gradient_clip_algorithm": norm}))
    with pytest.raises(ValueError, match="clips only by norm"):
        check_trainer(OmegaConf.create({**base, "gradient_clip_algorithm": "value"}))
