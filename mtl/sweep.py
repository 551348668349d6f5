"""What a sweep optimises: ``optimized_metric`` read from a finished run's metrics.

``val/<task>/<metric>`` is a validation metric exactly as logged, ``val/loss`` and ``val/<task>/loss`` the
validation losses (``metrics.json["val_losses"]``); ``delta_m`` is Δm% of the validation metrics against
``baselines.path`` (the single-task runs' metrics). Hydra's Optuna sweeper reads the value the training job returns.
"""
from __future__ import annotations

import math
from typing import Any, Mapping


def loss_names(tasks, split: str = "val", epoch: bool = False) -> list[str]:
    """The losses an evaluation logs (`mtl.module.MultiTaskModule`): the total and each task's (unweighted).
    ``epoch``: training's epoch means of its per-step losses (``train/loss_epoch``, ``train/<task>/loss_epoch``)."""
    end = "_epoch" if epoch else ""
    return [f"{split}/loss{end}", *(f"{split}/{t}/loss{end}" for t in tasks)]


def logged_values(metrics: Mapping[str, Any], split: str = "val") -> dict[str, Any]:
    """``{logged name: value}`` of a run's metrics record: ``<split>/<task>/<metric>``, then its losses."""
    values = {f"{split}/{t}/{m}": v for t, group in (metrics.get(split) or {}).items() for m, v in group.items()}
    return {**values, **(metrics.get(f"{split}_losses") or {})}


def higher_is_better(name: str, directions: Mapping[str, Mapping[str, bool]]) -> bool:
    """A logged value's direction: a loss is minimised, Δm maximised, a metric follows its task."""
    parts = str(name).split("/")
    return True if name == "delta_m" else False if parts[-1] == "loss" else bool(directions[parts[1]][parts[2]])


def check_objective(cfg, metric_names: Mapping[str, Any], directions: Mapping[str, Mapping[str, bool]] | None = None,
                    sweeper: Mapping[str, Any] | None = None) -> None:
    """Before training: ``optimized_metric`` names a metric these tasks log (``{task: [metric, ...]}``),
    so a typo in a sweep fails at once instead of after a whole trial. Under an optimising sweeper
    (``sweeper``: Hydra's ``hydra.sweeper`` node; by default the running one) the metric must be set and
    the sweeper's ``direction`` must follow it (``directions``: {task: {metric: higher is better}}):
    maximising an rmse would report the worst trial as the best."""
    objective(cfg, {"val": {t: {m: 0.0 for m in names} for t, names in metric_names.items()},
                    "val_losses": {n: 0.0 for n in loss_names(metric_names)}}, check_only=True)
    sweeper = _running_sweeper() if sweeper is None else sweeper
    if not sweeper or "direction" not in sweeper:
        return
    name = cfg.get("optimized_metric")
    if not name:
        raise ValueError("this sweep optimises a value: set optimized_metric=val/<task>/<metric> or delta_m "
                         "(optimized_metric=null would train every trial and then fail)")
    if directions is None:
        return
    higher = higher_is_better(name, directions)
    want = "maximize" if higher else "minimize"
    given = sweeper["direction"]
    if isinstance(given, (list, tuple)) or type(given).__name__ == "ListConfig":
        if len(given) != 1:  # a multi-objective study needs as many values as directions; trials return one
            raise ValueError(f"hydra.sweeper.direction={list(given)} asks for a {len(given)}-objective study, but a "
                             f"trial returns one value (optimized_metric={name}); set hydra.sweeper.direction={want}")
        given = given[0]
    if str(given).lower() != want:
        raise ValueError(f"hydra.sweeper.direction={given} would keep the worst trial: {name} is "
                         f"{'higher' if higher else 'lower'}-is-better; set hydra.sweeper.direction={want}")


