"""What a sweep optimises: ``optimized_metric`` read from a finished run's metrics.

``val/<task>/<metric>`` is a validation metric exactly as logged; ``delta_m`` is Δm% of the
validation metrics against ``baselines.path`` (the single-task runs' metrics). Hydra's Optuna
sweeper reads the value the training job returns.
"""
from __future__ import annotations

from typing import Any, Mapping


def logged_names(metrics: Mapping[str, Any], split: str = "val") -> list[str]:
    return [f"{split}/{t}/{m}" for t, values in (metrics.get(split) or {}).items() for m in values]


def check_objective(cfg, metric_names: Mapping[str, Any]) -> None:
    """Before training: ``optimized_metric`` names a metric these tasks log (``{task: [metric, ...]}``),
    so a typo in a sweep fails at once instead of after a whole trial."""
    objective(cfg, {"val": {t: {m: 0.0 for m in names} for t, names in metric_names.items()}}, check_only=True)


def check_monitors(cfg, metric_names: Mapping[str, Any], directions: Mapping[str, Mapping[str, bool]] | None = None) -> None:
    """Before training: a checkpoint callback's ``monitor`` of the validation split names a value the
    module logs (``val/loss``, ``val/<task>/loss``, ``val/<task>/<metric>``); Lightning would say so only
    after the first epoch. With ``directions`` ({task: {metric: higher is better}}) its ``mode`` follows
    the monitored value: ``null`` is filled in (losses: min; a metric: its task's direction), and a mode
    against the direction (``monitor=val/semseg/miou mode=min`` keeps the worst epoch) is refused."""
    from omegaconf import open_dict

    logged = ["val/loss", *(f"val/{t}/{m}" for t, names in metric_names.items() for m in ["loss", *names])]
    for name, cb in (cfg.get("callbacks") or {}).items():
        monitor = cb.get("monitor") if hasattr(cb, "get") else None
        if not monitor or not str(monitor).startswith("val/"):
            continue
        if monitor not in logged:
            raise KeyError(f"callbacks.{name}.monitor={monitor!r} is not logged; logged: {', '.join(logged)}")
        if directions is None:
            continue
        parts = str(monitor).split("/")
        higher = False if parts[-1] == "loss" else bool(directions[parts[1]][parts[2]])
        want = "max" if higher else "min"
        mode = cb.get("mode")
        if mode is None:
            with open_dict(cb):
                cb["mode"] = want
        elif mode != want:
            raise ValueError(f"callbacks.{name}.mode={mode} keeps the worst epoch: {monitor} is "
                             f"{'higher' if higher else 'lower'}-is-better; set callbacks.{name}.mode={want} "
                             "(or null: from the monitored value)")


def objective(cfg, metrics: Mapping[str, Any], check_only: bool = False) -> float | None:
    """The value of ``cfg.optimized_metric`` for this run (None when the config names none)."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name == "delta_m":
        if not cfg.get("baselines", {}).get("path"):
            raise ValueError("optimized_metric=delta_m needs baselines.path=<baselines.json> (single-task runs' metrics)")
        if check_only:
            return None
        from mtl.evaluation import delta_m, load_baselines
        from mtl.train import build_tasks

        # Δm reads the tasks' metric directions only, which no class count changes
        tasks = {t.name: t for t in build_tasks(cfg, None, default_classes=2)}
        return float(delta_m(metrics["val"], load_baselines(cfg.baselines.path), tasks,
                             variant=cfg.baselines.get("variant", "primary")))
    parts = str(name).split("/")
    if len(parts) == 3 and parts[0] == "val":
        value = (metrics.get("val") or {}).get(parts[1], {}).get(parts[2])
        if value is not None:
            return float(value)
    raise KeyError(f"optimized_metric={name!r} is not logged; logged: {', '.join(logged_names(metrics)) or '(none)'}, or delta_m")
