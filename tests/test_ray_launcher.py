"""launcher=ray: mtlkit's own Hydra launcher runs a multirun's jobs as Ray tasks on a local cluster."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.plugins import Plugins
from omegaconf import OmegaConf

from mtl.launchers import HYDRA_TARGET, RayLauncher, register
from mtl.launchers import ray_launcher

SMOKE = ["experiment=scenes_hps", "debug=smoke", "logger=none", "viz.num_samples=0"]
HIDE_RAY = "import sys; sys.modules['ray'] = None; sys.argv[0] = 'mtl-train'; from mtl.cli.train import main; main()"


def cli(*args, cwd, hide_ray=False):
    env = dict(os.environ, MTL_OUTPUT_DIR=str(Path(cwd) / "outputs"), RAY_USAGE_STATS_ENABLED="0")
    head = ["-c", HIDE_RAY] if hide_ray else ["-m", "mtl.cli.train"]
    return subprocess.run([sys.executable, *head, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def compose_with_hydra(overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="mtl.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_launcher_config_composes_and_hydra_can_find_the_class():
    hydra_cfg = OmegaConf.to_container(compose_with_hydra(["launcher=ray", "hydra.launcher.num_cpus=1"]).hydra.launcher)
    launcher = hydra_cfg.pop("_target_")
    assert launcher == HYDRA_TARGET
    register()
    assert Plugins.instance().class_name_to_class[HYDRA_TARGET] is RayLauncher
    local = RayLauncher(**hydra_cfg)._init_kwargs()
    assert local == {"include_dashboard": False, "num_cpus": 1}  # num_gpus null: Ray detects them
    joined = RayLauncher(**{**hydra_cfg, "address": "auto", "init": {"namespace": "mtl"}})._init_kwargs()
    assert joined == {"include_dashboard": False, "address": "auto", "namespace": "mtl"}  # no num_cpus for a running cluster


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"^launcher=ray needs ray: pip install 'mtlkit\[ray\]'$"):
        ray_launcher.import_ray()
    proc = cli("-m", "launcher=ray", "task=depth", cwd=tmp_path, hide_ray=True)  # stops before anything runs
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: launcher=ray needs ray: pip install 'mtlkit[ray]'"]
    assert not (tmp_path / "outputs").exists()


def _sweep_dir(tmp_path):
    (d,) = (tmp_path / "outputs" / "scenes_hps" / "multiruns").iterdir()
    return d


@pytest.mark.slow  # a local Ray cluster and two smoke trainings: ~20 s on 2 cores
def test_ray_multirun_runs_each_job_in_its_own_folder(tmp_path):
    pytest.importorskip("ray")
    proc = cli("-m", "launcher=ray", "hydra.launcher.num_cpus=2", *SMOKE, "task=depth,regression", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = _sweep_dir(tmp_path)
    for i, task in enumerate(["depth", "regression"]):
        job = sweep / str(i)
        assert set(json.loads((job / "metrics.json").read_text())["test"]) == {task}
        assert f"task={task}" in OmegaConf.load(job / ".hydra" / "overrides.yaml")
        hydra = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra
        assert hydra.job.num == i and hydra.runtime.output_dir == str(job.resolve())
        assert (job / "train.log").is_file() and (job / "model" / "config.json").is_file()
    # the driver names every job's run folder, in job order, after Ray's relayed output; the sweep
    # folder is the multirun's last line
    assert proc.stdout.strip().splitlines()[-3:] == [f"run_dir: {(sweep / str(i)).resolve()}" for i in (0, 1)] \
        + [f"run_dir: {sweep.resolve()}"]


@pytest.mark.slow  # ~20 s
def test_a_failing_job_fails_the_multirun_and_keeps_the_others(tmp_path):
    pytest.importorskip("ray")
    proc = cli("-m", "launcher=ray", "hydra.launcher.num_cpus=2", *SMOKE, "task=[depth]",
               "optimized_metric=val/depth/rmse,val/depth/nope", cwd=tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]  # one line, no traceback
    # the same one line as every launcher's (the job now fails before training, naming the metric)
    assert last.startswith("error: sweep job #1 (") and "optimized_metric=val/depth/nope) failed: " \
        "optimized_metric='val/depth/nope' is not logged" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    sweep = _sweep_dir(tmp_path)
    assert (sweep / "0" / "metrics.json").is_file()


def test_a_cluster_that_cannot_be_reached_is_one_line(monkeypatch, tmp_path, capsys):
    """ray.init failing (wrong address, auth token, ...) stops the multirun with one error line."""
    import types

    def init(**kw):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init)
    monkeypatch.setitem(sys.modules, "ray", fake)
    cfg = compose_with_hydra(["launcher=ray", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    launcher = RayLauncher(address="10.0.0.1:6379")
    launcher.setup(hydra_context=object(), task_function=lambda c: None, config=cfg)
    with pytest.raises(SystemExit) as e:
        launcher.launch([["task=depth"]], initial_job_idx=0)
    assert e.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: launcher=ray could not connect to the Ray cluster at 10.0.0.1:6379 (ray.init({'include_dashboard': "
        "False, 'address': '10.0.0.1:6379'})): ConnectionError: Failed to connect to Ray cluster at 10.0.0.1:6379")


def test_a_job_larger_than_the_local_cluster_is_refused_not_left_waiting(monkeypatch, tmp_path, capsys):
    """cpus_per_job=3 on a 2-CPU local cluster once waited forever on Ray's autoscaler messages."""
    import types

    shut = []
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: None,
                                 cluster_resources=lambda: {"CPU": 2.0}, shutdown=lambda: shut.append(1))
    monkeypatch.setitem(sys.modules, "ray", fake)
    cfg = compose_with_hydra(["launcher=ray", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    launcher = RayLauncher(num_cpus=2, cpus_per_job=3)
    launcher.setup(hydra_context=object(), task_function=lambda c: None, config=cfg)
    with pytest.raises(SystemExit) as e:
        launcher.launch([["task=depth"]], initial_job_idx=0)
    assert e.value.code == 1 and shut == [1]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: hydra.launcher.cpus_per_job=3 exceeds the local Ray cluster's 2 CPUs (hydra.launcher.num_cpus); "
        "no job could ever start")


@pytest.mark.slow  # a local Ray cluster's start, ~20 s
def test_a_job_larger_than_the_cluster_ray_detected_leaves_no_sweep_folder(tmp_path):
    """The cluster's size is known only once Ray has started (num_cpus=null): the refusal came after the
    sweep folder was made and left it behind, holding only multirun.yaml."""
    pytest.importorskip("ray")
    proc = cli("-m", "launcher=ray", *SMOKE, "task=depth", "hydra.launcher.num_cpus=null",
               "hydra.launcher.cpus_per_job=4096", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: hydra.launcher.cpus_per_job=4096 exceeds the local "
                                                           "Ray cluster's ")
    assert not list(tmp_path.glob("outputs/*/multiruns/*"))
