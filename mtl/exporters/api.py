"""``mtl.export``: one entry point, one registry of formats, one atomic output folder per export."""
from __future__ import annotations

import copy
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mtl.io import (atomic_path, check_output_apart, holds_user_files, load_model, model_skeleton, read_json,
                    read_model_config, user_path, write_json)
from mtl.registry import Registry, check_bool

#: format name -> ``fn(source, out_dir, tasks, **options) -> report dict`` (writes into out_dir)
EXPORTERS: "Registry[Callable[..., dict[str, Any]]]" = Registry("export format")
REPORT = "export.json"
CARD = "README.md"


class ExportError(RuntimeError):
    """An export that cannot be written or does not reproduce the PyTorch model."""


@dataclass
class Source:
    """The model being exported and everything known about how it was made."""

    model: nn.Module
    folder: Path | None
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] | None = None  # test metrics of the run that made it
    metrics_file: Path | None = None
    run_metrics: dict[str, Any] | None = None  # that run's whole metrics.json

    @property
    def family(self) -> str:
        return self.config.get("family", "multitask")


def load_source(model: str | os.PathLike | nn.Module) -> Source:
    """A model folder (validated file by file, errors name the file) or an in-memory model (copied,
    so exporting never changes it)."""
    if isinstance(model, nn.Module):
        if not hasattr(model, "config"):
            raise TypeError(f"{type(model).__name__} has no `config`: only mtlkit model families can be exported")
        from mtl.models.surgery import model_config  # the config with any pruning plan, as a folder stores it

        cast = next(((k, v.dtype) for k, v in model.state_dict().items()
                     if v.is_floating_point() and v.dtype != torch.float32), None)
        if cast is not None:  # ONNX Runtime would fail on the graph with an error naming a temporary file
            raise ValueError(f"export: key {cast[0]!r} is {cast[1]}; export float32 models (call model.float() "
                             "first; exported graphs and folders hold float32 weights)")

        src = Source(copy.deepcopy(model).cpu().eval(), None, model_config(model),
                     dict(getattr(model, "meta", {}) or {}))
    else:
        folder = user_path(model).resolve()  # provenance (exported_from, export.json) must read from anywhere
        cfg = read_model_config(folder)
        src = Source(load_model(folder), folder, cfg["model"], cfg.get("meta", {}) or {})
    src.metrics_file, src.run_metrics = _find_run_metrics(src)
    src.metrics = _test_metrics(src.run_metrics) or src.meta.get("test")
    return src


def _find_run_metrics(src: Source) -> tuple[Path | None, dict[str, Any] | None]:
    """The ``metrics.json`` of the run that wrote the folder: beside it (mtl-train, mtl-merge put the
    model at ``<run_dir>/model``) or in the run folder its meta names. Never for a pruned model: a run
    folder's test metrics describe the model it trained (``mtl-prune`` stores its own in ``meta.test``),
    unless the pruned model was then fine-tuned (``meta.init_from``): that run trained this very model."""
    if (src.config.get("pruning") and not src.meta.get("init_from")) or src.meta.get("tested"):
        # meta.tested: the run scored other models (TALL's per-task models), not this folder
        return None, None
    candidates = []
    if src.folder is not None:
        candidates.append(src.folder.parent / "metrics.json")
    if src.meta.get("run_dir"):
        candidates.append(Path(src.meta["run_dir"]) / "metrics.json")
    for path in candidates:
        if path.is_file():
            try:
                data = read_json(path)
            except ValueError:
                continue  # a broken neighbour is not this model's problem; the card says none found
            if isinstance(data, dict) and _test_metrics(data) and _agrees(_test_metrics(data), src.meta.get("test")):
                return path, data
    return None, None


def _agrees(run: dict[str, dict[str, float]], own: dict[str, Any] | None) -> bool:
    """A run's test metrics belong to this model unless the folder records other ones (a pruned or
    otherwise derived model whose meta still points at its parent's run)."""
    if not isinstance(own, dict) or not own:
        return True
    shared = [(t, m) for t, v in own.items() if isinstance(v, dict) for m in v if m in (run.get(t) or {})]
    return all(abs(float(run[t][m]) - float(own[t][m])) <= 1e-9 * max(1.0, abs(float(own[t][m])))
               for t, m in shared)


