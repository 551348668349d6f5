"""Checks of an ``mtl-train`` run made before (or as) training starts, so a bad setting fails in seconds with
one line naming it, and the run folder kept apart from a failed attempt's files."""
from __future__ import annotations

import logging
import os
import pickle
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mtl.cli.failures import FAILED
from mtl.folder_checks import same_json
from mtl.io import as_plain
from mtl.registry import check_int, check_kwargs, meant

log = logging.getLogger("mtl.train")

__all__ = ["ABSENT", "changed_on_resume", "check_checkpoint", "check_eval_splits", "check_precision", "check_resume_length",
           "check_test_batches", "check_trainer", "check_validation", "finished_run_refusal", "hydra_override", "hydra_value", "read_checkpoint", "resume_refusal",
           "resume_start", "set_aside_failed_attempt", "warn_seed_of_resume"]


def check_eval_splits(trainer, datamodule) -> None:
    """Under DDP each process evaluates its own share of val and test, with no image repeated (metrics
    count each once): a split smaller than the process count leaves a process none, and evaluation
    would fail only after training."""
    world = int(getattr(trainer, "world_size", 1) or 1)
    if world <= 1 or not hasattr(datamodule, "dataset"):
        return
    for split in ("val", "test"):
        n = len(datamodule.dataset(split))
        if n < world:
            raise ValueError(f"data: the {split} split has {n} image(s), fewer than the {world} processes "
                             f"(trainer.devices × trainer.num_nodes), each of which evaluates its own share; "
                             f"use at least {world} {split} images or fewer processes")


def set_aside_failed_attempt(run_dir: Path, ckpt_path: Any) -> None:
    """A new attempt in a failed run's folder: that attempt's training curves go to ``csv.failed/`` (the CSV
    logger would start its ``metrics.csv`` afresh, even when resuming) and its checkpoints to
    ``checkpoints.failed/`` (each replacing an older set there), so ``checkpoints/`` holds this run's best and
    last only. The checkpoints stay when this run resumes from a checkpoint anywhere in the folder (which files
    of them a later epoch of the failed attempt wrote cannot be told safely: modification times do not survive a
    copy, and the resumed checkpoint's own best must stay)."""
    if not (run_dir / FAILED).is_file():
        return
    if (run_dir / "csv" / "metrics.csv").is_file():
        shutil.rmtree(run_dir / "csv.failed", ignore_errors=True)
        os.replace(run_dir / "csv", run_dir / "csv.failed")
        log.warning("run_dir %s held a failed attempt's training curves: moved to %s", run_dir, run_dir / "csv.failed")
    # records a failed attempt wrote before failing (e.g. saving baselines after testing): without FAILED they
    # would make the folder pass for a finished run while this attempt trains
    for name, aside, what in (("model", "model.failed", "model folder"), ("metrics.json", "metrics.failed.json", "metrics")):
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / aside, ignore_errors=True)  # (a file is replaced by os.replace itself)
            os.replace(run_dir / name, run_dir / aside)
            log.warning("run_dir %s held a failed attempt's %s: moved to %s", run_dir, what, run_dir / aside)
    old = run_dir / "checkpoints"
    if not old.is_dir() or not any(old.iterdir()):
        return
    aside = run_dir / "checkpoints.failed"
    if ckpt_path and run_dir.resolve() in Path(str(ckpt_path)).resolve().parents:
        return  # resuming from a checkpoint in this folder (checkpoints/ or checkpoints.failed/): move nothing
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(old, aside)
    log.warning("run_dir %s held a failed attempt's checkpoints: moved to %s", run_dir, aside)


