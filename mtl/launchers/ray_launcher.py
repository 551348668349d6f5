"""A Hydra launcher that runs a multirun's jobs as Ray tasks, on a local Ray cluster or an existing one.

Each job is one Ray task that does what Hydra's basic launcher does in-process: load the job's sweep
config, give it its number and run it with ``run_job`` (its own run folder ``<sweep dir>/<n>``, its
own log file, its own ``.hydra`` copy of the config). Results come back as Hydra ``JobReturn``s in the
order of the jobs. Ray itself is imported only when a multirun launches (extra ``ray``).

Hydra instantiates a launcher only when its ``_target_`` lies in the ``hydra_plugins`` namespace, so
`register` enters the class under `HYDRA_TARGET`; the mtlkit CLIs call it before Hydra starts.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl.cli.common import verbose
from mtl.cli.sweep_end import remove_unused_sweep_dir

log = logging.getLogger(__name__)

HYDRA_TARGET = "hydra_plugins.mtlkit.RayLauncher"
MISSING_RAY = "launcher=ray needs ray: pip install 'mtlkit[ray]'"


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(MISSING_RAY) from e
    return ray


def register() -> None:
    """Make ``_target_: hydra_plugins.mtlkit.RayLauncher`` instantiate `RayLauncher`."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()
    plugins.register(RayLauncher)  # checks it is a concrete Launcher and lists it among Hydra's launchers
    plugins.class_name_to_class[HYDRA_TARGET] = RayLauncher


class JobExit(RuntimeError):
    """A job that ended through ``sys.exit`` after printing its error (how every mtlkit CLI job fails)."""


def hydra_job(idx: int, overrides: Sequence[str], hydra_context: HydraContext, config: DictConfig,
                 task_function: TaskFunction, singleton_state: dict[Any, Any]) -> JobReturn:
    """One job inside a Ray worker: the basic launcher's loop body, with Hydra's globals restored."""
    from hydra.core.hydra_config import HydraConfig

    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    try:
        return run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    except SystemExit as e:  # an mtlkit job prints its error and exits: keep the worker, report the cause
        if e.code in (0, None):
            raise
        cause = f": {type(e.__context__).__name__}: {e.__context__}" if e.__context__ else ""
        return JobReturn(overrides=list(overrides), cfg=sweep_config, status=JobStatus.FAILED,
                         _return_value=JobExit(f"job #{idx} ({' '.join(filter_overrides(overrides))}) "
                                               f"exited with status {e.code}{cause}"))


class RayLauncher(Launcher):
    """``address``: an existing cluster (``auto``, ``ray://host:10001``) or null for a local one of
    ``num_cpus``/``num_gpus``; ``cpus_per_job``/``gpus_per_job``: each job's Ray resources (how many run
    at once); ``init``: more ``ray.init`` arguments (``runtime_env``, ``object_store_memory``, ...)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                 cpus_per_job: float = 1, gpus_per_job: float = 0, init: dict[str, Any] | None = None) -> None:
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.cpus_per_job, self.gpus_per_job = cpus_per_job, gpus_per_job
        self.init = OmegaConf.to_container(init, resolve=True) if isinstance(init, DictConfig) else dict(init or {})
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def _init_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"include_dashboard": False, **self.init}
        if self.address:
            kw["address"] = self.address  # the cluster's own resources count; num_cpus/num_gpus are for a new one
        else:
            kw.update({k: v for k, v in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus)) if v is not None})
        return kw

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        ray = import_ray()
        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)

        started = not ray.is_initialized()
        if started:
            kw = self._init_kwargs()
            try:
                ray.init(**kw)
            except Exception as e:
                where = f"connect to the Ray cluster at {self.address}" if self.address else "start a local Ray cluster"
                if verbose():
                    raise
                print(f"error: launcher=ray could not {where} (ray.init({kw})): {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
                sys.exit(1)
        if started and not self.address:  # a local cluster never grows: a job larger than it would wait forever
            from mtl.cli.sweep_checks import ray_job_too_large

            have = ray.cluster_resources()
            too_large = ray_job_too_large({"CPU": self.cpus_per_job, "GPU": self.gpus_per_job},
                                          {k: have.get(k, 0) for k in ("CPU", "GPU")})
            if too_large:
                ray.shutdown()
                remove_unused_sweep_dir()
                print(f"error: {too_large}", file=sys.stderr, flush=True)
                sys.exit(1)
        try:
            log.info("Ray is launching %d jobs (%s CPU, %s GPU each) into %s", len(job_overrides), self.cpus_per_job,
                     self.gpus_per_job, sweep_dir)
            remote = ray.remote(num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job, max_retries=0)(hydra_job)
            state = Singleton.get_state()
            refs = []
            for i, overrides in enumerate(job_overrides):
                idx = initial_job_idx + i
                log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
                refs.append(remote.remote(idx, list(overrides), self.hydra_context, self.config, self.task_function,
                                          state))
            runs = ray.get(refs)  # in submission order, whatever order they finish in
        finally:
            if started:
                ray.shutdown()
        assert all(isinstance(r, JobReturn) for r in runs)
        exits = [r._return_value for r in runs if r.status == JobStatus.FAILED and isinstance(r._return_value, JobExit)]
        if exits and not verbose():  # the CLI convention: one line per failed job, no traceback
            for e in exits:
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        # Ray relays the jobs' console output asynchronously and may drop its tail at shutdown, so the
        # run folders are printed here, in job order: the last line names the last job's, as in-process
        for r in runs:
            if r.hydra_cfg is not None:
                print(f"run_dir: {r.hydra_cfg.hydra.runtime.output_dir}", flush=True)
        return runs
