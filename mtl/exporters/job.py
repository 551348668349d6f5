"""The job behind ``mtl-export``: resolve the model folder, export it, print what was written."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtl.exporters.api import export, read_report


def build_smoke_model(root: Path) -> Path:
    """A seconds-long real model: scenes semseg + depth + classification on timm's test backbone."""
    from mtl.train import run

    run_dir = run(["experiment=scenes_hps", "debug=smoke", "viz.num_samples=0", "logger=none",
                   "task=[semseg,depth,classification]"], run_dir=root)
    return run_dir / "model"


def run_export(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    options = OmegaConf.to_container(cfg.format, resolve=True)
    fmt = options.pop("name")
    output = Path(cfg.output) if cfg.get("output") else run_dir / fmt
    if output.exists() and not cfg.overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=true to replace it")
    if cfg.get("model"):
        model = Path(cfg.model)
    elif cfg.get("smoke_model"):
        model = build_smoke_model(run_dir / "smoke_model")
    else:
        raise ValueError("nothing to export: pass model=<model folder> (or debug=smoke for a tiny one)")
    tasks = cfg.get("tasks")
    if tasks is not None and not isinstance(tasks, str):
        tasks = [str(t) for t in tasks]
    out = export(model, fmt, output, tasks=tasks, overwrite=bool(cfg.overwrite), **options)
    report = read_report(out)
    print_summary(out, report)
    return report


def print_summary(out: Path, report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mtl-export: {report['format']}")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for f in sorted(p for p in Path(out).iterdir() if p.is_file()):
        table.add_row(f.name, f"{f.stat().st_size:,}")
    Console().print(table)
    Console().print(f"exported {report['family']} model ({', '.join(report['tasks'])}) to {out}")


def run(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Compose the ``mtl-export`` config in-process and run it (for notebooks, scripts and tests)."""
    from mtl.cli.common import compose_in_process

    cfg, run_dir = compose_in_process("mtl.configs.export_app", "export", overrides, run_dir)
    return run_export(cfg, run_dir)
