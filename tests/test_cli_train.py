"""Drive the real `mtl-train` entry point with tiny overrides."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mtl


def cli(*args, cwd, env_extra=None, check=True):
    env = dict(os.environ, MTL_OUTPUT_DIR=str(Path(cwd) / "outputs"), **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "mtl.cli.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"mtl-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_dir_of(proc) -> Path:
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: "), last
    return Path(last.removeprefix("run_dir: "))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    proc = cli("experiment=scenes_hps", "debug=smoke", cwd=cwd)
    return cwd, run_dir_of(proc)


def test_smoke_run_writes_a_complete_run_folder(smoke_run):
    _, run_dir = smoke_run
    for name in ("config.yaml", "metrics.json", "model/model.safetensors", "model/config.json", "predictions.png"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) == {"semseg", "depth", "normals", "edges", "classification", "regression"}
    assert "miou" in metrics["test"]["semseg"] and "rmse" in metrics["test"]["depth"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "expert_usage.json").exists()  # the default usage callback leaves expert-free models alone
    assert (run_dir / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["global_steps"] == 3  # debug=smoke: one epoch of limit_train_batches=3
    assert 0.0 <= metrics["test"]["semseg"]["miou"] <= 1.0 and metrics["test"]["depth"]["rmse"] > 0


def test_a_refused_run_leaves_the_finished_runs_folder_as_it_was(smoke_run):
    """Hydra writes .hydra/ before the job runs; mtlkit writes it only once the folder is accepted, so a
    command pointed at a finished run's folder changes nothing there (no FAILED, no new Hydra record)."""
    cwd, run_dir = smoke_run
    record = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    assert set(record) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert b"experiment=scenes_hps" in record["overrides.yaml"]
    proc = cli("debug=smoke", "task=[depth]", f"hydra.run.dir={run_dir}", cwd=cwd, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: run_dir {run_dir} holds a finished run (metrics.json, model) of mtl-train (name: scenes_hps); pick a "
        f"new folder; to continue it, pass ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'} with a new folder")
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record
    assert not (run_dir / "FAILED").exists()


def _contents(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_a_folder_of_other_files_is_not_trained_into(tmp_path):
    """An existing folder that was no mtlkit run got its config.yaml and csv/metrics.csv replaced (rc 0); only a
    folder holding metrics.json or model/ was protected. Hydra's own log file there does not count as a file, and
    the empty one it made goes with the refusal (it stayed): the folder is exactly as it was. A user's own train.log
    stays."""
    user = tmp_path / "userdir"
    (user / "csv").mkdir(parents=True)
    (user / "config.yaml").write_text("mine: 1\n")
    (user / "csv" / "metrics.csv").write_text("mine\n")
    before = _contents(user)
    proc = cli("experiment=scenes_hps", "debug=smoke", f"hydra.run.dir={user}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: run_dir {user} is not empty (config.yaml and 1 more) and holds no failed run to retry (no FAILED "
        "file): its files would be replaced; give a new or empty folder")
    assert _contents(user) == before  # no FAILED, no .hydra, no train.log
    # hydra.run.dir=. in a project folder likewise, whose own train.log stays as it was
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "README.md").write_text("my project\n")
    (tmp_path / "project" / "train.log").write_text("")
    before = _contents(tmp_path / "project")
    proc = cli("experiment=scenes_hps", "debug=smoke", "hydra.run.dir=.", cwd=tmp_path / "project", check=False)
    assert proc.returncode == 1 and "is not empty (README.md) and holds no failed run" in proc.stderr
    assert _contents(tmp_path / "project") == before


