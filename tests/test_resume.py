"""A run stopped after an epoch and resumed from last.ckpt ends bit-identical to an uninterrupted one."""
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtl.train import run

BASE = ["experiment=scenes_hps", "debug=smoke", "viz.num_samples=0", "~callbacks.progress_bar",
        "+trainer.enable_progress_bar=false", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "task=[depth,classification]", "log_weights_every=0", "trainer.limit_train_batches=2"]


def losses(run_dir: Path) -> dict[int, str]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss")}


def check_identical(a: Path, first: Path, resumed: Path, steps: int) -> None:
    la, lb = losses(a), {**losses(first), **losses(resumed)}
    assert sorted(la) == list(range(steps)) and sorted(lb) == list(range(steps))
    assert la == lb  # every step's loss, to the last printed digit
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, resumed))
    assert ma["test"] == mb["test"] and ma["val"] == mb["val"] and ma["global_steps"] == mb["global_steps"] == steps


@pytest.mark.parametrize("stop, extra", [
    (2, ["balancer=rlw"]),  # rlw draws random weights every step
    # an epoch without validation still ends with last.ckpt; famo(recompute=false) carries its pending
    # logit update across the checkpoint
    (1, ["balancer=famo", "balancer.recompute=false", "+trainer.check_val_every_n_epoch=2"]),
    # loader workers draw their seeds per epoch, as an uninterrupted run's do (augmentation runs in them)
    (1, ["data.num_workers=1", "data.augment=true"]),
], ids=["rlw", "famo-val-every-2", "workers"])
def test_resume_after_a_stop_is_bit_identical(tmp_path, stop, extra):
    # the stop raises at the start of epoch `stop`; on disk that is what a kill there leaves
    # (the last epoch-end checkpoint), so the resume path is the same one a SIGKILL takes
    common = BASE + extra + ["trainer.max_epochs=3"]
    a = run(common, run_dir=tmp_path / "a")
    with pytest.raises(InterruptedError):
        run(common + ["+callbacks.stop._target_=kill_callback.InterruptAtEpoch", f"+callbacks.stop.epoch={stop}"],
            run_dir=tmp_path / "b1")
    b2 = run(common + [f"ckpt_path={tmp_path / 'b1' / 'checkpoints' / 'last.ckpt'}"], run_dir=tmp_path / "b2")
    check_identical(a, tmp_path / "b1", b2, steps=6)
    if stop != 2:
        return
    # a checkpoint of another model is named by the setting that differs, not as an unpickling or state-dict dump
    with pytest.raises(ValueError, match=r"^decoder.channels=24 differs from the checkpoint's 16: .*; resume with "
                                         r"decoder.channels=16, or start a new run"):
        run(common + ["decoder.channels=24", f"ckpt_path={tmp_path / 'b1' / 'checkpoints' / 'last.ckpt'}"],
            run_dir=tmp_path / "other")


