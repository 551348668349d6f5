"""What every mtlkit CLI does the same way: quiet start, one-line errors, failed-run markers and the
``run_dir:`` last line (the in-process twins: `mtl.cli.in_process`).

A console script is a Hydra app built from two pieces::

    @hydra.main(version_base="1.3", config_path="pkg://mtl.configs", config_name="train")
    def _main(cfg):
        run_job(cfg, train)          # train(cfg, run_dir); errors -> one line + FAILED marker

    def main():
        cli_main(_main, "mtl.configs")

Errors are one line on stderr (``error: <message>``) and exit status 1; ``verbose=true`` on the
command line or ``HYDRA_FULL_ERROR=1`` shows the full traceback instead. Hydra's own errors (a
misspelt key, a malformed override) and unset required values (``???``) get the same one line, and leave
no run folder (the folders Hydra made for the run are removed; one that existed before stays). A run that fails later keeps the folder, gets a ``FAILED`` file (message + traceback) in
it, so no failed run looks like an unfinished or a finished one, and still prints ``run_dir:`` last.
A SIGTERM or Ctrl-C is a failure too (``FAILED`` names it and the checkpoint to resume from; exit
status 143 / 130). In a multirun a failing job does not stop the others: the sweep reports the first
failure and ends with the sweep folder, where a job refused before the run started keeps its folder, marked FAILED.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mtl.cli.choices import check_overrides
from mtl.cli.failures import (FAILED, Terminated, claims_run_folder, interrupted_message, interruption, marks_failure,
                               output_root_problem, sigterm_raises)
from mtl.cli.rank_failures import led_by_peers, process_rank
from mtl.cli.new_folders import held_before_run, made_for_run, removes_unused_folder


def write_hydra_record(cfg, run_dir: str | os.PathLike) -> None:
    """``<run_dir>/.hydra/{config,hydra,overrides}.yaml``, as Hydra writes them, but only once the job has
    accepted its folder (``hydra.output_subdir`` is null: Hydra would write them before any check, over a
    finished run's own)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mtl.io import atomic_path

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    out = Path(run_dir) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hc})),
                       ("overrides.yaml", OmegaConf.create(list(hc.overrides.task)))):
        with atomic_path(out / name, overwrite=True) as tmp:
            tmp.write_text(OmegaConf.to_yaml(node))
# Lightning's own use of a torch API torch deprecates (lightning/pytorch/utilities/_pytree.py)
LEAFSPEC_WARNING = r".*LeafSpec.*is deprecated"


def verbose_switch(arg: str) -> bool | None:
    """The command-line switch ``verbose=<bool>`` (or ``+verbose=``), read by `cli_main`, not the config: True/False
    (also 1/0), None for any other argument; any other value is refused (`mtl.cli.switches.as_switch`)."""
    key, eq, value = arg.partition("=")
    if not eq or key not in ("verbose", "+verbose"):
        return None
    from mtl.cli.switches import as_switch

    return value.strip() == "1" if value.strip() in ("1", "0") else as_switch("verbose", value)


def quiet_warnings() -> None:
    """Lightning and torch are chatty about things users cannot act on in a CPU demo."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)


def prepare(traceback_wanted: bool = False) -> None:
    quiet_warnings()
    # HYDRA_FULL_ERROR=1 is the user's switch for tracebacks, as in Hydra, unless it is ours: we set it
    # so that Hydra raises its errors instead of printing them over several lines (cli_main prints one)
    users = os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get("_MTL_HYDRA_RAISES") != "1"
    os.environ["MTL_VERBOSE"] = "1" if traceback_wanted or users else "0"
    os.environ["HYDRA_FULL_ERROR"] = os.environ["_MTL_HYDRA_RAISES"] = "1"


def verbose() -> bool:
    return os.environ.get("MTL_VERBOSE") == "1"


#: the ranks a distributed launcher gives a process: torchrun's, Lightning's own DDP processes' (a second node's
#: first process has LOCAL_RANK 0 but NODE_RANK 1), an srun task's
_RANK_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def _rank0() -> bool:
    """This process is global rank 0 (or runs alone): the one that writes run folders and prints."""
    return all(int(os.environ.get(key) or 0) == 0 for key in _RANK_KEYS)


def finish(run_dir) -> None:
    """Every CLI run ends by printing its run folder as the last line (once: DDP's other ranks are silent)."""
    if not _rank0():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"run_dir: {os.path.abspath(str(run_dir))}", flush=True)