def finished_run_refusal(run_dir: Path, found: list[str]) -> str:
    """Why a run folder holding a finished run (``found``: its records) is refused: whose run it is (the CLI its
    config.yaml records) and, only for a training run with a last checkpoint, how to continue it (a merge, prune,
    export or extract run has no checkpoint to resume)."""
    try:
        record = OmegaConf.load(run_dir / "config.yaml")
    except Exception:  # noqa: BLE001  (no readable record: say what the folder holds, not whose it is)
        record = None
    name = record.get("name") if isinstance(record, DictConfig) else None
    training = isinstance(record, DictConfig) and "trainer" in record
    job = (f" of mtl-train (name: {name})" if training else
           f" of mtl-{name}" if name in ("merge", "prune", "export", "extract") else "")
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = f"; to continue it, pass ckpt_path={last} with a new folder" if training and last.is_file() else ""
    return f"run_dir {run_dir} holds a finished run ({', '.join(found)}){job}; pick a new folder{resume}"


def check_trainer(tr: DictConfig) -> None:
    """Trainer settings that would fail (or mislead) only once training starts, named now."""
    # the keys go to lightning.Trainer, whose "unexpected keyword" would come after the run folder is written
    check_kwargs(L.Trainer.__init__, OmegaConf.to_container(tr, resolve=True), "trainer",
                 given={"callbacks": "use callbacks.<name>=...", "logger": "use logger=<name>",  # the job passes these
                        "default_root_dir": "the run folder; use hydra.run.dir=..."})
    accelerator = tr.get("accelerator")
    if isinstance(accelerator, str):  # Lightning's own names (its registry, plus auto and gpu, as its Trainer takes)
        from lightning.pytorch.accelerators import AcceleratorRegistry

        names = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
        if accelerator not in names:
            raise ValueError(f"trainer.accelerator={accelerator!r} is not an accelerator; use one of {', '.join(names)}")
        kind = AcceleratorRegistry[accelerator]["accelerator"] if accelerator not in ("auto", "gpu", "cuda") else None
        if kind is not None and not kind.is_available():  # mps off a Mac, tpu without XLA: Lightning's error came later
            raise RuntimeError(f"trainer.accelerator={accelerator} is not available on this machine ({kind.__name__}); "
                               "use trainer=cpu or trainer.accelerator=auto")
    strategy = tr.get("strategy")
    if isinstance(strategy, str):  # Lightning's names, as its Trainer takes them (lowercased; a Strategy object passes)
        from lightning.pytorch.strategies import StrategyRegistry

        names = ["auto", *sorted(StrategyRegistry.available_strategies())]  # trainer=ddp and trainer=fsdp among them
        if strategy.lower() not in names:
            raise ValueError(f"trainer.strategy={strategy!r} is not a strategy{meant([strategy.lower()], names)}; "
                             f"use one of {', '.join(names)}")
    cuda = torch.cuda.is_available()
    if str(accelerator) in ("gpu", "cuda") and not cuda:
        raise RuntimeError(f"trainer.accelerator={tr.accelerator} needs a CUDA GPU and torch sees none; use trainer=cpu")
    if str(tr.get("strategy", "")).startswith("fsdp") and not cuda:
        raise RuntimeError("trainer=fsdp needs CUDA GPUs (Lightning's FSDP has no CPU backend); on CPU use trainer=ddp")
    # mtlkit steps the optimiser itself (balancers act on each step's task gradients): Lightning's automatic
    # accumulation and clipping do not apply
    if tr.get("accumulate_grad_batches") not in (None, 1):
        raise ValueError(f"trainer.accumulate_grad_batches={tr.accumulate_grad_batches} is not supported (each step's "
                         "task gradients feed the balancer); raise data.batch_size instead")
    if tr.get("gradient_clip_val") is not None:
        raise ValueError(f"trainer.gradient_clip_val={tr.gradient_clip_val}: mtlkit clips with optim.grad_clip=<max norm>")
    if tr.get("gradient_clip_algorithm") is not None and str(tr.gradient_clip_algorithm).lower() != "norm":  # Lightning's clipping does not run (see above)
        raise ValueError(f"trainer.gradient_clip_algorithm={tr.gradient_clip_algorithm}: mtlkit clips only by norm, "
                         "with optim.grad_clip=<max norm>")
    # the cosine schedule needs a finite length; 0 epochs (or 0 batches) would save an untrained model as a finished run
    check_int("trainer.max_epochs", tr.get("max_epochs"), 1)
    limit = tr.get("limit_train_batches")
    if limit is not None and not isinstance(limit, str) and limit == 0:  # Lightning skips fit, tests the initial weights
        raise ValueError(f"trainer.limit_train_batches={limit} trains no step and would save an untrained model as a "
                         "finished run; use a batch count >= 1 or a fraction in (0, 1] (null: every batch)")
    steps = tr.get("max_steps")
    if steps is not None and not isinstance(steps, bool) and isinstance(steps, int) and steps == 0:  # as above
        raise ValueError("trainer.max_steps=0 trains no step and would save an untrained model as a finished run; "
                         "use a step count >= 1 (-1 or null: no step limit)")
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mtl.cli.sweep_checks import LOCAL_DDP_IN_MULTIRUN, runs_local_ddp

    # the sweep refuses trainer=ddp at its start; a swept choice (trainer=cpu,ddp) is known only to its job
    if runs_local_ddp(tr) and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ValueError(LOCAL_DDP_IN_MULTIRUN)


