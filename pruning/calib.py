"""Calibration data (a few batches the pruner scores channels and losses on) and per-task losses."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from mtl.data.calibration import calibration_batches  # noqa: F401  (re-exported: pruning.calib is its documented home)
from mtl.modes import eval_mode


def datamodule_for(model: nn.Module, data: Mapping[str, Any] | None = None, source: str | Path | None = None):
    """The data module a model was trained on (``meta.data`` of its folder), with ``data`` overrides.

    ``data`` may also be a whole data config (it then needs ``name``)."""
    from mtl.data import create_datamodule
    from mtl.folder_data import rebuild_config

    where = f"{Path(source) / 'config.json'}" if source else "the model's meta"
    kw = rebuild_config(getattr(model, "meta", {}).get("data") or {}, dict(data or {}), where, "data")
    if "name" not in kw:
        raise ValueError(f"{where} has no meta.data (the data the model was trained on), so there is no calibration "
                         "data; pass a data config, e.g. data={name: scenes, size: 64}")
    name = kw.pop("name")
    try:
        dm = create_datamodule(name, **kw)
        dm.setup("fit")
        dm.setup("test")
    except (KeyError, TypeError, ValueError, FileNotFoundError, OSError) as e:
        raise ValueError(f"calibration data from {where} ({name!r}, {kw}) cannot be loaded: {e}") from None
    return dm


def as_batches(calib: Any) -> list[dict[str, torch.Tensor]]:
    if isinstance(calib, Mapping):
        return [dict(calib)]
    if isinstance(calib, Iterable):
        batches = list(calib)
        if batches and all(isinstance(b, Mapping) and "image" in b for b in batches):
            return [dict(b) for b in batches]
    raise ValueError("calib must be a batch or a list of batches: dicts with 'image' and each task's target")


def task_losses(model: nn.Module, batches: list[dict[str, torch.Tensor]], tasks: Iterable[str] | None = None) -> dict[str, float]:
    """Mean loss of every task over the calibration batches (eval mode, no gradients)."""
    names = list(tasks or model.tasks)
    totals = {t: 0.0 for t in names}
    with eval_mode(model), torch.no_grad():
        for b in batches:
            out = model(b["image"], tasks=names)
            for t in names:
                task = model.tasks[t]
                if task.target_key not in b:
                    raise KeyError(f"calibration batch has no target {task.target_key!r} for task {t!r} "
                                   f"(it holds {sorted(b)})")
                totals[t] += float(task.loss(out[t], b[task.target_key]))
    return {t: v / len(batches) for t, v in totals.items()}
