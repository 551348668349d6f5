"""The job CLIs' run folders (mtl.cli.jobs.start_run): a finished run of any of them is left exactly as it was by a
refused command, and no other command takes it over afterwards."""
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtl.cli.failures import RunFolderTaken
from mtl.io import save_model
from mtl.models import create_model

SLIM_BACKBONE = {"name": "slim_resnet", "stem": 8, "channels": [8, 16, 16], "depths": [1, 2, 1], "out_indices": [1, 2, 3]}
DATA = {"name": "scenes", "size": 16, "n_train": 8, "n_val": 4, "n_test": 4, "batch_size": 4}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused_reruns_leave_it_as_it_was(run, args: list[str], run_dir: Path) -> None:
    """A plain rerun and a rerun refused before it accepts the folder write nothing there (no FAILED), and a
    training run given the folder afterwards is refused too."""
    from mtl.train import run as train

    before = files(run_dir)
    with pytest.raises(RunFolderTaken, match=r"exists; pass overwrite=true to replace it"):
        run(args, run_dir=run_dir)
    with pytest.raises(ValueError, match=r"is or holds this run's folder"):
        run(args + [f"output={run_dir}", "overwrite=true"], run_dir=run_dir)
    assert files(run_dir) == before
    with pytest.raises(RunFolderTaken, match=rf"run_dir {run_dir} (is not empty|holds a finished run)"):
        train(["experiment=scenes_hps", "debug=smoke", "logger=none", "viz.num_samples=0"], run_dir=run_dir)
    assert files(run_dir) == before


def test_a_finished_export_is_refused_and_left_as_it_was(tmp_path):
    """A plain rerun of a finished export wrote FAILED (it has no metrics.json, so it did not count as finished),
    after which mtl-train took the folder over."""
    from mtl.exporters.job import run

    torch.manual_seed(0)
    model = save_model(create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                                    decoder={"name": "hps", "channels": 16}), tmp_path / "model", meta={"data": DATA})
    args = [f"model={model}", "format=folder"]
    done = Path(run(args, run_dir=tmp_path / "exp")["run_dir"])
    assert (done / "export_report.json").is_file()
    refused_reruns_leave_it_as_it_was(run, args, done)
    run(args + ["overwrite=true"], run_dir=done)  # its own rerun, asked for, still replaces it


def test_a_finished_extract_is_refused_and_left_as_it_was(tmp_path):
    from mtl.cli.extract import run

    torch.manual_seed(0)
    slim = create_model(["depth", "semseg"], backbone=SLIM_BACKBONE, decoder={"name": "slimmable", "channels": 12},
                        family="slimmable")
    model = save_model(slim.eval(), tmp_path / "slim", meta={"data": DATA})
    args = [f"model={model}", "widths={encoder: 0.5}"]
    done = Path(run(args, run_dir=tmp_path / "ex")["run_dir"])
    refused_reruns_leave_it_as_it_was(run, args, done)


@pytest.mark.parametrize("name, record", [("train", "metrics.json"), ("merge", "metrics.json"),
                                          ("prune", "metrics.json"), ("extract", "extract_report.json"),
                                          ("export", "export_report.json")])
def test_each_job_clis_last_record_marks_its_run_finished(tmp_path, name, record):
    from mtl.cli.jobs import finished_run

    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"name: {name}\n")
    assert not finished_run(run_dir)  # killed or failed before its last record
    (run_dir / record).write_text("{}")
    assert finished_run(run_dir)
    (run_dir / "FAILED").write_text("a late step failed")
    assert not finished_run(run_dir)