def check_test_batches(cfg: DictConfig) -> None:
    """``trainer.limit_test_batches=0`` makes Lightning skip testing: ``metrics.json["test"]`` stays empty, so
    ``baselines.save_to`` would save an empty entry and ``baselines.path`` fail only after training."""
    limit = cfg.trainer.get("limit_test_batches")
    if limit is None or isinstance(limit, str) or limit != 0:
        return
    needs = [f"baselines.{k}" for k in ("save_to", "path") if (cfg.get("baselines") or {}).get(k)]
    if needs:
        raise ValueError(f"trainer.limit_test_batches={limit} tests nothing, and {needs[0]} needs the test metrics; "
                         "use a batch count >= 1 or a fraction in (0, 1] (null: every batch)")
    log.warning("trainer.limit_test_batches=%s: no test, so metrics.json['test'] and the model folder's test metrics "
                "are empty", limit)


def check_validation(cfg: DictConfig) -> bool:
    """Whether this schedule provably runs a validation (a ``False`` is warned about): without one the checkpoint
    tested and saved is the last trained, and ``metrics.json["val"]`` stays empty, so a sweep objective read from
    the validation metrics (``optimized_metric``) is refused now instead of after training."""
    tr = cfg.trainer
    limit, every = tr.get("limit_val_batches"), tr.get("check_val_every_n_epoch")
    if limit is not None and not isinstance(limit, str) and limit == 0:
        why = f"trainer.limit_val_batches={limit}"
    elif isinstance(every, int) and not isinstance(every, bool) and every > tr.max_epochs:
        why = f"trainer.check_val_every_n_epoch={every} with trainer.max_epochs={tr.max_epochs}"
    else:
        return True
    if cfg.get("optimized_metric"):
        raise ValueError(f"optimized_metric={cfg.optimized_metric} is read from the validation metrics, and {why} "
                         "runs no validation; validate at least once (check_val_every_n_epoch <= max_epochs)")
    log.warning("%s: no validation, so the checkpoint tested and saved is the last epoch's and metrics.json['val'] "
                "is empty", why)
    return False


def check_checkpoint(path: Path) -> None:
    """A Lightning checkpoint is a torch zip archive; a model folder or its files are not (their
    weights start a run through init_from instead)."""
    import zipfile

    if path.is_dir():
        last = path / "last.ckpt" if (path / "last.ckpt").is_file() else path / "checkpoints" / "last.ckpt"
        hint = f"; did you mean {last}?" if last.is_file() else ""
        raise IsADirectoryError(f"ckpt_path {path} is a folder, not a checkpoint file (a Lightning .ckpt, e.g. "
                                f"<run>/checkpoints/last.ckpt){hint}")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path {path}: no such file (a Lightning .ckpt, e.g. <run>/checkpoints/last.ckpt)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"ckpt_path {path}: not a Lightning checkpoint (a torch zip archive such as "
                         "<run>/checkpoints/last.ckpt); to start from a model folder's weights use init_from=<folder>")


