"""Launcher and sweeper settings a multirun cannot run with, named at its start (`PrintSweepDir.on_multirun_start`,
before the sweep folder is made) in one line: otherwise they fail only once the sweep has begun, in the
plugin's own words (joblib's "n_jobs == 0 in Parallel has no meaning", Optuna's "No trials are completed
yet"), leave an empty sweep folder behind, or are silently ignored."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# Lightning starts the other ranks of local DDP by re-running the command line: the whole sweep, on every rank
LOCAL_DDP_IN_MULTIRUN = ("trainer=ddp with local processes cannot run inside a -m multirun (each rank would re-run "
                         "the sweep); use launcher=slurm, or run each job with torchrun")


def runs_local_ddp(trainer: DictConfig) -> bool:
    """The trainer would start its DDP ranks itself (no torchrun, SLURM task or other launcher gave this
    process a rank)."""
    return str(trainer.get("strategy", "")).startswith("ddp") and _processes(trainer.get("devices")) != 1 \
        and not any(k in os.environ for k in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"))


#: what Lightning's DDP sets in this process's environment for its rank 0
_RANK_ENV = ("LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


@contextmanager
def distributed_state_of_one_job():
    """Undo the rank environment and process group a job's DDP left in this process: in a multirun the next job
    runs here too, and an earlier one-process DDP job's LOCAL_RANK made a two-process one look launched by
    torchrun, so it skipped the local-DDP refusal and trained on one process."""
    import torch.distributed as dist

    from mtl.cli.environ import restored_environ

    had_group = dist.is_available() and dist.is_initialized()
    with restored_environ(_RANK_ENV):
        try:
            yield
        finally:
            if not had_group and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def _processes(devices: Any) -> int | None:
    """How many processes Lightning starts for ``trainer.devices``: one per listed device ([0] is one, as 1 and
    "0," are), the number given; None where only the machine tells ("auto", -1: counted as several, as before)."""
    if devices is None:
        return 1
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    try:
        count = int(text)
    except ValueError:
        return None
    return count if count >= 0 else None


def sweep_problem(config: DictConfig) -> str | None:
    """The refusal for the first unusable ``hydra.launcher.*`` / ``hydra.sweeper.*`` setting of ``config`` (a
    multirun's composed config), or for local DDP in a multirun; None when there is none."""
    launcher, sweeper = (config.hydra.get(k) or {} for k in ("launcher", "sweeper"))  # a hand-made config may lack one
    kind = _class_name(launcher)
    problem = {"JoblibLauncher": _joblib, "RayLauncher": _ray}.get(kind, lambda _: None)(launcher)
    if problem is None and _class_name(sweeper) == "OptunaSweeper":
        problem = _optuna(sweeper)
    # under SLURM each job's ranks come from its tasks' environment, not from re-running the command line
    if problem is None and kind != "SlurmLauncher" and config.get("trainer") is not None \
            and runs_local_ddp(config.trainer) and not swept_process_keys(config):
        problem = LOCAL_DDP_IN_MULTIRUN
    return problem or objective_problem(config) or shared_output_problem(config)


#: what decides which values a training sweep's jobs log and which one they optimise, in which direction
OBJECTIVE_KEYS = ("task", "experiment", "hparams_search", "optimized_metric", "baselines", "hydra.sweeper.direction")


def objective_problem(config: DictConfig) -> str | None:
    """The refusal of ``optimized_metric`` (a name the tasks do not log, a direction against it: `mtl.sweep.check_objective`)
    at a training sweep's start, from its tasks as configured (their metric names and directions need no data), instead
    of in every trial after its data and model are built. Left to the jobs where the sweep varies any of OBJECTIVE_KEYS
    (the sweep's config does not hold the swept values) or the tasks cannot be built without the data."""
    if "optimized_metric" not in config or not config.get("task"):
        return None
    if any(k == key or k.startswith((f"{key}.", f"{key}/")) for k in _swept(config) for key in OBJECTIVE_KEYS):
        return None
    from mtl.sweep import check_objective
    from mtl.train import build_tasks

    try:
        tasks = build_tasks(config, default_classes=2)  # (a class count changes no metric name)
    except Exception:  # noqa: BLE001  (each job names it, with the data it needs)
        return None
    try:
        check_objective(config, {t.name: list(t.metrics()) for t in tasks},
                        {t.name: dict(t.directions) for t in tasks}, sweeper=config.hydra.get("sweeper") or {})
    except (KeyError, ValueError) as e:
        from mtl.cli.common import one_line

        return one_line(e)
    return None


def shared_output_problem(config: DictConfig) -> str | None:
    """The refusal of an ``output=`` that two jobs of the multirun would both write (a fixed folder, or an
    interpolation that resolves alike for them): each job would replace the last one's result (or, without
    overwrite=true, fail only after the first finished) while every job's metrics.json named that folder.
    Under the basic sweeper each job's ``output`` is resolved from its own composed config (as its launcher composes
    it); under another sweeper (sampled values) only a fixed folder is refused, for more than one trial."""
    raw = OmegaConf.to_container(config, resolve=False).get("output")  # (resolved per job, below)
    if raw is None:
        return None  # the default: each job's own <run_dir>/...
    swept = _swept(config)
    jobs = _basic_sweep_jobs(config)
    if jobs is None:
        trials = (config.hydra.get("sweeper") or {}).get("n_trials", 2)
        same = "output" not in swept and "${" not in str(raw) and _is_number(trials) and trials > 1
        return _shared_output_message(config, raw, swept, (0, 1), os.path.abspath(str(raw))) if same else None
    if len(jobs) < 2:
        return None
    if "output" not in swept and "${" not in str(raw):
        return _shared_output_message(config, raw, swept, (0, 1), os.path.abspath(str(raw)))
    seen: dict[str, int] = {}
    sweep_dir = _sweep_dir(config)
    for num, overrides in enumerate(jobs):
        try:
            path = _job_output(config, overrides, num, sweep_dir)
        except Exception:  # noqa: BLE001  (a job that cannot compose names its own error, as it did)
            return None
        if path is not None and path in seen:
            return _shared_output_message(config, raw, swept, (seen[path], num), path)
        seen.setdefault(path, num)
    return None


def _basic_sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper lists them (``hydra.sweeper.params`` first, then the command
    line's); None under another sweeper (an optimiser samples its trials' values)."""
    if _class_name(config.hydra.get("sweeper") or {}) != "BasicSweeper":
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in ((config.hydra.sweeper.get("params") or {}).items())]
    given = params + _task_overrides(config)
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(given), None)[0]


def _job_output(config: DictConfig, overrides: list[str], num: int, sweep_dir: str) -> str | None:
    """Job `num`'s ``output``, resolved in its own config (``${hydra:job.num}`` and ``${hydra:runtime.output_dir}``,
    the job's own folder, included), as an absolute path."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    job = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
    with open_dict(job):
        job.hydra.job.id = job.hydra.job.num = num
        # set only when the job runs (None here): the job's own folder, as the launcher makes it
        job.hydra.runtime.output_dir = os.path.join(sweep_dir, str(job.hydra.sweep.subdir))
    hydra, saved = HydraConfig.instance(), HydraConfig.instance().cfg
    hydra.set_config(job)
    try:
        value = job.get("output")
    finally:
        hydra.cfg = saved
    return None if value is None else os.path.abspath(str(value))


def _sweep_dir(config: DictConfig) -> str:
    """The sweep's folder, resolved once as Hydra resolves it (a time stamp in it is read once per sweep); where it
    does not resolve yet, a stand-in: what matters is that each job's folder under it is its own."""
    try:
        return str(config.hydra.sweep.dir)
    except Exception:  # noqa: BLE001  (a resolver the CLI registers later)
        return os.path.join(os.getcwd(), "<sweep folder>")


def _shared_output_message(config: DictConfig, raw: Any, swept: set[str], jobs: tuple[int, int], path: str) -> str:
    key = next((k for k in sorted(swept) if not isinstance(OmegaConf.select(config, k), DictConfig)
                and not k.startswith("hydra.")), None)
    example = f"{raw}_${{{key}}}" if key else f"{raw}_${{hydra:job.num}}"
    return (f"output={raw} is one folder for several jobs of this multirun (jobs #{jobs[0]} and #{jobs[1]} would both "
            f"write {path}, each replacing the last one's result): make it differ per job, e.g. "
            f"output='{example}', or leave output unset (each job's own run folder)")


#: the trainer keys that decide how many processes a job starts
PROCESS_KEYS = ("trainer.devices", "trainer.num_nodes", "trainer.strategy")


def swept_process_keys(config: DictConfig) -> list[str]:
    """The PROCESS_KEYS a multirun varies (a sweep override such as trainer.devices=1,2, or a hydra.sweeper.params
    entry): Hydra leaves swept values out of the sweep's own config, so its DDP check would see the trainer
    file's devices instead of each job's; check_trainer decides for each job then."""
    swept = _swept(config)
    return [k for k in PROCESS_KEYS if k in swept]


def _swept(config: DictConfig) -> set[str]:
    """The keys and groups a multirun varies: its sweep overrides (``+``/``++`` dropped) and sweeper params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(_task_overrides(config))
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    return swept | set((config.hydra.get("sweeper") or {}).get("params") or {})


def _task_overrides(config: DictConfig) -> list[str]:
    """The command line's overrides as given (an interpolation in a value stays one, as Hydra's sweeper reads them)."""
    task = config.hydra.get("overrides", {}).get("task")
    return OmegaConf.to_container(task, resolve=False) if task else []


def _class_name(node: DictConfig | dict) -> str:
    return str(node.get("_target_") or "").rsplit(".", 1)[-1]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _joblib(launcher: DictConfig) -> str | None:
    if launcher.get("n_jobs") == 0:
        return "hydra.launcher.n_jobs=0 runs no job: set the number of worker processes (>= 1; -1: one per CPU)"
    # Hydra's joblib launcher replaces the backend with loky: these choices would be ignored, not honoured
    for key, honoured in (("backend", "loky"), ("prefer", "processes"), ("require", None)):
        value = launcher.get(key)
        if value is not None and value != honoured:
            return (f"hydra.launcher.{key}={value} would be ignored: Hydra's joblib launcher always runs its jobs in "
                    f"loky worker processes; leave hydra.launcher.{key} unset")
    return None


def _ray(launcher: DictConfig) -> str | None:
    cpus, gpus = launcher.get("cpus_per_job"), launcher.get("gpus_per_job")
    if not _is_number(cpus) or cpus <= 0:  # Ray would start every job at once, with no CPU limit
        return (f"hydra.launcher.cpus_per_job={cpus}: each job needs a CPU share > 0 (it sets how many jobs run at "
                "once; 0 would start them all together)")
    if not _is_number(gpus) or gpus < 0:
        return f"hydra.launcher.gpus_per_job={gpus}: set 0 or more GPUs per job"
    if launcher.get("address"):  # a running cluster's own resources count, known only once joined
        return None
    return ray_job_too_large({"CPU": cpus, "GPU": gpus}, {"CPU": launcher.get("num_cpus"), "GPU": launcher.get("num_gpus")})


def ray_job_too_large(want: dict[str, Any], have: dict[str, Any]) -> str | None:
    """The refusal of a job needing more CPUs or GPUs than a local Ray cluster has (a local cluster never grows: it
    would wait forever), None when it fits or a size is unknown; for the given sizes at the sweep's start and for
    the sizes Ray detected once started (the launcher)."""
    for kind in ("CPU", "GPU"):
        job, cluster = want.get(kind), have.get(kind)
        if job and _is_number(cluster) and job > cluster:
            key = f"num_{kind.lower()}s"
            return (f"hydra.launcher.{kind.lower()}s_per_job={job} exceeds the local Ray cluster's {cluster:g} {kind}s "
                    f"(hydra.launcher.{key}); no job could ever start")
    return None


def _optuna(sweeper: DictConfig) -> str | None:
    for key, why in (("n_trials", "the study would end without a best trial"),
                     ("n_jobs", "the trials run in batches of n_jobs")):
        value = sweeper.get(key)
        if not isinstance(value, int) or value < 1:
            return f"hydra.sweeper.{key}={value}: {why}; set it to 1 or more"
    given = sweeper.get("direction")
    directions = list(given) if isinstance(given, (list, tuple, ListConfig)) else [given]
    names = [getattr(d, "name", d) for d in directions]  # the plugin's Direction enum, or the string Optuna takes
    if not names or any(n not in ("maximize", "minimize") for n in names):
        return f"hydra.sweeper.direction={given}: Optuna takes maximize or minimize"
    rate = sweeper.get("max_failure_rate")
    if not _is_number(rate) or not 0 <= rate <= 1:
        return (f"hydra.sweeper.max_failure_rate={rate}: the share of a batch's trials that may fail must be within "
                "[0, 1]")
    return None