@pytest.mark.parametrize("name, record", [("export", "export_report.json"), ("merge", "metrics.json")])
def test_an_overwrite_rerun_drops_the_finished_record_of_the_run_it_replaces(tmp_path, name, record):
    """The earlier run's last record stayed beside the rerun's config.yaml: a rerun killed (SIGKILL) after taking
    the folder over then passed for a finished run, its config describing one request and its report another."""
    from mtl.cli.jobs import finished_run, start_run

    run_dir = tmp_path / name
    (run_dir / "out").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"name: {name}\n")
    (run_dir / record).write_text("{}")
    cfg = OmegaConf.create({"name": name, "overwrite": True, "output": str(run_dir / "out")})
    start_run(cfg, run_dir)
    assert not (run_dir / record).exists() and not finished_run(run_dir)
    assert OmegaConf.load(run_dir / "config.yaml").overwrite is True


@pytest.mark.slow  # two smoke trainings (about a minute)
def test_a_smoke_extract_retried_with_another_request_trains_the_model_it_needs(tmp_path):
    """The auditor's case: a widths= smoke run trained a slimmable smoke_model/; its overwrite=true rerun with the
    default request (a task of a task-MoE model) reused it and failed: "model family 'slimmable' extracts with
    (widths=); got (task=, calib=, min_share=)"."""
    import json

    import mtl
    from mtl.cli.extract import run

    run(["debug=smoke", "widths={encoder: 0.5}"], run_dir=tmp_path / "ex")
    assert mtl.load_model(tmp_path / "ex" / "smoke_model" / "model").config["family"] == "slimmable"
    report = run(["debug=smoke", "overwrite=true"], run_dir=tmp_path / "ex")
    assert report["task"] == "depth" and json.loads((tmp_path / "ex" / "extract_report.json").read_text())["task"] == "depth"
    assert mtl.load_model(tmp_path / "ex" / "smoke_model" / "model").config["family"] != "slimmable"


def test_a_job_refused_before_it_accepts_its_folder_leaves_none(console, capfd, tmp_path):
    """mtl-export with an existing output= (or one inside the model) left a run folder holding only FAILED and
    export.log, with no config.yaml to say what was asked: a refusal before the job accepts its folder leaves no
    folder (as a command-line mistake), and every failed run that keeps one keeps its config.yaml."""
    torch.manual_seed(0)
    model = save_model(create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                                    decoder={"name": "hps", "channels": 16}), tmp_path / "model", meta={"data": DATA})
    taken = tmp_path / "x"
    taken.mkdir()
    for cli, args, said in (
            ("mtl.cli.export", [f"output={taken}"], f"{taken} exists; pass overwrite=true to replace it"),
            ("mtl.cli.export", [f"output={model / 'x'}"], f"lies inside the input model folder {model}"),
            ("pruning.cli", [f"output={taken}"], f"{taken} exists; pass overwrite=true to replace it"),
            ("mtl.cli.train", ["debug=smoke", "+trainer.accumulate_grad_batches=2"], "is not supported")):
        code, out = console(cli, f"model={model}" if cli != "mtl.cli.train" else "seed=0", *args)
        stdout, err = capfd.readouterr()
        assert code == 1 and said in err and "run_dir:" not in stdout, err
        assert not out.exists() or list(out.iterdir()) == [], sorted(out.rglob("*"))
    # NaN weights are found when the model is loaded, after start_run (its checks read the config and the header)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        state, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    save_file(state, str(model / "model.safetensors"), metadata=header)
    code, out = console("mtl.cli.export", f"model={model}", "format=folder", "tasks=[depth]")
    (run,) = (out / "export" / "runs").iterdir()
    assert code == 1 and (run / "FAILED").is_file() and "NaN" in (run / "FAILED").read_text()
    assert OmegaConf.load(run / "config.yaml").tasks == ["depth"]
    assert capfd.readouterr().out.strip().splitlines()[-1] == f"run_dir: {run}"


