"""How a run fails: the ``FAILED`` marker (message + traceback) in its folder, SIGTERM and Ctrl-C as
named interruptions with their exit status, and the refusal of a finished run's folder."""
from __future__ import annotations

import contextlib
import os
import traceback
from pathlib import Path
from typing import Iterator

from mtl.atomic import alive, atomic_path, make_parents, remove_empty

FAILED = "FAILED"


class RunFolderTaken(FileExistsError):
    """The run folder holds a finished run: refused before anything is written into it (no FAILED marker,
    no Hydra record), so the finished run stays exactly as it was."""


@contextlib.contextmanager
def marks_failure(run_dir: str | os.PathLike) -> Iterator[None]:
    """On an exception, write ``run_dir/FAILED`` (message + traceback) and re-raise."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, RunFolderTaken):  # the folder is another run's: leave it exactly as it is
            raise
        stop = interruption(e)
        if isinstance(e, SystemExit) and not e.code and stop is None:
            raise
        run_dir = Path(run_dir)
        if run_dir.is_dir():
            head = f"{type(e).__name__}: {e}" if stop is None else interrupted_message(stop[0], run_dir)
            try:
                with atomic_path(run_dir / FAILED) as tmp:
                    tmp.write_text(f"{head}\n\n" + "".join(traceback.format_exception(e)))
            except OSError:
                pass  # the original error matters more than the marker
        raise


class Terminated(BaseException):
    """A SIGTERM outside Lightning's ``fit`` (which installs its own handler): merge, prune, export,
    extract and the test/save phases of training. A BaseException, as KeyboardInterrupt, so that no
    ``except Exception`` swallows it."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread (Python's default would end the process at once:
    no ``error:`` line, no ``FAILED``, a temporary output left behind)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if signal.getsignal(signal.SIGTERM) is not handler:
            return  # called by Lightning's own handler inside fit, which stops training its way (all ranks)
        raise Terminated("SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def interruption(e: BaseException) -> tuple[str, int] | None:
    """(what stopped the run, exit status) for a SIGTERM or Ctrl-C, else None. Lightning turns SIGTERM
    into a ``SystemExit`` without a code (which reads as success) and Ctrl-C into ``sys.exit(1)``."""
    if isinstance(e, Terminated) or type(e).__name__ == "SIGTERMException":
        return "SIGTERM", 143
    if isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt)):
        return "Ctrl-C", 130
    return None


def interrupted_message(what: str, run_dir: Path) -> str:
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    resume = f"; resume with ckpt_path={last}" if last.is_file() else ""
    return f"interrupted by {what}{resume}"


RUNNING = ".running"


@contextlib.contextmanager
def claims_run_folder(run_dir: str | os.PathLike, rank0: bool = True) -> Iterator[None]:
    """Hold ``run_dir/.running`` (this process's pid) while a job runs in it: a second run given the same
    folder (``hydra.run.dir=...`` twice at once) is refused with `RunFolderTaken` instead of mixing its
    logs, model and metrics with the first's. A marker whose process is gone (a killed run) is taken over.
    Only DDP's rank 0 claims (the other ranks share its folder). A folder that does not exist yet (an
    in-process run) is made here, so two such runs given one new folder cannot both start, and removed
    again (with the parents made for it) when the run leaves it empty (refused before writing)."""
    if not rank0:
        yield
        return
    marker = Path(run_dir) / RUNNING
    made = make_parents(marker.parent)
    try:
        with _claim(marker, run_dir):
            yield
    finally:
        remove_empty(made)


@contextlib.contextmanager
def _claim(marker: Path, run_dir) -> Iterator[None]:
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _owner(marker)
            if owner is not None and owner != os.getpid() and alive(owner):
                raise RunFolderTaken(f"run_dir {run_dir} is in use by another run (pid {owner}); give each run "
                                     "its own folder (hydra.run.dir)") from None
            marker.unlink(missing_ok=True)  # left by a run that no longer exists
    else:
        raise RunFolderTaken(f"run_dir {run_dir}: could not claim it ({marker} keeps reappearing)")
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)
    try:
        yield
    finally:
        if _owner(marker) == os.getpid():
            marker.unlink(missing_ok=True)


def _owner(marker: Path) -> int | None:
    try:
        return int(marker.read_text().strip())
    except (OSError, ValueError):
        return None