@pytest.mark.slow
@pytest.mark.parametrize("balancer", ["ew", "dwa"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, balancer):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), MTL_OUTPUT_DIR=str(tmp_path / "out"))

    def cli(name, *extra):
        return subprocess.run([sys.executable, "-m", "mtl.cli.train", *BASE, f"balancer={balancer}",
                               "trainer.max_epochs=4", f"hydra.run.dir={tmp_path / name}", *extra],
                              env=env, capture_output=True, text=True, timeout=900)

    assert cli("a").returncode == 0
    killed = cli("b1", "+callbacks.kill._target_=kill_callback.KillAtEpoch", "+callbacks.kill.epoch=2")
    assert killed.returncode == -9  # SIGKILL: no cleanup, no end-of-fit hooks
    assert not (tmp_path / "b1" / "metrics.json").exists()
    resumed = cli("b2", f"ckpt_path={tmp_path / 'b1' / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    check_identical(tmp_path / "a", tmp_path / "b1", tmp_path / "b2", steps=8)


@pytest.mark.slow
def test_a_ddp_resume_between_nash_mtl_solves_is_bit_identical(tmp_path):
    # each rank solves its own nash_mtl weights; the checkpoint held rank 0's only, so a run resumed between two
    # solves gave rank 1 rank 0's weights (weights 2e-3 off). Both ranks kill themselves at epoch 1 (call 2)
    from safetensors.torch import load_file

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               MTL_OUTPUT_DIR=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    args = [*BASE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "balancer=nash_mtl",
            "balancer.update_weights_every=3", "trainer.max_epochs=3", "data.n_val=29", "data.n_test=29"]

    def cli(name, *extra):
        proc = subprocess.Popen([sys.executable, "-m", "mtl.cli.train", *args, f"hydra.run.dir={tmp_path / name}",
                                 *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a rank left behind by the kill
            except ProcessLookupError:
                pass
        return proc.returncode, err

    assert cli("a")[0] == 0
    assert cli("b1", "+callbacks.kill._target_=kill_callback.KillAtEpoch", "+callbacks.kill.epoch=1")[0] == -9
    rc, err = cli("b2", f"ckpt_path={tmp_path / 'b1' / 'checkpoints' / 'last.ckpt'}")
    assert rc == 0, err[-2000:]
    check_identical(tmp_path / "a", tmp_path / "b1", tmp_path / "b2", steps=6)
    wa, wb = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("a", "b2"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resume_that_changes_the_balancer_task_weights_or_schedule_is_refused_by_name(tmp_path):
    """balancer=pcgrad, task.depth.weight=5 or optim.warmup_ratio=0.2 on a resume went on silently (only a stateful
    balancer's missing keys were named), and metrics.json recorded the new balancer for the whole run."""
    first = run(BASE + ["trainer.max_epochs=1", "balancer=dwa"], run_dir=tmp_path / "a")
    resume = ["trainer.max_epochs=2", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"]
    for i, (extra, match) in enumerate([
        (["balancer=pcgrad"], r"balancer=pcgrad differs from the checkpoint's dwa: the epochs so far trained with dwa"),
        (["balancer=dwa", "balancer.temperature=3.0"], r"balancer.temperature=3.0 differs from the checkpoint's 2.0"),
        (["balancer=dwa", "task.depth.weight=5"], r"task.depth.weight=5.0 differs from the checkpoint's 1.0"),
        (["balancer=dwa", "optim.warmup_ratio=0.2"], r"optim.warmup_ratio=0.2 differs from the checkpoint's 0.05"),
        (["balancer=dwa", "optim.min_lr_ratio=0.1"], r"optim.min_lr_ratio=0.1 differs from the checkpoint's 0.0"),
    ]):
        with pytest.raises(ValueError, match=match + r".*; resume with \S+=\S+, or start a new run from its weights"):
            run(BASE + extra + resume, run_dir=tmp_path / f"b{i}")
        assert not (tmp_path / f"b{i}" / "metrics.json").exists()
    # a setting that leaves a finite step's update as it is may change
    run(BASE + ["balancer=dwa", "balancer.skip_nonfinite=true"] + resume, run_dir=tmp_path / "c")


def test_a_resume_with_another_seed_is_warned(tmp_path, caplog):
    """seed=5 on a resume ran without a word while the checkpoint's random streams were used."""
    first = run(BASE + ["trainer.max_epochs=1", "seed=7"], run_dir=tmp_path / "a")
    with caplog.at_level("WARNING", logger="mtl.train"):
        run(BASE + ["trainer.max_epochs=2", "seed=5", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"],
            run_dir=tmp_path / "b")
    assert "seed=5 differs from the resumed run's seed 7" in caplog.text


@pytest.mark.parametrize("value", [None, True, False, 3, 0.05, 1e-5, float("inf"), "dwa", "null", "1.0", "True",
                                   "a b", 'say "hi"', [0.25, 0.5, 1.0], (1, 2), {"encoder": 0.5, "decoders": {"depth": None}}])
def test_a_resume_refusals_values_read_back_as_themselves_in_hydra(value):
    """The advice printed Python's repr: `optim.grad_clip=None`, which Hydra reads as the string 'None'."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mtl.train_checks import hydra_override

    [word] = shlex.split(hydra_override("strategy.x", value))  # one shell word, as the user pastes it
    parsed = OverridesParser.create().parse_override(word).value()
    assert parsed == (list(value) if isinstance(value, tuple) else value) and type(parsed) is type(
        list(value) if isinstance(value, tuple) else value)


def test_the_advised_override_of_a_refused_resume_is_accepted(tmp_path):
    """A run without clipping resumed with optim.grad_clip=1.0 was told `resume with optim.grad_clip=None`, which
    then failed as "optim.grad_clip must be a number > 0 (or null: no clipping), got 'None'"."""
    import re
    import shlex

    first = run(BASE + ["trainer.max_epochs=1"], run_dir=tmp_path / "a")
    resume = BASE + ["trainer.max_epochs=2", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"]
    with pytest.raises(ValueError, match=r"optim.grad_clip=1.0 differs from the checkpoint's null") as refused:
        run(resume + ["optim.grad_clip=1.0"], run_dir=tmp_path / "b")
    advice = re.search(r"resume with (\S+), or start", str(refused.value)).group(1)
    assert shlex.split(advice) == ["optim.grad_clip=null"]
    run(resume + shlex.split(advice), run_dir=tmp_path / "c")


@pytest.mark.parametrize("checkpoint, now, advised", [
    (["experiment=scenes_slimmable"], ["experiment=scenes_slimmable", "~strategy.cikd_level"],
     ["+strategy.cikd_level=neck"]),
    (["experiment=scenes_slimmable", "~strategy.cikd_level"], ["experiment=scenes_slimmable"], ["~strategy.cikd_level"]),
    (["experiment=scenes_slimmable", "strategy=null"], ["experiment=scenes_slimmable"], ["strategy=null"]),
    (["experiment=scenes_slimmable"], ["experiment=scenes_slimmable", "strategy=null"],
     ["strategy={name:sandwich,num_random:2,train_min:true,inplace_distill:true,cikd:true,cikd_weight:0.1,"
      "cikd_match:projection,cikd_level:neck}"]),
])
def test_a_refused_resumes_advice_adds_or_removes_a_strategy_key_the_config_or_checkpoint_lacks(checkpoint, now, advised):
    """A key in the checkpoint's strategy but not in this config was advised as `strategy.x=...`, which Hydra refuses
    (a new key needs `+`), and one the checkpoint lacked as `strategy.x=null`, which sets it instead of removing it:
    the advice, pasted onto the command line, composes the checkpoint's strategy."""
    import shlex

    from omegaconf import OmegaConf

    from mtl.cli.choices import check_overrides
    from mtl.cli.in_process import compose_in_process
    from mtl.train_checks import changed_on_resume, resume_refusal

    def hparams(overrides):
        cfg, _ = compose_in_process("mtl.configs", "train", overrides, run_dir="unused")
        check_overrides(cfg, overrides, ("mtl.configs",))
        optim = OmegaConf.to_container(cfg.optim, resolve=True)
        return {**optim, "balancer": OmegaConf.to_container(cfg.balancer, resolve=True),
                "strategy": OmegaConf.to_container(cfg.strategy, resolve=True) if cfg.strategy else None}

    stored = hparams(checkpoint)
    message = resume_refusal(changed_on_resume(stored, hparams(now), {}))
    advice = shlex.split(message.split("; resume with ")[1].split(", or start")[0])
    assert advice == advised, message
    assert hparams(now + advice)["strategy"] == stored["strategy"]


def test_a_resume_that_changes_the_model_config_is_refused_by_name(tmp_path):
    """decoder.renormalize went from true to null (false for top_k=1) in scenes_task_moe_vit: a run started before
    with top_k=1, resumed with the same command, trained on with raw router probabilities without a word."""
    import torch

    moe = [a for a in BASE if not a.startswith(("experiment=", "task="))] + [
        "experiment=scenes_task_moe_vit", "task=[depth,classification]", "data.size=16", "backbone.depth=2",
        "backbone.embed_dim=24", "backbone.num_heads=1", "decoder.num_experts=2", "decoder.top_k=1",
        "decoder.channels=8"]
    first = run(moe + ["trainer.max_epochs=1"], run_dir=tmp_path / "a")
    old = first / "checkpoints" / "last.ckpt"
    for path in old.parent.glob("*.ckpt"):  # as saved before 2026-12-06, when top_k=1 renormalised
        ckpt = torch.load(path, weights_only=False)
        assert ckpt["hyper_parameters"]["model"]["decoder"]["renormalize"] is False
        ckpt["hyper_parameters"]["model"]["decoder"]["renormalize"] = True
        torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"^decoder.renormalize=false differs from the checkpoint's true: the epochs "
                                         r"so far trained with true.*; resume with decoder.renormalize=true, or start "
                                         r"a new run from its weights with init_from=<model folder>$"):
        run(moe + ["trainer.max_epochs=2", f"ckpt_path={old}"], run_dir=tmp_path / "b")
    resumed = run(moe + ["trainer.max_epochs=2", "decoder.renormalize=true", f"ckpt_path={old}"], run_dir=tmp_path / "d")
    assert (resumed / "metrics.json").is_file()  # the advice resumes it (with task_moe_vit's warning)
    with pytest.raises(ValueError, match=r"^backbone.depth=3 differs from the checkpoint's 2"):
        run(moe + ["trainer.max_epochs=2", "backbone.depth=3", f"ckpt_path={old}"],
            run_dir=tmp_path / "c")


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """A finished run of 2 epochs (2 steps each); its validation keeps epoch000.ckpt or epoch001.ckpt as the best."""
    return run(BASE + ["trainer.max_epochs=2"], run_dir=tmp_path_factory.mktemp("two_epochs") / "run")


@pytest.mark.parametrize("extra, match", [
    (["trainer.max_epochs=1"], r"has already trained 2 epoch\(s\) and trainer.max_epochs=1: the resume would train "
                               r"nothing; set trainer.max_epochs to 2 to test and save it as it is, or above 2"),
    (["trainer.max_epochs=3", "+trainer.max_steps=3"], r"has already trained 4 steps and trainer.max_steps=3"),
])
def test_a_resume_past_its_own_schedule_is_refused_before_any_folder(two_epochs, tmp_path, extra, match):
    """trainer.max_epochs below the epochs trained did nothing and counted as a finished run, without a word
    (metrics.json's global_steps from the checkpoint; config.yaml recording the lower max_epochs)."""
    last = two_epochs / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=rf"^ckpt_path {last} " + match):
        run(BASE + extra + [f"ckpt_path={last}"], run_dir=tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_resume_at_its_own_schedules_end_tests_and_saves_it(two_epochs, tmp_path, caplog):
    """A job interrupted after its last epoch (at test, or saving) is finished by resuming it with its own
    overrides (docs/scaleout.md): nothing is trained, the checkpoint is tested and saved, and the log says so."""
    last = two_epochs / "checkpoints" / "last.ckpt"
    with caplog.at_level("WARNING"):
        done = run(BASE + ["trainer.max_epochs=2", f"ckpt_path={last}"], run_dir=tmp_path / "again")
    assert "has trained all 2 epoch(s) of trainer.max_epochs=2: nothing to train; the resume tests and saves it" \
        in caplog.text
    metrics = json.loads((done / "metrics.json").read_text())
    assert metrics["global_steps"] == json.loads((two_epochs / "metrics.json").read_text())["global_steps"]
    assert (done / "model" / "model.safetensors").is_file()


def test_a_resume_whose_best_checkpoint_is_gone_tracks_the_best_anew(tmp_path, caplog):
    """The old run folder moved (or last.ckpt copied elsewhere): the resumed run trained every epoch, then failed at
    test with 'Checkpoint file not found: .../epoch000.ckpt', leaving no model/ and no metrics.json, and its own
    last.ckpt recorded that path again."""
    import shutil

    import torch

    first = run(BASE + ["trainer.max_epochs=1"], run_dir=tmp_path / "a")
    copy = tmp_path / "copy.ckpt"
    shutil.copy(first / "checkpoints" / "last.ckpt", copy)
    gone = next((first / "checkpoints").glob("epoch*.ckpt"))
    shutil.move(first, tmp_path / "moved")
    with caplog.at_level("WARNING"):
        resumed = run(BASE + ["trainer.max_epochs=3", f"ckpt_path={copy}"], run_dir=tmp_path / "b")
    assert f"best checkpoint {gone} is gone" in caplog.text and "tracked anew from the resumed epochs" in caplog.text
    metrics = json.loads((resumed / "metrics.json").read_text())
    tested = Path(metrics["best_checkpoint"])
    assert tested.parent == resumed / "checkpoints" and tested.is_file() and metrics["val_epoch"] in (1, 2)
    assert (resumed / "model" / "model.safetensors").is_file()
    states = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["callbacks"]
    assert str(tested) in {s.get("best_model_path") for s in states.values()}


def test_a_resume_at_its_schedules_end_whose_best_is_gone_says_why_no_epoch_is_validated(tmp_path, caplog):
    """Nothing is left to train and the recorded best is gone: the last weights are tested, and the warning names
    that cause (it blamed trainer.max_steps / check_val_every_n_epoch, which nobody set)."""
    import shutil

    first = run(BASE + ["trainer.max_epochs=1"], run_dir=tmp_path / "a")
    copy = tmp_path / "copy.ckpt"
    shutil.copy(first / "checkpoints" / "last.ckpt", copy)
    gone = next((first / "checkpoints").glob("epoch*.ckpt"))
    gone.unlink()
    with caplog.at_level("WARNING"):
        resumed = run(BASE + ["trainer.max_epochs=1", f"ckpt_path={copy}"], run_dir=tmp_path / "b")
    assert f"no epoch was validated after the resume and the recorded best checkpoint {gone} is gone" in caplog.text
    assert "trainer.max_steps or check_val_every_n_epoch" not in caplog.text
    assert json.loads((resumed / "metrics.json").read_text())["val_epoch"] == "last"


@pytest.mark.slow
def test_a_resume_keeps_the_backbone_file_it_started_from_without_reading_it_and_refuses_another(tmp_path):
    """backbone.checkpoint_path was no part of the kept start: the same resume failed 'no such file' once the file had
    moved (the checkpoint replaces its weights anyway), one without it dropped it from config.yaml, and one naming
    another file was accepted with config.yaml naming that file."""
    import timm
    import yaml
    from safetensors.torch import save_file

    weights = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(weights))
    first = BASE + ["trainer.max_epochs=2", f"+backbone.checkpoint_path={weights}"]
    with pytest.raises(InterruptedError):
        run(first + ["+callbacks.stop._target_=kill_callback.InterruptAtEpoch", "+callbacks.stop.epoch=1"],
            run_dir=tmp_path / "b1")
    last = tmp_path / "b1" / "checkpoints" / "last.ckpt"
    other = tmp_path / "other.safetensors"
    weights.rename(other)  # the file moved: the same command resumes, reading no file
    with pytest.raises(ValueError) as e:
        run(BASE + ["trainer.max_epochs=2", f"+backbone.checkpoint_path={other}", f"ckpt_path={last}"],
            run_dir=tmp_path / "b2")
    assert str(e.value) == (f"backbone.checkpoint_path={other} differs from the checkpoint's start {weights}: its run "
                            "started from those weights (the checkpoint's replace both) and config.yaml would name "
                            "these; resume without backbone.checkpoint_path (the checkpoint's start is kept)")
    assert not (tmp_path / "b2").exists()  # refused before any folder
    for name, extra in (("b3", [f"+backbone.checkpoint_path={weights}"]), ("b4", [])):
        resumed = run(BASE + ["trainer.max_epochs=2", f"ckpt_path={last}", *extra], run_dir=tmp_path / name)
        assert yaml.safe_load((resumed / "config.yaml").read_text())["backbone"]["checkpoint_path"] == str(weights)
    # the resumed run's own checkpoints keep the record: a resume of the resume names the file too
    again = run(BASE + ["trainer.max_epochs=3", f"ckpt_path={resumed / 'checkpoints' / 'last.ckpt'}"],
                run_dir=tmp_path / "b5")
    assert yaml.safe_load((again / "config.yaml").read_text())["backbone"]["checkpoint_path"] == str(weights)


def test_a_resumed_fine_tune_keeps_its_init_from_record_and_refuses_another(tmp_path):
    """A resume as the interrupt message advises (ckpt_path= alone) wrote a model folder with no init_from record,
    and one naming another init_from recorded that folder and its digest for a fine-tune of the first, so mtl-merge's
    θ0 check refused the true start and accepted the false one."""
    from merging.pool import check_same_start

    theta0 = run(BASE + ["trainer.max_epochs=1"], run_dir=tmp_path / "theta0") / "model"
    tune = BASE + ["trainer.max_epochs=2", f"init_from={theta0}"]
    whole = run(tune, run_dir=tmp_path / "whole")
    with pytest.raises(InterruptedError):
        run(tune + ["+callbacks.stop._target_=kill_callback.InterruptAtEpoch", "+callbacks.stop.epoch=1"],
            run_dir=tmp_path / "b1")
    last = tmp_path / "b1" / "checkpoints" / "last.ckpt"
    resumed = run([a for a in tune if not a.startswith("init_from=")] + [f"ckpt_path={last}"], run_dir=tmp_path / "b2")
    keys = ("init_from", "init_from_weights_digest", "start_weights_digests")
    meta = [json.loads((d / "model" / "config.json").read_text())["meta"] for d in (whole, resumed)]
    assert meta[0]["init_from"] == str(theta0.resolve()) and all(k in meta[0] for k in keys)
    assert {k: meta[1].get(k) for k in keys} == {k: meta[0][k] for k in keys}
    assert "init_from: " + str(theta0.resolve()) in (resumed / "config.yaml").read_text()
    check_same_start(str(theta0), [str(resumed / "model")])  # its true θ0 is accepted
    other = whole / "model"  # another folder, other weights
    with pytest.raises(ValueError, match=rf"^init_from={other.resolve()} \(weights digest \w+\) differs from the "
                                         rf"checkpoint's start {theta0.resolve()} \(weights digest \w+\): .*; resume "
                                         r"without init_from"):
        run(tune[:-1] + [f"init_from={other}", f"ckpt_path={last}"], run_dir=tmp_path / "b3")
    assert not (tmp_path / "b3").exists()  # refused before any folder
    scratch = theta0.parent / "checkpoints" / "last.ckpt"  # a run that started from scratch is no fine-tune
    with pytest.raises(ValueError, match=rf"^init_from={other.resolve()} differs from the checkpoint's start none"):
        run(BASE + ["trainer.max_epochs=2", f"init_from={other}", f"ckpt_path={scratch}"], run_dir=tmp_path / "b4")


def test_a_fine_tune_of_a_moved_pruned_start_resumes_from_its_new_location(tmp_path, caplog):
    """Once the start folder had moved, naming its new location was refused as another start and leaving init_from
    out lost the pruned architecture (the checkpoint's weights did not fit): the run could not be resumed at all."""
    import shutil

    from pruning.job import run as prune

    theta0 = run(BASE + ["trainer.max_epochs=1"], run_dir=tmp_path / "theta0") / "model"
    prune(["prune=l1", f"model={theta0}", "prune.ratio=0.5", "calib.batches=1", "eval.max_batches=1",
           "eval.latency_repeats=1"], run_dir=tmp_path / "p")
    tune = BASE + ["trainer.max_epochs=2", f"init_from={tmp_path / 'p' / 'model'}"]
    with pytest.raises(InterruptedError):
        run(tune + ["+callbacks.stop._target_=kill_callback.InterruptAtEpoch", "+callbacks.stop.epoch=1"],
            run_dir=tmp_path / "b1")
    last = tmp_path / "b1" / "checkpoints" / "last.ckpt"
    moved = Path(shutil.move(tmp_path / "p" / "model", tmp_path / "moved"))
    with pytest.raises(ValueError, match=rf"^ckpt_path {last}: its run started from init_from="
                                         rf"{tmp_path.resolve() / 'p' / 'model'}, which is no longer a folder; pass "
                                         r"init_from=<its new location>"):
        run(tune[:-1] + [f"ckpt_path={last}"], run_dir=tmp_path / "b2")
    assert not (tmp_path / "b2").exists()  # refused before any folder
    with pytest.raises(ValueError, match=rf"^init_from={theta0.resolve()} \(weights digest \w+\) differs from the "
                                         r"checkpoint's start .*: its weights were trained from"):
        run(tune[:-1] + [f"init_from={theta0}", f"ckpt_path={last}"], run_dir=tmp_path / "b3")
    with caplog.at_level("INFO", logger="mtl.train"):
        resumed = run(tune[:-1] + [f"init_from={moved}", f"ckpt_path={last}"], run_dir=tmp_path / "b4")
    assert "the start moved; recording its new location" in caplog.text
    meta = json.loads((resumed / "model" / "config.json").read_text())["meta"]
    assert meta["init_from"] == str(moved.resolve()) and meta["init_from_weights_digest"]
    assert "init_from: " + str(moved.resolve()) in (resumed / "config.yaml").read_text()
    assert json.loads((resumed / "metrics.json").read_text())["global_steps"] == 4


def test_a_resume_start_record_compares_weights_digests_and_warns_on_old_checkpoints(tmp_path, caplog):
    """The same path holding other weights since is another start, another path holding the same weights is the same
    (it was refused, claiming a fine-tune of another start); a checkpoint from before the record was kept resumes,
    warning that its start is unknown."""
    import torch
    from omegaconf import OmegaConf

    from mtl.train_checks import changed_start, resume_refusal, resume_start

    then = {"init_from": "/m/a", "init_from_weights_digest": "d1", "start_weights_digests": ["d1"]}
    assert changed_start(then, None) is None and changed_start(then, dict(then)) is None
    assert changed_start(then, {**then, "init_from": "/m/c"}) is None  # moved or copied: the same weights
    other = resume_refusal(changed_start(then, {**then, "init_from": "/m/c", "init_from_weights_digest": "d2"}))
    assert other.startswith("init_from=/m/c (weights digest d2) differs from the checkpoint's start /m/a (weights "
                            "digest d1): its weights were trained from /m/a's, not from these")
    rebuilt = resume_refusal(changed_start(then, {**then, "init_from_weights_digest": "d2"}))
    assert rebuilt.startswith("init_from=/m/a (weights digest d2) differs from the checkpoint's start /m/a "
                              "(weights digest d1)") and "the folder holds other weights since" in rebuilt
    bare = {"init_from": "/m/a"}  # no digest on one side: only the same path is known to be the same start
    assert changed_start(bare, dict(bare)) is None
    unknown = resume_refusal(changed_start(then, {"init_from": "/m/c"}))
    assert "is unknown (no weights digest in this folder)" in unknown and "trained from" not in unknown
    old = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {"lr": 1e-3}}, old)
    with caplog.at_level("WARNING", logger="mtl.train"):
        assert resume_start(OmegaConf.create({"init_from": None}), old) is None
    assert "predates the start record: whether its run was a fine-tune (init_from) is unknown" in caplog.text


def test_a_resume_in_its_folder_moves_no_checkpoint_and_names_why_the_best_is_gone(tmp_path, caplog):
    """Killed while writing epoch 1's last.ckpt, an attempt left epoch001.ckpt (its new best, epoch000.ckpt pruned)
    beside the epoch-0 last.ckpt it resumes from. The resume moves no checkpoint of its folder (file times cannot
    tell a later attempt's best from the resumed checkpoint's own once the folder was copied), and its warning says
    the recorded best was removed from this checkpoint folder, not that the run folder moved."""
    from mtl.cli.failures import FAILED

    run_dir = run(BASE + ["trainer.max_epochs=1"], run_dir=tmp_path / "r")
    ckpts = run_dir / "checkpoints"
    os.replace(ckpts / "epoch000.ckpt", ckpts / "epoch001.ckpt")
    later = (ckpts / "last.ckpt").stat().st_mtime_ns + 10**9
    os.utime(ckpts / "epoch001.ckpt", ns=(later, later))
    stale = (ckpts / "epoch001.ckpt").read_bytes()
    (run_dir / FAILED).write_text("killed\n")
    with caplog.at_level("WARNING"):
        run(BASE + ["trainer.max_epochs=2", f"ckpt_path={ckpts / 'last.ckpt'}"], run_dir=run_dir)
    assert (ckpts / "epoch001.ckpt").read_bytes() == stale and not (run_dir / "checkpoints.failed").exists()
    assert "moved or deleted" not in caplog.text
    assert f"best checkpoint {ckpts / 'epoch000.ckpt'} is gone (removed from this checkpoint folder" in caplog.text


def test_a_resume_keeps_the_best_its_checkpoint_records_whatever_the_file_times(tmp_path):
    """A run folder copied without its file times (cp -r, rsync without -t) can hold its best epochNNN.ckpt newer
    than last.ckpt: a resume from last.ckpt in that folder keeps that best, the one last.ckpt records."""
    from mtl.cli.failures import FAILED

    run_dir = run(BASE + ["trainer.max_epochs=1"], run_dir=tmp_path / "r")
    ckpts = run_dir / "checkpoints"
    later = (ckpts / "last.ckpt").stat().st_mtime_ns + 10**9
    os.utime(ckpts / "epoch000.ckpt", ns=(later, later))
    (run_dir / FAILED).write_text("killed\n")
    run(BASE + ["trainer.max_epochs=1", f"ckpt_path={ckpts / 'last.ckpt'}"], run_dir=run_dir)
    assert (ckpts / "epoch000.ckpt").is_file() and not (run_dir / "checkpoints.failed").exists()
