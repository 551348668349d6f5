"""Drive the real `mtl-export` entry point."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtl.io import save_model
from mtl.models import create_model

pytest.importorskip("onnxruntime")


def cli(*args, cwd):
    env = dict(os.environ, MTL_OUTPUT_DIR=str(Path(cwd) / "outputs"))
    return subprocess.run([sys.executable, "-m", "mtl.cli.export", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def run_dir_of(proc) -> Path:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: "), last
    return Path(last.removeprefix("run_dir: "))


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    model = create_model(["semseg", "depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": 16})
    return save_model(model, tmp_path / "model", meta={"data": {"name": "scenes", "size": 32}})


def test_cli_exports_a_task_subset_to_onnx(folder, tmp_path):
    proc = cli(f"model={folder}", "format=onnx", "format.exporter=torchscript", "tasks=[depth]", cwd=tmp_path)
    run_dir = run_dir_of(proc)
    report = json.loads((run_dir / "onnx" / "export.json").read_text())
    assert report["tasks"] == ["depth"] and report["verification"]["passed"]
    assert "ONNX Runtime == PyTorch within atol=0.0001" in proc.stdout
    assert (run_dir / "onnx" / "model.onnx").is_file() and (run_dir / "onnx" / "README.md").is_file()


def test_cli_bad_input_is_one_clear_line(folder, tmp_path):
    proc = cli(f"model={folder}", "format=tflite", cwd=tmp_path)
    assert proc.returncode == 1 and "valid names: folder, onnx, timm" in proc.stderr
    out = tmp_path / "taken"
    out.mkdir()
    proc = cli(f"model={folder}", "format=folder", f"output={out}", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == f"error: {out} exists; pass overwrite=true to replace it"
    assert list(out.iterdir()) == []
    proc = cli(f"model={folder}", "format=folder", "tasks=[normals]", cwd=tmp_path)
    assert proc.returncode == 1 and "unknown task(s) ['normals']" in proc.stderr


@pytest.mark.parametrize("fmt, tasks, message", [
    ("onnx", "[bogus]", "unknown task(s) ['bogus'] for export; this model has: semseg, depth"),
    ("folder", "[depth,depth]", "tasks names ['depth'] more than once"),
    ("timm", "[depth]", "format=timm exports the shared backbone only, which serves every task; tasks=['depth']"),
])
def test_a_tasks_list_the_export_refuses_leaves_no_run_folder(folder, tmp_path, fmt, tasks, message):
    """The task names are in the folder's config.json: tasks= is judged by the export's own rule before the run."""
    from mtl.exporters.job import run

    with pytest.raises((KeyError, ValueError), match=re.escape(message)):
        run([f"model={folder}", f"format={fmt}", f"tasks={tasks}"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_overwrite_onto_a_folder_that_is_no_earlier_export_leaves_no_run_folder(folder, tmp_path):
    """Refused only inside export(), after the run folder was made: a FAILED folder (mtl-extract refused it first)."""
    from mtl.exporters.job import run

    user = tmp_path / "userdir"
    user.mkdir()
    (user / "notes.txt").write_text("hi")
    with pytest.raises(FileExistsError, match=rf"^{user} exists and is not an earlier export \(no export.json\)"):
        run([f"model={folder}", "format=folder", f"output={user}", "overwrite=true"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]


def finished_training_run(model: Path, run_dir: Path) -> Path:
    """What a finished mtl-train run leaves: config.yaml (name: its experiment), metrics.json and model/."""
    import shutil

    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: scenes_hps\nseed: 0\n")
    (run_dir / "metrics.json").write_text("{}")
    shutil.copytree(model, run_dir / "model")
    return run_dir


def test_a_folder_of_other_files_is_not_written_into(folder, tmp_path):
    """The job CLIs (start_run) replaced a non-run folder's config.yaml as mtl-train did; they share its rule."""
    from mtl.cli.failures import RunFolderTaken
    from mtl.exporters.job import run

    user = tmp_path / "userdir"
    user.mkdir()
    (user / "config.yaml").write_text("mine: 1\n")
    with pytest.raises(RunFolderTaken, match=rf"run_dir {user} is not empty \(config.yaml\) and holds no failed run"):
        run([f"model={folder}", "format=folder"], run_dir=user)
    assert sorted(p.name for p in user.iterdir()) == ["config.yaml"] and (user / "config.yaml").read_text() == "mine: 1\n"
    # overwrite=true reruns an earlier export in its own folder, its output elsewhere too (it writes no report there)
    done = run([f"model={folder}", "format=folder"], run_dir=tmp_path / "r")
    run([f"model={folder}", "format=folder", "overwrite=true"], run_dir=done["run_dir"])
    run([f"model={folder}", "format=folder", f"output={tmp_path / 'out'}"], run_dir=tmp_path / "r2")
    run([f"model={folder}", "format=folder", f"output={tmp_path / 'out'}", "overwrite=true"], run_dir=tmp_path / "r2")
    # but not take over another tool's finished run: a training run's model/ and metrics.json
    trained = finished_training_run(folder, tmp_path / "trained")
    before = (trained / "config.yaml").read_text()
    with pytest.raises(RunFolderTaken, match=rf"run_dir {trained} is not empty"):
        run([f"model={folder}", "format=folder", f"output={tmp_path / 'out3'}", "overwrite=true"], run_dir=trained)
    assert (trained / "config.yaml").read_text() == before