def one_line(exc: BaseException) -> str:
    """The message a user reads: the exception's first non-empty line (the rest goes to FAILED).
    Hydra's "Error in call to target ..." wrapper gives way to the error it wraps, which says what to do."""
    from hydra.errors import InstantiationException

    if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        target = str(exc).split("'")[1] if str(exc).count("'") >= 2 else "a config target"
        return f"{target}: {one_line(exc.__cause__)}"
    from omegaconf.errors import InterpolationKeyError

    if isinstance(exc, InterpolationKeyError) and getattr(exc, "full_key", None) and "'" in str(exc):
        missing = str(exc).split("'")[1]  # which setting reads a key the composed config lacks
        return (f"{exc.full_key} reads ${{{missing}}}, which this config does not have: the group that sets "
                f"{missing} was swapped out or removed, or does not fit this combination")
    bare_key = isinstance(exc, KeyError) and type(exc).__str__ is KeyError.__str__
    # a KeyError of ours carries a sentence (KeyError's str() would quote it); a bare one (a missing
    # dict key) needs its type to make sense
    sentence = bare_key and len(exc.args) == 1 and isinstance(exc.args[0], str) and " " in exc.args[0].strip()
    from mtl.progress_log import strip_ansi

    lines = [ln.strip() for ln in strip_ansi(exc.args[0] if sentence else str(exc)).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    text = _without_resolver_prefix(lines[0]) + (" (…)" if len(lines) > 1 else "")
    return f"KeyError {text}" if bare_key and not sentence else text


class JobFailed(Exception):
    """A multirun job's failure, raised to Hydra (not ``sys.exit``) so that the other jobs still run;
    ``cli_main`` reports it and ends with the sweep folder."""

    def __init__(self, message: str, sweep_dir: str):
        super().__init__(message, sweep_dir)

    def __str__(self) -> str:
        return self.args[0]


def run_job(cfg, job: Callable[[Any, Path], Any] | str, check: str | None = None) -> Any:
    """Body of every Hydra main: ``job(cfg, run_dir)`` with failure marking, one-line errors and the
    ``run_dir:`` last line; returns what the job returns (a sweeper's objective). ``job`` may be named
    ``"package.module:function"``: imported inside the guarded region, so a Ctrl-C or SIGTERM during the
    seconds its imports take (torch, timm...) still marks the run folder Hydra has already made. ``check``
    (``"package.module:function"``, called with ``cfg``): the job's inputs checked before the run folder is
    accepted: a refusal there leaves no run folder, as a command-line mistake does."""
    from hydra.core.hydra_config import HydraConfig

    from hydra.types import RunMode

    # again here: a launcher's worker (joblib's loky) is a fresh interpreter that never ran `prepare`
    quiet_warnings()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        # a single run's folders, noted before Hydra made them (NotesRunFolder), go with a refusal before the job
        # accepts them; a multirun job's folder stays, marked FAILED, so that the sweep folder shows every failure
        made, held = (None, None) if multirun else (made_for_run(run_dir), held_before_run(run_dir))
        with sigterm_raises(), removes_unused_folder(run_dir, made, held), \
                (marks_failure(run_dir) if multirun else contextlib.nullcontext()):
            # command-line mistakes, found before the folder is touched: the folders Hydra made for a single run are
            # removed (as for Hydra's own errors), a finished run's stays as it was
            # the app's own config package first (its settings), then those it searches (the shared groups)
            modules = [src.path for src in hc.runtime.config_sources if src.schema == "pkg" and src.path != "hydra.conf"]
            check_overrides(cfg, hc.overrides.task, modules or ("mtl.configs",))
            check_required(cfg)
            if check is not None:
                _named(check)(cfg)
            with claims_run_folder(run_dir, _rank0(), key), \
                    (contextlib.nullcontext() if multirun else marks_failure(run_dir, made is not None)):
                result = (_named(job) if isinstance(job, str) else job)(cfg, run_dir)
    except BaseException as e:
        stop = interruption(e)
        if (stop is None and not isinstance(e, Exception)) or verbose():
            if (run_dir / FAILED).is_file():
                finish(run_dir)  # stdout still ends with the folder; the traceback follows on stderr
            raise
        message = interrupted_message(stop[0], run_dir) if stop else one_line(e)
        if _rank0():
            shown = led_by_peers(message, e, run_dir) if stop is None else message  # another rank's own error first
            print(f"error: {shown}", file=sys.stderr, flush=True)
        else:  # another DDP rank: its own error, which rank 0 may only see as a lost connection
            print(f"error: rank {process_rank()}: {message}", file=sys.stderr, flush=True)
            logging.getLogger().error("rank %s failed: %s", process_rank(), message, exc_info=e)  # its job log
        if (run_dir / FAILED).is_file():  # where the traceback is
            finish(run_dir)
        if stop is None and hc.mode == RunMode.MULTIRUN:
            overrides = " ".join(hc.overrides.task)
            raise JobFailed(f"sweep job #{hc.job.num} ({overrides}) failed: {message}", str(hc.sweep.dir)) from None
        from mtl.cli.sweep_end import INTERRUPTED_SWEEP

        if stop is not None and hc.mode == RunMode.MULTIRUN and INTERRUPTED_SWEEP:  # a job in the sweep's process
            finish(hc.sweep.dir)  # the sweep ends here (the sweeper never returns): its folder is the last line
        sys.exit(stop[1] if stop else 1)
    finish(run_dir)
    return result


def _named(function: str) -> Callable:
    """The function ``"package.module:function"`` names (imported when called: inside the guarded region)."""
    import importlib

    module, _, name = function.partition(":")
    return getattr(importlib.import_module(module), name)


def check_required(cfg) -> None:
    """Refuse a config with unset required values (``???``, e.g. ``data.root``), naming them, before
    any work: resolved later they would surface as the literal string '???'."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"required value(s) not set: {', '.join(missing)} (pass e.g. {missing[0]}=...)")


def hydra_message(exc: BaseException) -> str:
    """One line from a Hydra composition error: its sentences plus the OmegaConf cause's first line."""
    parts = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if ln.strip()]
    if getattr(exc, "override", None):  # a malformed override: say which
        parts.insert(0, f"cannot parse override {exc.override!r}")
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        parts.append(str(cause).strip().splitlines()[0].rstrip("."))
    text = "; ".join(p for p in parts if not p.startswith(("full_key:", "object_type=")))
    if not text:  # e.g. a bare AssertionError inside a plugin: its type is all there is to say
        inner = cause if cause is not None else exc
        text = f"{type(inner).__name__} (no message; pass verbose=true for the traceback)"
    return _without_resolver_prefix(text)


