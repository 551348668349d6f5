"""The job behind ``mtl-prune``: load a model folder, prune it, measure before/after, write the pruned
folder, ``metrics.json`` and the plots into the run folder."""
from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import pruning
from mtl.cli.jobs import check_model_given, input_model, start_run
from mtl.data.calibration import check_calib_settings
from mtl.folder_checks import JSON_ERRORS, ModelFolderError
from mtl.folder_data import data_record, rebuild_config
from mtl.io import first_non_finite, load_model, model_skeleton, read_checked_config, save_model, user_path, write_json
from mtl.registry import check_int, check_seed
from pruning.calib import calibration_batches, datamodule_for
from pruning.graph import PruningError, check_module_names, check_prunable_config
from pruning.api import SEARCHED_KNOBS
from pruning.methods import METHODS
from mtl.progress_log import emit
from pruning.report import evaluate_all, latency_ms, plot_delta_m_vs_flops, plot_kept

log = logging.getLogger(__name__)

def _hparams(cfg: DictConfig, command_line: list[str]) -> tuple[str, dict[str, Any]]:
    hp = OmegaConf.to_container(cfg.prune, resolve=True)
    method = hp.pop("method", None)
    METHODS.get(method)  # unknown names fail here, listing the valid ones
    if hp.get("flops_target") is not None:
        # the target replaces the method's own knob: the config file's ratio / budget give way to it; one typed on the
        # command line stays for effective_hparams to refuse (as pruning.prune refuses both given), not dropped
        typed = {o.split("=", 1)[0].lstrip("+") for o in command_line if "=" in o and not o.startswith("~")}
        for knob in SEARCHED_KNOBS:
            if f"prune.{knob}" not in typed or hp.get(knob) is None:
                hp.pop(knob, None)
    else:
        hp.pop("flops_target", None)
    try:  # unknown options first, then values, before the model is loaded: pruning.prune's own check
        pruning.api.effective_hparams(method, hp, prefix="prune.")
    except TypeError as e:
        raise TypeError(f"prune={method}: {e}") from None
    return method, hp


def check_finetune_lr(lr: Any, steps_run: bool) -> float:
    """``finetune.lr``: a positive finite number. 0 only where no fine-tune step runs: it would leave every
    weight as it is (AdamW scales its step and its weight decay by lr) while the steps still moved the
    BatchNorm statistics, which is not what a fine-tune was asked for."""
    finite = not isinstance(lr, bool) and isinstance(lr, (int, float)) and math.isfinite(lr)
    if not finite or lr < 0 or (lr == 0 and steps_run):
        raise ValueError(f"finetune.lr must be a positive finite number, got {lr!r}"
                         + (" (finetune.steps > 0 runs AdamW steps that would change no weight)" if finite and lr == 0 else ""))
    return float(lr)


