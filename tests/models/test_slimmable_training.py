"""The sandwich strategy (sandwich rule, in-place distillation, CI-KD) and the mtl-train contract."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import mtl
from mtl.models import create_model
from mtl.models.slimmable.sandwich import distill_loss
from mtl.strategies import create_strategy
from mtl.tasks import create_task

TASKS = ["semseg", "depth", "edges", "classification"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return create_model(TASKS, backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16], "out_indices": [1, 2]},
                        decoder={"name": "slimmable", "channels": 8}, family="slimmable")


@pytest.mark.parametrize("kind", ["semseg", "depth", "edges", "classification", "normals"])
def test_distillation_loss_is_stationary_where_the_student_matches_the_teacher(kind):
    task = create_task(kind)
    shape = (2, task.out_channels, 4, 4) if task.dense else (2, task.out_channels)
    teacher = torch.randn(shape)
    at = teacher.clone().requires_grad_(True)
    distill_loss(task, at, teacher).backward() if kind != "depth" else None
    if kind != "depth":  # L1 has no gradient at its kink; its minimum is 0 there
        assert at.grad.abs().max() < 1e-6
    else:
        assert distill_loss(task, at, teacher) == 0
    off = (teacher + 0.5 * torch.randn(shape)).requires_grad_(True)
    assert distill_loss(task, off, teacher) > distill_loss(task, teacher, teacher)


def test_normals_distillation_reads_directions_as_the_task_loss_does():
    """The normals loss is 1 − cos (scale-free): distilling the raw vectors with L1 also pulled their lengths,
    which grew ~50x in training and stalled the cosine's gradient (docs/BENCHMARKS.md, Slimmable models)."""
    task = create_task("normals")
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 4.0]]).reshape(2, 3, 1, 1)
    longer = 7.0 * teacher  # the same directions, other lengths: nothing to distil
    assert float(distill_loss(task, longer, teacher)) == pytest.approx(0.0, abs=1e-6)
    turned = torch.tensor([[0.0, 1.0, 0.0], [0.0, 3.0, 4.0]]).reshape(2, 3, 1, 1)  # first pixel at 90°
    assert float(distill_loss(task, turned, 5.0 * teacher)) == pytest.approx((1.0 - 0.0 + 1.0 - 1.0) / 2)


def sandwich_step(model, **kw):
    strat = create_strategy("sandwich", model, **kw)
    model.train()
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    module = SimpleNamespace(model=model, manual_backward=lambda loss: loss.backward())
    strat.before_forward(module, {"image": x})
    z = model.shared(x)  # the module's standard pass at the widest configuration
    logs = strat.after_backward(module, {"image": x}, SimpleNamespace(features=z))
    return strat, logs


def test_sandwich_trains_sub_networks_with_cikd_and_returns_to_the_widest():
    model = tiny()
    min_row = model.backbone.stem[1].running_means[0].clone()
    strat, logs = sandwich_step(model, num_random=1)
    assert model.widths == model.max_widths()
    assert set(strat.proj) == {"0_25", "0_5", "0_75"}
    assert strat.proj["0_25"].weight.grad is not None and strat.proj["0_25"].weight.grad.abs().sum() > 0
    assert model.backbone.stem[0].weight.grad[:2].abs().sum() > 0  # sub-network gradients reach shared weights
    assert not torch.equal(model.backbone.stem[1].running_means[0], min_row)  # min width's BN row trained
    assert logs["train/slim/cikd"] > 0 and logs["train/slim/sub_loss"] > 0


def test_cikd_slice_matches_the_widest_networks_first_channels_without_parameters():
    model = tiny()
    strat = create_strategy("sandwich", model, cikd_match="slice")
    assert len(list(strat.parameters())) == 0
    teacher = torch.randn(2, 8, 4, 4)
    sub = torch.randn(2, 4, 4, 4)
    assert strat.cikd_loss(sub, teacher, 0.5) == pytest.approx(((sub - teacher[:, :4]) ** 2).mean().item())
    assert strat.cikd_loss(teacher[:, :4].clone(), teacher, 0.5) == 0  # equal on the shared channels: no loss
    _, logs = sandwich_step(model, num_random=1, cikd_match="slice")
    assert logs["train/slim/cikd"] > 0 and model.widths == model.max_widths()
    with pytest.raises(ValueError, match="cikd_match must be 'projection' or 'slice', got 'cosine'"):
        create_strategy("sandwich", model, cikd_match="cosine")


