"""Sweeps (Optuna), launchers (joblib, submitit) and their bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from mtl.cli import plugins
from mtl.cli.in_process import compose_in_process
from mtl.sweep import objective

METRICS = {"val": {"depth": {"rmse": 2.5, "abs_rel": 0.4}, "semseg": {"miou": 0.3}}}


def cli(*args, cwd):
    env = dict(os.environ, MTL_OUTPUT_DIR=str(Path(cwd) / "outputs"))
    return subprocess.run([sys.executable, "-m", "mtl.cli.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_objective_reads_the_named_validation_metric():
    assert objective(OmegaConf.create({"optimized_metric": "val/depth/rmse"}), METRICS) == 2.5
    assert objective(OmegaConf.create({}), METRICS) is None
    with pytest.raises(KeyError, match=r"'val/depth/mae' is not logged; logged: val/depth/rmse, val/depth/abs_rel, "
                                       r"val/semseg/miou, or delta_m"):
        objective(OmegaConf.create({"optimized_metric": "val/depth/mae"}), METRICS)
    with pytest.raises(ValueError, match="needs baselines.path"):
        objective(OmegaConf.create({"optimized_metric": "delta_m", "baselines": {"path": None}}), METRICS)


def test_objective_reads_the_logged_validation_losses():
    """val/loss and val/<task>/loss are logged (val/loss is the default checkpoint monitor), so a sweep may optimise
    them; they are lower-is-better."""
    from mtl.sweep import check_objective

    record = {**METRICS, "val_losses": {"val/loss": 3.5, "val/depth/loss": 1.25}}
    for name, value in (("val/loss", 3.5), ("val/depth/loss", 1.25)):
        assert objective(OmegaConf.create({"optimized_metric": name}), record) == value
        cfg = OmegaConf.create({"optimized_metric": name})
        check_objective(cfg, NAMES, DIRS, sweeper={"direction": "minimize"})
        with pytest.raises(ValueError, match=f"{name} is lower-is-better; set hydra.sweeper.direction=minimize"):
            check_objective(cfg, NAMES, DIRS, sweeper={"direction": "maximize"})
    with pytest.raises(KeyError, match=r"'val/normals/loss' is not logged; logged: .*val/semseg/miou, val/loss, "
                                       r"val/depth/loss, val/semseg/loss, or delta_m"):
        check_objective(OmegaConf.create({"optimized_metric": "val/normals/loss"}), NAMES, DIRS, sweeper={})


def test_a_diverged_trial_fails_instead_of_telling_nan():
    """Optuna told NaN stops the whole study with an unreadable error; a failed trial is what it is."""
    nan = {"val": {"depth": {"rmse": float("nan")}}}
    with pytest.raises(ValueError, match=r"optimized_metric val/depth/rmse is nan \(the trial diverged\)"):
        objective(OmegaConf.create({"optimized_metric": "val/depth/rmse"}), nan)


NAMES, DIRS = {"depth": ["rmse"], "semseg": ["miou"]}, {"depth": {"rmse": False}, "semseg": {"miou": True}}


@pytest.mark.parametrize("metric, direction, match", [
    ("val/depth/rmse", "maximize", r"hydra.sweeper.direction=maximize would keep the worst trial: val/depth/rmse "
                                   r"is lower-is-better; set hydra.sweeper.direction=minimize"),
    ("val/semseg/miou", "minimize", r"val/semseg/miou is higher-is-better; set hydra.sweeper.direction=maximize"),
    (None, "maximize", r"this sweep optimises a value: set optimized_metric="),
])
def test_an_optimising_sweep_follows_its_metrics_direction(metric, direction, match):
    from mtl.sweep import check_objective

    cfg = OmegaConf.create({"optimized_metric": metric})
    with pytest.raises(ValueError, match=match):
        check_objective(cfg, NAMES, DIRS, sweeper={"direction": direction})
    if metric:  # the right direction passes; a sweeper without a direction (the basic one) is not checked
        check_objective(cfg, NAMES, DIRS, sweeper={"direction": "minimize" if direction == "maximize" else "maximize"})
    check_objective(OmegaConf.create({"optimized_metric": None}), NAMES, DIRS, sweeper={"params": {}})


def test_a_multi_objective_direction_is_refused_before_training():
    """direction=[maximize, minimize] once passed the check (its first entry was read); every trial then
    returned one value, Optuna failed each and the study ended with exit 0 and no solution."""
    from mtl.sweep import check_objective

    cfg = OmegaConf.create({"optimized_metric": "val/semseg/miou"})
    with pytest.raises(ValueError, match=r"hydra.sweeper.direction=\['maximize', 'minimize'\] asks for a 2-objective "
                                         r"study, but a trial returns one value"):
        check_objective(cfg, NAMES, DIRS, sweeper=OmegaConf.create({"direction": ["maximize", "minimize"]}))
    check_objective(cfg, NAMES, DIRS, sweeper=OmegaConf.create({"direction": ["maximize"]}))


def test_objective_delta_m_against_baselines(tmp_path):
    base = tmp_path / "b.json"
    base.write_text(json.dumps({"depth": {"rmse": 2.0, "abs_rel": 0.4}, "semseg": {"miou": 0.6, "pixel_acc": 0.9}}))
    cfg, _ = compose_in_process("mtl.configs", "train", ["experiment=scenes_hps", "task=[depth,semseg]",
                                                         "optimized_metric=delta_m", f"baselines.path={base}"])
    # primary metrics: depth rmse 2.5 vs 2.0 (lower is better): -25 %; semseg miou 0.3 vs 0.6: -50 %
    assert objective(cfg, METRICS) == pytest.approx((-25.0 - 50.0) / 2)


def test_sweep_and_launcher_configs_compose():
    cfg, _ = compose_in_process("mtl.configs", "train", ["hparams_search=optuna_dwa"])
    assert cfg.optimized_metric == "val/semseg/miou" and cfg.balancer.name == "dwa"
    # the plain search keeps the chosen balancer (it once forced DWA, whose temperature it searched)
    cfg, _ = compose_in_process("mtl.configs", "train", ["hparams_search=optuna", "balancer=famo"])
    assert cfg.optimized_metric == "val/semseg/miou" and cfg.balancer.name == "famo"


def test_missing_plugin_names_the_extra(monkeypatch):
    monkeypatch.setattr(plugins, "_installed", lambda module: False)
    assert plugins.check_plugins(["task=depth", "launcher=joblib"]) == \
        "launcher=joblib needs the Hydra plugin hydra-joblib-launcher: pip install 'mtlkit[launchers]'"
    for search in ("hparams_search=optuna", "hparams_search=optuna_dwa"):
        assert "pip install 'mtlkit[sweeps]'" in plugins.check_plugins([search])
    assert plugins.check_plugins(["launcher=ray"]) == "launcher=ray needs ray: pip install 'mtlkit[ray]'"
    assert plugins.check_plugins(["task=depth"]) is None


def test_the_plugin_check_reads_an_added_launcher_too(monkeypatch):
    monkeypatch.setattr(plugins, "_installed", lambda module: False)
    for given in ("+launcher=joblib", "++launcher=joblib"):
        assert plugins.check_plugins([given]) == \
            "launcher=joblib needs the Hydra plugin hydra-joblib-launcher: pip install 'mtlkit[launchers]'"


#: every CLI's console-script module
CLI_MODULES = {"train": "mtl.cli.train", "merge": "merging.cli", "prune": "pruning.cli", "export": "mtl.cli.export",
               "extract": "mtl.cli.extract"}


def app_cli(app, *args, cwd):
    env = dict(os.environ, MTL_OUTPUT_DIR=str(Path(cwd) / "outputs"))
    return subprocess.run([sys.executable, "-m", CLI_MODULES[app], *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("app", sorted(CLI_MODULES))
def test_every_cli_takes_launcher_as_mtl_train_does(tmp_path, app):
    """launcher= was a group of mtl-train's only: the other CLIs answered Hydra's "Could not override
    'launcher'" and needed +launcher=, which mtl-train refuses."""
    pytest.importorskip(plugins.PLUGINS["launcher=joblib"][0])
    proc = app_cli(app, "launcher=joblib", "--cfg", "hydra", "-p", "hydra.launcher", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout)["_target_"].endswith("JoblibLauncher")
    proc = app_cli(app, "+launcher=joblib", "--cfg", "hydra", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: +launcher=joblib adds a second launcher, and the config already has one: " \
                                  "write launcher=joblib"


@pytest.mark.slow
def test_mtl_merge_sweeps_with_a_launcher(tmp_path):
    pytest.importorskip(plugins.PLUGINS["launcher=joblib"][0])
    proc = app_cli("merge", "-m", "launcher=joblib", "debug=smoke", "merge=ties", "merge.lam=0.6,1.0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "merge" / "multiruns").iterdir()
    assert proc.stdout.strip().splitlines()[-1] == f"run_dir: {sweep}"
    lams = [yaml.safe_load((sweep / str(i) / "config.yaml").read_text())["merge"]["lam"] for i in (0, 1)]
    assert lams == [0.6, 1.0] and all((sweep / str(i) / "metrics.json").is_file() for i in (0, 1))


SMOKE = ["experiment=scenes_hps", "debug=smoke", "logger=none", "viz.num_samples=0"]


def _sweep_dir(tmp_path):
    (d,) = (tmp_path / "outputs" / "scenes_hps" / "multiruns").iterdir()
    return d


@pytest.mark.slow
def test_optuna_sweep_reports_the_best_trial(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = cli("-m", "hparams_search=optuna", *SMOKE, "task=[depth]", "optimized_metric=val/depth/rmse",
               "balancer=famo", '++hydra.sweeper.params={balancer.lr: "interval(0.005, 0.1)"}',  # the documented way to add a knob
               "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = _sweep_dir(tmp_path)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    records = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(3)]
    trials = [r["val"]["depth"]["rmse"] for r in records]
    assert best["best_value"] == pytest.approx(min(trials))
    assert [r["objective"] for r in records] == [{"optimized_metric": "val/depth/rmse", "value": v} for v in trials]
    assert set(best["best_params"]) == {"optim.lr", "balancer.lr"}


def test_a_trials_metrics_record_the_value_it_reports(tmp_path):
    """The sweeper's summary keeps only the best trial's value: each trial's own was nowhere."""
    from mtl.cli.train import train_job

    cfg, run_dir = compose_in_process("mtl.configs", "train", [*SMOKE, "task=[depth]", "optimized_metric=val/depth/rmse",
                                                               "logger=none", "viz.num_samples=0"], run_dir=tmp_path / "t")
    value = train_job(cfg, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["objective"] == {"optimized_metric": "val/depth/rmse", "value": value}
    assert value == metrics["val"]["depth"]["rmse"]


@pytest.mark.parametrize("rank_env", [{"LOCAL_RANK": "1"}, {"RANK": "1", "LOCAL_RANK": "0"}])
def test_only_rank_0_writes_a_trials_metrics(tmp_path, monkeypatch, rank_env):
    """Under DDP every rank returns from train(); the others' record is partial (no model_stats) and must not
    replace rank 0's metrics.json, though each rank still returns the value to its sweeper."""
    import mtl.train
    from mtl.cli.train import train_job

    monkeypatch.setattr(mtl.train, "train", lambda cfg, run_dir: {"val": {"depth": {"rmse": 2.5}}})
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    cfg = OmegaConf.create({"optimized_metric": "val/depth/rmse"})
    assert train_job(cfg, tmp_path) == 2.5 and (tmp_path / "metrics.json").is_file()  # rank 0 writes it
    (tmp_path / "metrics.json").unlink()
    for key, value in rank_env.items():
        monkeypatch.setenv(key, value)
    assert train_job(cfg, tmp_path) == 2.5
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("env, rank0", [({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True),
                                         ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # a 2nd node's first rank
                                         ({"SLURM_PROCID": "2"}, False), ({"SLURM_PROCID": "0"}, True)])
def test_rank_0_is_the_global_first_process(env, rank0, monkeypatch):
    from mtl.cli.common import _rank0

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _rank0() is rank0


def test_a_validation_loss_objective_is_the_best_epochs_logged_loss(tmp_path):
    """optimized_metric=val/depth/loss is the value logged for the epoch the best checkpoint holds (the default
    monitor, val/loss, min), as a metric objective is."""
    import csv

    from mtl.cli.train import train_job

    cfg, run_dir = compose_in_process("mtl.configs", "train", [*SMOKE, "task=[depth,semseg]", "logger=csv",
                                                               "trainer.max_epochs=2", "optimized_metric=val/depth/loss"],
                                      run_dir=tmp_path / "t")
    value = train_job(cfg, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("val/loss")]
    best = min(rows, key=lambda r: float(r["val/loss"]))
    assert len(rows) == 2 and int(best["epoch"]) == metrics["val_epoch"]
    assert value == pytest.approx(float(best["val/depth/loss"]), rel=1e-6)
    assert metrics["val_losses"]["val/loss"] == pytest.approx(float(best["val/loss"]), rel=1e-6)


def test_optunas_database_storage_works_with_the_installed_sqlalchemy(tmp_path):
    # the sweeps extra pins sqlalchemy<2 / alembic<1.14: optuna 2.x (the newest Hydra's sweeper allows)
    # fails on SQLAlchemy 2 with a bare AssertionError when the study is created
    optuna = pytest.importorskip("optuna")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="minimize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1) ** 2, n_trials=2)
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 2


@pytest.mark.slow
def test_an_optuna_study_in_a_database_resumes(tmp_path):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    for _ in range(2):
        proc = cli("-m", "hparams_search=optuna", *SMOKE, "task=[depth]", "optimized_metric=val/depth/rmse",
                   "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={url}",
                   "hydra.sweeper.study_name=resumed", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(optuna.load_study(study_name="resumed", storage=url).trials) == 2


@pytest.mark.slow
def test_optuna_sweep_with_an_unlogged_metric_fails_naming_the_logged_ones(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = cli("-m", "hparams_search=optuna", *SMOKE, "task=[depth]", "optimized_metric=val/depth/miou",
               "hydra.sweeper.n_trials=1", cwd=tmp_path)
    assert proc.returncode == 1
    # refused at the sweep's start, once: no trial built its data and model, no sweep folder is left
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
        "error: optimized_metric='val/depth/miou' is not logged; logged: val/depth/rmse, val/depth/abs_rel, val/loss, "
        "val/depth/loss, or delta_m"]
    assert "Launching" not in proc.stderr + proc.stdout and not list(tmp_path.glob("outputs/*/multiruns/*"))


@pytest.mark.parametrize("overrides, swept, message", [
    (["task=[depth]", "optimized_metric=val/depht/rmse", "hydra.sweeper.direction=minimize"], [],
     "optimized_metric='val/depht/rmse' is not logged; logged: val/depth/rmse, val/depth/abs_rel, val/loss, "
     "val/depth/loss, or delta_m"),
    (["task=[depth]", "optimized_metric=val/depth/rmse"], [],
     "hydra.sweeper.direction=maximize would keep the worst trial: val/depth/rmse is lower-is-better; "
     "set hydra.sweeper.direction=minimize"),
    (["task=[depth]", "optimized_metric=val/depth/rmse", "hydra.sweeper.direction=minimize"], [], None),
    (["task=[semseg]", "optimized_metric=val/depth/rmse"], ["task=depth,semseg"], None),  # each job's own tasks
    (["task=[depth]", "optimized_metric=val/depth/rmse"], ["hydra.sweeper.direction=minimize,maximize"], None),
    # a baselines file Δm cannot read failed in trial 0, after the sweep folder was made
    (["task=[depth]", "optimized_metric=delta_m", "baselines.path=/nonexistent.json"], [],
     "cannot read baselines file /nonexistent.json: No such file or directory"),
    (["task=[depth]", "optimized_metric=delta_m", "baselines.path=/nonexistent.json"], ["baselines.variant=primary,all"],
     None),  # the sweep varies baselines: each trial checks its own
])
def test_the_optimized_metric_is_checked_at_the_sweeps_start(overrides, swept, message):
    """A typo in optimized_metric, or a direction against it, failed in every trial after its data and model were
    built (a FAILED trial folder, the error twice); the tasks' metric names and directions need no data."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from mtl.cli.sweep_checks import sweep_problem

    with initialize_config_module(config_module="mtl.configs", version_base="1.3"):
        config = compose(config_name="train", overrides=["hparams_search=optuna", *SMOKE, *overrides],
                         return_hydra_config=True)
    with open_dict(config):
        config.hydra.overrides.task = [*overrides, *swept]
    assert sweep_problem(config) == message


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launcher_runs_a_multirun(tmp_path, launcher):
    module = plugins.PLUGINS[f"launcher={launcher}"][0]
    pytest.importorskip(module)
    proc = cli("-m", f"launcher={launcher}", *SMOKE, "task=depth,semseg", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the warnings a single run filters stay filtered in the launcher's worker processes (joblib's are fresh
    # interpreters: Lightning's LeafSpec FutureWarning reached the console there)
    assert not [ln for ln in proc.stderr.splitlines() if "deprecated" in ln or "Warning" in ln], proc.stderr[-3000:]
    sweep = _sweep_dir(tmp_path)
    for i, task in enumerate(["depth", "semseg"]):
        assert set(json.loads((sweep / str(i) / "metrics.json").read_text())["test"]) == {task}
    if launcher == "submitit_local":
        assert list((sweep / ".submitit").glob("*/*_log.out"))  # submitit's own per-job logs


def test_a_failing_job_does_not_stop_the_multirun(tmp_path):
    """The basic launcher: job #0 fails, job #1 still runs; the first failure is named and the sweep
    folder is the last line (a job's sys.exit used to end the whole sweep)."""
    proc = cli("-m", *SMOKE, "task=depth", "optim.lr=-1,0.002", cwd=tmp_path)
    assert proc.returncode == 1
    sweep = _sweep_dir(tmp_path)
    # job #0 is refused before its folder is accepted (optim checks come first), so it leaves no records
    assert not (sweep / "0" / "metrics.json").exists() and (sweep / "1" / "metrics.json").is_file()
    assert proc.stdout.strip().splitlines()[-1] == f"run_dir: {sweep}"
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors[-1].startswith("error: sweep job #0 (") and \
        "optim.lr=-1) failed: optim.lr must be a finite number > 0" in errors[-1]
    assert "Error executing job with overrides" not in proc.stderr  # Hydra's own second line about it


JOBLIB, OPTUNA = "launcher=joblib", "hparams_search=optuna"
LOKY_ONLY = "would be ignored: Hydra's joblib launcher always runs its jobs in loky worker processes; leave "


def test_a_study_whose_every_trial_failed_names_the_first_and_ends_with_its_folder(tmp_path, monkeypatch, capsys):
    """Hydra's Optuna sweeper, told by a launcher that both trials failed (max_failure_rate=1.0 tolerates them),
    ended in Optuna's bare "No trials are completed yet" without the sweep folder."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra.core.utils import JobReturn, JobStatus
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

    from mtl.cli.common import JobFailed, cli_main

    class FailingLauncher:
        def launch(self, overrides, initial_job_idx):
            return [JobReturn(status=JobStatus.FAILED, _return_value=JobFailed(
                f"sweep job #{initial_job_idx + i} ({' '.join(o)}) failed: boom {initial_job_idx + i}", str(tmp_path)))
                for i, o in enumerate(overrides)]

    sweeper = OptunaSweeperImpl(sampler=None, direction="maximize", storage=None, study_name="s", n_trials=2, n_jobs=1,
                                max_failure_rate=1.0, search_space=None, custom_search_space=None,
                                params=OmegaConf.create({"optim.lr": "interval(0.1, 1)"}))
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    sweeper.launcher, sweeper.job_idx, sweeper.hydra_context = FailingLauncher(), 0, object()
    with pytest.raises(SystemExit) as exit_:
        cli_main(lambda: sweeper.sweep([]), "mtl.configs", argv=["mtl-train"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 1 and out.strip().splitlines()[-1:] == [f"run_dir: {tmp_path}"], (out, err)
    assert err.strip().splitlines()[-1].startswith("error: every trial of the study failed (2); first: sweep job #0 (")
    assert err.strip().endswith("failed: boom 0") and "No trials are completed yet" not in err


@pytest.mark.slow
def test_an_optuna_study_whose_every_trial_failed_ends_as_a_failed_multirun(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = cli("-m", OPTUNA, *SMOKE, "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failure_rate=1.0",
               'hydra.sweeper.params={optim.lr: "interval(-2, -1)"}', cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == f"run_dir: {_sweep_dir(tmp_path)}"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: every trial of the study failed (2); first: sweep job #0 (optim.lr=-")
    assert "failed: optim.lr must be a finite number > 0" in last


@pytest.mark.parametrize("args, message", [
    ([JOBLIB, "hydra.launcher.n_jobs=0"],
     "hydra.launcher.n_jobs=0 runs no job: set the number of worker processes (>= 1; -1: one per CPU)"),
    ([JOBLIB, "hydra.launcher.backend=foo"], f"hydra.launcher.backend=foo {LOKY_ONLY}hydra.launcher.backend unset"),
    ([JOBLIB, "hydra.launcher.backend=threading"],
     f"hydra.launcher.backend=threading {LOKY_ONLY}hydra.launcher.backend unset"),
    ([JOBLIB, "hydra.launcher.prefer=threads"], f"hydra.launcher.prefer=threads {LOKY_ONLY}hydra.launcher.prefer unset"),
    ([OPTUNA, "hydra.sweeper.n_trials=0"],
     "hydra.sweeper.n_trials=0: the study would end without a best trial; set it to 1 or more"),
    ([OPTUNA, "hydra.sweeper.n_jobs=0"], "hydra.sweeper.n_jobs=0: the trials run in batches of n_jobs; set it to 1 or more"),
    ([OPTUNA, "hydra.sweeper.direction=foo"], "hydra.sweeper.direction=foo: Optuna takes maximize or minimize"),
    ([OPTUNA, "hydra.sweeper.direction=Maximize"], "hydra.sweeper.direction=Maximize: Optuna takes maximize or minimize"),
    ([OPTUNA, "hydra.sweeper.max_failure_rate=-0.5"],
     "hydra.sweeper.max_failure_rate=-0.5: the share of a batch's trials that may fail must be within [0, 1]"),
    (["launcher=ray", "hydra.launcher.cpus_per_job=3"], "hydra.launcher.cpus_per_job=3 exceeds the local Ray "
     "cluster's 2 CPUs (hydra.launcher.num_cpus); no job could ever start"),
    (["launcher=ray", "hydra.launcher.cpus_per_job=0"], "hydra.launcher.cpus_per_job=0: each job needs a CPU share > 0 "
     "(it sets how many jobs run at once; 0 would start them all together)"),
    (["launcher=ray", "hydra.launcher.gpus_per_job=-1"], "hydra.launcher.gpus_per_job=-1: set 0 or more GPUs per job"),
    (["trainer=ddp", "trainer.accelerator=cpu", "balancer=ew,rlw"], "trainer=ddp with local processes cannot run inside "
     "a -m multirun (each rank would re-run the sweep); use launcher=slurm, or run each job with torchrun"),
])
def test_a_sweep_it_cannot_run_is_refused_at_its_start(tmp_path, args, message):
    """Each failed only once the sweep had begun (joblib's and Optuna's own errors, local DDP job by job, 31 s
    in), or was ignored (joblib's backend) or unbounded (Ray's cpus_per_job=0), and left a sweep folder behind."""
    choice = next((a for a in args if a in plugins.PLUGINS), None)
    if choice:
        pytest.importorskip(plugins.PLUGINS[choice][0])
    proc = cli("-m", *SMOKE, "task=depth,regression", *args, cwd=tmp_path)
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (1, f"error: {message}")
    assert "Launching" not in proc.stderr and "run_dir:" not in proc.stdout
    assert not list(tmp_path.glob("outputs/*/multiruns/*"))


def test_ddp_under_slurm_is_left_to_its_jobs():
    """Each SLURM job gets its ranks from its tasks' environment: a sweep of them is not refused."""
    from hydra import compose, initialize_config_module

    from mtl.cli.sweep_checks import LOCAL_DDP_IN_MULTIRUN, sweep_problem

    pytest.importorskip(plugins.PLUGINS["launcher=slurm"][0])
    with initialize_config_module(config_module="mtl.configs", version_base="1.3"):
        local, slurm = (compose(config_name="train", overrides=["trainer=ddp", *more], return_hydra_config=True)
                        for more in ([], ["launcher=slurm"]))
    assert sweep_problem(local) == LOCAL_DDP_IN_MULTIRUN and sweep_problem(slurm) is None


def test_local_ddp_swept_with_another_trainer_is_refused_by_its_job(tmp_path):
    """A swept trainer choice is not in the sweep's own config: the DDP job refuses, the other one runs."""
    proc = cli("-m", *SMOKE, "task=depth", "trainer=ddp,cpu", "trainer.accelerator=cpu", cwd=tmp_path)
    assert proc.returncode == 1
    assert "sweep job #0 (" in proc.stderr and "trainer=ddp with local processes cannot run inside a -m multirun" \
        in proc.stderr
    assert (_sweep_dir(tmp_path) / "1" / "metrics.json").is_file()


def test_a_sweep_of_the_process_count_starts_and_its_multi_process_jobs_refuse_one_by_one(tmp_path):
    """docs/scaleout.md: one process is no local DDP and runs. Hydra leaves swept values out of the sweep's config,
    so the start check saw ddp.yaml's devices: 2 and refused trainer.devices=1,2 whole; its jobs decide now."""
    proc = cli("-m", *SMOKE, "task=depth", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1,2",
               cwd=tmp_path)
    assert proc.returncode == 1
    assert "sweep job #1 (" in proc.stderr and "trainer=ddp with local processes cannot run inside a -m multirun" \
        in proc.stderr
    assert (_sweep_dir(tmp_path) / "0" / "metrics.json").is_file()


@pytest.mark.parametrize("swept, refused", [
    ([], True), (["seed=0,1"], True), (["trainer.devices=1,1"], False), (["trainer.devices=[0],[1]"], False),
    (["+trainer.num_nodes=1,2"], False), (["trainer.strategy=ddp,auto"], False)])
def test_the_sweep_start_leaves_a_swept_process_count_to_its_jobs(swept, refused, monkeypatch):
    """The sweep's config holds the trainer file's devices: 2 whatever a swept key gives each job (Hydra records
    the sweep overrides in hydra.overrides.task only); a sweep of other keys is still refused at its start."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from mtl.cli.sweep_checks import LOCAL_DDP_IN_MULTIRUN, sweep_problem

    for key in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    with initialize_config_module(config_module="mtl.configs", version_base="1.3"):
        config = compose(config_name="train", overrides=["trainer=ddp"], return_hydra_config=True)
    with open_dict(config):
        config.hydra.overrides.task = ["trainer=ddp", *swept]
    assert sweep_problem(config) == (LOCAL_DDP_IN_MULTIRUN if refused else None)
    with open_dict(config):
        config.hydra.sweeper.params = {"trainer.devices": "1,2"}  # the sweeper's own search space
    assert sweep_problem(config) is None


@pytest.mark.slow
def test_ddp_evaluation_counts_every_sample_once(tmp_path):
    """29 test images on 2 ranks: Lightning's default sampler repeats one (8/30 instead of 8/29); the
    test metrics must equal one process evaluating the saved model on the whole split."""
    import mtl
    from mtl.data import create_datamodule
    from pruning.report import evaluate_all

    proc = cli(*SMOKE, "task=[depth,classification]", "trainer=ddp", "trainer.accelerator=cpu", "data.n_test=29",
               "optimized_metric=val/depth/rmse", cwd=tmp_path)  # (the objective is written by rank 0 only)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(proc.stdout.strip().splitlines()[-1].split("run_dir: ")[1])
    record = json.loads((run / "metrics.json").read_text())
    assert "model_stats" in record and record["objective"]["value"] == record["val"]["depth"]["rmse"]
    reported = record["test"]
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    dm = create_datamodule(**data)
    again = evaluate_all(mtl.load_model(run / "model"), dm, split="test")
    for task, values in again.items():
        for name, value in values.items():
            assert reported[task][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, name)


def test_gradient_clipping_works_under_bf16_mixed(tmp_path):
    # trainer=gpu's default precision; Lightning's clipping refused the fused AdamW there
    proc = cli(*SMOKE, "task=depth", "trainer.precision=bf16-mixed", "optim.grad_clip=0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_to_a_joblib_sweep_stops_its_jobs_too(tmp_path):
    """SIGTERM to a launcher=joblib sweep ended it at once and silently while its workers trained on,
    orphaned, until each wrote a finished run: the jobs are now told to stop, each marks its folder
    FAILED, and the sweep ends as a single run does (exit 143, one error line, its folder last)."""
    import signal
    import time

    pytest.importorskip(plugins.PLUGINS["launcher=joblib"][0])
    sweep = tmp_path / "sweep"
    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "outputs"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mtl.cli.train", "-m", "launcher=joblib", *SMOKE, "task=depth",
                             "trainer.max_epochs=500", "seed=1,2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(list(sweep.glob("*/checkpoints/last.ckpt"))) < 2 and time.time() < deadline:  # both jobs training
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert out.strip().splitlines()[-1] == f"run_dir: {sweep}"
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert errors[-1].startswith("error: interrupted by SIGTERM; the sweep's running jobs were stopped")
    for job in ("0", "1"):
        assert (sweep / job / "FAILED").read_text().startswith("interrupted by SIGTERM")
        assert not (sweep / job / "metrics.json").exists() and not (sweep / job / ".running").exists()
    assert not (sweep / ".sweeping").exists()


@pytest.mark.parametrize("devices, refused", [
    ("[0]", False), ("1", False), ("null", False), ('"0,"', False),
    ("[0,1]", True), ("2", True), ('"0,1"', True), ("auto", True), ("-1", True)])
def test_local_ddp_in_a_sweep_is_refused_by_its_process_count(devices, refused, monkeypatch):
    """trainer=ddp trainer.devices=[0] (one process) was refused as local DDP: only '1' and None counted as one."""
    from hydra import compose, initialize_config_module

    from mtl.cli.sweep_checks import LOCAL_DDP_IN_MULTIRUN, sweep_problem

    for key in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    with initialize_config_module(config_module="mtl.configs", version_base="1.3"):
        config = compose(config_name="train", overrides=["trainer=ddp", f"trainer.devices={devices}"],
                         return_hydra_config=True)
    assert sweep_problem(config) == (LOCAL_DDP_IN_MULTIRUN if refused else None)


def test_gradient_clipping_under_16_mixed_clips_the_unscaled_gradients():
    """Clipping ran in training_step, before fp16's scaler unscaled the gradients inside opt.step(): it clipped the
    scaled norm, and the AdamW step saw a gradient of norm grad_clip/scale (1e-3/32768). The norm the step sees is
    grad_clip, as in 32-true. Lightning's own fp16 plugin with a CPU GradScaler runs the GPU's code path."""
    import lightning as L
    import torch
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch.utils.data import DataLoader

    from mtl.models import create_model
    from mtl.module import MultiTaskModule

    torch.manual_seed(0)
    model = create_model([{"kind": "depth"}], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": 8})
    seen = []

    class StepNorms(L.Callback):
        def on_train_start(self, trainer, pl_module):
            def norm(opt, args, kwargs):  # the gradients the AdamW step uses, after unscaling and clipping
                grads = [p.grad.float().norm() for g in opt.param_groups for p in g["params"] if p.grad is not None]
                seen.append(float(torch.stack(grads).norm()))
            trainer.optimizers[0].register_step_pre_hook(norm)

    samples = [{"image": torch.randn(3, 32, 32), "depth": torch.rand(1, 32, 32) + 0.5} for _ in range(4)]
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[plugin], max_steps=3, limit_val_batches=0,
                        callbacks=[StepNorms()])
    trainer.fit(MultiTaskModule(model, log_weights_every=0, grad_clip=1e-3), DataLoader(samples, batch_size=2))
    # the scaler skips a step whose scaled gradients overflowed (the first, at scale 65536): no pre-hook there
    assert seen and seen == pytest.approx([1e-3] * len(seen), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("app, swept", [("prune", "seed=0,1"), ("export", "model=a,b"), ("extract", "tasks=depth,semseg"),
                                        ("merge", "mergekit_yaml=x.yml seed=0,1")])
def test_every_cli_refuses_one_output_for_several_jobs_at_the_sweeps_start(tmp_path, app, swept):
    """A fixed output= in a multirun: each job replaced the last one's result (or failed after it had finished)."""
    proc = app_cli(app, "-m", *swept.split(), "output=out", cwd=tmp_path)
    key = swept.split()[-1].split("=")[0]
    assert (proc.returncode, proc.stderr.strip()) == (1, (
        f"error: output=out is one folder for several jobs of this multirun (jobs #0 and #1 would both write "
        f"{tmp_path}/out, each replacing the last one's result): make it differ per job, e.g. output='out_${{{key}}}', "
        "or leave output unset (each job's own run folder)"))
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("output, refused", [("out", True), ("out_${seed}", True), ("out_${merge.lam}", False),
                                             ("out_${hydra:job.num}", False), (None, False),
                                             ("${hydra:runtime.output_dir}/m", False), ("${paths.output_dir}/m", False)])
def test_the_sweep_start_compares_the_jobs_resolved_outputs(output, refused):
    """Each job's output as its own composed config resolves it: a fixed folder, or an interpolation alike for every
    job, would be written by both jobs; one of the swept value or of the job's number differs, and null is each
    job's own run folder."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from mtl.cli.sweep_checks import sweep_problem

    given = ["eval=none", "merge=task_arithmetic", *([f"output={output}"] if output else [])]
    with initialize_config_module(config_module="mtl.configs.merge_app", version_base="1.3"):
        config = compose(config_name="merge", overrides=given, return_hydra_config=True)
        with open_dict(config):
            config.hydra.overrides.task = [*given, "merge.lam=0.3,0.5"]
        problem = sweep_problem(config)
    assert (problem is not None) == refused, problem
    if refused:
        assert problem.startswith(f"output={output} is one folder for several jobs of this multirun (jobs #0 and #1 "
                                  f"would both write {os.path.abspath('out' if output == 'out' else 'out_0')}")


@pytest.mark.slow
def test_a_delta_m_sweep_with_a_bad_baselines_file_is_refused_before_its_folder(tmp_path):
    """The start check reads and parses baselines.path with the trials' own loader and message."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    (tmp_path / "bad.json").write_text("{not json")
    for path, message in ((tmp_path / "missing.json", f"cannot read baselines file {tmp_path}/missing.json: No such "
                           "file or directory"), (tmp_path / "bad.json", f"baselines file {tmp_path}/bad.json is not "
                                                  "valid JSON: Expecting property name enclosed in double quotes")):
        proc = cli("-m", "hparams_search=optuna", *SMOKE, "task=depth", "optimized_metric=delta_m",
                   f"baselines.path={path}", cwd=tmp_path)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), proc.stderr
        assert "run_dir:" not in proc.stdout and not list(tmp_path.glob("outputs/*/multiruns/*"))
