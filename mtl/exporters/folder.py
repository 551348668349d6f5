"""``format=folder``: a Hugging Face-style model folder (``model.safetensors``, ``config.json``,
``README.md`` card) that ``mtl.load_model`` reads, optionally holding only some tasks' heads."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from mtl.exporters.api import EXPORTERS, ExportError, Source, widths_without
from mtl.io import save_model


def _names_task(name: str, dropped: set[str]) -> bool:
    return any(part in dropped for part in name.split("."))


def _without_tasks(cfg: dict[str, Any], dropped: set[str]) -> dict[str, Any]:
    """The model config (with any pruning plan) minus the dropped tasks: their task entries, per-task
    settings (a ``{task: value}`` dict such as ``head_channels``, active decoder widths) and plan entries."""
    cfg = copy.deepcopy(cfg)
    names = {t.get("name") for t in cfg["tasks"]}
    cfg["tasks"] = [t for t in cfg["tasks"] if t.get("name") not in dropped]
    for part in ("backbone", "decoder"):
        for key, value in (cfg.get(part) or {}).items():
            if isinstance(value, dict) and value and set(value) <= names:
                cfg[part][key] = {t: v for t, v in value.items() if t not in dropped}
    if cfg.get("active_widths"):
        cfg["active_widths"] = widths_without(cfg["active_widths"], dropped)
    for key in ("modules", "layers"):
        if isinstance((cfg.get("pruning") or {}).get(key), dict):
            cfg["pruning"][key] = {m: s for m, s in cfg["pruning"][key].items() if not _names_task(m, dropped)}
    return cfg


def keep_tasks(model: nn.Module, tasks: list[str]) -> nn.Module:
    """The same model with only ``tasks``: rebuilt from its config (pruning plan included) without the
    others, holding every weight except the dropped tasks' own (heads, per-task routers)."""
    from mtl.models import model_from_config
    from mtl.models.surgery import model_config

    if tasks == list(getattr(model, "tasks", {})):
        return model
    cfg = model_config(model)
    family = cfg.get("family", "multitask")
    dropped = {t for t in model.tasks if t not in tasks}
    refuse = f"format=folder: the {family!r} family cannot drop tasks {sorted(dropped)}"
    if not isinstance(cfg.get("tasks"), list):
        raise ExportError(f"{refuse} (its config has no task list); export all of them")
    try:
        sub = model_from_config(_without_tasks(cfg, dropped))
    except Exception as e:
        raise ExportError(f"{refuse}: the model without them cannot be built ({type(e).__name__}: {e}); "
                          "export all of them") from None
    expected = sub.state_dict()
    state = {k: v for k, v in model.state_dict().items() if k in expected or not _names_task(k, dropped)}
    bad = next((k for k in state if k not in expected), None) or next((k for k in expected if k not in state), None) \
        or next((k for k in expected if state[k].shape != expected[k].shape), None)
    if bad is not None:
        raise ExportError(f"{refuse}: key {bad!r} does not fit the model without them; export all of them")
    sub.load_state_dict(state, strict=True)
    sub.meta = getattr(model, "meta", {})
    return sub.eval()


@EXPORTERS.register("folder")
def export_folder(source: Source, out: Path, tasks: list[str]) -> dict[str, Any]:
    model = keep_tasks(source.model, tasks)
    meta = dict(source.meta)
    meta["exported_from"] = str(source.folder) if source.folder else None
    if source.config.get("active_widths"):  # a slimmable model at chosen widths: its run's metrics are the full widths'
        meta.pop("test", None)
    elif source.metrics is not None:
        meta["test"] = {t: v for t, v in source.metrics.items() if t in tasks}
    save_model(model, out, meta=meta, overwrite=True)
    return {"files": ["model.safetensors", "config.json", "README.md"], "load": 'mtl.load_model("<folder>")',
            "tasks": list(model.tasks),  # the folder's order (the model's), whatever order `tasks` named them in
            "parameters": sum(p.numel() for p in model.parameters())}