def test_training_into_a_finished_extract_run_names_it_without_resume_advice(console, capfd, tmp_path):
    """mtl-train into a finished mtl-extract run's folder said it held a finished run '(model)' and advised
    ckpt_path=<it>/checkpoints/last.ckpt, a file an extract run never has."""
    from mtl.cli.extract import run

    torch.manual_seed(0)
    slim = create_model(["depth", "semseg"], backbone=SLIM_BACKBONE, decoder={"name": "slimmable", "channels": 12},
                        family="slimmable")
    model = save_model(slim.eval(), tmp_path / "slim", meta={"data": DATA})
    done = Path(run([f"model={model}", "widths={encoder: 0.5}"], run_dir=tmp_path / "ex")["run_dir"])
    before = files(done)
    code, _ = console("mtl.cli.train", "debug=smoke", f"hydra.run.dir={done}")
    assert code == 1 and capfd.readouterr().err.strip() == (
        f"error: run_dir {done} holds a finished run (extract_report.json, model) of mtl-extract; pick a new folder")
    assert {k: v for k, v in files(done).items() if k != "train.log"} == before  # (Hydra's log, made before the job)


def test_a_smoke_model_is_reused_only_for_the_same_config_as_json_reads_it(tmp_path):
    """The smoke-reuse check compared with ==, so a recorded 0 passed for the composed false (True == 1 in Python),
    where a model folder's own config check (same_json) tells them apart."""
    from mtl.cli.in_process import compose_in_process
    from mtl.cli.jobs import config_difference

    overrides = ["experiment=scenes_hps", "debug=smoke"]
    cfg, _ = compose_in_process("mtl.configs", "train", overrides, tmp_path)
    recorded = OmegaConf.to_container(cfg, resolve=True)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(recorded))
    assert config_difference(overrides, tmp_path) is None
    assert recorded["trainer"]["enable_model_summary"] is False
    recorded["trainer"]["enable_model_summary"] = 0
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(recorded))
    assert config_difference(overrides, tmp_path) == "trainer.enable_model_summary: 0 -> False"


def test_one_setting_compares_equal_however_it_was_given():
    import numpy as np

    from mtl.io import as_plain

    assert as_plain((1, (2, np.float32(0.5)))) == [1, [2, 0.5]]  # a tuple in Python, a list in a config
    assert type(as_plain(torch.tensor(0.25))) is float and as_plain(np.int64(3)) == 3 and as_plain(True) is True


def test_the_in_process_runs_say_what_run_dir_is_and_what_they_return():
    import merging.job
    import mtl.cli.extract
    import mtl.exporters.job
    import mtl.train

    import pruning.job

    for fn in (mtl.train.run, merging.job.run, mtl.exporters.job.run, mtl.cli.extract.run, pruning.job.run):
        assert "``run_dir``: the folder the run writes" in fn.__doc__ and "Returns the run" in fn.__doc__, fn.__module__


def test_a_refused_job_leaves_no_folder_when_its_run_dir_uses_hydras_resolver(console, capfd, tmp_path):
    """hydra.run.dir=.../${hydra:job.name}/x could not be resolved before Hydra set HydraConfig, so the folder made
    for a run refused early was not noted and stayed behind holding FAILED and the job's log."""
    taken = tmp_path / "x"
    taken.mkdir()
    code, _ = console("pruning.cli", f"model={tmp_path / 'nonexist'}", f"output={taken}",
                      f"hydra.run.dir={tmp_path}/r/${{hydra:job.name}}/x")
    stdout, err = capfd.readouterr()
    assert code == 1 and "run_dir:" not in stdout, err
    assert not (tmp_path / "r").exists(), sorted((tmp_path / "r").rglob("*"))