def _test_metrics(run: dict[str, Any] | None) -> dict[str, dict[str, float]] | None:
    if not run:
        return None
    if isinstance(run.get("test"), dict) and run["test"]:
        return run["test"]  # mtl-train
    tasks = run.get("tasks")
    if isinstance(tasks, dict) and all(isinstance(v, dict) and "merged" in v for v in tasks.values()):
        return {t: v["merged"] for t, v in tasks.items()}  # mtl-merge
    return None


def resolve_tasks(model: nn.Module | Sequence[str], tasks: str | Sequence[str] | None,
                  format: str | None = None) -> list[str]:
    """The tasks ``tasks`` picks (all for None) of ``model``: a model, or the task names its folder's config.json
    lists (mtl-export checks ``tasks=`` so before its run folder). Unknown, repeated or no names are refused, and
    with ``format`` what that format's exporter refuses (its ``check_tasks(picked, names)``: timm takes no subset)."""
    names = [str(t) for t in model] if isinstance(model, (list, tuple)) else list(getattr(model, "tasks", {}) or [])
    picked = names if tasks is None else _picked(names, tasks)
    check = getattr(EXPORTERS.get(format), "check_tasks", None) if format is not None else None
    if check is not None:
        check(picked, names)
    return picked


def _picked(names: list[str], tasks: str | Sequence[str]) -> list[str]:
    if not isinstance(tasks, str) and len(tasks) == 0:
        raise ValueError(f"tasks=[] selects no task to export; pass some of {', '.join(names)} (or null for all)")
    wanted = [tasks] if isinstance(tasks, str) else list(tasks)
    repeated = sorted({t for t in wanted if wanted.count(t) > 1})
    if repeated:
        raise ValueError(f"tasks names {repeated} more than once; each exported task is one output")
    unknown = [t for t in wanted if t not in names]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown} for export; this model has: {', '.join(names)}")
    return wanted


def check_format_options(fmt: str, options: dict[str, Any]) -> Callable:
    """The exporter of format ``fmt``, its ``options`` checked (names, with a did-you-mean, and scalar types; and
    the values the settings alone decide, by the exporter's ``check_options`` if it has one, given every option
    with its default filled in) without exporting: mtl-export refuses a bad ``format.<key>`` before its run folder
    exists."""
    from mtl.registry import check_kwargs, meant

    fn = EXPORTERS.get(fmt)
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("source", "out", "tasks")]
    bad = [k for k in options if k not in allowed]
    if bad:
        raise TypeError(f"format={fmt} has no option(s) {bad}{meant(bad, allowed)}; its options: "
                        f"{', '.join(allowed) or '(none)'}")
    check_kwargs(fn, options, "format")  # errors name the CLI key: format.opset ...
    check = getattr(fn, "check_options", None)
    if check is not None:  # e.g. format.opset=17 with the dynamo exporter (it writes 18 and up)
        params = inspect.signature(fn).parameters
        check(**{k: options.get(k, params[k].default) for k in allowed})
    return fn


def check_family(fmt: str, family: str) -> None:
    """Refuse a model family that format ``fmt`` cannot write."""
    if family == "linearized" and fmt != "folder":
        # its forward is f(θ0) + J·(θ − θ0) through torch.func.jvp: no tracer writes that, and θ as plain
        # weights (timm) would be another function
        raise ValueError(f"format={fmt} cannot export a linearized model (it computes f(θ0) + J(θ − θ0) with "
                         "forward-mode autodiff, which ONNX cannot express and timm weights would not reproduce); "
                         "format=folder copies it as a model folder")


