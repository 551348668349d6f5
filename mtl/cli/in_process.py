"""The CLIs' in-process twins (`mtl.train.run`, `merging.job.run`, ...): the same Hydra composition,
checks and failure marking as the console scripts, for notebooks, scripts and tests."""
from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from mtl.atomic import make_parents, user_path
from mtl.cli.choices import check_overrides
from mtl.cli.environ import restored_environ
from mtl.cli.common import (LEAFSPEC_WARNING, _rank0, check_group_choices, check_required, check_run_name,
                            hydra_message, register_resolvers)
from mtl.cli.failures import (Terminated, claims_run_folder, interrupted_message, interruption, marks_failure,
                              output_root, output_root_problem, override_value)
from mtl.cli.new_folders import made_for_run, missing_or_empty, note_made, removes_unused_folder

__all__ = ["default_run_dir", "compose_in_process", "check_single_job", "run_in_process", "report_in_process"]


def default_run_dir(name: str) -> Path:
    """Where an in-process run goes when no folder is given: like the CLI's run folders
    (``$MTL_OUTPUT_DIR/<name>/runs/<time>``, default ``outputs``), unique within one second too."""
    name = check_run_name(name)
    root = output_root()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{time.time_ns() // 1000 % 1_000_000:06d}"
    base = root / name / "runs" / stamp
    try:
        parents = make_parents(base.parent)
    except OSError as e:
        problem = output_root_problem(e)
        if problem is None:
            raise
        error = type(e)(problem)  # one line naming MTL_OUTPUT_DIR, not "[Errno 20] ..." on a path under it
        error.errno = e.errno
        raise error from None
    path, n = base, 0
    while True:
        try:
            path.mkdir(exist_ok=False)
            note_made(path, tuple(p.absolute() for p in (path, *parents)))  # removed by a refusal before the run
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def compose_in_process(config_module: str, config_name: str, overrides, run_dir=None):
    """Compose a CLI's Hydra config without running the app (notebooks, tests, scripts) and point its
    output at `run_dir` (or a ``hydra.run.dir=<path>`` override, as on the CLI; default: a new folder
    under ``$MTL_OUTPUT_DIR/<name>/runs/``, see `default_run_dir`); returns ``(cfg, run_dir)``.

    Safe inside another Hydra app (mtl-merge builds its smoke pool with mtl-train's config): the
    outer app's global Hydra state is restored afterwards.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf import OmegaConf

    from hydra.errors import HydraException

    register_resolvers()
    outer = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=config_module, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
    except HydraException as e:  # a misspelt key or a malformed override: one line, as the CLI says it
        from mtl.cli.choices import near_setting

        raise ValueError(near_setting(hydra_message(e), config_module, e.__cause__)) from None
    finally:
        restore_gh_from_backup(outer)
    given = override_value(overrides, "hydra.run.dir")
    if given is not None:  # the CLI's way to name the folder: honoured here too, never silently dropped
        if "${" in given:
            raise ValueError(f"hydra.run.dir={given} uses an interpolation, which only the CLI resolves; "
                             "in Python pass run_dir= (a path) instead")
        if run_dir is not None and Path(run_dir) != Path(given):
            raise ValueError(f"run_dir={str(run_dir)!r} and the override hydra.run.dir={given} name different "
                             "folders; give one of them")
        run_dir = given
    # a leading ~ expanded, as the shell would: a folder named "~" in the working directory is never meant
    run_dir = default_run_dir(cfg.name) if run_dir is None else user_path(str(run_dir))
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = str(run_dir)
    return cfg, Path(run_dir)


def check_single_job(overrides: Sequence[str]) -> None:
    """The in-process twins run one job: a sweep (``hparams_search=``, ``launcher=``, ``a=1,2``) is the CLI's
    ``-m``, refused by name instead of one ordinary run with the sweeper or launcher ignored."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in overrides:
        key, _, value = o.partition("=")
        if o.startswith("~") or value.strip() in ("null", ""):
            continue  # removing the group, or choosing none: no sweep
        if key.lstrip("+") in ("hparams_search", "launcher", "hydra/sweeper", "hydra/launcher"):
            raise ValueError(f"{o}: an in-process run is one job; sweeps and launchers run from the command line "
                             "(mtl-train -m ...)")
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if "=" in o])
    except Exception:  # noqa: BLE001  (a malformed override: the composition names it)
        return
    swept = [p.input_line for p in parsed if p.is_sweep_override()]
    if swept:
        raise ValueError(f"{swept[0]}: a sweep of values; an in-process run is one job (run one per value, or "
                         "mtl-train -m ... from the command line)")