def check_resume_length(tr: DictConfig, path: Path, ckpt: dict[str, Any] | None = None) -> None:
    """A resume past its own schedule (``trainer.max_epochs`` / ``max_steps`` below what the checkpoint trained) is
    refused: it would train nothing and record a shorter schedule than the one run. One that has just reached it
    tests and saves the checkpoint, which finishes a job interrupted after training (docs/scaleout.md): said so.
    ``ckpt``: the checkpoint as `read_checkpoint` gives it, when the caller has read it already."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    progress = ((ckpt.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}
    found = [("max_epochs", tr.get("max_epochs"), (progress.get("current") or {}).get("processed"), "epoch(s)"),
             ("max_steps", tr.get("max_steps"), ckpt.get("global_step"), "steps")]
    for key, limit, done, unit in found:
        if done is None or not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            continue
        if limit < done:
            raise ValueError(f"ckpt_path {path} has already trained {done} {unit} and trainer.{key}={limit}: the "
                             f"resume would train nothing; set trainer.{key} to {done} to test and save it as it "
                             f"is, or above {done} to train longer")
        if limit == done:
            log.warning("ckpt_path %s has trained all %d %s of trainer.%s=%d: nothing to train; the resume tests and "
                        "saves it (raise trainer.%s to train longer)", path, done, unit, key, limit, key)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, its tensors memory-mapped (not read); refused in one line (`torch_load_refusal`)
    when it needs unpickling beyond tensors and plain data or is no torch checkpoint at all (a zip of other files)."""
    from mtl.torch_load import torch_load_refusal

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(torch_load_refusal(f"ckpt_path {path}", e)) from None