def test_cikd_stages_matches_every_encoder_stage_of_the_widest_pass():
    # the stage form: mean over the encoder's output stages of MSE(sub-width stage, widest stage's first channels)
    model = tiny()
    torch.manual_seed(1)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    strat = create_strategy("sandwich", model, num_random=0, cikd_match="slice", cikd_level="stages")
    model.train()
    module = SimpleNamespace(model=model, manual_backward=lambda loss: loss.backward())
    strat.before_forward(module, {"image": x})
    z = model.shared(x)
    model.backbone(model.normalize(torch.zeros_like(x)))  # a balancer's recompute: not the teacher
    logs = strat.after_backward(module, {"image": x}, SimpleNamespace(features=z))
    assert not model.backbone._forward_hooks  # the hook lives for one step only
    with torch.no_grad():  # no optimiser step was taken: the weights are those of the step
        model.set_config(model.max_widths())
        teachers = model.backbone(model.normalize(x))
        model.set_config(model.min_widths())
        subs = model.backbone(model.normalize(x))
        model.set_config(model.max_widths())
    expected = sum(((s - t[:, : s.shape[1]]) ** 2).mean() for s, t in zip(subs, teachers)) / len(subs)
    assert [s.shape[1] for s in subs] == [2, 4] and logs["train/slim/cikd"].item() == pytest.approx(expected.item(), rel=1e-5)
    proj = create_strategy("sandwich", model, cikd_level="stages")
    assert set(proj.proj) == {f"s{i}_{w}" for i in (0, 1) for w in ("0_25", "0_5", "0_75")}
    assert proj.proj["s1_0_25"].in_channels == 4 and proj.proj["s1_0_25"].out_channels == 16
    _, logs = sandwich_step(model, num_random=1, cikd_level="stages")
    assert logs["train/slim/cikd"] > 0 and model.widths == model.max_widths()
    with pytest.raises(ValueError, match="cikd_level must be 'neck' or 'stages', got 'encoder'"):
        create_strategy("sandwich", model, cikd_level="encoder")


def test_cikd_projections_leave_the_random_stream_alone():
    # a paired ablation: with and without CI-KD, the run draws the same random widths and batches afterwards
    model = tiny()
    draws = []
    for kw in ({"cikd": False}, {"cikd": True}, {"cikd_match": "slice"}, {"cikd_level": "stages"}):
        torch.manual_seed(3)
        create_strategy("sandwich", model, **kw)
        draws.append(torch.rand(5))
    assert all(torch.equal(draws[0], d) for d in draws[1:])


def test_cikd_weight_zero_is_cikd_off():
    # idle projections (zero gradients) would still change gradient clipping's float rounding
    model = tiny()
    strat = create_strategy("sandwich", model, cikd=True, cikd_weight=0.0)
    assert not strat.cikd and len(list(strat.parameters())) == 0
    with pytest.raises(ValueError, match="cikd_weight must be a finite number >= 0, got -0.1"):
        create_strategy("sandwich", model, cikd_weight=-0.1)


def test_sandwich_without_cikd_and_without_distillation_uses_labels():
    model = tiny()
    strat = create_strategy("sandwich", model, num_random=0, cikd=False, inplace_distill=False)
    assert len(list(strat.parameters())) == 0
    with pytest.raises(KeyError):  # the labels are read: this batch has none
        sandwich_step(model, num_random=0, cikd=False, inplace_distill=False)
    assert model.widths == model.max_widths()


def test_sandwich_refuses_a_plain_model():
    plain = create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2]}, decoder="hps")
    with pytest.raises(ValueError, match="family 'slimmable', got 'multitask'"):
        create_strategy("sandwich", plain)


