"""``format=folder``: a Hugging Face-style model folder (``model.safetensors``, ``config.json``,
``README.md`` card) that ``mtl.load_model`` reads, optionally holding only some tasks' heads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mtl.exporters.api import EXPORTERS, ExportError, Source
from mtl.io import save_model


def keep_tasks(model: nn.Module, tasks: list[str]) -> nn.Module:
    """The same model with only ``tasks``' heads (families that store their tasks as a config list
    and their heads under ``decoder.heads.<task>``)."""
    cfg = model.config
    if tasks == list(getattr(model, "tasks", {})):
        return model
    if not isinstance(cfg.get("tasks"), list):
        raise ExportError(f"format=folder: the {cfg.get('family')!r} family cannot drop tasks; export all of them")
    from mtl.models import model_from_config

    sub_cfg = dict(cfg, tasks=[t for t in cfg["tasks"] if t.get("name") in tasks])
    sub = model_from_config(sub_cfg)
    dropped = tuple(f"decoder.heads.{t}." for t in model.tasks if t not in tasks)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(dropped)}
    try:
        sub.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"format=folder: the {cfg.get('family')!r} family cannot drop tasks ({str(e).splitlines()[0]}); "
                          "export all of them") from None
    return sub.eval()


@EXPORTERS.register("folder")
def export_folder(source: Source, out: Path, tasks: list[str]) -> dict[str, Any]:
    model = keep_tasks(source.model, tasks)
    meta = dict(source.meta)
    meta["exported_from"] = str(source.folder) if source.folder else None
    if source.metrics is not None:
        meta["test"] = {t: v for t, v in source.metrics.items() if t in tasks}
    save_model(model, out, meta=meta, overwrite=True)
    return {"files": ["model.safetensors", "config.json", "README.md"], "load": 'mtl.load_model("<folder>")',
            "parameters": sum(p.numel() for p in model.parameters())}