def resume_start(cfg: DictConfig, path: Path, ckpt: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The start record (`mtl.warm_start.start_record`) of the run resumed from checkpoint ``path``, which the
    resume keeps: ``init_from`` left out inherits it (its folder must still be there: a pruned start's architecture
    comes from it), one holding the same weights (equal weights digest) at another path records that path (the start
    was moved or copied), other weights are refused (`changed_start`). A checkpoint from before the record was kept:
    this run's ``init_from``, if any, is taken as it is, with a warning. ``ckpt``: as in `check_resume_length`."""
    from mtl.warm_start import start_record

    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    stored = (ckpt or {}).get("hyper_parameters") or {}
    now = start_record(cfg.init_from) if cfg.get("init_from") else None
    if "start" not in stored:
        log.warning("ckpt_path %s predates the start record: whether its run was a fine-tune (init_from) is unknown; "
                    "%s", path, f"recording init_from={now['init_from']} as given" if now else
                    "the model folder records no init_from (pass the run's init_from= to record it)")
        return now
    then = stored["start"]
    changed = changed_start(then, now)
    if changed is not None:
        raise ValueError(resume_refusal(changed))
    if then is None:
        return None
    if now is None:
        if not Path(then["init_from"]).is_dir():
            raise ValueError(f"ckpt_path {path}: its run started from init_from={then['init_from']}, which is no longer "
                             "a folder; pass init_from=<its new location> (its weights digest is checked against the "
                             "checkpoint's record)")
        return then
    if now["init_from"] != then["init_from"]:
        log.info("init_from=%s holds the checkpoint's start weights (weights digest %s) recorded at %s: the start "
                 "moved; recording its new location", now["init_from"], now.get("init_from_weights_digest"),
                 then["init_from"])
    return {**then, "init_from": now["init_from"]}


def changed_start(then: dict[str, Any] | None, now: dict[str, Any] | None) -> tuple[str, Any, Any, str] | None:
    """A resume's ``init_from`` (``now``, its start record; None: left out, which keeps the checkpoint's) that is not
    the checkpoint's start ``then`` (None: trained from scratch), as `changed_on_resume` reports it. The weights
    digests decide where both are recorded (a start moved or copied is the same start); the paths, where neither is."""
    if now is None:
        return None
    records = "and the model folder would record this one as their start (merge pools check it)"
    if then is None:
        return "init_from", now["init_from"], None, f"its weights are trained from scratch, {records}"
    digests = [r.get("init_from_weights_digest") for r in (now, then)]
    if all(digests):
        if digests[0] == digests[1]:
            return None
        why = f"its weights were trained from {then['init_from']}'s, not from these, {records}"
        if now["init_from"] == then["init_from"]:
            why += "; the folder holds other weights since"
        return ("init_from", f"{now['init_from']} (weights digest {digests[0]})",
                f"{then['init_from']} (weights digest {digests[1]})", why)
    if not any(digests) and now["init_from"] == then["init_from"]:
        return None
    lacking = " or ".join(n for n, d in zip(("this folder", "the checkpoint's record"), digests) if not d)
    return ("init_from", now["init_from"], then["init_from"],
            f"whether it holds the weights its run started from is unknown (no weights digest in {lacking}), {records}")


def warn_seed_of_resume(cfg: DictConfig, ckpt: Path) -> None:
    """A resume continues the random streams stored in the checkpoint: a ``seed`` other than its run's
    (``<run>/config.yaml`` beside ``checkpoints/``) is not used, and config.yaml would record it anyway."""
    stored = ckpt.resolve().parent.parent / "config.yaml"
    if ckpt.parent.name != "checkpoints" or not stored.is_file():
        return
    try:
        seed = OmegaConf.load(stored).get("seed")
    except Exception:  # noqa: BLE001  (an unreadable record: nothing to compare, the resume goes on)
        return
    if seed is not None and seed != cfg.get("seed"):
        log.warning("seed=%s differs from the resumed run's seed %s (%s): a resume continues the random streams "
                    "its checkpoint holds, so this seed is not used", cfg.get("seed"), seed, stored)


def check_precision(cfg: DictConfig, trainer: L.Trainer | None = None) -> None:
    """Lightning replaces a precision the accelerator lacks (fp16 AMP on a CPU becomes bf16-mixed) with a
    warning; the run would then record one precision and train in another. Without ``trainer`` (before the run
    folder): the config's precision, and Lightning's one replacement, fp16 AMP on the CPU accelerator it will pick;
    with it, whatever precision the built trainer ended with (any other replacement)."""
    asked = str(cfg.trainer.get("precision", "32-true"))
    asked = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}.get(asked, asked)
    if asked.endswith("-true") and asked != "32-true":  # found now, not by save_model after the whole run
        dtype = {"bf16-true": "bfloat16", "16-true": "float16", "64-true": "float64"}.get(asked, asked)
        raise ValueError(f"trainer.precision={asked} keeps the weights in {dtype}, and model folders hold "
                         "float32 weights; use trainer.precision=bf16-mixed (bfloat16 compute, float32 weights) or 32-true")
    if trainer is None:
        if asked == "16-mixed" and _picks_cpu(cfg.trainer.get("accelerator", "auto")):
            raise ValueError(_unavailable(asked, "CPUAccelerator", "bf16-mixed"))
    elif str(trainer.precision) != asked:
        raise ValueError(_unavailable(asked, type(trainer.accelerator).__name__, trainer.precision))


def _unavailable(asked: str, accelerator: str, used: str) -> str:
    return (f"trainer.precision={asked} is not available on {accelerator} (Lightning would train in {used}); use "
            f"trainer.precision={used} or run on a GPU")