def _without_resolver_prefix(text: str) -> str:
    """OmegaConf prefixes a resolver's own error ("ValueError raised while resolving interpolation: ..."):
    the message after it is the one written for the user."""
    import re

    return re.sub(r"^\w+ raised while resolving interpolation: ", "", text)


def cli_main(hydra_main: Callable[[], Any], *config_modules: str, argv: list[str] | None = None) -> None:
    """Console-script entry: strip the ``verbose=true`` switch, check config-group choices (an unknown
    ``task=bogus`` gets the valid names, not Hydra's search path), then run the Hydra app. A Ctrl-C before the job
    takes over (while the config composes: the job's own handler marks its folder) is one line, exit status 130."""
    try:
        _cli_main(hydra_main, *config_modules, argv=argv)
    except KeyboardInterrupt:
        if verbose():
            raise
        print("error: interrupted by Ctrl-C before the job started", file=sys.stderr, flush=True)
        sys.exit(130)


def _cli_main(hydra_main: Callable[[], Any], *config_modules: str, argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    try:
        switches = [verbose_switch(a) for a in argv[1:]]
    except ValueError as e:  # verbose=no: said before anything runs
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    wanted = any(switches)
    argv[1:] = [a for a, s in zip(argv[1:], switches) if s is None]
    prepare(traceback_wanted=wanted)
    from mtl.cli.help import print_help_if_asked
    from mtl.cli.plugins import check_plugins, register_plugins

    if print_help_if_asked(hydra_main, config_modules or ("mtl.configs",), argv):
        return

    missing = check_plugins(argv[1:])
    if missing:
        print(f"error: {missing}", file=sys.stderr, flush=True)
        sys.exit(1)
    register_plugins()
    try:
        register_resolvers()
    except ValueError as e:  # no home folder: said before anything runs
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if not verbose():
        problem = check_group_choices(argv[1:], config_modules or ("mtl.configs",))
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            sys.exit(1)
    from mtl.cli.sweep_end import restore_sigterm

    try:
        with _without_hydra_job_error_line():
            try:
                hydra_main()
            except ValueError as e:
                raise _every_trial_failed(e) or e
    except JobFailed as e:  # a multirun ran every job; the first failure is named, the sweep folder ends
        print(f"error: {e}", file=sys.stderr, flush=True)
        finish(e.args[1])
        sys.exit(1)
    except (Terminated, KeyboardInterrupt) as e:  # a multirun's launcher stopped (jobs told to stop: sweep_end)
        from mtl.cli.sweep_end import INTERRUPTED_SWEEP

        if verbose() or not INTERRUPTED_SWEEP:
            raise
        terminated = isinstance(e, Terminated)
        said = ("the sweep's running jobs were stopped too (each marked FAILED in its folder)" if terminated else
                "a terminal's Ctrl-C reaches the sweep's jobs too")
        print(f"error: interrupted by {'SIGTERM' if terminated else 'Ctrl-C'}; {said}", file=sys.stderr, flush=True)
        finish(INTERRUPTED_SWEEP[0])
        sys.exit(143 if terminated else 130)
    except Exception as e:  # Hydra's own (composition, overrides, making the run folder); a job's errors exit in run_job
        if verbose():
            raise
        from mtl.cli.choices import near_setting

        app = (config_modules or ('mtl.configs',))[0]
        message = output_root_problem(e) or near_setting(hydra_message(e), app, e.__cause__)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        restore_sigterm()  # an in-process sweep ended by a failing job never reaches on_multirun_end


class _DropHydraJobError:
    """stderr minus Hydra's "Error executing job with overrides: [...]" (written when a multirun reads a
    failed job's result): mtlkit's own one line names the job, its overrides and the error."""

    PREFIX = "Error executing job with overrides: "

    def __init__(self, stream):
        self._stream = stream

    def write(self, s: str) -> int:
        return len(s) if s.startswith(self.PREFIX) else self._stream.write(s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _without_hydra_job_error_line() -> Iterator[None]:
    FAILED_TRIALS.clear()  # (an earlier sweep's, in this process)
    if verbose():  # the full story was asked for
        yield
        return
    import logging

    stream = sys.stderr
    sys.stderr = _DropHydraJobError(stream)
    sweeper_log = logging.getLogger("hydra_plugins.hydra_optuna_sweeper._impl")
    sweeper_log.addFilter(_drop_failed_trial_echo)
    try:
        yield
    finally:
        sys.stderr = stream
        sweeper_log.removeFilter(_drop_failed_trial_echo)


#: the failed trials of the running Optuna study, in order (noted by `_drop_failed_trial_echo`)
FAILED_TRIALS: list[JobFailed] = []


def _every_trial_failed(exc: BaseException) -> JobFailed | None:
    """A study whose every trial failed (``max_failure_rate`` tolerated each) ends in Optuna's bare "No trials are
    completed yet": the first failed trial is named instead, and the sweep folder ends the output."""
    if not FAILED_TRIALS or "No trials are completed yet" not in str(exc):
        return None
    first = FAILED_TRIALS[0]
    return JobFailed(f"every trial of the study failed ({len(FAILED_TRIALS)}); first: {first}", first.args[1])


def _drop_failed_trial_echo(record) -> bool:
    """Optuna's sweeper logs a study-ending failure as a repr of the exception list ("Failed
    [JobFailed(...)] times out of 1"), after mtlkit's own ``error:`` line names it. Its "Failed
    experiment: ..." warning stays: for a failure ``max_failure_rate`` tolerates it is the only report; it is
    logged while the sweeper handles the trial's exception, which is noted in `FAILED_TRIALS`."""
    failure = sys.exc_info()[1]
    if str(record.msg).startswith("Failed experiment: ") and isinstance(failure, JobFailed):
        FAILED_TRIALS.append(failure)
    return not (str(record.msg).startswith("Failed ") and "JobFailed(" in record.getMessage())


def _group_options(config_modules: Sequence[str]) -> dict[str, set[str]]:
    """``{group: {option, ...}}`` for every config group folder (nested ones as ``a/b``); a module is a
    package name, or a ``pkg://`` / ``file://`` entry of ``hydra.searchpath``."""
    groups: dict[str, set[str]] = {}

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir() and not child.name.startswith(("_", ".")):
                name = f"{prefix}{child.name}"
                opts = groups.setdefault(name, set())
                opts.update(f.name[:-5] for f in child.iterdir() if f.is_file() and f.name.endswith(".yaml"))
                walk(child, name + "/")

    for module in config_modules:
        try:
            if module.startswith("file://"):
                walk(Path(module.removeprefix("file://")), "")
            else:
                walk(resources.files(module.removeprefix("pkg://")), "")
        except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
            continue
    return groups


def _searchpath(parsed) -> list[str]:
    """The entries of a ``hydra.searchpath=[...]`` override: a user's own config groups live there."""
    for ov in parsed:
        if ov.key_or_group == "hydra.searchpath" and isinstance(ov.value(), list):
            return [str(v) for v in ov.value()]
    return []


def check_group_choices(overrides: Sequence[str], config_modules: Sequence[str]) -> str | None:
    """The first override that picks a config-group option that does not exist, as a message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    args = [a for a in overrides if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # malformed overrides: Hydra's own message says it best
        return None
    groups = _group_options([*config_modules, *_searchpath(parsed)])
    from mtl.cli.choices import check_removals

    removal = check_removals(overrides, config_modules[0], groups)
    if removal:
        return removal
    for ov in parsed:
        group = ov.key_or_group
        if group not in groups or ov.is_delete() or ov.package:
            continue
        value = ov.value()
        for option in value.list if isinstance(value, ChoiceSweep) else [value]:  # a sweep's options, or the one
            choices = option if isinstance(option, list) else [option]
            for choice in choices:
                if isinstance(choice, str) and choice not in groups[group] and choice != "null":
                    return (f"unknown {group} {choice!r} in {ov.input_line!r}; valid names: "
                            f"{', '.join(sorted(groups[group]))}")
            repeated = [c for i, c in enumerate(choices) if c in choices[:i]]
            if repeated:  # Hydra merges a repeated option into one, silently
                return f"{group} {repeated[0]!r} is named twice in {ov.input_line!r}; name each {group} once"
    return None


def check_run_name(name: Any) -> str:
    """``name`` as a folder under the output root: relative, no ``..`` part (``a/b`` nests, ``../x``
    would put the run outside ``$MTL_OUTPUT_DIR``). Hydra's run folders read it through the
    ``mtl_run_name`` resolver, so a bad name stops before any folder is made."""
    text = str(name).strip() if name is not None else ""
    parts = Path(text).parts
    if not text or Path(text).is_absolute() or ".." in parts or "\\" in text or text in (".",):
        raise ValueError(f"name={name!r} must be a relative folder name inside the output root "
                         "(no leading '/', no '..' part), e.g. name=ablations/cikd")
    return text


#: read by the configs through ``oc.env`` with a default, which gives "" for a variable set but empty
EMPTY_MEANS_UNSET = ("MTL_OUTPUT_DIR", "MTL_DATA_CACHE")


def normalize_path_env() -> None:
    """MTL_OUTPUT_DIR / MTL_DATA_CACHE as the Python side reads them: set but empty counts as unset (dropped from
    the environment, so that the configs' ``${oc.env:NAME,DEFAULT}`` give the default; they gave "", which put the
    scenes cache at /scenes and run folders at /<name>), and a leading ``~`` is expanded (``export
    MTL_OUTPUT_DIR="~/runs"`` made run folders under a literal ``./~``). The configs use only OmegaConf's own
    resolvers there, so a run's ``.hydra/config.yaml`` loads with plain ``OmegaConf.load``. Without ``$HOME`` it is
    set to the home folder Python's ``~`` means then (the password database's, `mtl.data.default_cache_dir`): the
    configs' ``${oc.env:HOME}`` (the data cache's default, resolved even when MTL_DATA_CACHE is set) failed every
    CLI, and the CLI and Python would not share one cache. Where there is no absolute home folder (`mtl.atomic.home_folder`:
    ``~`` stays ``~`` for a uid without a passwd entry, ``HOME='~'`` cached under ./~; or a relative $HOME): with
    MTL_DATA_CACHE set, an unset $HOME becomes ``/nonexistent`` (Debian's home of such users: the configs resolve,
    nothing is cached there), else the ValueError asking for one, as `mtl.data.default_cache_dir` raises."""
    for name in EMPTY_MEANS_UNSET:
        value = os.environ.get(name)
        if value == "":
            del os.environ[name]
        elif value is not None and value.startswith("~"):
            os.environ[name] = os.path.expanduser(value)
    from mtl.atomic import home_folder

    try:
        home = home_folder()
    except ValueError:
        if not os.environ.get("MTL_DATA_CACHE"):  # the data cache's default is under the home folder
            raise
        home = "/nonexistent"
    os.environ.setdefault("HOME", home)


def register_resolvers() -> None:
    """What composing mtlkit's configs needs: its resolvers and `normalize_path_env`."""
    from omegaconf import OmegaConf

    normalize_path_env()
    OmegaConf.register_new_resolver("mtl_run_name", check_run_name, replace=True)
