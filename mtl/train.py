"""The training job behind ``mtl-train``: data -> tasks -> model -> Lightning -> run folder."""
from __future__ import annotations

import copy

import gc
import logging
import pickle
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.cli.common import write_hydra_record
from mtl.cli.failures import FAILED, FINISHED_RECORDS, RunFolderTaken, check_run_folder, stop_if_sigterm
from mtl.cli.rank_failures import stale_rank_markers
from mtl.data import check_datamodule, create_datamodule
from mtl.evaluation import check_run_baselines, delta_m, save_baselines
from mtl.folder_data import data_record
from mtl.io import atomic_path, save_model, write_json
from mtl.models import create_model
from mtl.model_checks import check_model_settings
from mtl.models.backbone_weights import check_file
from mtl.module import MultiTaskModule, check_optim
from mtl.registry import check_int, check_seed
from mtl.sweep import check_monitors, check_objective
from mtl.tasks import create_task
from mtl.torch_load import torch_load_refusal
from mtl.train_checks import (check_checkpoint, check_eval_splits, check_precision, check_resume_length,
                              check_test_batches, check_trainer, check_validation, finished_run_refusal,
                              read_checkpoint, resume_start, set_aside_failed_attempt, warn_seed_of_resume)
from mtl.warm_start import (INITIAL_WEIGHTS, check_init_from, check_one_start, folder_architecture, init_from_folder,
                             initial_weights, keep_expansion_point, resume_initial_weights, start_record)

log = logging.getLogger(__name__)


def data_info(datamodule: Any) -> dict[str, Any] | None:
    """The data module's ``info`` (None when it has none). Not ``getattr(dm, "info", None)``: ``info`` may
    load the data, and getattr would turn an AttributeError raised while loading into "no info"."""
    return datamodule.info if hasattr(type(datamodule), "info") or "info" in vars(datamodule) else None


def build_tasks(cfg: DictConfig, info: dict[str, Any] | None = None, default_classes: int | None = None):
    """Tasks from ``cfg.task``; a missing ``num_classes`` is read from the data module's ``info``
    (``<name>_classes``, ``<kind>_classes`` or ``num_classes``), so one config serves many datasets.
    A count set in the config may exceed the data's (classes absent from this data) but not fall short
    of it: a head too small for the labels would fail mid-training with an unnamed index error.
    ``default_classes`` serves when neither gives a count (callers that never see data); else that is an error."""
    if not cfg.get("task"):
        raise ValueError("no task selected: pass e.g. task=[semseg,depth] or task=depth")
    info = info or {}
    tasks = []
    for key, tcfg in cfg.task.items():
        kw = OmegaConf.to_container(tcfg, resolve=True)
        kw.setdefault("name", key)
        if kw.get("kind") in ("classification", "semseg"):
            kw["num_classes"] = _num_classes(key, kw, info, default_classes)
        task = create_task(**kw, where=f"task.{key}")  # the key, not kw["name"] (task.zoo's name is the dataset's)
        mark = info.get(f"{kw['kind']}_ignore_index")
        if mark is not None and task.ignore_index != mark:  # else the first loss fails on every unlabelled pixel
            raise ValueError(f"task.{key}.ignore_index={task.ignore_index} but this data marks unlabelled pixels "
                             f"{mark}; drop the override (or set it to {mark})")
        tasks.append(task)
    return tasks


def _num_classes(key: str, kw: dict[str, Any], info: dict[str, Any], default: int | None) -> int:
    found = next(((k, int(info[k])) for k in (f"{kw['name']}_classes", f"{kw['kind']}_classes", "num_classes")
                  if info.get(k) is not None), None)
    given = kw.get("num_classes")
    if given is None:
        if found is None and default is not None:
            return default
        target = kw.get("target_key") or kw["kind"]
        if found is None and info.get("targets") is not None and target not in info["targets"]:
            raise ValueError(f"task {key!r} has no targets in this data (no {target!r}); it provides "
                             f"{sorted(info['targets'])} (choose tasks with task=[...])")
        if found is None:
            raise ValueError(f"task.{key}.num_classes is not set and the data does not report a class count; "
                             f"set task.{key}.num_classes=<N>")
        return found[1]
    if found is not None and int(given) < found[1]:
        raise ValueError(f"task.{key}.num_classes={given} but the data has {found[1]} classes ({found[0]}); "
                         f"drop the override (null reads it from the data) or raise it")
    return int(given)