def _picks_cpu(accelerator: Any) -> bool:
    """Whether Lightning's Trainer resolves ``trainer.accelerator`` to the CPU: ``cpu``, or ``auto`` on a machine
    with none of the devices it prefers (TPU, MPS, CUDA, in its order)."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator, XLAAccelerator

    if str(accelerator) != "auto":
        return str(accelerator) == "cpu"
    return not any(a.is_available() for a in (XLAAccelerator, MPSAccelerator, CUDAAccelerator))


#: balancer settings that leave a finite step's update as it is (memory layout; a recovery switch past a NaN)
_RESUMABLE_BALANCER_KEYS = ("parallel_chunk_size", "skip_nonfinite")


def changed_on_resume(stored: dict[str, Any], hparams: Any, tasks: dict[str, Any]) -> tuple[str, Any, Any, str] | None:
    """The first setting a resume would change: (its config key, this run's value, the checkpoint's, why that is
    refused), or None. Settings a checkpoint lacks (older ones) are not compared."""
    if "start" in stored:  # (None: trained from scratch)
        changed = changed_start(stored["start"], hparams.get("start"))
        if changed is not None:
            return changed
    for key in ("lr", "weight_decay"):  # the restored optimiser keeps the checkpoint's: a new value is never used
        if key in stored and float(stored[key]) != float(hparams[key]):
            return (f"optim.{key}", hparams[key], stored[key],
                    f"resuming restores its optimiser, so it would train at {stored[key]}")
    # the rest would apply from the resumed step on, while config.yaml and metrics.json record them for the whole run
    def mixed(then: Any, now: Any) -> str:
        trained = "without it" if then is ABSENT else f"with {hydra_value(then)}"
        named = "leave it out" if now is ABSENT else f"name only {hydra_value(now)}"
        return f"the epochs so far trained {trained}, and this run's records would {named} for all of them"

    for key in ("warmup_ratio", "min_lr_ratio"):
        if key in stored and float(stored[key]) != float(hparams[key]):
            return f"optim.{key}", hparams[key], stored[key], mixed(stored[key], hparams[key])
    if "grad_clip" in stored and as_plain(stored["grad_clip"]) != as_plain(hparams["grad_clip"]):
        return "optim.grad_clip", hparams["grad_clip"], stored["grad_clip"], mixed(stored["grad_clip"], hparams["grad_clip"])
    if "strategy" in stored:  # a slimmable run's sandwich settings (CI-KD, in-place distillation, ...)
        then_s, now_s = stored["strategy"], hparams["strategy"]
        if not then_s or not now_s:  # a strategy on one side only: the whole setting differs
            if bool(then_s) != bool(now_s):
                return "strategy", now_s, then_s, mixed(then_s, now_s)
        else:  # a key on one side only is ABSENT on the other (its override adds or removes it)
            then_s, now_s = dict(then_s), dict(now_s)
            for key in sorted(set(then_s) | set(now_s)):
                then, now = then_s.get(key, ABSENT), now_s.get(key, ABSENT)
                if as_plain(then) != as_plain(now):
                    return f"strategy.{key}", now, then, mixed(then, now)
    then, now = dict(stored.get("balancer") or {}), dict(hparams["balancer"])
    if then.get("name", now["name"]) != now["name"]:
        return "balancer", now["name"], then["name"], mixed(then["name"], now["name"])
    for key in sorted(set(then) & set(now) - set(_RESUMABLE_BALANCER_KEYS)):
        if as_plain(then[key]) != as_plain(now[key]):  # a tuple in Python, a list in a config: the same setting
            return f"balancer.{key}", now[key], then[key], mixed(then[key], now[key])
    weights = {t.get("name"): t.get("weight") for t in (stored.get("model") or {}).get("tasks") or []}
    for name, task in tasks.items():
        if weights.get(name) is not None and float(weights[name]) != task.weight:
            return f"task.{name}.weight", task.weight, weights[name], mixed(weights[name], task.weight)
    if stored.get("model"):
        changed = _changed_model(dict(stored["model"]), dict(hparams["model"]))
        if changed is not None:
            key, then, now = changed
            return key, now, then, mixed(then, now)
    return None


def _changed_model(then: dict[str, Any], now: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first model setting (its config key, the checkpoint's value, this run's) that differs: a checkpoint's
    model config holds its settings resolved (task_moe_vit's renormalize null as true/false), so one a default
    changed since is found too. A key the checkpoint lacks is not compared (saved before the setting existed)."""
    named = lambda t: {d.get("name"): dict(d) for d in t.get("tasks") or []}  # noqa: E731
    then_tasks, now_tasks = named(then), named(now)
    if set(then_tasks) != set(now_tasks):
        return "task", list(then_tasks), list(now_tasks)
    for name, task in then_tasks.items():
        for key in sorted(set(task) - {"name", "weight"}):  # (weights are compared by the caller)
            if _differ(task[key], now_tasks[name].get(key, ABSENT)):
                return f"task.{name}.{key}", task[key], now_tasks[name].get(key, ABSENT)
    for part in sorted(set(then) - {"tasks"}):
        if isinstance(then[part], Mapping) and isinstance(now.get(part), Mapping):  # backbone, decoder
            for key in sorted(then[part]):
                if _differ(then[part][key], now[part].get(key, ABSENT)):
                    return f"{part}.{key}", then[part][key], now[part].get(key, ABSENT)
        elif _differ(then[part], now.get(part, ABSENT)):
            return part, then[part], now.get(part, ABSENT)
    return None