def run_in_process(job: Callable[[Any, Path], Any], config_modules: Sequence[str], config_name: str,
                   overrides, run_dir=None, check: Callable[[Any], None] | None = None) -> tuple[Any, Path]:
    """A CLI's in-process twin (``mtl.train.run``, ``merging.job.run``, ...): the CLI's checks (a group
    option that does not exist named with the valid ones, unset ``???`` values, and ``check(cfg)``: the
    job's inputs, as the CLI's ``run_job(check=...)``), then ``job(cfg, run_dir)`` with the CLI's failure
    marking; returns ``(what job returns, run_dir)``. ``config_modules``: the app's config package first,
    then the packages its groups come from. A refusal before the job leaves no new run folder."""
    if isinstance(overrides, str):  # list("debug=smoke") would be read as overrides 'd', 'e', ...
        raise TypeError(f"overrides must be a list of strings such as ['debug=smoke'], got the string {overrides!r}")
    overrides = list(overrides or [])
    check_single_job(overrides)
    problem = check_group_choices(overrides, config_modules)
    if problem:  # as the CLI says it: the valid names, not Hydra's "Could not load"
        raise ValueError(problem)
    cfg, run_dir = compose_in_process(config_modules[0], config_name, overrides, run_dir)
    made = made_for_run(run_dir)  # the default folder, made by compose_in_process
    if made is None:  # a folder given by the caller, untouched so far
        made = missing_or_empty(run_dir)
    # a failed run is marked as the CLI marks it; the claim is released first, so a new folder the run left
    # empty (refused before writing) is removed rather than marked
    try:
        with removes_unused_folder(run_dir, made):
            check_overrides(cfg, overrides, config_modules)  # before the folder is touched, as the CLI checks
            check_required(cfg)
            if check is not None:
                check(cfg)
            with leaves_process_state(), marks_failure(run_dir, made is not None), claims_run_folder(run_dir, _rank0(), "run_dir="):
                return job(cfg, run_dir), Path(run_dir)
    except KeyboardInterrupt as e:
        if str(e):
            raise
        raise KeyboardInterrupt(interrupted_message("Ctrl-C", run_dir)) from e
    except (SystemExit, Terminated) as e:  # Lightning's sys.exit for Ctrl-C / SIGTERM, or one it only noted:
        # raised to a caller as what it was
        stop = interruption(e)
        if stop is None:
            raise
        kind = KeyboardInterrupt if stop[0] == "Ctrl-C" else Terminated
        raise kind(interrupted_message(stop[0], run_dir)) from e


@contextlib.contextmanager
def leaves_process_state():
    """A run inside the caller's process seeds Python, numpy and torch (every CUDA device's generator too: those
    come back only when the caller had started CUDA before the run), sets torch's determinism switches (with cudnn.benchmark and CUBLAS_WORKSPACE_CONFIG) and Lightning's seed
    variables for itself: the caller's random streams, switches, variables and warnings filters are as they
    were once it ends, however it ends."""
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    env = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")
    # a GPU run seeds every device; their states are saved only when the caller has started CUDA already
    # (reading them would start it, which breaks the caller's later fork-started CUDA workers)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings(), restored_environ(env):
        warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
            torch.backends.cudnn.benchmark = benchmark


def report_in_process(job: Callable[[Any, Path], dict], config_modules: Sequence[str], config_name: str,
                      overrides, run_dir=None) -> dict[str, Any]:
    """`run_in_process` for jobs that return a report (merge, prune, export, extract): the report, with
    ``run_dir`` (absolute) added so a notebook can find the run's files."""
    report, folder = run_in_process(job, config_modules, config_name, overrides, run_dir)
    return {**report, "run_dir": str(Path(folder).resolve())}