@pytest.mark.parametrize("key, value, match", [
    ("cikd", "no", r"strategy.cikd must be true or false, got 'no'"),  # bool("no") ran CI-KD in an ablation without it
    ("inplace_distill", 1, r"strategy.inplace_distill must be true or false, got 1"),
    ("num_random", 1.5, r"strategy.num_random must be an int >= 0, got 1.5"),  # int(1.5) drew one
    ("num_random", "abc", r"strategy.num_random must be an int >= 0, got 'abc'"),
    ("cikd_weight", "x", r"strategy.cikd_weight must be a finite number >= 0, got 'x'"),
])
def test_sandwich_settings_of_the_wrong_type_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        create_strategy("sandwich", tiny(), **{key: value})


def test_a_slimmable_model_without_the_sandwich_strategy_is_refused_before_training(tmp_path):
    """It trained the full width only, silently, and wrote width tables from untrained BN rows."""
    from mtl.train import run

    with pytest.raises(ValueError, match=r"family 'slimmable' trains its widths with strategy.name=sandwich; without "
                                         r"it only the full width learns"):
        run(["experiment=scenes_slimmable", "debug=smoke", "strategy=null", "logger=none", "viz.num_samples=0"],
            run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "model").exists()


@pytest.mark.slow
def test_cli_smoke_run_saves_a_model_identical_at_every_width(tmp_path):
    env = {**os.environ, "MTL_OUTPUT_DIR": str(tmp_path / "outputs")}
    proc = subprocess.run([sys.executable, "-m", "mtl.cli.train", "experiment=scenes_slimmable", "debug=smoke"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: ")
    run_dir = Path(last.removeprefix("run_dir: "))
    for name in ("width_table.json", "width_table_test.json", "controllability.json", "slimmable_control.png",
                 "model/config.json"):
        assert (run_dir / name).is_file(), name
    control = json.loads((run_dir / "controllability.json").read_text())
    assert control["method"] == "measured" and control["held_out"] and control["adherence"] == 1.0
    assert set(control["compare"]) == {"measured/held_out", "measured/in_sample", "rule/held_out", "rule/in_sample"}
    cfg = OmegaConf.load(run_dir / "config.yaml").callbacks.width_table  # the settings it was scored with, recorded
    assert control["settings"] == {**{k: cfg[k] for k in ("budgets", "preferences", "search_method", "seed")}, "source": {
        k: f"config.yaml callbacks.width_table.{k}" for k in ("budgets", "preferences", "search_method", "seed")}}
    # the folder rebuilds the trained model (the tested checkpoint's weights) at every width of the set
    best = json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"]
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    model = mtl.load_model(run_dir / "model")
    ref = create_model(config=model.config)
    ref.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    ref.eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for w in model.width_set:
        model.set_widths(encoder=w, decoders=w)
        ref.set_widths(encoder=w, decoders=w)
        a, b = model(x), ref(x)
        for t in a:
            assert torch.equal(a[t], b[t]), (w, t)


def test_width_table_follows_each_splits_limit_and_is_skipped_without_validation(monkeypatch, tmp_path):
    """trainer.limit_val_batches=0 used to fail the run after testing (no model folder); the test table
    followed the validation limit, and fractions were ignored."""
    from types import SimpleNamespace

    import mtl.models.slimmable.callback as cb

    calls = []
    def build(model, loader, max_batches, progress=True, split=""):
        calls.append((len(loader), max_batches))
        if len(calls) == 2:
            raise ZeroDivisionError  # stop before scoring: what was asked of both splits is what is checked
        return None

    monkeypatch.setattr(cb, "build_width_table", build)
    dm = SimpleNamespace(val_dataloader=lambda: list(range(8)), test_dataloader=lambda: list(range(20)))

    def trainer(val, test):
        return SimpleNamespace(is_global_zero=True, datamodule=dm, limit_val_batches=val, limit_test_batches=test,
                               default_root_dir=str(tmp_path))

    callback = cb.WidthTableCallback()
    for val, test in [(0, 3), (0.0, 1.0), (2, 0)]:
        callback.on_test_end(trainer(val, test), SimpleNamespace(model=None))  # skipped, no error
    assert calls == []
    assert callback._cap(0.25, list(range(20))) == 5 and callback._cap(0.01, list(range(20))) == 1
    assert callback._cap(1.0, list(range(20))) is None and callback._cap(3, list(range(20))) == 3
    # reached the build: validation capped at 2, test at 5 of 20; its error is kept for after the model is saved
    callback.on_test_end(trainer(2, 0.25), SimpleNamespace(model=None))
    assert isinstance(callback.deferred_error, ZeroDivisionError)
    assert calls == [(8, 2), (20, 5)]
    assert cb.WidthTableCallback(max_batches=4)._cap(0, list(range(20))) == 4  # an explicit cap wins


def test_a_run_that_tests_nothing_warns_that_its_width_tables_are_skipped(tmp_path, caplog):
    """trainer.limit_test_batches=0: Lightning skips testing with its hooks, so the warning given in on_test_end
    never came and the tables were missing without a word."""
    from mtl.train import run

    with caplog.at_level("WARNING", logger="mtl.models.slimmable.callback"):
        run_dir = run(["experiment=scenes_slimmable", "debug=smoke", "viz.num_samples=0", "logger=none",
                       "trainer.limit_test_batches=0"], run_dir=tmp_path / "r")
    assert not (run_dir / "width_table.json").exists() and (run_dir / "model").is_dir()
    warned = [r.getMessage() for r in caplog.records if "width tables skipped" in r.getMessage()]
    assert len(warned) == 1 and "trainer.limit_test_batches=0" in warned[0], warned
    assert f"scripts/bench_slimmable.py --part control --runs {run_dir}" in warned[0]


OVERRIDE = "+callbacks.width_table._target_=mtl.models.slimmable.callback.WidthTableCallback"  # docs/models.md's


def test_a_slimmable_run_without_the_width_table_callback_says_how_to_get_one(tmp_path, caplog):
    """Without callbacks.width_table (only experiment=scenes_slimmable adds it) a slimmable run wrote no width
    table and said nothing."""
    from mtl.train import run

    with caplog.at_level("WARNING", logger="mtl.models.slimmable.callback"):
        run_dir = run(["experiment=scenes_slimmable", "debug=smoke", "viz.num_samples=0", "logger=none",
                       "~callbacks.width_table"], run_dir=tmp_path / "r")
    assert not (run_dir / "width_table.json").exists() and (run_dir / "model").is_dir()
    warned = [r.getMessage() for r in caplog.records if "no width table" in r.getMessage()]
    assert len(warned) == 1 and f"scripts/bench_slimmable.py --part control --runs {run_dir}" in warned[0], warned
    assert OVERRIDE in warned[0]


@pytest.mark.slow
def test_the_documented_override_adds_the_width_tables_to_a_run_outside_the_experiment(tmp_path, caplog):
    """docs/models.md: mtl-train family=slimmable ... +strategy.name=sandwich writes the width tables once the
    override the end-of-run warning names is added (and only then)."""
    from mtl.train import run

    command = ["family=slimmable", "backbone=slim_resnet", "decoder=slimmable", "+strategy.name=sandwich", "debug=smoke",
               "viz.num_samples=0", "logger=none"]
    with caplog.at_level("WARNING", logger="mtl.models.slimmable.callback"):
        plain = run(command, run_dir=tmp_path / "plain")
    assert not (plain / "width_table.json").exists()
    assert len([r for r in caplog.records if "no width table" in r.getMessage()]) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtl.models.slimmable.callback"):
        run_dir = run([*command, OVERRIDE], run_dir=tmp_path / "with")
    assert all((run_dir / f).is_file() for f in ("width_table.json", "controllability.json", "slimmable_control.png"))
    assert not [r for r in caplog.records if "no width table" in r.getMessage()]


def test_bench_control_builds_a_skipped_runs_files_with_that_runs_settings(tmp_path, monkeypatch):
    """--part control scored every run at 8 budgets, seed 0, the measured search and the script's --preferences,
    so the controllability.json it wrote into a run folder was not that run's analysis."""
    import importlib

    from mtl.io import read_json, strict_json
    from mtl.models.slimmable.control import score_controller
    from mtl.models.slimmable.table import WidthTable
    from mtl.train import run

    run_dir = run(["experiment=scenes_slimmable", "debug=smoke", "viz.num_samples=0", "logger=none",
                   "trainer.limit_test_batches=0", "callbacks.width_table.search_method=rule",
                   "callbacks.width_table.budgets=3", "callbacks.width_table.preferences=5",
                   "callbacks.width_table.seed=2"], run_dir=tmp_path / "r")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "scripts"))
    bench = importlib.import_module("bench_slimmable")
    with pytest.raises(ValueError, match=r"^--budgets must be ≥ 2, got 1$"):
        bench.main(["--part", "control", "--runs", str(run_dir), "--budgets", "1"])
    bench.main(["--part", "control", "--runs", str(run_dir), "--preferences", "4"])  # a flag given overrides
    report = read_json(run_dir / "controllability.json")
    val, test = WidthTable.load(run_dir / "width_table.json"), WidthTable.load(run_dir / "width_table_test.json")
    expected = score_controller(val, test, 3, 4, 2, "rule")
    assert {k: report[k] for k in expected} == strict_json(expected, "report")  # NaN stored as null
    assert report["method"] == "rule" and len(report["per_budget"]) == 3 and report["n_preferences"] == 4
    assert report["settings"] == {"budgets": 3, "preferences": 4, "search_method": "rule", "seed": 2, "source": {
        "budgets": "config.yaml callbacks.width_table.budgets", "preferences": "--preferences",
        "search_method": "config.yaml callbacks.width_table.search_method", "seed": "config.yaml callbacks.width_table.seed"}}


