"""Balancers inside the real MultiTaskModule and the real `mtl-train` entry point."""
import json
import logging
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mtl.balancers import BALANCERS, NonFiniteLossError
from mtl.models import create_model
from mtl.module import MultiTaskModule
from mtl.train import run

FAST = ["experiment=scenes_hps", "debug=smoke", "viz.num_samples=0", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false"]


def check_run(run_dir, name):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_steps"] == 3, name
    for values in metrics["test"].values():
        assert all(math.isfinite(v) for v in values.values()), name
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert "balancer/weight/depth" in rows[0] and "balancer/cos/depth-normals" in rows[0], name
    weights = [float(v) for r in rows for k, v in r.items() if k.startswith("balancer/weight/") and v]
    varied = max(weights) - min(weights) > 1e-9
    # the cosines are measured (three tasks): the plot exists whether or not the weights varied
    assert (run_dir / "balancer_weights.png").is_file(), (name, weights)
    if name in ("flat", "balancer=upgrad", "upgrad-features", "balancer=flat"):
        assert varied, (name, weights)  # aggregators weight conflicting tasks unequally from step 0


def test_cli_flat_with_recompute_monitor_and_plot(tmp_path):
    # flat exercises recompute(tasks=[t]) with frozen BN; the monitor logs weights + cosines
    run_dir = run(FAST + ["balancer=flat", "balancer.aggregator=pcgrad", "balancer.rho=0.1"], run_dir=tmp_path / "flat")
    check_run(run_dir, "flat")


def test_cli_monitor_rows_only_at_due_steps(tmp_path):
    # log_weights_every=2 over 3 steps: weights at steps 0 and 2 only (no stale copies in between)
    import csv

    run_dir = run(FAST + ["balancer=dwa", "log_weights_every=2", "trainer.log_every_n_steps=1"], run_dir=tmp_path / "m")
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    due = sorted({int(r["step"]) for r in rows if r.get("balancer/weight/depth")})
    assert due == [0, 2]
    assert any(r.get("train/loss") and int(r["step"]) == 1 for r in rows)  # other metrics still every step


@pytest.mark.slow
@pytest.mark.parametrize("name", BALANCERS.names())
def test_cli_every_balancer_runs(name, tmp_path):
    # the contract: `mtl-train experiment=scenes_hps debug=smoke balancer=<name>`, in-process
    check_run(run(FAST + [f"balancer={name}"], run_dir=tmp_path / name), name)


@pytest.mark.parametrize("overrides", [["balancer=upgrad"], ["balancer=upgrad", "balancer.level=features"],
                                       ["balancer=gradnorm"], ["balancer=flat"]], ids="+".join)
def test_cli_bf16_mixed_precision(overrides, tmp_path):
    # autocast: TorchJD's solvers need float32 Gramians and its vmapped backward fails on bf16 ops
    check_run(run(FAST + overrides + ["trainer.precision=bf16-mixed"], run_dir=tmp_path / "bf16"), overrides[0])


@pytest.mark.slow
def test_cli_features_level(tmp_path):
    check_run(run(FAST + ["balancer=upgrad", "balancer.level=features"], run_dir=tmp_path / "rep"), "upgrad-features")


# --- non-finite losses inside the module ------------------------------------------------------


@pytest.fixture(scope="module")
def scenes_batch(tmp_path_factory):
    from mtl.data import create_datamodule

    dm = create_datamodule("scenes", size=32, n_train=8, n_val=8, n_test=8, batch_size=8,
                           cache_dir=str(tmp_path_factory.mktemp("scenes")))
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def fit(balancer, batches, max_steps, root, prepare=None):
    torch.manual_seed(0)
    model = create_model(["depth", "regression"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": 16})
    module = MultiTaskModule(model, balancer=balancer, log_weights_every=1)
    if prepare is not None:
        prepare(module)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(root))  # the weights plot lands here, not in the working directory
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer, module


def with_inf_depth(batch):
    bad = dict(batch)
    bad["depth"] = torch.full_like(batch["depth"], float("inf"))  # NaN would count as "no valid pixel"
    return bad


def test_nonfinite_loss_stops_training_naming_the_task(scenes_batch, tmp_path):
    with pytest.raises(NonFiniteLossError, match="'depth'"):
        fit({"name": "pcgrad"}, [scenes_batch, with_inf_depth(scenes_batch)], max_steps=2, root=tmp_path)


def test_nonfinite_loss_skips_the_step_when_asked(scenes_batch, caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="mtl.balancers"):
        trainer, module = fit({"name": "famo", "skip_nonfinite": True},
                              [with_inf_depth(scenes_batch), scenes_batch, scenes_batch], max_steps=2, root=tmp_path)
    assert trainer.global_step == 2  # the bad batch made no optimiser step
    assert "skipping this step" in caplog.text and "depth" in caplog.text
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert [h["step"] for h in module.monitor.history] == [0, 1]


def nan_gradient_on_first_forward(module):
    """The backbone output of the first forward gets a term of value 0 whose gradient is NaN (a norm at
    its minimum): finite losses, non-finite task gradients."""
    calls = []

    def hook(_m, _inputs, out):
        calls.append(1)
        if len(calls) > 1:
            return None
        first = out[0] if isinstance(out, (list, tuple)) else out
        bad = first + (first - first.detach()).pow(2).sum().sqrt()
        return type(out)([bad, *out[1:]]) if isinstance(out, (list, tuple)) else bad

    module.model.backbone.register_forward_hook(hook)


def test_nonfinite_gradient_skips_the_step_when_asked(scenes_batch, caplog, tmp_path):
    # the check was on the losses only: pcgrad stepped with a NaN update and every weight turned NaN
    with caplog.at_level(logging.WARNING, logger="mtl.balancers"):
        trainer, module = fit({"name": "pcgrad", "skip_nonfinite": True}, [scenes_batch] * 3, max_steps=2,
                              root=tmp_path, prepare=nan_gradient_on_first_forward)
    assert trainer.global_step == 2  # the bad batch made no optimiser step
    assert "non-finite gradient" in caplog.text and "skipping this step" in caplog.text
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