def test_model_folder_from_cli_reloads(smoke_run):
    _, run_dir = smoke_run
    model = mtl.load_model(run_dir / "model")
    assert set(model.tasks) == {"semseg", "depth", "normals", "edges", "classification", "regression"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert model.meta["test"] == metrics["test"]  # the folder records the metrics of its own run


def test_resume_from_checkpoint_continues_training(smoke_run):
    cwd, run_dir = smoke_run
    first = json.loads((run_dir / "metrics.json").read_text())
    proc = cli("experiment=scenes_hps", "debug=smoke", "trainer.max_epochs=2",
               f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", cwd=cwd)
    resumed = json.loads((run_dir_of(proc) / "metrics.json").read_text())
    assert resumed["global_steps"] == 2 * first["global_steps"]


def test_single_task_baselines_then_delta_m(tmp_path):
    baselines = tmp_path / "baselines.json"
    proc = cli("-m", "experiment=scenes_hps", "debug=smoke", "task=depth,classification",
               f"baselines.save_to={baselines}", cwd=tmp_path)
    sweep = run_dir_of(proc)  # a multirun ends with its sweep folder, the jobs' parent
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert not (sweep / ".sweeping").exists()  # the sweep's claim on its folder ends with it
    record = (sweep / "multirun.yaml").read_bytes()
    # a second sweep into that folder is refused before Hydra rewrites the first one's multirun.yaml
    again = cli("-m", "experiment=scenes_hps", "debug=smoke", "task=regression", f"hydra.sweep.dir={sweep}",
                cwd=tmp_path, check=False)
    assert again.returncode == 1 and "run_dir:" not in again.stdout
    assert f"hydra.sweep.dir {sweep} holds an earlier sweep (multirun.yaml; job folders that did not fail: 0, 1)" \
        in again.stderr.strip().splitlines()[-1]
    assert (sweep / "multirun.yaml").read_bytes() == record
    stored = json.loads(baselines.read_text())
    assert set(stored) == {"depth", "classification"}
    proc = cli("experiment=scenes_hps", "debug=smoke", "task=[depth,classification]",
               f"baselines.path={baselines}", cwd=tmp_path)
    metrics = json.loads((run_dir_of(proc) / "metrics.json").read_text())
    assert metrics["delta_m"]["variant"] == "primary"
    # Δm = 100/T Σ (−1)^l (M − M_b) / M_b over the primary metrics: rmse (lower better), accuracy (higher)
    m, b = metrics["test"], stored
    expected = 100 / 2 * (-(m["depth"]["rmse"] - b["depth"]["rmse"]) / b["depth"]["rmse"]
                          + (m["classification"]["accuracy"] - b["classification"]["accuracy"])
                          / b["classification"]["accuracy"])
    assert metrics["delta_m"]["value"] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_a_sweep_folder_whose_jobs_all_failed_may_be_reused(tmp_path):
    from mtl.cli.sweep_end import jobs_not_failed

    assert jobs_not_failed(tmp_path / "none") == []
    (tmp_path / "multirun.yaml").write_text("x: 1")
    for job, failed in (("0", True), ("1", True), (".submitit", False)):
        (tmp_path / job).mkdir()
        if failed:
            (tmp_path / job / "FAILED").write_text("boom")
    assert jobs_not_failed(tmp_path) == []
    (tmp_path / "2").mkdir()  # finished or still running: either way not to be written over
    assert jobs_not_failed(tmp_path) == ["2"]
    # an Optuna sweep writes no multirun.yaml: its trials' folders (with their .hydra record) say it ran
    optuna = tmp_path / "optuna"
    (optuna / "0" / ".hydra").mkdir(parents=True)
    (optuna / "1" / ".hydra").mkdir(parents=True)
    (optuna / "1" / "FAILED").write_text("boom")
    (optuna / "notes").mkdir()  # a folder of the user's, not a job
    assert jobs_not_failed(optuna) == ["0"]


def test_a_failed_sweeps_job_folders_are_set_aside_but_not_a_users_or_a_held_one(tmp_path):
    from mtl.cli.sweep_end import set_aside_failed_jobs

    # an Optuna sweep (no multirun.yaml): trial folders carry their .hydra record
    for job in ("0", "1", "2"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / "FAILED").write_text(f"boom {job}")
    (tmp_path / "10").mkdir()  # refused before its .hydra record: FAILED and the job log only
    (tmp_path / "10" / "FAILED").write_text("boom 10")
    (tmp_path / "0.failed").mkdir()
    (tmp_path / "0.failed" / "FAILED").write_text("older")  # an older attempt's: kept, nothing is deleted
    (tmp_path / "2" / ".running").write_text(json.dumps({"pid": os.getppid()}))  # a live run retrying job 2 there
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")  # no FAILED: no job's
    (tmp_path / "pilot" / "checkpoints").mkdir(parents=True)  # a user's failed single run: not named as a job
    (tmp_path / "pilot" / "FAILED").write_text("oom")
    assert set_aside_failed_jobs(tmp_path) == ["0.failed.2", "1.failed", "10.failed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.failed", "0.failed.2", "1.failed", "10.failed", "2",
                                                         "notes", "pilot"]
    assert (tmp_path / "0.failed.2" / "FAILED").read_text() == "boom 0"
    assert (tmp_path / "0.failed" / "FAILED").read_text() == "older"
    assert (tmp_path / "pilot" / "FAILED").read_text() == "oom"


def test_baselines_missing_a_task_is_an_error(tmp_path):
    baselines = tmp_path / "b.json"
    baselines.write_text(json.dumps({"depth": {"rmse": 1.0, "abs_rel": 0.5}}))
    proc = cli("experiment=scenes_hps", "debug=smoke", "task=[depth,semseg]", f"baselines.path={baselines}",
               cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "semseg" in proc.stderr + proc.stdout and "b.json" in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "override, expected",
    [
        ("task=sky", "semseg"),                    # Hydra lists the available task configs
        ("backbone.name=resnet_nope", "unknown timm backbone"),
        ("data.name=nope", "valid names"),
        ("experiment=nope", "scenes_hps"),
    ],
)
def test_bad_names_list_the_valid_ones(tmp_path, override, expected):
    proc = cli("experiment=scenes_hps", "debug=smoke", override, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout


def test_in_process_run_helper(tmp_path):
    from mtl.train import run

    run_dir = run(["experiment=scenes_hps", "debug=smoke", "task=[depth]", "viz.num_samples=0"], run_dir=tmp_path / "r")
    assert (run_dir / "model" / "model.safetensors").is_file()
