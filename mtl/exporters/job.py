"""The job behind ``mtl-export``: resolve the model folder, export it, print what was written."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtl.atomic import user_path
from mtl.cli.jobs import check_model_given, input_model, input_model_config, start_run
from mtl.exporters.api import (check_format_options, check_model_config, check_replaceable, export, read_report,
                               resolve_tasks)
from mtl.io import write_json


def run_export(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    options = OmegaConf.to_container(cfg.format, resolve=True)
    fmt = options.pop("name")
    check_format_options(fmt, options)  # before the run folder: a misspelt format.<key> leaves none
    check_model_given(cfg, "export")
    tasks = checked_input(cfg, fmt)
    run_dir, output = start_run(cfg, run_dir, default_output=fmt, replaceable=check_replaceable)
    model = input_model(cfg, run_dir, "export")
    out = export(model, fmt, output, tasks=tasks, overwrite=bool(cfg.overwrite), **options)
    report = {**read_report(out), "output": str(Path(out).resolve())}
    write_json(run_dir / "export_report.json", report)  # written last: the run folder's mark of a finished export
    print_summary(out, report)
    return report


def checked_input(cfg: DictConfig, fmt: str) -> list[str] | str | None:
    """``tasks=`` as `export` takes it; ``model=`` judged from its config.json (no tensor read) by the rules the
    export applies, before the run folder: the model by `check_model_config` (a linearized model, timm's own
    refusals), ``tasks=`` by `resolve_tasks`. debug=smoke's model is checked in the run."""
    tasks = cfg.get("tasks")
    if tasks is not None and not isinstance(tasks, str):
        tasks = [str(t) for t in tasks]
    config = input_model_config(cfg)
    if config is not None:
        check_model_config(fmt, config["model"], user_path(str(cfg.model)))
        if tasks is not None:
            resolve_tasks([t["name"] for t in config["model"]["tasks"]], tasks, fmt)
    return tasks


def print_summary(out: Path, report: dict[str, Any]) -> None:
    from mtl.progress_log import summary_console
    from rich.table import Table

    table = Table(title=f"mtl-export: {report['format']}")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for f in sorted(p for p in Path(out).iterdir() if p.is_file()):
        table.add_row(f.name, f"{f.stat().st_size:,}")
    summary_console().print(table)
    summary_console().print(f"exported {report['family']} model ({', '.join(report['tasks'])}) to {out}")


def run(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``mtl-export`` in this process (notebooks, scripts, tests): ``overrides`` as on the command line (a list
    of strings; one job), with the CLI's checks and failure marking (``FAILED``).
    ``run_dir``: the folder the run writes its files to (default: a new ``$MTL_OUTPUT_DIR/<name>/runs/<time>``,
    ``outputs/`` without the variable, as the CLI's; a ``hydra.run.dir=`` override names it too).
    Returns the run's report (as in its ``export_report.json``, with ``output``: the result's path) plus ``run_dir``
    (absolute)."""
    from mtl.cli.in_process import report_in_process

    return report_in_process(run_export, ("mtl.configs.export_app", "mtl.configs"), "export", overrides, run_dir)  # the report, with run_dir
