"""logger=mlflow (local file store), logger=wandb (offline), logger=tensorboard: metric names stay val/<task>/<metric>."""
import importlib.util

import pytest

from mtl import loggers


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mlflow", "wandb") else real(name, *a))
    with pytest.raises(ImportError, match=r"logger=mlflow needs the 'mlflow' package: pip install 'mtlkit\[loggers\]'"):
        loggers.mlflow_logger(tracking_uri=f"file://{tmp_path}", experiment_name="x")
    with pytest.raises(ImportError, match=r"logger=wandb needs the 'wandb' package: pip install 'mtlkit\[loggers\]'"):
        loggers.wandb_logger(save_dir=str(tmp_path), project="x")


def test_mlflow_file_store_keeps_metric_names(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"file://{tmp_path}/mlruns"
    logger = loggers.mlflow_logger(tracking_uri=uri, experiment_name="t")
    logger.log_metrics({"val/semseg/miou": 0.25}, step=3)
    logger.finalize("success")
    history = MlflowClient(uri).get_metric_history(logger.run_id, "val/semseg/miou")
    assert [(m.step, m.value) for m in history] == [(3, 0.25)]


@pytest.mark.slow
def test_training_logs_to_mlflow_and_wandb_offline(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    from mtl.train import run

    run_dir = run(["experiment=scenes_hps", "debug=smoke", "task=[semseg,depth]", "logger=[mlflow,wandb,tensorboard]",
                   "viz.num_samples=0"], run_dir=tmp_path / "run")
    client = MlflowClient(f"file://{run_dir}/mlruns")
    (exp,) = [e for e in client.search_experiments() if e.name == "scenes_hps"]  # experiment_name: ${name}
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert {"val/semseg/miou", "val/depth/rmse", "test/depth/rmse"} <= set(mlrun.data.metrics)
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    records = next(offline.glob("run-*.wandb")).read_bytes()
    assert b"val/semseg/miou" in records and b"val/depth/rmse" in records
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))  # the loggers extra's tensorboardX
