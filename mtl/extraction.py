"""``mtl.extract`` (defined here, in ``mtl.extraction``, so the name stays a function): turn a model into a smaller standalone one (a task's sub-network, a width setting).

Each model family that supports extraction implements ``extract_subnetwork(**kwargs) -> nn.Module``
returning a plain, reloadable model (its own ``config`` + weights); this function only dispatches,
checks the request and optionally writes the model folder.
"""
from __future__ import annotations

import os
from typing import Any

from torch import nn


def extract(model: nn.Module, *, out: str | os.PathLike | None = None, overwrite: bool = False, **kwargs: Any) -> nn.Module:
    """``extract(model, task="depth", calib=batches)`` (task-routed MoE) or
    ``extract(model, widths={...})`` (slimmable). With ``out=`` the result is also saved as a model folder."""
    fn = getattr(model, "extract_subnetwork", None)
    if fn is None:
        family = getattr(model, "config", {}).get("family", type(model).__name__)
        raise TypeError(f"model family {family!r} does not support extraction "
                        "(supported: task-routed MoE models by task, slimmable models by widths)")
    sub = fn(**kwargs)
    if out is not None:
        from mtl.io import save_model

        meta = {"extracted_from": getattr(model, "meta", {}).get("run_dir"), "extract": _jsonable(kwargs)}
        if getattr(sub, "extraction_report", None):  # what the family measured while extracting
            meta["report"] = sub.extraction_report
        save_model(sub, out, meta=meta, overwrite=overwrite)
    return sub


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}
