"""Training runs: checks before fitting, nothing lost after it, run folders that never collide."""
import json
import sys
from pathlib import Path

import pytest

import mtl
from mtl.cli.in_process import compose_in_process
from mtl.cli.failures import FAILED, marks_failure
from mtl.train import run

FAST = ["experiment=scenes_hps", "debug=smoke", "logger=none", "viz.num_samples=0", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false"]
MC = {"_target_": "mtl.callbacks.ModelCheckpoint"}  # check_monitors judges a callback by its target


def test_baselines_lacking_a_task_fail_before_training(tmp_path):
    baselines = tmp_path / "b.json"
    baselines.write_text(json.dumps({"depth": {"rmse": 1.0}}))
    with pytest.raises(ValueError, match=r"task 'semseg'.*missing in baselines file .*b\.json"):
        run(FAST + ["task=[depth,semseg]", f"baselines.path={baselines}"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training step


def test_saving_baselines_from_a_multitask_run_is_refused_before_training(tmp_path):
    """Its numbers replaced the single-task entries of the file, and every later Δm was against them."""
    target = tmp_path / "b.json"
    target.write_text(json.dumps({"depth": {"rmse": 1.0, "abs_err": 1.0, "abs_rel": 1.0}}))
    with pytest.raises(ValueError, match=r"baselines.save_to: baselines are single-task runs, this run trains 2 tasks "
                                         r"\(depth, classification\)"):
        run(["debug=smoke", "task=[depth,classification]", f"baselines.save_to={target}"], run_dir=tmp_path / "r")
    assert json.loads(target.read_text()) == {"depth": {"rmse": 1.0, "abs_err": 1.0, "abs_rel": 1.0}}
    assert not (tmp_path / "r" / "model").exists()


@pytest.mark.parametrize("override", ["hparams_search=optuna", "launcher=joblib", "task=depth,classification"])
def test_an_in_process_run_refuses_a_sweep(tmp_path, override):
    """run(['hparams_search=optuna']) trained one ordinary run with the default lr, the study ignored."""
    with pytest.raises(ValueError, match=r"an in-process run is one job"):
        run(["debug=smoke", override], run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_choosing_no_launcher_or_search_is_not_a_sweep():
    from mtl.cli.in_process import check_single_job

    for overrides in (["launcher=null"], ["hparams_search=null"], ["~launcher"], ["task=[depth,semseg]"],
                      ["+merge.lam={a: 0.1, b: 0.2}"]):
        check_single_job(overrides)


def test_model_and_metrics_survive_a_failure_after_testing_and_the_run_can_be_retried_in_its_folder(tmp_path):
    blocker = tmp_path / "not_a_folder"  # made a file once testing ends: the baselines update fails
    run_dir = tmp_path / "run"
    with pytest.raises(OSError):
        with marks_failure(run_dir):
            run(FAST + ["task=[depth]", f"baselines.save_to={blocker / 'b.json'}", "+callbacks.block._target_="
                        "kill_callback.MakeFileAtTestEnd", f"+callbacks.block.path={blocker}"], run_dir=run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) == {"depth"}
    assert metrics["balancer"] == {"name": "ew"}
    assert set(mtl.load_model(run_dir / "model").tasks) == {"depth"}
    assert "NotADirectoryError" in (run_dir / FAILED).read_text() or "FileExistsError" in (run_dir / FAILED).read_text()
    # a failed run's folder takes a new attempt, as docs/training.md says (it was refused as "holds a finished run"),
    # with the failed attempt's records set aside, not mixed with the new ones
    before = (run_dir / "metrics.json").read_bytes()
    run(FAST + ["task=[depth]"], run_dir=run_dir)
    assert not (run_dir / FAILED).exists() and (run_dir / "metrics.failed.json").read_bytes() == before
    assert (run_dir / "model.failed" / "model.safetensors").is_file() and (run_dir / "model" / "model.safetensors").is_file()
    # a finished run's folder is never trained into again: its model and checkpoints would be mixed
    with pytest.raises(FileExistsError, match=r"holds a finished run \(metrics.json, model\)"):
        run(FAST + ["task=[depth]"], run_dir=run_dir)


@pytest.mark.parametrize("hook", ["train_end", "test_end"])
def test_a_sigterm_lightning_only_noted_still_stops_the_run(tmp_path, monkeypatch, hook):
    """Inside fit and test Lightning's handler only sets trainer.received_sigterm and its loops stop between batches:
    a SIGTERM at the end of training or testing let the run save, write metrics.json and finish as if none came."""
    from mtl.cli.failures import Terminated

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # tests/kill_callback.py
    run_dir = tmp_path / "run"
    with pytest.raises(Terminated, match=r"^interrupted by SIGTERM; resume with ckpt_path="):
        run(FAST + ["task=[depth]", "trainer.max_epochs=1", "+callbacks.sig._target_=kill_callback.SigtermAt",
                    f"+callbacks.sig.hook={hook}"], run_dir=run_dir)
    assert (run_dir / FAILED).read_text().startswith("interrupted by SIGTERM")
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model").exists()


def test_in_process_run_folders_honour_MTL_OUTPUT_DIR_and_never_collide(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    dirs = [compose_in_process("mtl.configs", "train", ["debug=smoke"])[1] for _ in range(5)]
    assert len(set(dirs)) == 5  # five in well under a second
    for d in dirs:
        assert d.is_dir() and d.parent == tmp_path / "out" / "train" / "runs"
    assert not (tmp_path / "outputs").exists()


def test_in_process_runs_honour_a_hydra_run_dir_override_as_the_cli_does(tmp_path):
    cfg, run_dir = compose_in_process("mtl.configs", "train", ["debug=smoke", f"hydra.run.dir={tmp_path / 'mine'}"])
    assert run_dir == tmp_path / "mine" and cfg.paths.output_dir == str(tmp_path / "mine")
    same = compose_in_process("mtl.configs", "train", [f"hydra.run.dir={tmp_path / 'mine'}"], tmp_path / "mine")[1]
    assert same == tmp_path / "mine"
    with pytest.raises(ValueError, match="name different folders; give one of them"):
        compose_in_process("mtl.configs", "train", [f"hydra.run.dir={tmp_path / 'a'}"], tmp_path / "b")
    with pytest.raises(ValueError, match="uses an interpolation.*pass run_dir="):
        compose_in_process("mtl.configs", "train", ["hydra.run.dir=outputs/${now:%H}"])


@pytest.mark.slow
def test_plot_only_where_weights_vary_or_cosines_were_measured(tmp_path):
    one = run(FAST + ["task=depth", "log_weights_every=1"], run_dir=tmp_path / "one")
    assert not (one / "balancer_weights.png").exists()  # one task: a flat weight, no pair to compare
    ew = run(FAST + ["task=[depth,classification]", "log_weights_every=1"], run_dir=tmp_path / "ew")
    assert (ew / "balancer_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the cosines
    rlw = run(FAST + ["task=[depth,classification]", "balancer=rlw", "log_weights_every=1"], run_dir=tmp_path / "rlw")
    assert (rlw / "balancer_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_pyplot_backend_change(tmp_path):
    import subprocess

    code = ("import matplotlib; matplotlib.use('svg'); import torch; from mtl.models import create_model; "
            "from mtl.viz import save_predictions; "
            "m = create_model(['depth'], backbone={'name': 'test_resnet', 'out_indices': [1, 2]}, "
            "decoder={'name': 'hps', 'channels': 8}); m.train(); m.backbone.eval(); "
            "b = {'image': torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), 'depth': torch.rand(2, 1, 32, 32)}; "
            f"save_predictions(m, b, r'{tmp_path / 'p.png'}', 2); "
            "print(matplotlib.get_backend(), m.training, m.backbone.training, m.decoder.training)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["svg", "True", "False", "True"]
    assert (tmp_path / "p.png").is_file()


@pytest.mark.parametrize("override, match", [
    ("optim.min_lr_ratio=-3", r"optim.min_lr_ratio must be a finite number in \[0, 1\], got -3"),
    ("optim.grad_clip=-1", r"optim.grad_clip must be a finite number > 0 \(or null: no clipping\), got -1"),
    ("optim.warmup_ratio=2", r"optim.warmup_ratio must be a finite number in \[0, 1\], got 2"),
    ("log_weights_every=-5", r"log_weights_every must be an int >= 0 \(0: off\), got -5"),
    ("trainer.max_epochs=0", r"trainer.max_epochs must be an int >= 1, got 0"),
    ("trainer.max_epochs=1.5", r"trainer.max_epochs must be an int >= 1, got 1.5"),
    ("trainer.max_epochs=-1", r"trainer.max_epochs must be an int >= 1, got -1"),
    # Lightning skipped fit and the untrained model was saved as a finished run (rc 0, global_steps 0)
    ("trainer.limit_train_batches=0", r"trainer.limit_train_batches=0 trains no step and would save an untrained model"),
    ("trainer.limit_train_batches=0.0", r"trainer.limit_train_batches=0.0 trains no step"),
    ("+trainer.max_steps=0", r"trainer.max_steps=0 trains no step and would save an untrained model"),
    ("seed=abc", r"seed must be an int in \[0, 2\*\*32 - 1\], got 'abc'"),
    ("seed=4294967296", r"seed must be an int in \[0, 2\*\*32 - 1\], got 4294967296"),  # was Lightning's, after the folder
    ("viz.num_samples=-1", r"viz.num_samples must be an int >= 0, got -1"),
    ("data.batch_size=0", r"data.batch_size must be an int >= 1, got 0"),
    ("callbacks.model_checkpoint.monitor=val/depth/bogus",
     r"callbacks.model_checkpoint.monitor='val/depth/bogus' is not logged; logged: val/loss, val/depth/loss, val/depth/rmse"),
    ("+backbone.checkpoint_path=/nonexistent.safetensors", r"backbone.checkpoint_path=/nonexistent.safetensors: no such file"),
    ("callbacks.model_checkpoint.mode=max",
     r"callbacks.model_checkpoint.mode=max keeps the worst epoch: val/loss is lower-is-better; set callbacks.model_checkpoint.mode=min"),
])
def test_bad_settings_are_named_before_training(tmp_path, override, match):
    with pytest.raises((ValueError, KeyError, FileNotFoundError), match=match):
        run(FAST + ["task=[depth]", override], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_missing_checkpoint_file_is_refused_before_the_run_folder(tmp_path):
    """It was refused only when the model was built, after the run folder (a FAILED folder left behind)."""
    with pytest.raises(FileNotFoundError, match=r"^backbone.checkpoint_path=/nonexistent.safetensors: no such file$"):
        run(FAST + ["task=[depth]", "+backbone.checkpoint_path=/nonexistent.safetensors"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_file_matching_no_backbone_key_is_refused_before_training(tmp_path):
    """timm loads features_only weights with strict=False: the run finished on random weights, an INFO line aside."""
    import torch
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(1)}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match=rf"backbone.checkpoint_path={tmp_path}/empty.safetensors: the file lacks (\d+) of "
                                         r"the \1 tensors timm's 'test_resnet' features need \(first: conv1.0.weight"):
        run(FAST + ["task=[depth]", f"+backbone.checkpoint_path={tmp_path}/empty.safetensors"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_baselines_save_to_is_checked_before_training(tmp_path):
    (tmp_path / "folder").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    for target, match in [(tmp_path / "folder", r"baselines.save_to=.*folder is a folder"), (bad, r"not valid JSON"),
                          # failed after training (and after metrics.json) with "[Errno 17] File exists"
                          (bad / "b.json", rf"^baselines.save_to={bad / 'b.json'}: {bad} is a file, not a folder")]:
        with pytest.raises((ValueError, IsADirectoryError, NotADirectoryError), match=match):
            run(FAST + ["task=[depth]", f"baselines.save_to={target}"], run_dir=tmp_path / target.stem)
        assert not (tmp_path / target.stem / "checkpoints").exists()


@pytest.mark.parametrize("key", ["save_to", "path"])
def test_no_test_batches_is_refused_before_training_when_baselines_need_the_test_metrics(tmp_path, key):
    """save_to wrote a baselines file `{}` (rc 0); path trained, then failed on 'task ... is missing in the metrics'."""
    base = tmp_path / "b.json"
    base.write_text(json.dumps({"depth": {"rmse": 1.0, "abs_err": 1.0, "abs_rel": 1.0, "delta1": 0.5}}))
    with pytest.raises(ValueError, match=rf"trainer.limit_test_batches=0 tests nothing, and baselines.{key} needs "
                                         r"the test metrics; use a batch count >= 1"):
        run(FAST + ["task=[depth]", "trainer.limit_test_batches=0", f"baselines.{key}={base}"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained
    assert json.loads(base.read_text()) == {"depth": {"rmse": 1.0, "abs_err": 1.0, "abs_rel": 1.0, "delta1": 0.5}}


def test_metrics_json_counts_the_images_each_split_scored(tmp_path, caplog):
    """A partial test split (a baselines run with trainer.limit_test_batches) is recognisable in metrics.json."""
    with caplog.at_level("WARNING", logger="mtl.train"):
        run(FAST + ["task=[depth]", "trainer.limit_test_batches=0"], run_dir=tmp_path / "none")
    assert "trainer.limit_test_batches=0: no test, so metrics.json['test']" in caplog.text
    none = json.loads((tmp_path / "none" / "metrics.json").read_text())
    assert none["test"] == {} and none["scored_samples"] == {"val": 16, "test": 0}  # debug=smoke: batches of 16
    run(FAST + ["task=[depth]", "trainer.limit_test_batches=null"], run_dir=tmp_path / "all")
    full = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert full["scored_samples"] == {"val": 16, "test": 32}  # debug=smoke: data.n_test=32, the whole split


def test_python_run_marks_failures_names_groups_and_replaces_a_stale_marker(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(1)}, str(tmp_path / "empty.safetensors"))  # refused once the model is built
    with pytest.raises(ValueError, match=r"backbone.checkpoint_path=.*empty.safetensors: the file lacks"):
        run(FAST + ["task=[depth]", f"+backbone.checkpoint_path={tmp_path}/empty.safetensors"], run_dir=tmp_path / "r")
    assert (tmp_path / "r" / FAILED).is_file()  # as mtl-train marks it
    with pytest.raises(ValueError, match=r"unknown task 'bogus' in 'task=\[bogus\]'; valid names: .*depth"):
        run(FAST + ["task=[bogus]"], run_dir=tmp_path / "b")
    run(FAST + ["task=[depth]"], run_dir=tmp_path / "r")  # a new attempt in the failed run's folder
    assert not (tmp_path / "r" / FAILED).exists() and (tmp_path / "r" / "metrics.json").is_file()
    with pytest.raises(FileExistsError, match="holds a finished run"):  # refused: the finished run gets no marker
        run(FAST + ["task=[depth]"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / FAILED).exists()


def test_a_new_attempt_sets_a_failed_attempts_checkpoints_aside(tmp_path):
    """checkpoints/ holds this run's best and last only (a failed attempt's epoch004.ckpt once stayed beside
    them); resuming from the failed attempt's own last.ckpt keeps them where they are."""
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "epoch004.ckpt").write_bytes(b"old")
    (run_dir / FAILED).write_text("interrupted by Ctrl-C")
    run(FAST + ["task=[depth]"], run_dir=run_dir)
    assert "epoch004.ckpt" not in {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert (run_dir / "checkpoints.failed" / "epoch004.ckpt").read_bytes() == b"old"
    from mtl.train_checks import set_aside_failed_attempt as _set_aside_failed_attempt

    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    (again / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (again / "csv").mkdir()
    (again / "csv" / "metrics.csv").write_text("epoch,step\n0,0\n")
    (again / FAILED).write_text("x")
    _set_aside_failed_attempt(again, str(again / "checkpoints" / "last.ckpt"))
    assert (again / "checkpoints" / "last.ckpt").is_file() and not (again / "checkpoints.failed").exists()
    # the CSV logger starts metrics.csv afresh even on a resume: the failed attempt's curves are kept aside
    assert (again / "csv.failed" / "metrics.csv").read_text() == "epoch,step\n0,0\n" and not (again / "csv").exists()


def test_resuming_with_another_learning_rate_is_refused_by_name(tmp_path):
    run(FAST + ["task=[depth]"], run_dir=tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"optim.lr=0.1 differs from the checkpoint's 0.002"):
        run(FAST + ["task=[depth]", "trainer.max_epochs=2", "optim.lr=0.1", f"ckpt_path={ckpt}"], run_dir=tmp_path / "second")
    # same lr, trained longer: from its first step the lr follows the new (2-epoch) curve
    def lrs(name, *extra):
        run(FAST + ["task=[depth]", "trainer.max_epochs=2", "+callbacks.lr._target_=kill_callback.RecordLR",
                    f"+callbacks.lr.path={tmp_path / name}.txt", *extra], run_dir=tmp_path / name)
        return dict(ln.split() for ln in (tmp_path / f"{name}.txt").read_text().splitlines())

    resumed, straight = lrs("third", f"ckpt_path={ckpt}"), lrs("straight")
    assert sorted(resumed) == ["3", "4", "5"] and all(resumed[s] == straight[s] for s in resumed)


def test_tensorboard_logger_without_its_package_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    from mtl.loggers import tensorboard_logger

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(ImportError, match=r"logger=tensorboard needs the 'tensorboardX' \(or 'tensorboard'\) package: "
                                          r"pip install 'mtlkit\[loggers\]'"):
        tensorboard_logger(str(tmp_path))


def test_create_decoder_takes_the_tasks_as_the_model_holds_them():
    from mtl.models.decoders import create_decoder
    from mtl.tasks import create_task

    tasks = {t: create_task(t) for t in ("depth", "semseg")}
    dec = create_decoder("hps", [8, 16], tasks, channels=8)
    assert set(dec.heads) == {"depth", "semseg"}


def test_the_checkpoint_mode_follows_the_monitored_values_direction():
    from omegaconf import OmegaConf

    from mtl.sweep import check_monitors

    names, directions = {"semseg": ["miou"], "depth": ["rmse"]}, {"semseg": {"miou": True}, "depth": {"rmse": False}}
    for monitor, want in (("val/semseg/miou", "max"), ("val/depth/rmse", "min"), ("val/loss", "min"), ("val/semseg/loss", "min")):
        cfg = OmegaConf.create({"callbacks": {"model_checkpoint": {**MC, "monitor": monitor, "mode": None}}})
        OmegaConf.set_struct(cfg, True)
        check_monitors(cfg, names, directions)
        assert cfg.callbacks.model_checkpoint.mode == want, monitor
    cfg = OmegaConf.create({"callbacks": {"model_checkpoint": {**MC, "monitor": "val/semseg/miou", "mode": "min"}}})
    with pytest.raises(ValueError, match=r"mode=min keeps the worst epoch: val/semseg/miou is higher-is-better"):
        check_monitors(cfg, names, directions)
    # another split's loss is minimised (Lightning refused mode=None after building the trainer)
    cfg = OmegaConf.create({"callbacks": {"model_checkpoint": {**MC, "monitor": "train/loss_epoch", "mode": None}}})
    check_monitors(cfg, names, directions)
    assert cfg.callbacks.model_checkpoint.mode == "min"
    cfg = OmegaConf.create({"callbacks": {"model_checkpoint": {**MC, "monitor": "train/semseg/miou", "mode": None}}})
    with pytest.raises(ValueError, match=r"mode=null is filled in only for losses and val/ metrics; set callbacks"):
        check_monitors(cfg, names, directions)


def test_a_training_loss_is_monitored_by_its_epoch_mean_not_its_last_batch():
    """monitor=train/loss was accepted and read each epoch's last batch (a step value): the kept epoch was the one
    whose last batch happened to be lowest. It is refused naming the epoch mean, which is checked like val names."""
    from omegaconf import OmegaConf

    from mtl.sweep import check_monitors

    names, directions = {"semseg": ["miou"], "depth": ["rmse"]}, {"semseg": {"miou": True}, "depth": {"rmse": False}}
    for step, mean in (("train/loss", "train/loss_epoch"), ("train/depth/loss", "train/depth/loss_epoch")):
        cfg = OmegaConf.create({"callbacks": {"model_checkpoint": {**MC, "monitor": step, "mode": None}}})
        with pytest.raises(ValueError, match=rf"^callbacks.model_checkpoint.monitor='{step}' is logged per step: .*"
                                             rf"callbacks.model_checkpoint.monitor={mean}$"):
            check_monitors(cfg, names, directions)
        cfg.callbacks.model_checkpoint.monitor = mean
        check_monitors(cfg, names, directions)
        assert cfg.callbacks.model_checkpoint.mode == "min"
        # saved at the training epoch's end, where the mean is known (Lightning would save at validation's end when
        # validation is not every epoch, and read the previous epoch's mean)
        assert cfg.callbacks.model_checkpoint.save_on_train_epoch_end is True
        cfg.callbacks.model_checkpoint.save_on_train_epoch_end = False
        with pytest.raises(ValueError, match=r"save_on_train_epoch_end must not be false"):
            check_monitors(cfg, names, directions)
    cfg = OmegaConf.create({"callbacks": {"model_checkpoint": {**MC, "monitor": "train/normals/loss_epoch", "mode": None}}})
    with pytest.raises(KeyError, match=r"'train/normals/loss_epoch' is not logged; logged epoch means: train/loss_epoch, "
                                       r"train/semseg/loss_epoch, train/depth/loss_epoch"):
        check_monitors(cfg, names, directions)


def test_checkpoint_settings_go_to_checkpoint_callbacks_only():
    """An EarlyStopping on train/loss_epoch was given ModelCheckpoint's save_on_train_epoch_end, which its __init__
    refuses (after the run folder was written): it gets its own check_on_train_epoch_end; another callback with a
    monitor key is left as given."""
    import inspect

    from lightning.pytorch.callbacks import EarlyStopping
    from omegaconf import OmegaConf

    from mtl.sweep import check_monitors

    names, directions = {"depth": ["rmse"]}, {"depth": {"rmse": False}}
    es = {"_target_": "lightning.pytorch.callbacks.EarlyStopping", "monitor": "train/loss_epoch"}
    other = {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor", "monitor": "train/loss_epoch", "mode": None}
    cfg = OmegaConf.create({"callbacks": {"early_stopping": es, "other": other}})
    check_monitors(cfg, names, directions)
    assert OmegaConf.to_container(cfg.callbacks.other) == other
    got = OmegaConf.to_container(cfg.callbacks.early_stopping)
    assert got == {**es, "check_on_train_epoch_end": True}
    assert set(got) - {"_target_"} <= set(inspect.signature(EarlyStopping).parameters)
    cfg.callbacks.early_stopping.check_on_train_epoch_end = False
    with pytest.raises(ValueError, match=r"callbacks.early_stopping.check_on_train_epoch_end must not be false"):
        check_monitors(cfg, names, directions)
    # a validation monitor is still checked against the logged names
    cfg = OmegaConf.create({"callbacks": {"early_stopping": {**es, "monitor": "val/depth/rsme"}}})
    with pytest.raises(KeyError, match=r"callbacks.early_stopping.monitor='val/depth/rsme' is not logged"):
        check_monitors(cfg, names, directions)


@pytest.mark.slow
def test_early_stopping_on_the_training_loss_epoch_mean_runs(tmp_path):
    """The command the audit gave (and the one the train/loss refusal suggests) failed after the run folder."""
    run_dir = run(["debug=smoke", "task=depth", "logger=none", "viz.num_samples=0",
                   "+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
                   "+callbacks.early_stopping.monitor=train/loss_epoch"], run_dir=tmp_path / "r")
    assert (run_dir / "metrics.json").is_file() and not (run_dir / FAILED).exists()


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 2])
def test_monitor_train_loss_epoch_keeps_the_epoch_with_the_lowest_mean_training_loss(tmp_path, every):
    """Also with validation every second epoch, where Lightning saved at validation's end and scored each
    checkpoint with the previous epoch's mean."""
    import csv

    import torch

    run(FAST + ["task=[semseg,depth]", "trainer.max_epochs=3", "logger=csv", "callbacks.model_checkpoint.save_top_k=-1",
                "callbacks.model_checkpoint.monitor=train/loss_epoch", f"+trainer.check_val_every_n_epoch={every}"],
        run_dir=tmp_path / "r")
    (log,) = (tmp_path / "r" / "csv").rglob("metrics.csv")
    steps = {}
    for r in csv.DictReader(open(log)):
        if r.get("train/loss"):
            steps.setdefault(int(r["epoch"]), []).append(float(r["train/loss"]))
    means = {e: sum(v) / len(v) for e, v in steps.items()}
    assert len(means) == 3 and all(len(v) > 1 for v in steps.values())
    for epoch, mean in means.items():  # each checkpoint's score is its epoch's mean step loss
        state = torch.load(tmp_path / "r" / "checkpoints" / f"epoch{epoch:03d}.ckpt", weights_only=True)["callbacks"]
        (score,) = [s["current_score"] for s in state.values() if s.get("monitor") == "train/loss_epoch"]
        assert float(score) == pytest.approx(mean, rel=1e-5), epoch
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    best = min(means, key=means.get)
    assert m["best_checkpoint"].endswith(f"epoch{best:03d}.ckpt")
    assert m["val_epoch"] == (best if best % every == every - 1 else "last")  # an epoch without validation: "last"


def test_checkpoints_without_a_monitor_fill_in_the_unused_mode_and_refuse_a_ranking():
    """monitor=null failed after the run folder was written: Lightning refuses the config's mode=null."""
    from omegaconf import OmegaConf

    from mtl.sweep import check_monitors

    names, directions = {"depth": ["rmse"]}, {"depth": {"rmse": False}}
    for top_k in (1, -1):
        cfg = OmegaConf.create({"callbacks": {"model_checkpoint": {**MC, "monitor": None, "mode": None, "save_top_k": top_k}}})
        check_monitors(cfg, names, directions)
        assert cfg.callbacks.model_checkpoint.mode in ("min", "max")
        # saved at each training epoch's end, so the newest is the last epoch trained (not the last validated)
        assert cfg.callbacks.model_checkpoint.save_on_train_epoch_end is True
    cfg = OmegaConf.create({"callbacks": {"model_checkpoint": {**MC, "monitor": None, "save_on_train_epoch_end": False}}})
    check_monitors(cfg, names, directions)
    assert cfg.callbacks.model_checkpoint.save_on_train_epoch_end is False  # as given
    cfg = OmegaConf.create({"callbacks": {"model_checkpoint": {**MC, "monitor": None, "mode": None, "save_top_k": 3}}})
    with pytest.raises(ValueError, match=r"^callbacks.model_checkpoint.save_top_k=3 needs a monitor to rank checkpoints"):
        check_monitors(cfg, names, directions)


@pytest.mark.slow
def test_a_run_without_a_checkpoint_monitor_tests_and_saves_its_last_epoch(tmp_path):
    run(FAST + ["task=[depth]", "trainer.max_epochs=2", "callbacks.model_checkpoint.monitor=null"], run_dir=tmp_path / "r")
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["best_checkpoint"].endswith("epoch001.ckpt") and m["val_epoch"] == 1 and m["val"]["depth"]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["epoch001.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_without_a_monitor_the_model_is_the_last_epoch_trained_when_validation_skips_it(tmp_path, caplog):
    """With validation every second epoch, epoch001.ckpt (the last validated) was tested and saved as model/, and
    the last epoch trained was lost; its validation metrics are now the last validation's ("last"), said in a
    warning naming that epoch."""
    import torch
    from safetensors.torch import load_file

    run(FAST + ["task=[depth]", "trainer.max_epochs=3", "+trainer.check_val_every_n_epoch=2",
                "callbacks.model_checkpoint.monitor=null"], run_dir=tmp_path / "r")
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["best_checkpoint"].endswith("epoch002.ckpt") and m["val_epoch"] == "last" and m["val"]["depth"]
    assert "(epoch002.ckpt) is of an epoch that ran no validation" in caplog.text
    assert "holds epoch 1's, the last validated" in caplog.text
    last = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == m["global_steps"]
    saved = load_file(tmp_path / "r" / "model" / "model.safetensors")
    assert saved and all(torch.equal(v, last["state_dict"][f"model.{k}"]) for k, v in saved.items())


def test_metrics_val_are_the_tested_checkpoints_epoch(tmp_path):
    import csv

    import json

    run(FAST + ["task=[semseg]", "trainer.max_epochs=3", "callbacks.model_checkpoint.monitor=val/semseg/miou",
                "logger=csv"], run_dir=tmp_path / "r")
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    epoch = m["val_epoch"]
    assert isinstance(epoch, int) and m["best_checkpoint"].endswith(f"epoch{epoch:03d}.ckpt")
    (log,) = (tmp_path / "r" / "csv").rglob("metrics.csv")
    rows = {int(r["epoch"]): float(r["val/semseg/miou"]) for r in csv.DictReader(open(log)) if r.get("val/semseg/miou")}
    assert m["val"]["semseg"]["miou"] == pytest.approx(rows[epoch]) and rows[epoch] == max(rows.values())


@pytest.mark.parametrize("extra, warned", [
    (["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0: no validation"),
    (["+trainer.check_val_every_n_epoch=2"], "trainer.check_val_every_n_epoch=2 with trainer.max_epochs=1: no validation"),
    # stopped mid-epoch 0: nothing said, metrics.json val {} with val_epoch "last"
    (["trainer.max_epochs=3", "+trainer.max_steps=1"], "no validation ran (trainer.max_steps or check_val_every_n_epoch "
                                                      "ended training before one, at step 1)"),
])
def test_a_run_without_validation_is_warned(tmp_path, caplog, extra, warned):
    with caplog.at_level("WARNING", logger="mtl.train"):
        run(FAST + ["task=[depth]", *extra], run_dir=tmp_path / "r")
    assert caplog.text.count("no validation") == 1 and warned in caplog.text, caplog.text
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["val"] == {} and m["val_epoch"] == "last" and m["best_checkpoint"] is None


@pytest.mark.parametrize("extra", [["trainer.limit_val_batches=0"], ["+trainer.check_val_every_n_epoch=3",
                                                                      "trainer.max_epochs=2"]])
def test_a_sweep_objective_a_schedule_never_validates_is_refused_before_any_folder(tmp_path, extra):
    with pytest.raises(ValueError, match=r"^optimized_metric=val/depth/rmse is read from the validation metrics, and "
                                         r"trainer\.\S+ .*runs no validation"):
        run(FAST + ["task=[depth]", "optimized_metric=val/depth/rmse", *extra], run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_a_precision_the_accelerator_lacks_is_refused_not_replaced_before_any_folder(tmp_path, accelerator):
    import torch

    if accelerator == "auto" and torch.cuda.is_available():
        pytest.skip("auto picks the GPU here")
    with pytest.raises(ValueError, match=r"^trainer.precision=16-mixed is not available on CPUAccelerator \(Lightning "
                                         r"would train in bf16-mixed\); use trainer.precision=bf16-mixed or run on a GPU$"):
        run(FAST + ["trainer.precision=16-mixed", f"trainer.accelerator={accelerator}"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()  # (it was refused once the trainer was built, after config.yaml)


@pytest.mark.parametrize("precision, dtype", [("bf16-true", "bfloat16"), ("16-true", "float16"), ("64-true", "float64")])
def test_a_precision_that_keeps_non_float32_weights_is_refused_before_training(tmp_path, precision, dtype):
    """It would train and test, then fail in save_model (model folders hold float32 weights): the whole run lost."""
    with pytest.raises(ValueError, match=rf"trainer.precision={precision} keeps the weights in {dtype}, and model "
                                         "folders hold float32 weights; use trainer.precision=bf16-mixed"):
        run(FAST + [f"trainer.precision={precision}"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_resuming_in_another_precision_is_refused_by_name(tmp_path):
    run(FAST + ["task=[depth]", "trainer.precision=bf16-mixed"], run_dir=tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"trainer.precision=32-true differs from the checkpoint's bf16-mixed: .*resume "
                                         r"with trainer.precision=bf16-mixed"):
        run(FAST + ["task=[depth]", "trainer.max_epochs=2", f"ckpt_path={ckpt}"], run_dir=tmp_path / "second")
    run(FAST + ["task=[depth]", "trainer.max_epochs=2", "trainer.precision=bf16-mixed", f"ckpt_path={ckpt}"],
        run_dir=tmp_path / "third")
    assert (tmp_path / "third" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("experiment, name", [("scenes_slimmable", "slim_resnet"), ("scenes_task_moe_vit", "task_moe_vit")])
def test_a_backbone_choice_an_experiment_overwrites_is_refused(tmp_path, experiment, name):
    """These experiments set their backbone in full; backbone=resnet18 trained their own encoder while the
    run's overrides.yaml recorded resnet18."""
    with pytest.raises(ValueError, match=rf"backbone=resnet18 is overwritten by {experiment}'s own backbone settings "
                                         rf"\(backbone.name={name}\)"):
        run([f"experiment={experiment}", "debug=smoke", "backbone=resnet18"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_check_choices_honoured_ignores_what_explains_the_name():
    from omegaconf import OmegaConf

    from mtl.cli.choices import check_choices_honoured

    cfg = OmegaConf.create({"name": "x", "backbone": {"name": "resnet34"}})
    check_choices_honoured(cfg, ["backbone=resnet18", "backbone.name=resnet34"], ("mtl.configs",))  # named on purpose
    check_choices_honoured(cfg, ["backbone=no_such_file"], ("mtl.configs",))  # a user's own group file: not judged
    with pytest.raises(ValueError, match=r"backbone=resnet18 is overwritten by x's own backbone settings"):
        check_choices_honoured(cfg, ["backbone=resnet18"], ("mtl.configs",))


def test_ddp_with_an_evaluation_split_smaller_than_the_process_count_is_refused_before_training():
    """Each process evaluates its own share, no image repeated: with 3 test images 4 processes cannot."""
    from types import SimpleNamespace

    from mtl.data import create_datamodule
    from mtl.train_checks import check_eval_splits as _check_eval_splits

    dm = create_datamodule("scenes", size=16, n_train=8, n_val=5, n_test=3, batch_size=4)
    _check_eval_splits(SimpleNamespace(world_size=3), dm)  # 3 processes: one test image each
    _check_eval_splits(SimpleNamespace(world_size=1), create_datamodule("scenes", size=16, n_train=8, n_val=1, n_test=1))
    with pytest.raises(ValueError, match=r"the test split has 3 image\(s\), fewer than the 4 processes"):
        _check_eval_splits(SimpleNamespace(world_size=4), dm)


def test_the_model_folder_records_data_paths_absolute(tmp_path, monkeypatch):
    """A relative data.path/root in meta.data made mtl-prune/-extract/-merge fail from any other folder."""
    from mtl.folder_data import data_record

    monkeypatch.chdir(tmp_path)
    got = data_record({"name": "nyuv2", "root": "nyu", "splits_file": "s.mat", "class_mapping": ["a.mat", "b.mat"],
                       "path": "~/ds", "cache_dir": None, "size": 32, "columns": {"mask": "semseg"}})
    assert got == {"name": "nyuv2", "root": str(tmp_path / "nyu"), "splits_file": str(tmp_path / "s.mat"),
                   "class_mapping": [str(tmp_path / "a.mat"), str(tmp_path / "b.mat")],
                   "path": str(Path("~/ds").expanduser().resolve()), "cache_dir": None, "size": 32,
                   "columns": {"mask": "semseg"}}
    assert data_record({"class_mapping": [1, -1, 2]})["class_mapping"] == [1, -1, 2]  # a table, not paths


def test_ctrl_c_in_an_in_process_run_reaches_the_caller_as_keyboardinterrupt(tmp_path):
    """Lightning turns Ctrl-C into sys.exit(1): a script around run() exited 1 with a bare SystemExit, and
    `except KeyboardInterrupt` never fired."""
    from mtl.cli.in_process import run_in_process

    def job(cfg, run_dir):
        (Path(run_dir) / "train.log").write_text("epoch 0\n")  # a run that started (an empty folder is removed)
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)  # what Lightning's fit does with it

    with pytest.raises(KeyboardInterrupt, match=r"^interrupted by Ctrl-C$"):
        run_in_process(job, ("mtl.configs",), "train", ["debug=smoke"], run_dir=tmp_path / "r")
    assert (tmp_path / "r" / FAILED).read_text().startswith("interrupted by Ctrl-C")


def test_an_in_process_run_leaves_the_callers_process_state_alone(tmp_path, monkeypatch):
    import os
    import random

    import numpy as np
    import torch

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    def seed_all():
        random.seed(5), np.random.seed(7), torch.manual_seed(123)

    seed_all()
    want = draws()
    import warnings

    seed_all()
    torch.use_deterministic_algorithms(True, warn_only=True)
    benchmark, filters = torch.backends.cudnn.benchmark, list(warnings.filters)
    monkeypatch.setenv("PL_GLOBAL_SEED", "999")  # the caller's own (the run sets 3), and none for workers
    monkeypatch.delenv("PL_SEED_WORKERS", raising=False)
    torch.backends.cudnn.benchmark = True
    try:
        # trainer.deterministic=false: Lightning switches torch's determinism off (and cudnn.benchmark) for the run
        run(FAST + ["task=[depth]", "seed=3", "trainer.deterministic=false"], run_dir=tmp_path / "r")
        # the run seeded all three and set the switches for itself; the caller's come back
        assert draws() == want
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.benchmark
        assert os.environ["PL_GLOBAL_SEED"] == "999" and "PL_SEED_WORKERS" not in os.environ
        assert warnings.filters == filters
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = benchmark


def test_in_process_runs_read_the_cuda_generators_only_once_the_caller_started_cuda(monkeypatch):
    """Reading a CUDA generator's state starts CUDA (torch's own docs); a caller that has not started it
    must not find it started after a CPU run (its fork-started CUDA workers would fail)."""
    import torch

    from mtl.cli.in_process import leaves_process_state

    read = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": read.append(device) or torch.zeros(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with leaves_process_state():
        pass
    assert read == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # started by the caller: both come back
    with leaves_process_state():
        pass
    assert len(read) == 2


def test_in_process_errors_are_one_line_as_on_the_cli(tmp_path):
    from mtl.cli.in_process import run_in_process

    with pytest.raises(ValueError, match=r"^no setting optim\.lrr \(did you mean optim\.lr\?\)$") as e:
        run(FAST + ["optim.lrr=1"], run_dir=tmp_path / "typo")
    assert "\n" not in str(e.value)

    def interrupted(cfg, run_dir):
        (run_dir / "started").write_text("")  # a folder the run wrote into is marked, an empty one removed
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="interrupted by Ctrl-C"):
        run_in_process(interrupted, ("mtl.configs",), "train", FAST, tmp_path / "ctrl_c")
    assert (tmp_path / "ctrl_c" / FAILED).is_file()


def test_a_folder_holding_only_a_file_managers_placeholder_counts_as_empty(tmp_path):
    from mtl.cli.failures import RunFolderTaken, check_run_folder

    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / ".gitkeep").write_text("")
    check_run_folder(tmp_path)  # accepted
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderTaken, match=r"is not empty \(notes.txt\)"):
        check_run_folder(tmp_path)