@pytest.mark.parametrize("key, value", [("budgets", 0), ("preferences", 0), ("preferences", -3), ("budgets", 2.5),
                                        ("budgets", 1), ("preferences", 1),  # always 0: undefined, not a measurement
                                        ("max_batches", -1), ("seed", "x")])
def test_bad_width_table_settings_are_refused_when_the_run_starts(key, value):
    from mtl.models.slimmable.callback import WidthTableCallback

    with pytest.raises(ValueError, match=rf"callbacks.width_table.{key} must be an int"):
        WidthTableCallback(**{key: value})


def test_a_width_table_that_fails_after_testing_keeps_the_trained_model(monkeypatch, tmp_path):
    import mtl.models.slimmable.callback as cb
    from mtl.train import run

    def broken(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cb, "build_width_table", broken)
    with pytest.raises(ZeroDivisionError):
        run(["experiment=scenes_slimmable", "debug=smoke", "viz.num_samples=0", "logger=none"], run_dir=tmp_path / "r")
    assert (tmp_path / "r" / "FAILED").is_file() and (tmp_path / "r" / "metrics.json").is_file()
    mtl.load_model(tmp_path / "r" / "model")


@pytest.mark.slow
def test_ddp_smoke_run_trains_and_writes_the_width_tables(tmp_path):
    """DDP once refused the step (idle CI-KD projections) and then hung in the table (rank 0 alone gathered)."""
    env = {**os.environ, "MTL_OUTPUT_DIR": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mtl.cli.train", "experiment=scenes_slimmable", "debug=smoke",
                           "trainer=ddp"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run_dir: "))
    assert (run_dir / "controllability.json").is_file() and (run_dir / "model" / "model.safetensors").is_file()


def test_a_width_set_of_one_width_is_warned(caplog):
    """backbone.widths=[1.0] trained the full network twice per step without a word."""
    torch.manual_seed(0)
    one = create_model(["depth"], backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16], "out_indices": [1, 2], "widths": [1.0]}, decoder={"name": "slimmable", "channels": 8},
                       family="slimmable")
    with caplog.at_level("WARNING", logger="mtl.models.slimmable.sandwich"):
        create_strategy("sandwich", one)
    assert "every sub-network is the full one" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtl.models.slimmable.sandwich"):
        create_strategy("sandwich", tiny())
    assert "every sub-network" not in caplog.text


def test_a_sandwich_without_any_sub_network_is_refused():
    """train_min=false, num_random=0: each step trained the full width only, which the family check exists to prevent."""
    with pytest.raises(ValueError, match=r"strategy.train_min=false with strategy.num_random=0 trains the full width only"):
        create_strategy("sandwich", tiny(), train_min=False, num_random=0)
    assert len(create_strategy("sandwich", tiny(), train_min=False, num_random=1).configs(tiny())) == 1
