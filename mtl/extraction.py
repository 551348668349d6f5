"""``mtl.extract`` (defined here, in ``mtl.extraction``, so the name stays a function): turn a model into a smaller standalone one (a task's sub-network, a width setting).

Each model family that supports extraction implements ``extract_subnetwork(**kwargs) -> nn.Module``
returning a plain, reloadable model (its own ``config`` + weights); this function only dispatches,
checks the request and optionally writes the model folder.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Mapping

import torch
from torch import nn

from mtl.io import is_plain_json, require_model
from mtl.registry import check_bool


def extract(model: nn.Module, *args: Any, out: str | os.PathLike | None = None, overwrite: bool = False,
            run_dir: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """``extract(model, task="depth", calib=batches)`` (task-routed MoE; ``extract(model, "depth", batches)``
    too: positional arguments are the family's, in its order) or
    ``extract(model, widths={...})`` (slimmable: widths not named keep the model's current ones, and
    ``extract(model)`` takes the current configuration as it is). With ``out=`` the result is also saved
    as a model folder whose meta records the full configuration used (``extract.widths``) and, when
    given, the ``run_dir`` that made it (mtl-extract's run folder, which model cards name). The model is left as
    it was (weights, every module's train/eval mode) and so are torch's random streams."""
    require_model(model, "extract")
    check_bool("overwrite", overwrite)
    if args:
        kwargs = _as_keywords(model, args, kwargs)
    check_request(model, kwargs)
    fn = model.extract_subnetwork
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # the sub-network's random init is overwritten: not the caller's stream
        sub = fn(**kwargs)
    # the settings the family used, defaults included, so the folder says how it was made
    defaults = {n: p.default for n, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty and n not in kwargs}
    if out is not None:
        from mtl.io import save_model

        parent = getattr(model, "meta", None) or {}
        report = getattr(sub, "extraction_report", None) or {}
        request = _describe({**defaults, **kwargs})
        if "widths" in report:  # the configuration used: the request over the parent's current widths
            request = {**request, "widths": report["widths"], "requested_widths": request.get("widths")}
            calibrated = calibrations_used(parent, report["widths"])
            if calibrated:  # BN statistics estimated by calibrate_widths (mtl-extract: on calib.batches), not trained
                request["calibrated_widths"] = calibrated
        meta = {"extracted_from": parent.get("run_dir"), "extract": request,
                # the training data and seed stay true of the sub-network (mtl-prune, mtl-export use the size)
                **{k: parent[k] for k in ("data", "seed") if parent.get(k) is not None}}
        if run_dir is not None:
            meta["run_dir"] = str(run_dir)
        measured = {k: v for k, v in report.items() if k != "widths"}
        if measured:  # what the family measured while extracting
            meta["report"] = measured
        save_model(sub, out, meta=meta, overwrite=overwrite)
    return sub


def calibrations_used(meta: Mapping[str, Any] | None, widths: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The entries of a slimmable model's ``meta["calibrated_widths"]`` (``{"0.6": {"batches": 8, "split":
    "train"}}``) for the widths an extraction used (``widths``: ``{"encoder": w, "decoders": {task: w}}``): what
    the extracted folder's ``meta.extract`` and mtl-extract's report record under ``calibrated_widths``."""
    from mtl.models.slimmable.layers import wkey

    # by the key calibrate_widths wrote (6 significant digits): float(key) == width only when it prints so
    used = {wkey(w) for w in (widths["encoder"], *widths["decoders"].values())}
    return {k: dict(v) for k, v in ((meta or {}).get("calibrated_widths") or {}).items() if k in used}


def _as_keywords(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments named by the family's ``extract_subnetwork`` signature, in its order."""
    fn = getattr(model, "extract_subnetwork", None)
    if fn is None:
        check_request(model, kwargs)  # raises: no extraction
    names = [n for n, p in inspect.signature(fn).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"model family {_family(model)!r} extracts with ({_accepted(fn)}); got "
                        f"{len(args)} positional arguments")
    twice = [n for n in names[:len(args)] if n in kwargs]
    if twice:
        raise TypeError(f"extract: {twice[0]} given both by position and as {twice[0]}=")
    return {**dict(zip(names, args)), **kwargs}


def check_request(model: nn.Module, kwargs: dict[str, Any], family: str | None = None) -> None:
    """Refuse a family without extraction, arguments the model's family does not extract by (naming the
    ones it takes), then values the family refuses (its optional ``check_extraction(**kwargs)``). ``family``: its
    name where the model cannot say it (one built on the meta device, whose config reads its buffers)."""
    family = family or _family(model)
    fn = getattr(model, "extract_subnetwork", None)
    if fn is None:
        raise TypeError(f"model family {family!r} does not support extraction "
                        "(supported: task-routed MoE models by task, slimmable models by widths)")
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise TypeError(f"model family {family!r} extracts with ({_accepted(fn)}); got "
                        f"({', '.join(f'{k}=' for k in kwargs) or 'nothing'}): {e}") from None
    check = getattr(model, "check_extraction", None)
    if check is not None:
        check(**kwargs)


def _family(model: nn.Module) -> str:
    return getattr(model, "config", {}).get("family", type(model).__name__)


def _accepted(fn) -> str:
    """The arguments a family's ``extract_subnetwork`` takes, as an error lists them (``task=, calib=``)."""
    return ", ".join(f"{n}=" for n in inspect.signature(fn).parameters)


def _describe(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The request as plain JSON for the folder's config: settings kept, data (calibration batches)
    reduced to a count; never images or labels in a folder meant for shipping."""
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if v is None or is_plain_json(v) and not isinstance(v, (list, tuple)):
            out[k] = v
        elif isinstance(v, (torch.Tensor, Mapping)):  # one batch (images, or a dict holding them)
            out[f"{k}_batches"] = 1
        elif hasattr(v, "__len__"):  # a list of batches, a DataLoader
            out[f"{k}_batches"] = len(v)
        elif is_plain_json(v):
            out[k] = v
    return out