def check_model_config(fmt: str, config: dict[str, Any], folder: str | os.PathLike | None = None) -> None:
    """What format ``fmt`` refuses of a model that its config (config.json's ``"model"``) shows, no tensor read:
    its family (`check_family`) and the exporter's own ``check_model(config, skeleton)`` (timm: a timm backbone,
    not pruned), given the model built on the meta device from ``folder`` (`model_skeleton`; None without one).
    mtl-export calls it before its run folder; the exporters' checks on the loaded model stay the guard."""
    check_family(fmt, config.get("family", "multitask"))
    check = getattr(EXPORTERS.get(fmt), "check_model", None)
    if check is not None:
        check(config, model_skeleton(folder) if folder is not None else None)


def check_replaceable(out: Path) -> None:
    """An existing ``out`` may be replaced only when it is an earlier export (mtl-export checks it before its run
    folder): never a run folder or anything else that happens to be there."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file, not an earlier export (a folder); refusing to replace it")
    if out.is_dir() and holds_user_files(out) and not (out / REPORT).is_file():
        raise FileExistsError(f"{out} exists and is not an earlier export (no {REPORT}); refusing to replace it")


def export(
    model: str | os.PathLike | nn.Module,
    format: str = "onnx",
    out: str | os.PathLike | None = None,
    *,
    tasks: str | Sequence[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Export ``model`` (a model folder or a loaded mtlkit model) to ``out`` in ``format``
    (``onnx``, ``timm``, ``folder``; see ``mtl.exporters.EXPORTERS``); returns the output folder.
    ``out`` is required (it defaults to None only so that leaving it out gets a clear error).

    ``tasks`` picks a subset of heads (``onnx`` and ``folder``); ``options`` go to the format
    (e.g. ``opset=18`` for ONNX). An existing ``out`` is replaced only with ``overwrite=True``.
    """
    if not isinstance(model, (str, os.PathLike, nn.Module)):
        raise TypeError(f"export: model must be a model folder (a path) or a loaded mtlkit model, "
                        f"got {type(model).__name__}")
    check_bool("overwrite", overwrite)  # bool("no") is True: a text "no" would replace an existing output
    fn = check_format_options(format, options)
    if out is None:
        raise ValueError("export needs an output folder: out=<path>")
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"export: out must be the output folder's path, got {type(out).__name__}")
    out = user_path(out)
    if out.exists() and not out.is_dir():  # overwrite=True would not replace a file either: not advised
        check_replaceable(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=true to replace it")
    if not isinstance(model, nn.Module):
        check_output_apart(out, [Path(model)])  # inside the model folder too: an input is never altered
    check_replaceable(out)
    src = load_source(model)
    check_family(format, src.family)
    names = resolve_tasks(src.model, tasks, format)
    start = time.perf_counter()
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.mkdir()
        details = fn(src, tmp, names, **options)
        report = {
            "format": format,
            "source": str(src.folder) if src.folder else None,
            "family": src.family,
            "tasks": names,
            **({"widths": widths_without(src.config["active_widths"], set(src.model.tasks) - set(names))} if src.config.get("active_widths")
               else {}),
            **details,
            "seconds": round(time.perf_counter() - start, 2),
        }
        from mtl.exporters.card import render_card

        (tmp / CARD).write_text(render_card(src, report))
        write_json(tmp / REPORT, report)
    return out


def widths_without(widths: dict[str, Any], dropped: set[str]) -> dict[str, Any]:
    """A slimmable model's active widths minus the dropped tasks' decoder widths (a subset export's)."""
    dec = widths.get("decoders")
    return {**widths, "decoders": {t: w for t, w in dec.items() if t not in dropped}} if isinstance(dec, dict) else widths


def read_report(out: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(out) / REPORT).read_text())


def image_hw(size: Any) -> tuple[int, int] | None:
    """(H, W) of an int side or an [H, W] pair of positive ints; None for anything else."""
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    if ok(size):
        return int(size), int(size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(ok(v) for v in size):
        return int(size[0]), int(size[1])
    return None


def trained_image_size(src: "Source") -> tuple[int, int] | None:
    """The (H, W) the model was trained at, as its folder records it: ``meta.data.size``, else
    ``meta.image_size`` (a merge of members trained on other data at one size); None if neither."""
    data = src.meta.get("data") or {}
    recorded = image_hw(data.get("size")) if isinstance(data, dict) else None
    return recorded or image_hw(src.meta.get("image_size"))
