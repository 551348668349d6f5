"""Which folders a run made: a run refused before it writes anything removes the folders made for it and
only those, so an empty folder the user made beforehand (``mkdir -p $RUN`` in a job script) stays.

Hydra makes ``hydra.run.dir`` before the job starts; the `NotesRunFolder` callback (``hydra/default.yaml``)
looks at it just before, in ``on_run_start``. In-process runs note the default folder as they make it."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback

from mtl.atomic import missing_parents, remove_empty
from mtl.cli.failures import holds_nothing

#: run folder (absolute) -> the folders made for it, deepest first; () for a folder that existed empty
_NOTED: dict[str, tuple[Path, ...]] = {}


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
        note_made(run_dir, missing_or_empty(run_dir))


@contextlib.contextmanager
def removes_unused_folder(run_dir: str | os.PathLike, made: tuple[Path, ...] | None) -> Iterator[None]:
    """A run refused before it wrote anything into its folder (e.g. an unset ``???`` value, a bad ``output=``)
    leaves the file system as it found it, as a misspelt key does: Hydra's job log and this run's claim go, and so
    do the folders made for the run (``made``, from `made_for_run`); a folder that existed empty stays. An
    interruption is no refusal: it still marks the folder."""
    try:
        yield
    except Exception:
        run_dir = Path(run_dir)
        if made is not None and run_dir.is_dir() and holds_nothing(run_dir):
            for p in run_dir.iterdir():
                p.unlink(missing_ok=True)
            remove_empty(list(made))
        raise