@pytest.mark.parametrize("cli, args, said", [
    ("pruning.cli", [], "nothing to prune: pass model=<model folder>"),
    ("pruning.cli", ["model={missing}"], "model: {missing}: no such folder"),
    ("pruning.cli", ["model={empty}"], "model: {empty}/config.json: file not found"),
    ("pruning.cli", ["model={model}", "calib.split=test"], "calib.split must be train or val"),
    ("pruning.cli", ["model={model}", "calib.batches=0"], "calib.batches must be an int >= 1, got 0"),
    ("mtl.cli.export", [], "nothing to export: pass model=<model folder>"),
    ("mtl.cli.export", ["model={missing}"], "model: {missing}: no such folder"),
    ("mtl.cli.extract", [], "say what to extract: tasks=<name>"),
    ("mtl.cli.extract", ["tasks=depth"], "nothing to extract from: pass model=<model folder>"),
    ("mtl.cli.extract", ["tasks=depth", "model={empty}"], "model: {empty}/config.json: file not found"),
    ("merging.cli", [], "nothing to merge: pass pretrained=<folder> models=[<folder>,...]"),
    ("merging.cli", ["pretrained={model}", "models=[{missing}]"], "models: {missing}: no such folder"),
    ("merging.cli", ["pretrained={missing}", "models=[{model}]", "eval=none"], "pretrained={missing}: no such file"),
    ("merging.cli", ["pretrained={model}", "models={model}"], "models must be a list of model folders"),
])
def test_a_missing_or_unreadable_input_is_refused_before_any_run_folder(console, capfd, tmp_path, cli, args, said):
    """A bare command, a model folder that does not exist or is none, and calib.* settings were refused only after
    the run folder was made, leaving a FAILED folder behind; each is one line, exit 1, and no folder."""
    torch.manual_seed(0)
    model = save_model(create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                                    decoder={"name": "hps", "channels": 16}), tmp_path / "model", meta={"data": DATA})
    (tmp_path / "empty").mkdir()
    paths = {"model": model, "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    code, out = console(cli, *(a.format(**paths) for a in args))
    stdout, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert said.format(**paths) in lines[0] and "run_dir:" not in stdout, err
    assert not out.exists() or list(out.iterdir()) == [], sorted(out.rglob("*"))


@pytest.mark.parametrize("value, root", [("", "outputs"), ("elsewhere", "elsewhere")])
def test_an_empty_output_dir_variable_counts_as_unset(monkeypatch, value, root):
    """MTL_OUTPUT_DIR= (set but empty) made the configs' oc.env give "": run folders at /<name>/runs/...,
    while the Python side (mtl.cli.failures.output_root) used outputs/."""
    from hydra import compose, initialize_config_module

    from mtl.cli.common import register_resolvers

    monkeypatch.setenv("MTL_OUTPUT_DIR", value)  # (set when the process starts, as for a CLI)
    register_resolvers()
    with initialize_config_module(config_module="mtl.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["name=a/b"], return_hydra_config=True)
    for kind in ("run", "sweep"):
        assert Path(cfg.hydra[kind].dir).parts[:3] == (root, "a", "b")


def test_output_folders_with_a_tilde_are_under_home(tmp_path, monkeypatch, home_and_cwd):
    """MTL_OUTPUT_DIR="~/runs", output="~/merged" and run_dir="~/r" made a literal ./~ folder in the working
    directory (Hydra's run folder, the jobs' output, an in-process run's folder)."""
    from hydra import compose, initialize_config_module

    from mtl.cli.common import register_resolvers
    from mtl.cli.failures import output_root
    from mtl.cli.in_process import compose_in_process
    from mtl.cli.jobs import start_run

    home, cwd = home_and_cwd
    monkeypatch.setenv("MTL_OUTPUT_DIR", "~/runs")
    assert output_root() == home / "runs"
    register_resolvers()
    with initialize_config_module(config_module="mtl.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["name=a"], return_hydra_config=True)
    assert Path(cfg.hydra.run.dir).parts[:-1] == (home / "runs" / "a" / "runs").parts
    _, output = start_run(OmegaConf.create({"name": "merge", "output": "~/merged"}), tmp_path / "run")
    assert output == home / "merged"
    _, run_dir = compose_in_process("mtl.configs", "train", [], "~/r")
    assert run_dir == home / "r"
    assert list(cwd.iterdir()) == []


def test_the_jobs_read_a_tilde_input_where_their_checks_found_it(home_and_cwd):
    """model='~/pre' passed the checks before the run folder (they expand ~) but the jobs then read ./~/pre: mtl-export
    and mtl-merge failed after writing a FAILED run folder ('<cwd>/~/pre: no such folder'), merging.merge too."""
    import merging

    home, cwd = home_and_cwd
    for i, name in enumerate(("pre", "ft")):
        torch.manual_seed(i)
        save_model(create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                                decoder={"name": "hps", "channels": 8}), home / name)
    from merging.job import run as merge_run
    from mtl.exporters.job import run as export_run

    export_run(["model='~/pre'", "format=folder", "output='~/e1'"], run_dir=home / "export_run")
    assert (home / "e1" / "model.safetensors").is_file()

    merge_run(["eval=none", "merge=task_arithmetic", "merge.lam=0.5", "pretrained='~/pre'", "models=['~/ft']",
               "output='~/m1'"], run_dir=home / "merge_run")
    want = merging.merge("task_arithmetic", home / "pre", [home / "ft"], lam=0.5)
    from safetensors.torch import load_file

    got = load_file(str(home / "m1" / "model.safetensors"))  # (eval=none writes a bare state dict)
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    assert merging.merge("task_arithmetic", "~/pre", ["~/ft"], lam=0.5).keys() == want.keys()
    from pruning.report import plot_delta_m_vs_flops

    # a writer returns the path it wrote (it returned '~/dm.png', which no reader of the return value finds)
    assert plot_delta_m_vs_flops({"l1": [(1.0, 0.1), (0.5, -0.2)]}, "~/dm.png") == home / "dm.png"
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("module, name", [("mtl.configs", "train"), ("mtl.configs.merge_app", "merge"),
                                          ("mtl.configs.prune_app", "prune"), ("mtl.configs.export_app", "export"),
                                          ("mtl.configs.extract_app", "extract")])
def test_a_runs_hydra_config_loads_with_plain_omegaconf(tmp_path, monkeypatch, module, name):
    """.hydra/config.yaml used mtlkit's own mtl_env resolver: OmegaConf.load(...).data.cache_dir raised
    UnsupportedInterpolationType outside mtlkit. Every value resolves in a fresh interpreter that never imports mtl,
    but those using Hydra's own ${hydra:...} (the run folder, known inside a Hydra app only)."""
    import json
    import subprocess
    import sys

    from hydra import compose, initialize_config_module

    from mtl.cli.common import register_resolvers

    monkeypatch.setenv("MTL_DATA_CACHE", "")  # set but empty still counts as unset
    register_resolvers()
    with initialize_config_module(config_module=module, version_base="1.3"):
        cfg = compose(config_name=name, overrides=["data=scenes"] if name == "train" else [])
    saved = tmp_path / ".hydra" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(OmegaConf.to_yaml(cfg))  # as write_hydra_record writes it: unresolved
    probe = ("import json, sys\nfrom omegaconf import OmegaConf\ncfg = OmegaConf.load(sys.argv[1])\nbad = {}\n"
             "def walk(node, key):\n"
             "    for k in (node.keys() if OmegaConf.is_dict(node) else range(len(node))):\n"
             "        full = f'{key}.{k}' if key else str(k)\n"
             "        try:\n"
             "            value = node[k]\n"
             "        except Exception as e:\n"
             "            bad[full] = str(e).splitlines()[0]\n"
             "            continue\n"
             "        if OmegaConf.is_config(value):\n"
             "            walk(value, full)\n"
             "walk(cfg, '')\n"
             "print(json.dumps({'bad': bad, 'mtl': any(m.split('.')[0] == 'mtl' for m in sys.modules),\n"
             "                  'cache': OmegaConf.select(cfg, 'paths.data_cache')}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MTL_DATA_CACHE", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-c", probe, str(saved)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    assert not found["mtl"]
    assert all(e == "Unsupported interpolation type hydra" for e in found["bad"].values()), found["bad"]
    if "paths" in cfg:
        assert found["cache"] == str(Path.home() / ".cache" / "mtlkit")
    if name == "train":
        assert "data.cache_dir" not in found["bad"]


def test_releasing_a_claim_leaves_one_of_the_same_pid_on_another_host(tmp_path):
    """A run folder's claim is {pid, host, start}: on a shared file system another host's process may have this pid,
    and releasing only by pid removed its claim."""
    import json

    from mtl.cli.failures import release

    marker = tmp_path / ".running"
    marker.write_text(json.dumps({"pid": os.getpid(), "host": "another-host", "start": "1"}))
    release(marker)
    assert marker.exists()
    marker.write_text(json.dumps({"pid": os.getpid()}))  # an older marker (a bare pid claim): this process's
    release(marker)
    assert not marker.exists()


def test_a_claim_of_the_same_pid_on_another_host_is_another_runs(tmp_path):
    """claim() and holds_nothing() compared only the pid: a live run on another node with this process's pid had its
    claim overwritten (not refused), and its folder counted as holding nothing."""
    import json

    from mtl.cli.failures import RUNNING, claims_run_folder, holds_nothing

    theirs = json.dumps({"pid": os.getpid(), "host": "other-node", "start": 1})
    (tmp_path / RUNNING).write_text(theirs)
    assert not holds_nothing(tmp_path)
    with pytest.raises(RunFolderTaken, match=rf"in use by another run \(pid {os.getpid()} on other-node\)"):
        with claims_run_folder(tmp_path):
            pass
    assert (tmp_path / RUNNING).read_text() == theirs  # left as it was
    (tmp_path / RUNNING).write_text(json.dumps({"pid": os.getpid()}))  # an older host-less claim: this process's
    assert holds_nothing(tmp_path)


@pytest.mark.parametrize("cache", [None, "/tmp/elsewhere"])
def test_the_data_cache_resolves_without_home_as_in_python(monkeypatch, cache):
    """Without $HOME the configs' paths.data_cache failed to resolve ("Environment variable 'HOME' not found"),
    even with MTL_DATA_CACHE set; it is now the folder Python's default_cache_dir uses (the home folder from the
    password database, as os.path.expanduser gives it)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from mtl.atomic import user_path
    from mtl.cli.common import register_resolvers
    from mtl.data import default_cache_dir

    monkeypatch.delenv("HOME", raising=False)
    if cache is None:
        monkeypatch.delenv("MTL_DATA_CACHE", raising=False)
    else:
        monkeypatch.setenv("MTL_DATA_CACHE", cache)
    register_resolvers()
    with initialize_config_module(config_module="mtl.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=scenes"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert user_path(data["cache_dir"]) == default_cache_dir("scenes")
    if cache is not None:
        assert data["cache_dir"] == f"{cache}/scenes"


def test_no_home_is_set_where_python_knows_none_either(monkeypatch):
    """A uid without a passwd entry: os.path.expanduser("~") stays "~", and $HOME was set to "~", so the data cache
    went to a relative ./~/.cache/mtlkit; $HOME stays unset then (the configs name it)."""
    import os

    from mtl.cli.common import normalize_path_env

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("MTL_DATA_CACHE", raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)
    with pytest.raises(ValueError, match=r"^no home folder .*: set HOME, or MTL_DATA_CACHE"):
        normalize_path_env()
    assert "HOME" not in os.environ
    monkeypatch.setenv("MTL_DATA_CACHE", "/tmp/elsewhere")  # enough: the configs resolve, nothing goes to ./~
    normalize_path_env()
    assert os.environ["HOME"] == "/nonexistent"


def _assert_file_output_refused(console, capfd, target, message, cli, *args):
    """``cli`` with ``output=<target>``, a file: exit 1 with ``message`` alone on stderr, no run_dir line, no run
    folder content, and the file as it was."""
    target.write_text("x\n")
    code, out = console(cli, *args, f"output={target}")
    stdout, err = capfd.readouterr()
    assert code == 1 and err.strip() == message, err
    assert "run_dir:" not in stdout
    assert not out.exists() or list(out.iterdir()) == [], sorted(out.rglob("*"))
    assert target.read_text() == "x\n"


@pytest.mark.parametrize("cli, args", [
    ("pruning.cli", ["model={hps}", "prune=l1", "prune.ratio=0.3", "calib.batches=1"]),
    ("merging.cli", ["pretrained={hps}", "models=[{hps2}]", "merge=average"]),
    ("mtl.cli.extract", ["model={slim}", "widths={{encoder: 0.5}}"]),
])
@pytest.mark.parametrize("overwrite", [[], ["overwrite=true"]])
def test_an_existing_file_as_a_model_output_is_refused_before_the_work(console, capfd, tmp_path, cli, args, overwrite):
    """``output=<a file> overwrite=true`` ran the whole prune, merge or extract before save_model refused the file,
    leaving a FAILED run folder: overwrite=true replaces an earlier model folder only, so the file is refused first."""
    models = {}
    for name, tasks, backbone, decoder, family in (
            ("hps", ["depth"], {"name": "test_resnet", "out_indices": [1, 2, 3]}, {"name": "hps", "channels": 16}, None),
            ("hps2", ["depth"], {"name": "test_resnet", "out_indices": [1, 2, 3]}, {"name": "hps", "channels": 16}, None),
            ("slim", ["depth", "semseg"], SLIM_BACKBONE, {"name": "slimmable", "channels": 12}, "slimmable")):
        torch.manual_seed(len(models))
        model = create_model(tasks, backbone=backbone, decoder=decoder, **({"family": family} if family else {}))
        models[name] = save_model(model.eval(), tmp_path / name, meta={"data": DATA})
    target = tmp_path / "f.txt"
    _assert_file_output_refused(console, capfd, target, f"error: output: {target} is a file, not a model folder; "
                                "remove it or choose another path", cli, *(a.format(**models) for a in args), *overwrite)


@pytest.mark.parametrize("overwrite", [[], ["overwrite=true"]])
def test_an_existing_file_as_an_export_output_is_refused_without_advising_overwrite(console, capfd, tmp_path, overwrite):
    """mtl-export output=<a file> said 'pass overwrite=true to replace it', and overwrite=true then refused the file
    (an export is a folder): the file is refused for what it is, with or without overwrite=true, before any folder."""
    model = save_model(create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                                    decoder={"name": "hps", "channels": 16}).eval(), tmp_path / "m")
    target = tmp_path / "f.txt"
    _assert_file_output_refused(console, capfd, target, f"error: {target} exists and is a file, not an earlier export "
                                "(a folder); refusing to replace it", "mtl.cli.export", f"model={model}", "format=timm",
                                *overwrite)
    import mtl

    with pytest.raises(FileExistsError, match=r"is a file, not an earlier export \(a folder\); refusing to replace it$"):
        mtl.export(model, "timm", out=target, overwrite=bool(overwrite))  # the API alike
    assert target.read_text() == "x\n"


def test_an_output_that_is_a_mount_point_is_refused_before_any_folder(console, capfd, tmp_path, monkeypatch):
    """A mount point cannot be renamed over: mtl-export output=<mount point> overwrite=true did the work and failed at
    its last step with '[Errno 16] Device or resource busy', leaving a FAILED run folder."""
    model = save_model(create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                                    decoder={"name": "hps", "channels": 16}).eval(), tmp_path / "m")
    target, is_mount = tmp_path / "mnt", os.path.ismount
    target.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == target or is_mount(p))  # (mounting needs root)
    code, out = console("mtl.cli.export", f"model={model}", "format=folder", f"output={target}", "overwrite=true")
    stdout, err = capfd.readouterr()
    assert code == 1 and err.strip() == (f"error: [Errno 16] {target}: cannot write this output (it is a mount point "
                                         "or in use, so it cannot be replaced; write to a folder inside it)"), err
    assert "run_dir:" not in stdout and (not out.exists() or list(out.iterdir()) == []), sorted(out.rglob("*"))
    assert list(target.iterdir()) == []
