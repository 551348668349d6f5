"""Experiment loggers beyond csv, created through functions so that a missing optional package is one
clear error naming the extra to install (``logger=tensorboard``, ``logger=mlflow``, ``logger=wandb``).

Metric names stay ``train/<task>/loss``, ``val/<task>/<metric>``: every logger receives what the
module logs, unchanged.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

EXTRA = "loggers"


def require(package: str, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"{what} needs the '{package}' package: pip install 'mtlkit[{EXTRA}]'")


def mlflow_logger(tracking_uri: str, experiment_name: str, run_name: str | None = None, **kwargs: Any):
    """MLflow with a local file store (``file://<dir>``): no server, nothing leaves the machine."""
    require("mlflow", "logger=mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    if tracking_uri.startswith("file:"):
        # MLflow 3 refuses the file store unless asked; a plain folder is what a run folder wants
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri, **kwargs)


def wandb_logger(save_dir: str, project: str, offline: bool = True, **kwargs: Any):
    """Weights & Biases; ``offline=True`` writes runs under ``save_dir/wandb`` for a later ``wandb sync``."""
    require("wandb", "logger=wandb")
    from lightning.pytorch.loggers import WandbLogger

    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")  # no login prompt, no network
        os.environ.setdefault("WANDB_SILENT", "true")
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, offline=offline, **kwargs)


def tensorboard_logger(save_dir: str, name: str = "tensorboard", version: str = "", **kwargs: Any):
    """TensorBoard event files under ``save_dir/name``; Lightning writes them with ``tensorboard`` or,
    lighter, ``tensorboardX`` (the extra installs the latter)."""
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ImportError(f"logger=tensorboard needs the 'tensorboardX' (or 'tensorboard') package: "
                          f"pip install 'mtlkit[{EXTRA}]'")
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=save_dir, name=name, version=version, **kwargs)
