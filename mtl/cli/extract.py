"""``mtl-extract``: a standalone sub-network of a model folder — one task of a task-routed MoE model,
or one width setting of a slimmable model.

    mtl-extract model=<folder> tasks=depth [calib.batches=8] [min_share=0.0]
    mtl-extract model=<slimmable folder> 'widths={encoder: 0.5, decoders: {depth: 1.0}}'
    mtl-extract debug=smoke              # trains a tiny real task-MoE model first, in seconds
    mtl-extract debug=smoke 'widths={encoder: 0.5}'   # the same with a tiny slimmable model

(`tasks=`, as in mtl-export: `task` is the training config group, which Hydra would try to load.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mtl.atomic import user_path
from mtl.cli.common import cli_main, run_job
from mtl.cli.jobs import (check_input_folders, check_model_given, input_folders, input_model, input_task_names,
                           start_run)
from mtl.extraction import calibrations_used, check_request
from mtl.folder_data import data_record
from mtl.registry import check_int


def _calibrate_new_widths(model, widths: dict[str, Any], cfg: DictConfig) -> list[dict[str, Any]]:
    """The requested widths outside the model's width set get BN statistics of their own from ``calib.batches``
    batches of ``calib.split`` (``model.calibrate_widths``, as in Python), so any width in (0, 1] extracts;
    widths in the set keep their trained statistics. Values that are no width are left to the extraction's errors.
    Returns the batches read (none when every width is in the set); ``model.meta["calibrated_widths"]`` records
    the widths, their batch count and split."""
    from collections.abc import Mapping

    from mtl.models.slimmable.layers import OneValuePerChannel, width_index, wkey
    from mtl.progress_log import emit

    dec = widths.get("decoders")
    values = [widths.get("encoder"), *(dec.values() if isinstance(dec, Mapping) else [dec])]
    new = sorted({float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and 0.0 < float(v) <= 1.0 and width_index(model.width_set, float(v)) is None})
    if not new:
        return []
    batches = calibration_batches(model, cfg, why=f"widths {new} outside the width set (BN recalibration)")
    old = list(model.width_set)
    try:
        model.calibrate_widths(new, batches)
    except OneValuePerChannel as e:  # say which setting made the batches
        size = data_config(model, cfg).get("batch_size")
        raise ValueError(f"{e} (calib.data.batch_size={size}{'; set it to 2 or more' if size == 1 else ''})") from None
    for w in new:  # calibrate_widths recorded the batch count; which split they came from is the CLI's to say
        model.meta["calibrated_widths"][wkey(w)]["split"] = cfg.calib.split
    emit(f"[mtl-extract] widths {new} are not in the model's width set {old}: their BN "
         f"statistics estimated on {len(batches)} {cfg.calib.split} batches (calib.batches, calib.split)")
    return batches


def _one_task(tasks) -> str:
    names = [tasks] if isinstance(tasks, str) else list(tasks or [])
    if not names:
        raise ValueError("say what to extract: tasks=<name> (a task-routed MoE model) or "
                         "'widths={encoder: 0.5, decoders: {depth: 1.0}}' (a slimmable model)")
    if len(names) != 1:
        raise ValueError(f"pass exactly one task to extract: tasks=<name> (got {names})")
    return str(names[0])


def data_config(model, cfg: DictConfig) -> dict[str, Any]:
    """The model's own data config (its folder's meta) updated by ``calib.data``, checked for this machine."""
    from mtl.folder_data import rebuild_config

    given = OmegaConf.to_container(cfg.calib.data, resolve=True) if cfg.calib.get("data") else {}
    file = user_path(str(cfg.model)) / "config.json" if cfg.get("model") else "the model's meta"
    return rebuild_config(getattr(model, "meta", {}).get("data") or {}, given, file, "calib.data")


def calibration_batches(model, cfg: DictConfig, limit: int | None = None, why: str = "calib") -> list[dict[str, Any]]:
    """``calib.batches`` (at most ``limit``) batches of the model's own data (its folder's meta), or of
    ``calib.data``; fewer batches than asked for is an error naming the split."""
    from mtl.data import create_datamodule
    from mtl.data.calibration import calibration_batches as first_batches

    data = data_config(model, cfg)
    if "name" not in data:
        raise ValueError(f"{why}: the model folder's meta has no data config; pass calib.data={{name: ..., size: ...}}")
    n = check_int("calib.batches", cfg.calib.batches, low=1)
    n = min(n, limit or n)
    dm = create_datamodule(**_checked_calib_data(data))
    dm.prepare_data()
    dm.setup("fit")
    return first_batches(dm, n, cfg.calib.split)  # dataset order: the same command keeps the same experts


def _checked_calib_data(data: dict[str, Any]) -> dict[str, Any]:
    """The data settings named as the user sets them (``calib.data.<key>``): unknown and missing ones."""
    import inspect

    from mtl.data import DATAMODULES
    from mtl.registry import check_kwargs

    cls = DATAMODULES.get(data["name"])
    kwargs = {k: v for k, v in data.items() if k != "name"}
    check_kwargs(cls, kwargs, "calib.data")
    missing = [n for n, p in inspect.signature(cls).parameters.items()
               if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and n not in kwargs]
    if missing:
        raise ValueError(f"calib.data.{missing[0]} is required for data {data['name']!r} (e.g. 'calib.data={{name: "
                         f"{data['name']}, {missing[0]}: ...}}')")
    return data


def _check_family(model, family: str, widths: dict[str, Any] | None, task: str | None, cfg: DictConfig) -> None:
    """Before any data: ``model``'s ``family`` extracts at all, and by this request (``widths=`` from slimmable models,
    ``tasks=`` from task-routed MoE models, as the CLI names them)."""
    by_widths = getattr(model, "width_set", None) is not None  # slimmable models only
    if widths is not None and not by_widths and hasattr(model, "extract_subnetwork"):  # the CLI's names, not Python's
        raise ValueError(f"widths= extracts from slimmable models; this {family!r} model extracts a task's "
                         "sub-network: pass tasks=<name> (with calib.* and min_share) instead")
    if widths is None and by_widths and cfg.get("tasks"):
        raise ValueError(f"tasks= extracts from task-routed MoE models; this {family!r} model extracts a width "
                         "configuration: pass 'widths={encoder: 0.5, decoders: {<task>: 1.0}}' instead")
    check_request(model, {"widths": widths} if widths is not None
                  else {"task": task, "calib": [], "min_share": cfg.min_share}, family)


def run_extract(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    import mtl
    from mtl.flops import model_stats
    from mtl.io import write_json

    widths = cfg.get("widths")
    if widths is not None and not OmegaConf.is_dict(widths):
        raise ValueError(f"widths must be a mapping like 'widths={{encoder: 0.5, decoders: {{depth: 1.0}}}}', got {widths!r}")
    widths = OmegaConf.to_container(widths, resolve=True) if widths is not None else None
    if widths is not None and cfg.get("tasks"):
        raise ValueError("pass tasks= (a task-routed MoE model) or widths= (a slimmable model), not both")
    smoke = bool(cfg.get("smoke_model")) and not cfg.get("model")
    tasks = cfg.get("tasks") or ("depth" if smoke and widths is None else None)  # debug=smoke's default request
    task = _one_task(tasks) if widths is None else None
    check_model_given(cfg, "extract from")
    from mtl.data.calibration import check_calib_settings

    check_calib_settings(cfg.calib.split, cfg.calib.batches)  # settings alone: before the run folder
    if widths is None:  # as given: float() would read a bool as 0 or 1 and a string as a number, naming nothing
        from mtl.models.task_moe_extract import check_min_share

        check_min_share(cfg.min_share)
    names = input_task_names(cfg) if task is not None else None
    if names is not None:  # the folder's config.json names its tasks: an unknown one is refused as the model refuses it
        from mtl.models.multitask import select_tasks

        select_tasks(names, [task])
    if cfg.get("model"):  # the folder's model as its config.json describes it (no weights read; None: not on meta)
        from mtl.io import model_skeleton, read_model_config
        from mtl.models.families import DEFAULT_FAMILY

        check_input_folders(input_folders(cfg))  # a missing or corrupt folder named as start_run names it
        if (skeleton := model_skeleton(user_path(str(cfg.model)))) is not None:
            family = read_model_config(user_path(str(cfg.model)))["model"].get("family", DEFAULT_FAMILY)
            _check_family(skeleton, family, widths, task, cfg)
    elif widths is not None:  # debug=smoke trains a slimmable model in the run folder: what needs none is judged now
        from mtl.models.slimmable import SlimmableMultiTaskModel

        SlimmableMultiTaskModel.check_width_values(widths)
    run_dir, output = start_run(cfg, run_dir, model_output=True)  # the request and its inputs checked first
    folder = input_model(cfg, run_dir, "extract from",
                         experiment="scenes_slimmable" if widths is not None else "scenes_task_moe_vit")
    model = mtl.load_model(folder)
    width_set = getattr(model, "width_set", None)  # slimmable models only
    by_widths = width_set is not None
    # (a smoke model's tasks and width set are judged only now)
    _check_family(model, getattr(model, "config", {}).get("family", "multitask"), widths, task, cfg)
    batches = _calibrate_new_widths(model, widths, cfg) if widths is not None and by_widths else []
    if widths is not None:
        # one image to count FLOPs at: the calibration's first batch, else the data's first (read once either way)
        batches = batches or calibration_batches(model, cfg, limit=1, why="widths= (one image to count FLOPs at)")
        if not getattr(model, "meta", {}).get("data"):  # the folder written next says what size its inputs are
            model.meta = {**getattr(model, "meta", {}), "data": data_record(data_config(model, cfg))}
        sub = mtl.extract(model, out=output, overwrite=bool(cfg.overwrite), run_dir=run_dir, widths=widths)
        report = {"widths": sub.extraction_report["widths"], "requested_widths": widths}
        used = calibrations_used(model.meta, report["widths"])
        if used:  # as the extracted folder's meta.extract records them: keyed by width
            report["calibrated_widths"] = used
    else:
        batches = calibration_batches(model, cfg)
        sub = mtl.extract(model, out=output, overwrite=bool(cfg.overwrite), run_dir=run_dir, task=task,
                          calib=batches, min_share=cfg.min_share)
        report = dict(getattr(sub, "extraction_report", {}))
    x = batches[0]["image"][:1]
    if width_set:  # a slimmable parent is measured at full width, whatever it was saved at
        model.set_widths(encoder=max(width_set), decoders=max(width_set))
    report.update({"model": str(Path(folder).resolve()), "output": str(Path(output).resolve()),
                   "parent": model_stats(model, x), "extracted": model_stats(sub, x)})
    if width_set:
        report["parent_widths"] = f"the widest configuration (encoder and every decoder at {max(width_set):g})"
    write_json(run_dir / "extract_report.json", report)
    print_summary(report)
    return report


def print_summary(report: dict[str, Any]) -> None:
    from mtl.progress_log import summary_console
    from rich.table import Table

    t = report.get("task")
    table = Table(title=f"mtl-extract: task {t}" if t else f"mtl-extract: widths {report['widths']}")
    for col in ("model", "params", f"FLOPs/sample ({t or 'all tasks'})") + (("experts",) if t else ()):
        table.add_column(col)

    def row(name, key, experts):
        stats = report[key]
        flops = (stats["flops_per_task"][t] if t else stats["flops_all_tasks"]) / 1e6
        table.add_row(name, f"{stats['params']:,}", f"{flops:.2f}M", *((str(report.get(experts, "")),) if t else ()))

    row("parent", "parent", "experts_total")
    row("extracted", "extracted", "experts_kept_total")
    console = summary_console()
    console.print(table)
    if "dropped_token_share" in report:
        console.print("share of the task's routed tokens that went to dropped experts, per MoE layer: "
                      + ", ".join(f"{s:.4f}" for s in report["dropped_token_share"]))


@hydra.main(version_base="1.3", config_path="pkg://mtl.configs.extract_app", config_name="extract")
def _main(cfg: DictConfig) -> None:
    run_job(cfg, run_extract)


def main() -> None:
    cli_main(_main, "mtl.configs.extract_app", "mtl.configs")


def run(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``mtl-extract`` in this process (notebooks, scripts, tests): ``overrides`` as on the command line (a list
    of strings; one job), with the CLI's checks and failure marking (``FAILED``).
    ``run_dir``: the folder the run writes its files to (default: a new ``$MTL_OUTPUT_DIR/<name>/runs/<time>``,
    ``outputs/`` without the variable, as the CLI's; a ``hydra.run.dir=`` override names it too).
    Returns the run's report (as in its ``extract_report.json``, with ``output``: the result's path) plus ``run_dir``
    (absolute)."""
    from mtl.cli.in_process import report_in_process

    return report_in_process(run_extract, ("mtl.configs.extract_app", "mtl.configs"), "extract", overrides, run_dir)  # the report, with run_dir


if __name__ == "__main__":
    main()
