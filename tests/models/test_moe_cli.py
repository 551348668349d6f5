"""The MoE experiments and mtl-extract through the real CLIs (slow: each trains a tiny model)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtl

pytestmark = pytest.mark.slow


def cli(module, *args, cwd, check=True):
    env = dict(os.environ, MTL_OUTPUT_DIR=str(Path(cwd) / "outputs"))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_dir_of(proc) -> Path:
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: "), last
    return Path(last.removeprefix("run_dir: "))


def reloads_identically(run_dir: Path) -> None:
    """The model folder equals the weights of the checkpoint the run tested (rebuilt from its config)."""
    model = mtl.load_model(run_dir / "model")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    fresh = mtl.create_model(config=model.config).eval()
    fresh.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    a, b = model(x), fresh(x)
    assert all(torch.equal(a[t], b[t]) for t in a)


@pytest.mark.parametrize("experiment", ["scenes_moe", "scenes_task_moe_vit", "scenes_hps decoder=moe"])
def test_experiment_smoke_run(tmp_path, experiment):
    # the last: an MoE decoder on another experiment records its expert usage too (a default callback)
    name, *extra = experiment.split()
    run_dir = run_dir_of(cli("mtl.cli.train", f"experiment={name}", *extra, "debug=smoke", cwd=tmp_path))
    for name in ("metrics.json", "model/config.json", "expert_usage.png", "expert_usage.json"):
        assert (run_dir / name).is_file(), name
    stats = json.loads((run_dir / "metrics.json").read_text())["model_stats"]
    assert stats["params"] > 0 and set(stats["flops_per_task"]) == set(mtl.load_model(run_dir / "model").tasks)
    assert all(f < stats["flops_all_tasks"] for f in stats["flops_per_task"].values())
    reloads_identically(run_dir)


def test_moe_decoder_with_a_features_level_balancer_and_a_vit(tmp_path):
    run_dir_of(cli("mtl.cli.train", "experiment=scenes_moe", "debug=smoke", "backbone=test_vit", "backbone.patch_size=8",
                   "balancer=upgrad", "balancer.level=features", "task=[semseg,depth]", cwd=tmp_path))


def test_task_moe_refuses_features_level_balancers_in_one_line(tmp_path):
    proc = cli("mtl.cli.train", "experiment=scenes_task_moe_vit", "debug=smoke", "balancer=upgrad",
               "balancer.level=features", "task=[semseg,depth]", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "level=features" in err


def test_extract_cli_smoke(tmp_path):
    run_dir = run_dir_of(cli("mtl.cli.extract", "debug=smoke", cwd=tmp_path))
    report = json.loads((run_dir / "extract_report.json").read_text())
    assert report["task"] == "depth" and report["dropped_token_share_max"] == 0.0
    sub = mtl.load_model(run_dir / "model")
    assert list(sub.tasks) == ["depth"] and sub.meta["report"]["experts_kept"] == report["experts_kept"]
    assert Path(sub.meta["run_dir"]).resolve() == run_dir.resolve()  # model cards name the extracting run


def test_extract_cli_smoke_with_widths_trains_a_slimmable_model(tmp_path):
    """debug=smoke once set tasks=depth, so widths= was refused as 'pass tasks= or widths=, not both'."""
    run_dir = run_dir_of(cli("mtl.cli.extract", "debug=smoke", "widths={encoder: 0.5}", cwd=tmp_path))
    report = json.loads((run_dir / "extract_report.json").read_text())
    assert report["widths"]["encoder"] == 0.5 and report["extracted"]["params"] < report["parent"]["params"]


def test_expert_usage_counts_training_routing_only_across_a_resume(tmp_path, monkeypatch):
    """debug=smoke: 16 images of 32x32 per batch, patch 4 -> 64 tokens, top-4: 4096 routed slots per
    step and MoE layer. 2 steps x 3 epochs = 6 steps; validation (noise-free routing) is not counted."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))  # tests/kill_callback.py
    from mtl.train import run

    common = ["experiment=scenes_task_moe_vit", "debug=smoke", "viz.num_samples=0", "~callbacks.progress_bar",
              "+trainer.enable_progress_bar=false", "task=[depth,classification]", "log_weights_every=0",
              "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
              "trainer.max_epochs=3"]
    a = run(common, run_dir=tmp_path / "a")
    with pytest.raises(InterruptedError):
        run(common + ["+callbacks.stop._target_=kill_callback.InterruptAtEpoch", "+callbacks.stop.epoch=2"],
            run_dir=tmp_path / "b1")
    b2 = run(common + [f"ckpt_path={tmp_path / 'b1' / 'checkpoints' / 'last.ckpt'}"], run_dir=tmp_path / "b2")
    ua, ub = (json.loads((d / "expert_usage.json").read_text()) for d in (a, b2))
    assert ua["unit"] == "routed tokens" and ua["layers"] == ["block 1", "block 3", "block 5"]
    for t in ("depth", "classification"):
        assert [sum(layer) for layer in ua["usage"][t]] == [6 * 16 * 64 * 4] * 3
    assert ua == ub  # the resumed run's totals include epochs 0-1 (resume is bit-identical)


@pytest.mark.parametrize("extra, ranks", [(["balancer=flat"], 1), (["trainer=ddp"], 2)])
def test_expert_usage_counts_each_training_step_once_on_every_rank(tmp_path, extra, ranks):
    """FLAT runs one extra forward per task on perturbed weights: not training routing, not counted.
    Under DDP each rank routes its own batches: the written totals sum the ranks."""
    common = ["experiment=scenes_task_moe_vit", "debug=smoke", "viz.num_samples=0", "task=[depth,classification]",
              "log_weights_every=0", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1", "trainer.max_epochs=1"]
    run_dir = run_dir_of(cli("mtl.cli.train", *common, *extra, cwd=tmp_path))
    usage = json.loads((run_dir / "expert_usage.json").read_text())
    for t in ("depth", "classification"):
        assert [sum(layer) for layer in usage["usage"][t]] == [ranks * 2 * 16 * 64 * 4] * 3, t