def _differ(then: Any, now: Any) -> bool:
    # as JSON reads them (same_json): a recorded true is not 1, as it is for Python's ==
    return not same_json(as_plain(then), as_plain(now))


class _Absent:
    """A setting one side (this config or the checkpoint) does not have."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()


def resume_refusal(changed: tuple[str, Any, Any, str]) -> str:
    """The one-line refusal of `changed_on_resume`'s finding, its values written as overrides, so that the advised
    ``resume with <override>`` can be pasted onto the command line as it is: ``key=value``, ``+key=value`` for a key
    this config lacks (Hydra adds no key without ``+``), ``~key`` for one the checkpoint lacks."""
    key, now, then, why = changed
    if key == "init_from":  # left out, a resume keeps the checkpoint's start
        then = "none (trained from scratch)" if then is None else then
        return (f"init_from={now} differs from the checkpoint's start {then}: {why}; resume without init_from "
                "(the checkpoint's start is kept), or start a new run from its weights with init_from=<model folder>")
    if now is ABSENT:
        differs, advice = f"{key} is not set here and the checkpoint's is {hydra_value(then)}", hydra_override(f"+{key}", then)
    elif then is ABSENT:
        differs, advice = f"{key}={hydra_value(now)} is not in the checkpoint", shlex.quote(f"~{key}")
    else:
        differs, advice = f"{key}={hydra_value(now)} differs from the checkpoint's {hydra_value(then)}", hydra_override(key, then)
    return f"{differs}: {why}; resume with {advice}, or start a new run from its weights with init_from=<model folder>"


def hydra_override(key: str, value: Any) -> str:
    """``key=value`` as a shell command line passes it to Hydra: quoted where the shell would split or expand it
    (a list's brackets, a mapping's braces)."""
    return shlex.quote(f"{key}={hydra_value(value)}")


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar, which reads it back as the same value: None is ``null`` (Python's
    ``None`` would be read as the string 'None'), booleans ``true``/``false``, a string quoted when the grammar would
    read it otherwise (``"null"``, ``"1.0"``, ``"a b"``)."""
    import numbers
    from collections.abc import Mapping

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):  # numpy's too
        return repr(float(value))
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{hydra_value(str(k))}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    return text if _reads_back(text) else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _reads_back(text: str) -> bool:
    """Hydra reads ``text`` unquoted as this very string."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(f"key={text}").value()
    except Exception:  # noqa: BLE001  (not valid unquoted: quote it)
        return False
    return isinstance(parsed, str) and parsed == text