def test_a_refused_inner_run_still_marks_the_jobs_own_folder_failed(tmp_path):
    """A smoke job's inner training run (its smoke model, inside the job's folder) refused as RunFolderTaken left
    the job's own folder with neither FAILED nor metrics.json: every retry was refused, overwrite=true too."""
    from mtl.cli.failures import FAILED, RunFolderTaken, marks_failure

    job = tmp_path / "job"
    job.mkdir()
    with pytest.raises(RunFolderTaken), marks_failure(job):
        raise RunFolderTaken("inner", job / "smoke_model")
    assert (job / FAILED).is_file()
    (job / FAILED).unlink()
    with pytest.raises(RunFolderTaken), marks_failure(job):  # the job's own folder refused: left as it was
        raise RunFolderTaken("own", job)
    assert not (job / FAILED).exists()


def test_a_smoke_job_retried_in_its_folder_reuses_only_a_smoke_model_of_the_same_config(folder, tmp_path, monkeypatch):
    """A retry reused any finished smoke_model/, whichever experiment had trained it: mtl-extract's slimmable model
    (an earlier widths= request) then failed a tasks= request with "family 'slimmable' extracts with (widths=)"."""
    import mtl.train
    from omegaconf import OmegaConf

    from mtl.cli.in_process import compose_in_process
    from mtl.cli.jobs import finished_model, smoke_model, smoke_training

    def smoke(experiment):
        return [f"experiment={experiment}", "debug=smoke", "viz.num_samples=0", "logger=none", "log_weights_every=0",
                "task=[semseg,depth,classification]"]

    trained = finished_training_run(folder, tmp_path / "trained")
    cfg, _ = compose_in_process("mtl.configs", "train", smoke("scenes_slimmable"), trained)
    (trained / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # what that training run records
    assert finished_model(trained) == trained / "model"
    calls = []
    monkeypatch.setattr(mtl.train, "run", lambda overrides, run_dir: calls.append((overrides, run_dir)) or run_dir)
    assert smoke_model(trained, "scenes_slimmable") == trained / "model" and calls == []  # the same config: reused
    before = sorted(p.name for p in trained.iterdir())
    assert smoke_training(smoke("scenes_slimmable"), trained, reuse=False)[1] is False  # its input trained again
    assert calls == [(smoke("scenes_slimmable"), trained)] and not trained.exists()
    calls.clear()
    finished_training_run(folder, trained)
    (trained / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert sorted(p.name for p in trained.iterdir()) == before
    assert smoke_model(trained, "scenes_task_moe_vit") == trained / "model"  # another experiment: trained again there
    assert calls == [(smoke("scenes_task_moe_vit"), trained)] and not trained.exists()
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "metrics.json").write_text("{}")
    (failed / "FAILED").write_text("x")
    assert finished_model(failed) is None


@pytest.mark.slow
def test_cli_smoke_trains_a_model_and_exports_it(tmp_path):
    run_dir = run_dir_of(cli("debug=smoke", "format=onnx", cwd=tmp_path))
    report = json.loads((run_dir / "onnx" / "export.json").read_text())
    assert report["exporter"] == "dynamo" and report["verification"]["passed"]
    assert (run_dir / "smoke_model" / "metrics.json").is_file()


def test_in_process_export_returns_its_report_with_the_run_and_output_folders(folder, tmp_path, monkeypatch):
    import mtl
    from mtl.exporters.job import run

    monkeypatch.chdir(folder.parent)
    report = run([f"model={folder.name}", "format=folder"], run_dir=tmp_path / "run")  # a relative model path
    assert report["run_dir"] == str((tmp_path / "run").resolve())
    assert report["output"] == str((tmp_path / "run" / "folder").resolve()) and report["format"] == "folder"
    # provenance readable from anywhere: the source recorded absolute
    assert mtl.load_model(tmp_path / "run" / "folder").meta["exported_from"] == str(folder.resolve())


def _timm_refused_folders(tmp_path):
    """Model folders format=timm cannot write, with what the refusal names: a family with no timm backbone, a
    slimmable backbone, a pruned backbone, a linearized model."""
    import pruning
    from mtl.models import linearize

    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    moe = create_model(["semseg", "depth"], backbone=vit, decoder={"num_experts": 2, "top_k": 1}, family="task_moe_vit")
    slim = create_model(["semseg", "depth"], backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16],
                                                       "depths": [1, 1], "out_indices": [1, 2]},
                        decoder={"name": "slimmable", "channels": 8}, family="slimmable")
    cnn = create_model(["semseg", "depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                       decoder={"name": "hps", "channels": 16})
    pruned = pruning.prune(cnn, "l1", example=x, ratio=0.5)[0]
    return [(save_model(moe, tmp_path / "moe"), "backbone 'task_moe_vit' is not a timm model"),
            (save_model(slim, tmp_path / "slim"), "backbone 'slim_resnet' is not a timm model"),
            (save_model(pruned, tmp_path / "pruned"), "format=timm: the model's pruning plan (config.json key "
                                                      "'model.pruning') resizes backbone module 'backbone.body."),
            (save_model(linearize(cnn), tmp_path / "lin"), "format=timm cannot export a linearized model")]


def test_a_model_format_timm_cannot_write_is_refused_before_the_run_folder(tmp_path, monkeypatch):
    """A model without a timm backbone was refused only in the run (after start_run, a pruned one after the whole
    model was loaded), leaving a FAILED run folder. Its config.json (family, backbone, pruning plan) tells."""
    import mtl.exporters.job as job
    from mtl.exporters.job import run

    monkeypatch.setattr(job, "input_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for folder, message in _timm_refused_folders(tmp_path):
        with pytest.raises((ValueError, RuntimeError), match=re.escape(message)):
            run([f"model={folder}", "format=timm", f"output={tmp_path / 'out'}"], run_dir=tmp_path / "run")
        assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists(), folder