def build_module(cfg: DictConfig, info: dict[str, Any] | None = None,
                 start: dict[str, Any] | None = None) -> MultiTaskModule:
    """The run's module; ``start``: its start record (a resume's is the checkpoint's: `resume_start`), else that of
    ``cfg.init_from``. A resume takes its architecture from ``init_from`` (a pruned folder's) but not its weights:
    the checkpoint's replace them."""
    tasks = build_tasks(cfg, info)
    resumes = bool(cfg.get("ckpt_path"))
    if cfg.get("init_from") and start is None:
        start = start_record(cfg.init_from)
    model = folder_architecture(cfg.init_from, tasks) if cfg.get("init_from") else None
    if model is None:
        family = cfg.get("family") or "multitask"
        backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
        decoder = OmegaConf.to_container(cfg.decoder, resolve=True)
        if resumes:  # rebuilt as its folder would load (the family's from_config): settings a family
            # refuses for new models since (task_moe_vit's renormalize=true with top_k=1) load with its warning;
            # with no initial weights (no file read, no Hub asked): the checkpoint's replace them
            backbone = {k: v for k, v in backbone.items() if k not in INITIAL_WEIGHTS}
            model = create_model(config={"family": family, "tasks": [t.to_config() for t in tasks],
                                         "backbone": backbone, "decoder": decoder})
        else:
            model = create_model(tasks, backbone=backbone, decoder=decoder, family=family)
    if cfg.get("init_from") and not resumes:  # (a resume's weights and expansion point are its checkpoint's)
        stats = init_from_folder(model, cfg.init_from)
        log.info("initialised %d/%d tensors from %s", stats["loaded"], stats["total"], cfg.init_from)
        keep_expansion_point(model, cfg.init_from)
    if cfg.get("linearize"):  # tangent-space fine-tuning: train the expansion around the weights loaded above
        from mtl.models import linearize

        model = linearize(model)
    strategy = OmegaConf.to_container(cfg.strategy, resolve=True) if cfg.get("strategy") else None
    return MultiTaskModule(model, balancer=OmegaConf.to_container(cfg.balancer, resolve=True),
                           log_weights_every=int(cfg.get("log_weights_every", 50)), strategy=strategy, start=start,
                           initial_weights=initial_weights(cfg.backbone),
                           **cfg.optim)


def _targets(group: DictConfig | None) -> dict[str, DictConfig]:
    """The entries of ``logger`` or ``callbacks`` that name a ``_target_`` (the others are switched off)."""
    return {name: c for name, c in (group or {}).items() if c is not None and "_target_" in c}


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(c) for c in _targets(group).values()]