def finetune_steps(model: torch.nn.Module, datamodule, steps: int, lr: float) -> None:
    """A few AdamW steps on the summed (task-weighted) losses: the fine-tuning between pruning rounds."""
    check_finetune_lr(lr, steps_run=int(steps) > 0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = itertools.cycle(datamodule.train_dataloader())
    for _ in range(int(steps)):
        batch = next(batches)
        out = model(batch["image"])
        loss = sum(task.weight * task.loss(out[t], batch[task.target_key]) for t, task in model.tasks.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    bad = first_non_finite(model)
    if bad is not None:  # the model folder would hold weights that load_model refuses: fail before writing it
        raise ValueError(f"finetune: tensor {bad!r} of the pruned model holds NaN or infinite values after "
                         f"{int(steps)} step(s) at finetune.lr={lr:g}; lower finetune.lr (no model folder written)")


def _undefined(values: dict[str, dict[str, float]], tasks, who: str, zero_too: bool) -> list[str]:
    """Why the primary metrics in `values` give no relative change: one is not finite (a test split with no
    valid pixel; outputs that overflow), or, for a reference (`zero_too`), 0. Missing ones are left to Δm."""
    task_map = tasks if isinstance(tasks, dict) else {t.name: t for t in tasks}
    out = []
    for name, task in task_map.items():
        v = values.get(name, {}).get(task.primary)
        if v is not None and (not math.isfinite(v) or (zero_too and v == 0)):
            out.append(f"{name}/{task.primary} of the {who} model is {v:g}")
    return out


def _why(reasons: list[str], against: str) -> str:
    why = "; ".join(reasons) + " (Δm's relative change is undefined)"
    log.warning("Δm vs %s is not defined: %s", against, why)
    return why


def delta_m_vs(reference: dict[str, dict[str, float]], metrics: dict[str, dict[str, float]], tasks) -> dict[str, Any]:
    """``{"after": Δm%}`` against the unpruned model, or ``{"after": None, "why": ...}`` when a primary
    metric of the unpruned model is 0 (a 2-image test split's accuracy) or one of either model is not
    finite (no valid pixel, outputs that overflow): no relative change exists, and the pruned model is
    still worth its folder. Anything else wrong (a missing metric) fails the run; non-finite weights
    after a diverged fine-tune already failed it (`finetune_steps`)."""
    from mtl.evaluation import Baselines, delta_m

    reasons = _undefined(reference, tasks, "unpruned", zero_too=True) + _undefined(metrics, tasks, "pruned", zero_too=False)
    if reasons:
        return {"after": None, "why": _why(reasons, "the unpruned model")}
    unpruned = Baselines(reference)
    unpruned.label = "the unpruned model's metrics"
    return {"after": delta_m(metrics, unpruned, tasks)}


def delta_m_vs_baselines(baselines, before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                         tasks) -> dict[str, Any]:
    """``{"before": Δm%, "after": Δm%}`` of the unpruned and the pruned model against single-task baselines
    (a loaded baselines file: finite and positive), each None with a ``why`` when a primary metric of that
    model is not finite, as in `delta_m_vs`."""
    from mtl.evaluation import delta_m

    out: dict[str, Any] = {}
    reasons: list[str] = []
    for key, values, who in (("before", before, "unpruned"), ("after", after, "pruned")):
        undefined = _undefined(values, tasks, who, zero_too=False)
        out[key] = None if undefined else delta_m(values, baselines, tasks)
        reasons += undefined
    if reasons:
        out["why"] = _why(reasons, "the baselines")
    return out


def ignored_layer_names(value: Any) -> list[str]:
    """``ignored_layers``: a list of module names; one name alone is a one-element list, as `pruning.prune` takes it
    (``list()`` of a string would be its characters)."""
    if isinstance(value, str):
        return [value]
    names = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"ignored_layers must be a module name or a list of them (ignored_layers=[backbone.conv1]), "
                         f"got {value!r}")
    return list(names)


def _check_run_settings(cfg: DictConfig) -> None:
    """The job's own settings that need no model, before the run folder is made (the model folder is written
    before the latency and reload checks that would otherwise fail on them)."""
    check_model_given(cfg, "prune")
    check_calib_settings(cfg.calib.split, cfg.calib.batches)
    ignored_layer_names(cfg.ignored_layers)
    ev = cfg.eval
    check_seed("seed", cfg.get("seed"), 0)  # torch.manual_seed's range: a larger one fails after the run folder
    for key, value, low in (("rounds", cfg.rounds, 1), ("finetune.steps", cfg.finetune.steps, 0),
                            ("eval.latency_batch", ev.latency_batch, 1), ("eval.latency_repeats", ev.latency_repeats, 1),
                            ("eval.latency_threads", ev.latency_threads, 1),
                            ("eval.max_batches", ev.get("max_batches") if ev.get("max_batches") is not None else 1, 1)):
        check_int(key, value, low)
    check_finetune_lr(cfg.finetune.lr, steps_run=cfg.rounds > 1 and cfg.finetune.steps > 0)


def _folder_skeleton(cfg: DictConfig):
    """The ``model=`` folder's model built on the meta device from its config (no weights or data read), for the checks
    made before the run folder; None without a folder, where it cannot be built there, or where the folder does not
    read (named by start_run, as for every input folder)."""
    if not cfg.get("model"):
        return None
    try:
        return model_skeleton(cfg.model)
    except ModelFolderError:
        return None


def _check_ignored_layers(cfg: DictConfig, skeleton) -> None:
    """``ignored_layers`` name modules of the ``model=`` folder's model (its ``skeleton``) before the run folder is
    made; a smoke model's are checked once it is built."""
    names = ignored_layer_names(cfg.ignored_layers)
    if names and skeleton is not None:
        check_module_names(skeleton, names)


def _check_prunable_folder(cfg: DictConfig, skeleton) -> None:
    """The ``model=`` folder's family, decoder and stored pruning plan (an already-pruned model), judged from its
    config.json (no weights read; its ``skeleton`` names the decoder's class) before the run folder is made; a smoke
    model is judged once built, a folder that does not read is named by start_run."""
    if not cfg.get("model"):
        return
    folder = user_path(str(cfg.model))
    try:
        model_cfg = read_checked_config(folder)["model"]
    except ModelFolderError:
        return
    decoder = type(skeleton.decoder).__name__ if hasattr(skeleton, "decoder") else "decoder"
    try:
        check_prunable_config(model_cfg, str(folder / "config.json"), decoder)
    except PruningError as e:
        raise PruningError(f"model={cfg.model}: {e}") from None


def _check_baselines(cfg: DictConfig, skeleton) -> None:
    """``baselines=`` read (a missing or malformed file named) and checked against the ``model=`` folder's tasks (its
    ``skeleton``'s), before the run folder is made."""
    if not cfg.get("baselines"):
        return
    from mtl.evaluation import load_baselines

    load_baselines(cfg.baselines, skeleton.tasks if skeleton is not None else None)


def _check_data_settings(cfg: DictConfig) -> None:
    """``data.<key>`` (names, with a did-you-mean, and scalar types) before the run folder exists, over the config the
    job builds (`datamodule_for`): the model folder's recorded data updated by the override when it names no other
    dataset (a new .mat data.root keeps the recorded splits_file and class_mapping, ``data.name`` repeating the
    recorded name or not), else the override alone; a smoke model's data is scenes, as `smoke_model` trains it. A
    folder whose record does not read is left to the job to name."""
    import json

    from mtl.data import check_datamodule

    given = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else {}
    if not isinstance(given, dict) or not given:
        return
    if cfg.get("model"):
        file = user_path(str(cfg.model)) / "config.json"
        try:
            recorded = json.loads(file.read_text())["meta"]["data"]
        except (OSError, KeyError, TypeError, *JSON_ERRORS):
            recorded = None
        if not isinstance(recorded, dict) or "name" not in recorded:
            recorded = None
        if recorded is None and "name" not in given:
            return
        if recorded is not None:  # rebuild_config keeps ``given`` alone when it names another dataset
            given = rebuild_config(recorded, given, file, "data")
    elif "name" not in given and cfg.get("smoke_model"):
        given = {"name": "scenes", **given}
    if given.get("name") is not None:
        check_datamodule(given["name"], **{k: v for k, v in given.items() if k != "name"})


def run_prune(cfg: DictConfig, run_dir: str | Path, command_line: list[str] | None = None) -> dict[str, Any]:
    """The job; ``command_line``: the overrides as typed (default: Hydra's task overrides, as the CLI has them)."""
    _check_run_settings(cfg)  # before the run folder is made
    if command_line is None:
        from hydra.core.hydra_config import HydraConfig

        command_line = list(HydraConfig.get().overrides.task)
    method, hp = _hparams(cfg, command_line)  # the config alone: a refused option leaves no run folder either
    _check_data_settings(cfg)
    skeleton = _folder_skeleton(cfg)
    _check_prunable_folder(cfg, skeleton)
    _check_ignored_layers(cfg, skeleton)
    _check_baselines(cfg, skeleton)
    run_dir, output = start_run(cfg, run_dir, model_output=True)
    torch.manual_seed(int(cfg.seed))
    source = input_model(cfg, run_dir, "prune")
    start = time.perf_counter()
    model = load_model(source)
    base = None
    if cfg.get("baselines"):  # read before minutes of pruning and testing (a smoke model's tasks: only now)
        from mtl.evaluation import load_baselines

        base = load_baselines(cfg.baselines, model.tasks)
    dm = datamodule_for(model, OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None, source)
    batches = calibration_batches(dm, cfg.calib.batches, cfg.calib.split)
    emit(f"[prune] {method} on {len(batches)} calibration batch(es) of {cfg.calib.split}")
    finetune = None
    if int(cfg.rounds) > 1 and int(cfg.finetune.steps) > 0:
        finetune = lambda m: finetune_steps(m, dm, int(cfg.finetune.steps), float(cfg.finetune.lr))  # noqa: E731
    pruned, report = pruning.prune(model, method, calib=batches, ignored_layers=ignored_layer_names(cfg.ignored_layers),
                                   rounds=int(cfg.rounds), finetune=finetune, **hp)
    report["model"] = str(Path(source).resolve())  # read later from other folders: never cwd-relative
    report["prune_seconds"] = round(time.perf_counter() - start, 2)
    report["seed"] = int(cfg.seed)

    ev = cfg.eval
    tasks = model.tasks
    emit(f"[prune] done in {report['prune_seconds']:.1f} s; testing the unpruned and the pruned model")
    before = evaluate_all(model, dm, "test", ev.get("max_batches"))
    after = evaluate_all(pruned, dm, "test", ev.get("max_batches"))
    report["metrics"] = {"before": before, "after": after}
    report["delta_m"] = {"variant": "primary", "reference": "unpruned model", "before": 0.0,
                         **delta_m_vs(before, after, tasks)}
    if base is not None:
        report["delta_m_vs_baselines"] = {"variant": "primary", "baselines": str(cfg.baselines),
                                          **delta_m_vs_baselines(base, before, after, tasks)}
    x = batches[0]["image"][: int(ev.latency_batch)]
    emit(f"[prune] CPU latency, {int(ev.latency_repeats)} repeats of batch {int(x.shape[0])} per model")
    lat = {k: latency_ms(m, x, int(ev.latency_repeats), threads=int(ev.latency_threads))
           for k, m in (("before", model), ("after", pruned))}
    report["latency_ms"] = {**lat, "speedup": lat["before"] / lat["after"], "threads": int(ev.latency_threads),
                            "batch": int(x.shape[0]), "repeats": int(ev.latency_repeats)}

    meta = dict(getattr(model, "meta", {}))
    # run_dir: this run made the model (the parent's run is pruned_from's); a card must not show its metrics
    # pruned_from: the parent's run when it has one (as pruning.prune records it), else its folder
    meta.update({"pruned_from": str(meta.get("run_dir") or Path(source).resolve()), "run_dir": str(Path(run_dir).resolve()), "test": after,
                 "prune": {"method": method, **report["hparams"], "rounds": int(cfg.rounds),
                           # all three change what later rounds prune (the seed: the fine-tuning's batch order); meta's
                           # own `seed` stays the parent's training seed
                           **({"finetune_steps": int(cfg.finetune.steps), "finetune_lr": float(cfg.finetune.lr),
                               "seed": int(cfg.seed)} if int(cfg.rounds) > 1 else {})}})
    if cfg.get("data"):
        given = data_record(OmegaConf.to_container(cfg.data, resolve=True))  # readable from any working directory
        meta["prune"]["data"] = given  # the calibration / evaluation data of this run
        if not meta.get("data"):  # a folder without a training-data record: the data it was pruned on is the best one
            meta["data"] = given
    save_model(pruned, output, meta=meta, overwrite=bool(cfg.overwrite))
    reloaded = load_model(output)
    with torch.no_grad():
        a, b = pruned.eval()(x), reloaded(x)
    report["reload_max_abs_diff"] = max(float((a[t] - b[t]).abs().max()) for t in a)
    report["output"] = str(Path(output).resolve())
    write_json(run_dir / "metrics.json", report)
    plot_kept(report, run_dir / "kept_channels.png")
    mflops = lambda f: f / 1e6  # noqa: E731
    if report["delta_m"]["after"] is not None:
        plot_delta_m_vs_flops({method: [(mflops(report["flops"]["before"]), 0.0),
                                        (mflops(report["flops"]["after"]), report["delta_m"]["after"])]},
                              run_dir / "delta_m_vs_flops.png", title=f"mtl-prune {method}: Δm% vs FLOPs")
    else:  # no Δm, no plot: an overwrite rerun in this folder must not keep an earlier run's
        (run_dir / "delta_m_vs_flops.png").unlink(missing_ok=True)
    print_table(report)
    return report


def print_table(report: dict[str, Any]) -> None:
    from mtl.progress_log import summary_console
    from rich.table import Table

    console = summary_console()
    table = Table(title=f"mtl-prune: {report['method']} {report['hparams']}")
    for col in ("", "before", "after", "change"):
        table.add_column(col)
    p, f, lat = report["params"], report["flops"], report["latency_ms"]
    table.add_row("params", f"{p['before']:,}", f"{p['after']:,}", f"-{p['reduction']:.1%}")
    table.add_row("FLOPs/sample", f"{f['before']:,}", f"{f['after']:,}", f"-{f['reduction']:.1%}")
    table.add_row(f"CPU latency ms ({lat['threads']} thread)", f"{lat['before']:.2f}", f"{lat['after']:.2f}",
                  f"{lat['speedup']:.2f}x")
    for t, m in report["metrics"]["before"].items():
        for k, v in m.items():
            table.add_row(f"{t}/{k}", f"{v:.4f}", f"{report['metrics']['after'][t][k]:.4f}", "")
    dm = report["delta_m"]["after"]
    table.add_row("Δm% (primary, vs unpruned)", "0.00", f"n/a: {report['delta_m']['why']}" if dm is None
                  else f"{round(dm, 2) + 0.0:+.2f}", "")  # + 0.0: no "-0.00" for a change that rounds to nothing
    console.print(table)


def run(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``mtl-prune`` in this process (notebooks, scripts, tests): ``overrides`` as on the command line (a list
    of strings; one job), with the CLI's checks and failure marking (``FAILED``).
    ``run_dir``: the folder the run writes its files to (default: a new ``$MTL_OUTPUT_DIR/<name>/runs/<time>``,
    ``outputs/`` without the variable, as the CLI's; a ``hydra.run.dir=`` override names it too).
    Returns the run's report (as in its ``metrics.json``) plus ``run_dir`` (absolute)."""
    from mtl.cli.in_process import report_in_process

    job = functools.partial(run_prune, command_line=[str(o) for o in overrides or []])
    return report_in_process(job, ("mtl.configs.prune_app", "mtl.configs"), "prune", overrides, run_dir)  # the report, with run_dir
