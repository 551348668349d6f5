"""Which folders a run made: a run refused before it writes anything removes the folders made for it and
only those, so an empty folder the user made beforehand (``mkdir -p $RUN`` in a job script) stays.

Hydra makes ``hydra.run.dir`` before the job starts; the `NotesRunFolder` callback (``hydra/default.yaml``)
looks at it just before, in ``on_run_start``. In-process runs note the default folder as they make it."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback

from mtl.atomic import missing_parents, remove_empty
from mtl.cli.failures import file_in_the_way, holds_nothing, given_on_command_line

#: run folder (absolute) -> the folders made for it, deepest first; () for a folder that existed empty
_NOTED: dict[str, tuple[Path, ...]] = {}
#: run folder (absolute) -> the names it held before Hydra wrote its job log there, for a folder that held files
_HELD: dict[str, frozenset[str]] = {}


def missing_or_empty(run_dir: str | os.PathLike) -> tuple[Path, ...] | None:
    """The folders (deepest first) that do not exist yet on the way to ``run_dir``; () if it exists and is
    empty, None if it holds something (or is a file): a folder that is not new."""
    folder = Path(os.path.abspath(run_dir))
    missing = missing_parents(folder)
    if missing:
        return tuple(missing)
    try:
        return None if any(folder.iterdir()) else ()
    except OSError:  # a file, or unreadable: no run folder of ours
        return None


def note_made(run_dir: str | os.PathLike, made: tuple[Path, ...] | None) -> None:
    if made is not None:
        _NOTED[os.path.abspath(run_dir)] = made


def made_for_run(run_dir: str | os.PathLike) -> tuple[Path, ...] | None:
    """What `note_made` recorded for ``run_dir`` (once), None if nothing was: the folder held files before
    the run, or no one looked."""
    return _NOTED.pop(os.path.abspath(run_dir), None)


def held_before_run(run_dir: str | os.PathLike) -> frozenset[str] | None:
    """The names ``run_dir`` held before Hydra wrote into it (once), for a folder that held files; None if it did
    not, or no one looked."""
    return _HELD.pop(os.path.abspath(run_dir), None)


class NotesRunFolder(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        # ${hydra:...} in the run dir reads HydraConfig, which Hydra's run_job sets only after this callback (to
        # this same config, first thing): set it as run_job will, and put back what was there.
        hydra_config = HydraConfig.instance()
        before = hydra_config.cfg
        hydra_config.set_config(config)
        try:
            run_dir = config.hydra.run.dir  # Hydra's ${now:} is cached: the job's folder resolves to the same path
        except Exception:  # noqa: BLE001  (a bad run name: Hydra's own resolution next reports it as the error)
            return
        finally:
            hydra_config.cfg = before
        given = given_on_command_line(config, "hydra.run.dir")
        problem = file_in_the_way("hydra.run.dir", run_dir, given)
        if problem:  # Hydra turns a callback's exception into a warning: said and exited here, nothing made yet
            print(f"error: {problem}", file=sys.stderr, flush=True)
            sys.exit(1)
        made = missing_or_empty(run_dir)
        note_made(run_dir, made)
        if made is None:  # a folder holding files: what Hydra's job log adds to it goes with a refusal
            with contextlib.suppress(OSError):
                _HELD[os.path.abspath(run_dir)] = frozenset(p.name for p in Path(run_dir).iterdir())


@contextlib.contextmanager
def removes_unused_folder(run_dir: str | os.PathLike, made: tuple[Path, ...] | None,
                          held: frozenset[str] | None = None) -> Iterator[None]:
    """A run refused before it wrote anything into its folder (e.g. an unset ``???`` value, a bad ``output=``)
    leaves the file system as it found it, as a misspelt key does: Hydra's job log and this run's claim go, and so
    do the folders made for the run (``made``, from `made_for_run`); a folder that existed empty stays. A folder
    that held files (``held``: their names, from `held_before_run`; a user's folder refused as not empty) loses
    only the job log Hydra made there, while it is empty and nothing else in the folder changed. An
    interruption is no refusal: it still marks the folder."""
    try:
        yield
    except Exception:
        run_dir = Path(run_dir)
        if made is not None and run_dir.is_dir() and holds_nothing(run_dir):
            for p in run_dir.iterdir():
                p.unlink(missing_ok=True)
            remove_empty(list(made))
        elif made is None and held is not None and HydraConfig.initialized():
            _remove_new_log(run_dir / f"{HydraConfig.get().job.name}.log", held)
        raise


def _remove_new_log(log: Path, held: frozenset[str]) -> None:
    """Remove ``log`` if this run made it (not among ``held``), it is empty and the folder otherwise holds what it
    held; the handlers writing to it are closed first (a later record would make it again)."""
    import logging

    try:
        if log.name in held or not log.is_file() or log.stat().st_size or \
                {p.name for p in log.parent.iterdir()} - {log.name} != held:
            return
    except OSError:
        return
    for logger in [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values()
                                          if isinstance(v, logging.Logger))]:
        for h in list(logger.handlers):
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == log.absolute():
                logger.removeHandler(h)
                h.close()
    log.unlink(missing_ok=True)