def check_targets(cfg: DictConfig) -> None:
    """Every ``logger.<name>`` and ``callbacks.<name>`` ``_target_`` imports, before the run folder: instantiated
    after the data, a misspelt one left a FAILED folder and Hydra's line without the key or the reason."""
    from hydra._internal.utils import _locate  # instantiate's own lookup (hydra.utils.get_object logs an error line)

    for group in ("logger", "callbacks"):
        for name, node in _targets(cfg.get(group)).items():
            try:
                _locate(str(node._target_))
            except Exception as e:  # Hydra wraps the import's own error (its message is the reason) in an ImportError
                reason = str(e.__cause__ or e).strip().splitlines()[0]
                raise ValueError(f"{group}.{name}._target_={node._target_} cannot be imported: {reason}") from None


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one training job into ``run_dir``; returns the metrics written to metrics.json.

    Everything that can be checked without training (the baselines file against the run's tasks)
    is checked before fitting; after testing, the model folder and metrics.json are written first,
    so a later failure (plots, baselines update) never loses the trained model.
    """
    from mtl.cli.common import check_required

    from mtl.cli.sweep_checks import distributed_state_of_one_job

    check_required(cfg)
    try:
        with distributed_state_of_one_job():
            return _train(cfg, run_dir)
    finally:
        _release()  # here, not inside _train: its frame still holds the job's objects there


def _train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    # a failed attempt may have written its records before failing (a bad baselines.save_to): retried, not refused
    failed = (run_dir / FAILED).exists()
    finished = [] if failed else [n for n in (*FINISHED_RECORDS, "model") if (run_dir / n).exists()]
    if finished:  # its model, metrics and checkpoints would be mixed with this run's
        raise RunFolderTaken(finished_run_refusal(run_dir, finished), run_dir)
    from mtl.cli.common import _rank0

    # the folder's records are rank 0's: under torchrun another rank's config.yaml could precede rank 0's check
    rank0 = _rank0()
    if rank0:
        check_run_folder(run_dir, resumes_from=cfg.get("ckpt_path"))
    if cfg.get("ckpt_path"):
        check_checkpoint(Path(cfg.ckpt_path))
        warn_seed_of_resume(cfg, Path(cfg.ckpt_path))
    check_trainer(cfg.trainer)
    check_precision(cfg)  # again once the trainer is built: any replacement Lightning made there
    start = None
    if cfg.get("ckpt_path"):
        ckpt = read_checkpoint(Path(cfg.ckpt_path))  # once (its tensors memory-mapped) for both checks
        check_resume_length(cfg.trainer, Path(cfg.ckpt_path), ckpt)
        start = resume_start(cfg, Path(cfg.ckpt_path), ckpt)
        # inherited: config.yaml records it, and a pruned start's architecture comes from its folder (not its weights)
        if start is not None:  # (its folder, moved or not, is there: resume_start checked it)
            cfg.init_from = start["init_from"]
        resume_initial_weights(cfg, ckpt)  # backbone.checkpoint_path / pretrained: kept as init_from is
    check_one_start(cfg)
    if not cfg.get("ckpt_path") and (cfg.get("backbone") or {}).get("checkpoint_path"):  # (a resume never reads it)
        check_file(cfg.backbone.checkpoint_path)
    check_optim(OmegaConf.to_container(cfg.optim, resolve=True))
    check_test_batches(cfg)
    validates = check_validation(cfg)
    # named before the run folder, not by Lightning's seed_everything after it (numpy's seeds: [0, 2**32 - 1])
    check_seed("seed", cfg.get("seed"), 0, 2**32 - 1)
    check_int("viz.num_samples", (cfg.get("viz") or {}).get("num_samples") or 0, 0)
    # data.<key> and task.<name>.<option> (names and types) too, before the run folder is written; a class count
    # left to the data is read once the data exists (2 stands in for it here)
    check_datamodule(**OmegaConf.to_container(cfg.data, resolve=True))
    tasks = build_tasks(cfg, default_classes=2)
    check_model_settings(cfg, tasks)  # backbone.<key>, decoder.<key>, family and balancer.<key>, as built
    check_init_from(cfg, tasks)  # init_from holds some of the model's encoder, a pruned one the tasks
    # the checkpoint monitors and the objective against the tasks' metric names (no data needed), on a copy: the
    # run's config.yaml records the settings as given; they are checked (and filled in) again on the built module
    names = {t.name: list(t.metrics()) for t in tasks}
    directions = {t.name: dict(t.directions) for t in tasks}
    check_objective(copy.deepcopy(cfg), names, directions)
    check_monitors(copy.deepcopy(cfg), names, directions)
    # baselines.save_to and .path, judged against the tasks (their metric names; no class count changes them)
    baselines, variant = check_run_baselines(cfg.baselines, tasks)
    check_targets(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank0:
        set_aside_failed_attempt(run_dir, cfg.get("ckpt_path"))
        (run_dir / FAILED).unlink(missing_ok=True)  # an earlier failed attempt in this folder: this run replaces it
        stale_rank_markers(run_dir)  # (and its other ranks' markers)
        write_hydra_record(cfg, run_dir)
        with atomic_path(run_dir / "config.yaml", overwrite=True) as tmp:
            tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    data_kw = OmegaConf.to_container(cfg.data, resolve=True)
    datamodule = create_datamodule(**{"name": data_kw["name"]}, **{k: v for k, v in data_kw.items() if k != "name"})
    module = build_module(cfg, data_info(datamodule), start)
    directions = {t: dict(task.directions) for t, task in module.tasks.items()}
    check_objective(cfg, {t: list(group) for t, group in module.val_metrics.items()}, directions)
    check_monitors(cfg, {t: list(group) for t, group in module.val_metrics.items()}, directions)
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not loggers:  # a learning-rate monitor has nowhere to write without a logger
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    trainer_kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_kw.get("strategy") == "ddp" and module.strategy is not None and module.strategy.idle_parameters():
        # DDP refuses a step where a parameter got no gradient unless told to look for them (a cost per step)
        trainer_kw["strategy"] = "ddp_find_unused_parameters_true"
        log.info("strategy.%s leaves some parameters without gradient in a step: DDP looks for unused parameters",
                 type(module.strategy).__name__.lower())
    if "plugins" not in trainer_kw and not str(trainer_kw.get("strategy", "")).startswith("fsdp"):
        from mtl.checkpoint_io import AtomicCheckpointIO  # (FSDP writes sharded checkpoints its own way)

        trainer_kw["plugins"] = [AtomicCheckpointIO()]
    from mtl.callbacks import MarksRankFailure

    callbacks.append(MarksRankFailure(run_dir))  # (another DDP rank's error, kept for rank 0 to name)
    trainer = L.Trainer(**trainer_kw, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir))
    check_precision(cfg, trainer)
    check_eval_splits(trainer, datamodule)
    try:
        return _fit_test_and_save(cfg, run_dir, trainer, module, datamodule, data_kw, baselines, variant, validates)
    finally:
        _finish_tracking_runs(trainer)


def _finish_tracking_runs(trainer) -> None:
    """Finish W&B runs with the job. W&B writes its records from a background service and completes
    them when the run finishes, which would otherwise be at interpreter exit: after `run()` returned
    (and in a `-m` multirun, after every later job)."""
    from lightning.pytorch.loggers import WandbLogger  # wandb itself is imported only by the logger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:  # never start a run just to end it
            lg._experiment.finish()


def _fit_test_and_save(cfg, run_dir, trainer, module, datamodule, data_kw, baselines, variant,
                       validates: bool = True) -> dict[str, Any]:
    start = time.perf_counter()
    # checkpoints hold tensors and plain data only (no pickled objects): never unpickle more
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        import re

        lines = str(e).splitlines()
        missing, unexpected = ([k for ln in lines if kind in ln for k in re.findall(r'"([^"]+)"', ln)]
                               for kind in ("Missing key(s)", "Unexpected key(s)"))
        named = "; ".join(f"{what} {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''}"
                          for what, ks in (("missing", missing), ("unexpected", unexpected)) if ks)
        part = {k.split(".", 1)[0] for k in missing + unexpected}
        hint = " (the balancer's state: resume with the checkpoint's balancer)" if part == {"balancer"} else ""
        raise ValueError(f"ckpt_path {cfg.get('ckpt_path')}: its weights do not fit this run's model ({len(missing)} "
                         f"missing, {len(unexpected)} unexpected key(s), or other shapes{': ' + named if named else ''})"
                         f"{hint}; resume with the config it was trained with (its run's config.yaml)") from e
    except pickle.UnpicklingError as e:
        raise ValueError(torch_load_refusal(f"ckpt_path {cfg.get('ckpt_path')}", e)) from e
    fit_seconds = time.perf_counter() - start
    stop_if_sigterm(trainer)  # one Lightning only noted (its last epoch, after its loop's last check)
    # before testing: loading the best checkpoint restores the balancer's state (and counters) as of then
    diagnostics = module.balancer.diagnostics()
    ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False, weights_only=True)
    stop_if_sigterm(trainer)  # (its last batch, on_test_end: Lightning's test loop does not stop there)

    # validation metrics of the epoch the tested checkpoint holds (not the last epoch's): what sweeps optimise
    entry = getattr(trainer.checkpoint_callback, "saved", {}).get(ckpt) if ckpt else None
    val = entry.get("val") if entry else None
    metrics: dict[str, Any] = {
        "test": module.results.get("test", {}),
        "val": val if val is not None else module.results.get("val", {}),
        # val/loss and val/<task>/loss of that epoch (a sweep may optimise them too)
        "val_losses": (entry.get("val_losses") if val is not None else
                       module.val_loss_history.get(max(module.val_history, default=None))) or {},
        "val_epoch": entry["epoch"] if val is not None else "last",
        # a partial split (trainer.limit_*_batches) is recognisable, e.g. in a baselines run
        "scored_samples": {split: module.scored.get(split, 0) for split in ("val", "test")},
        "best_checkpoint": ckpt,
        "fit_seconds": round(fit_seconds, 2),
        "global_steps": trainer.global_step,
        "balancer": {"name": module.balancer.name, **diagnostics},
    }
    lost_best = getattr(trainer.checkpoint_callback, "lost_best", None)
    if val is None and not module.val_history and lost_best:
        log.warning("no epoch was validated after the resume and the recorded best checkpoint %s is gone: the "
                    "checkpoint tested and saved is the last one trained and metrics.json['val'] holds no epoch's "
                    "validation", lost_best)
    elif val is None and not module.val_history and validates:  # (a schedule known to run none was warned at its start)
        log.warning("no validation ran (trainer.max_steps or check_val_every_n_epoch ended training before one, at "
                    "step %d): the checkpoint tested and saved is the last one trained and metrics.json['val'] holds "
                    "no epoch's validation", trainer.global_step)
    elif val is None and module.val_history and ckpt:  # a monitor-less checkpoint of an epoch validation skipped
        log.warning("the checkpoint tested and saved (%s) is of an epoch that ran no validation: metrics.json['val'] "
                    "(val_epoch 'last') holds epoch %d's, the last validated", Path(ckpt).name, max(module.val_history))
    if not trainer.is_global_zero:
        return metrics
    # the trained model and its metrics first: nothing after this can lose them
    meta = {"test": metrics["test"], "run_dir": str(run_dir), "data": data_record(data_kw), "seed": cfg.seed}
    meta.update(module.hparams.get("start") or {})  # a fine-tune's start (the card says so; merge pools check it)
    save_model(module.model, run_dir / "model", meta=meta)
    write_json(run_dir / "metrics.json", metrics)
    if baselines is not None:
        metrics["delta_m"] = {"value": delta_m(metrics["test"], baselines, dict(module.tasks), variant=variant),
                              "variant": variant, "baselines": str(cfg.baselines.path)}
    metrics["model_stats"] = _model_stats(module.model, datamodule)
    write_json(run_dir / "metrics.json", metrics)
    if cfg.baselines.get("save_to"):
        save_baselines(cfg.baselines.save_to, metrics["test"], target=f"baselines.save_to={cfg.baselines.save_to}")
    if cfg.viz.get("num_samples"):
        _save_viz(module, datamodule, run_dir, cfg.viz.num_samples)
    print_summary(metrics, module.tasks)
    if module.model.config.get("family") == "slimmable":
        from mtl.models.slimmable.callback import note_without_callback

        note_without_callback(trainer.callbacks, run_dir)
    for cb in trainer.callbacks:  # an analysis that failed during testing, now that the model is saved
        if getattr(cb, "deferred_error", None) is not None:
            raise cb.deferred_error
    return metrics


def _release() -> None:
    """Free this job's trainer, module and data now. They hold each other in reference cycles, so
    without a full collection they stay alive after `train` returns until Python's cyclic collector
    next runs its oldest generation, which in a ``-m`` multirun (every job in one process) can be
    several jobs later: resident memory grew from job to job."""
    gc.collect()


def _model_stats(model, datamodule) -> dict[str, Any]:
    """Params and per-sample FLOPs (all tasks, each task alone: a routed model's active FLOPs), one test image."""
    from mtl.flops import model_stats

    x = next(iter(datamodule.test_dataloader()))["image"][:1]
    return model_stats(model, x.to(next(model.parameters()).device))


def _save_viz(module: MultiTaskModule, datamodule, run_dir: Path, n: int) -> None:
    from mtl.viz import save_predictions

    batch = next(iter(datamodule.test_dataloader()))
    device = next(module.model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    info = data_info(datamodule) or {}
    names = {t: list(info[f"{t}_names"]) for t in module.tasks if isinstance(info.get(f"{t}_names"), (list, tuple))}
    save_predictions(module.model, batch, run_dir / "predictions.png", num_samples=n, class_names=names)


def print_summary(metrics: dict[str, Any], tasks) -> None:
    from mtl.progress_log import summary_console
    from rich.table import Table

    table = Table(title="test metrics")
    for col in ("task", "metric", "value", "better"):
        table.add_column(col)
    for name, values in metrics["test"].items():
        task = tasks[name]
        for m, v in values.items():
            star = " *" if m == task.primary else ""
            table.add_row(name, m + star, f"{v:.4f}", "higher" if task.directions.get(m, True) else "lower")
    console = summary_console()
    console.print(table)
    if "delta_m" in metrics:
        d = metrics["delta_m"]
        over = "the * metrics above" if d["variant"] == "primary" else "every metric above"
        console.print(f"Δm% (variant {d['variant']}: {over}) vs {d['baselines']}: {d['value']:+.2f}")
    if "model_stats" in metrics:
        st = metrics["model_stats"]
        per_task = ", ".join(f"{t} {f / 1e6:.2f}M" for t, f in st.get("flops_per_task", {}).items())
        console.print(f"params {st['params']:,} · FLOPs/sample: all tasks {st['flops_all_tasks'] / 1e6:.2f}M; "
                      f"one task alone: {per_task}")


def run(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> Path:
    """Run ``mtl-train`` in this process (notebooks, tests): ``overrides`` as on the command line (a list of
    strings; one job: sweeps are the CLI's ``-m``), with the CLI's checks and failure marking (``FAILED``).
    ``run_dir``: the folder the run writes its files to (default: a new ``$MTL_OUTPUT_DIR/<name>/runs/<time>``,
    ``outputs/`` without the variable, as the CLI's; a ``hydra.run.dir=`` override names it too).
    Returns the run folder (a Path: ``model/``, ``metrics.json``, ... inside)."""
    from mtl.cli.in_process import run_in_process
    from mtl.cli.train import check_inputs

    return run_in_process(train, ("mtl.configs",), "train", overrides, run_dir, check=check_inputs)[1]