def _running_sweeper() -> Mapping[str, Any] | None:
    """The running multirun's ``hydra.sweeper`` node (None outside Hydra or in a single run)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    return hc.sweeper if hc.mode == RunMode.MULTIRUN else None


def _epoch_end_flag(cb) -> str | None:
    """A callback config's argument that makes it act at the training epoch's end, by its ``_target_``:
    ModelCheckpoint's ``save_on_train_epoch_end``, EarlyStopping's ``check_on_train_epoch_end``; None for a
    node that is not one of them (another callback, a bare value, a target that does not import)."""
    if not hasattr(cb, "get") or not cb.get("_target_"):
        return None
    from hydra.utils import get_object
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    try:
        cls = get_object(str(cb["_target_"]))
    except Exception:  # (instantiating it names the problem)
        return None
    if not isinstance(cls, type):
        return None
    return ("save_on_train_epoch_end" if issubclass(cls, ModelCheckpoint) else
            "check_on_train_epoch_end" if issubclass(cls, EarlyStopping) else None)


def check_monitors(cfg, metric_names: Mapping[str, Any], directions: Mapping[str, Mapping[str, bool]] | None = None) -> None:
    """Before training: a checkpoint callback's ``monitor`` of the validation split names a value the
    module logs (``val/loss``, ``val/<task>/loss``, ``val/<task>/<metric>``); Lightning would say so only
    after the first epoch. A training loss is monitored by its epoch mean (``train/loss_epoch``): ``train/loss`` is
    a step value, the epoch's last batch, and refused. Without a monitor, ``mode`` is filled in (unused),
    ``save_top_k`` must be 1 or -1 (or 0), and ``save_on_train_epoch_end`` (unless given) is true: the newest
    checkpoint is the last epoch trained, validated or not. With ``directions`` ({task: {metric: higher is
    better}}) its ``mode`` follows the monitored value: ``null`` is filled in (losses: min; a metric: its task's direction), and a mode
    against the direction (``monitor=val/semseg/miou mode=min`` keeps the worst epoch) is refused. The settings apply
    by the callback's ``_target_``: a ModelCheckpoint (or subclass) gets all of them, an EarlyStopping the monitor and
    mode checks (``check_on_train_epoch_end`` for a ``train/`` epoch mean), any other callback is left as given."""
    from omegaconf import open_dict

    logged = [*loss_names(metric_names), *(f"val/{t}/{m}" for t, names in metric_names.items() for m in names)]
    train_epoch = loss_names(metric_names, "train", epoch=True)
    for name, cb in (cfg.get("callbacks") or {}).items():
        # the flag that reads a train/ epoch mean at the training epoch's end (None: not a monitoring callback)
        at_epoch_end = _epoch_end_flag(cb)
        if at_epoch_end is None:
            continue
        monitor = cb.get("monitor")
        if not monitor and at_epoch_end == "check_on_train_epoch_end":
            continue  # (EarlyStopping without a monitor: Lightning names it)
        if not monitor:
            # every save is the newest (Lightning's save_top_k 1 keeps the last, -1 all); mode is unused, but
            # Lightning refuses None
            top_k = cb.get("save_top_k", 1)
            if top_k not in (-1, 0, 1):
                raise ValueError(f"callbacks.{name}.save_top_k={top_k} needs a monitor to rank checkpoints by "
                                 f"(callbacks.{name}.monitor is null); set save_top_k to 1 (the last epoch) or -1 (all)")
            with open_dict(cb):
                if "mode" in cb and cb.get("mode") is None:
                    cb["mode"] = "min"
                if cb.get("save_on_train_epoch_end") is None:
                    # the newest is the last epoch trained: Lightning would save at validation's end when validation
                    # is not every epoch, and the epochs after the last validation would be neither tested nor saved
                    cb["save_on_train_epoch_end"] = True
            continue
        if str(monitor) in loss_names(metric_names, "train"):
            raise ValueError(f"callbacks.{name}.monitor={monitor!r} is logged per step: each epoch would be judged by "
                             f"its last batch; monitor the epoch mean, callbacks.{name}.monitor={monitor}_epoch")
        if str(monitor).startswith("train/") and str(monitor).endswith("/loss_epoch") and monitor not in train_epoch:
            raise KeyError(f"callbacks.{name}.monitor={monitor!r} is not logged; logged epoch means: "
                           f"{', '.join(train_epoch)}")
        if str(monitor).startswith("train/"):
            # read at the training epoch's end: Lightning saves (or checks) at validation's end when validation is
            # not every epoch (check_val_every_n_epoch > 1, val_check_interval), where it finds the last epoch's mean
            if cb.get(at_epoch_end) is False:
                raise ValueError(f"callbacks.{name}.monitor={monitor!r} is an epoch mean of training, known at the "
                                 f"training epoch's end: callbacks.{name}.{at_epoch_end} must not be false")
            with open_dict(cb):
                cb[at_epoch_end] = True
        if not str(monitor).startswith("val/"):
            if directions is not None and "mode" in cb and cb.get("mode") is None:
                # another split's value (train/loss_epoch, ...): a loss is minimised; other names have no known direction
                if str(monitor).split("/")[-1] not in ("loss", "loss_epoch"):
                    raise ValueError(f"callbacks.{name}.monitor={monitor!r}: mode=null is filled in only for losses "
                                     f"and val/ metrics; set callbacks.{name}.mode=min or max")
                with open_dict(cb):
                    cb["mode"] = "min"
            continue
        if monitor not in logged:
            raise KeyError(f"callbacks.{name}.monitor={monitor!r} is not logged; logged: {', '.join(logged)}")
        if directions is None:
            continue
        higher = higher_is_better(monitor, directions)
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
        from mtl.evaluation import delta_m, load_baselines

        if check_only:  # a missing or unreadable file: found before training (a sweep's start), not in its trials
            load_baselines(cfg.baselines.path)
            return None
        from mtl.train import build_tasks

        # Δm reads the tasks' metric directions only, which no class count changes
        tasks = {t.name: t for t in build_tasks(cfg, None, default_classes=2)}
        return float(delta_m(metrics["val"], load_baselines(cfg.baselines.path), tasks,
                             variant=cfg.baselines.get("variant", "primary")))
    logged = logged_values(metrics)
    value = logged.get(str(name))
    if value is not None:
        if not check_only and not math.isfinite(float(value)):  # an optimiser told NaN stops the whole study
            raise ValueError(f"optimized_metric {name} is {float(value)} (the trial diverged); this trial fails")
        return float(value)
    raise KeyError(f"optimized_metric={name!r} is not logged; logged: {', '.join(logged) or '(none)'}, or delta_m")
