"""How a run fails: the ``FAILED`` marker (message + traceback) in its folder, SIGTERM and Ctrl-C as
named interruptions with their exit status, and the refusal of a run folder that is not this run's to write
(a finished run's, another run's in progress, or a folder of other files)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import traceback
from pathlib import Path
from typing import Iterator

from mtl.atomic import alive, atomic_path, make_parents, remove_empty, user_path
from mtl.cli.rank_failures import FAILED, failure_marker, led_by_peers, process_rank
from mtl.folder_checks import JSON_ERRORS

#: each CLI's finishing record (mtl-train, mtl-merge, mtl-prune: metrics.json), which with no FAILED and no killed
#: run's claim (`killed_after_its_record`) tells finished runs of every tool from failed or killed ones
FINISHED_RECORDS = ("metrics.json", "extract_report.json", "export_report.json")


def holds_finished_run(run_dir: str | os.PathLike) -> bool:
    """``run_dir`` holds a finished run of any mtlkit CLI: its finishing record (`FINISHED_RECORDS`), no FAILED, and
    no claim (``.running``) of a run killed after writing it (`killed_after_its_record`)."""
    run_dir = Path(run_dir)
    if (run_dir / FAILED).exists():
        return False
    written = [p.stat().st_mtime_ns for p in (run_dir / name for name in FINISHED_RECORDS) if p.is_file()]
    return bool(written) and not killed_after_its_record(run_dir / RUNNING, max(written))


def killed_after_its_record(marker: Path, written_ns: int) -> bool:
    """``marker`` is the claim of a process that no longer runs, made before the folder's finishing record was last
    written (``written_ns``): the run that wrote it, killed (SIGKILL, out of memory) before it released its claim,
    i.e. with its plots, its baselines update or its sweep objective still to write. A claim made after the record
    is a later command's, refused in that finished folder, and leaves the run finished."""
    owner = owner_of(marker)
    try:
        return owner is not None and not holds(owner) and marker.stat().st_mtime_ns <= written_ns
    except OSError:
        return False


def _record_stamp(run_dir: Path) -> tuple[int, int] | None:
    """The identity of ``run_dir/config.yaml``, which every run rewrites (atomically: a new file) once it has
    accepted its folder."""
    try:
        st = (run_dir / "config.yaml").stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


class RunFolderTaken(FileExistsError):
    """The run folder holds a finished run, or files that are no run's: refused before anything is written into it
    (no FAILED marker, no Hydra record), so what it holds stays exactly as it was. ``folder``: the refused folder
    (None: the run's own), so a job whose *inner* run (a smoke model inside its folder) is refused still marks its
    own folder failed, and a retry may write there."""

    def __init__(self, message: str, folder: str | os.PathLike | None = None):
        super().__init__(message)
        self.folder = folder


@contextlib.contextmanager
def marks_failure(run_dir: str | os.PathLike, fresh: bool = False) -> Iterator[None]:
    """On an exception, write ``run_dir/FAILED`` (message + traceback; another DDP rank's: `failure_marker`) and
    re-raise. Not into a finished run's
    folder that this run has not accepted (its config.yaml not rewritten): whatever refused it, the finished run
    stays as it was and is not marked failed. Nor into a folder that was new or empty before this run (``fresh``)
    while it holds nothing yet (`holds_nothing`): a refusal before the job wrote its config.yaml leaves it as it
    was (`mtl.cli.new_folders.removes_unused_folder`)."""
    finished, stamp = holds_finished_run(run_dir), _record_stamp(Path(run_dir))
    try:
        yield
    except BaseException as e:
        if isinstance(e, RunFolderTaken) and (e.folder is None or Path(e.folder).resolve() == Path(run_dir).resolve()):
            raise  # the folder is another run's: leave it exactly as it is
        if finished and holds_finished_run(run_dir) and _record_stamp(Path(run_dir)) == stamp:
            raise  # refused before this run accepted the folder (a bad output=, a recipe error, ...)
        stop = interruption(e)
        if fresh and stop is None and isinstance(e, Exception) and holds_nothing(run_dir):
            raise  # refused before anything was written (an existing output=, an output inside the model)
        if isinstance(e, SystemExit) and not e.code and stop is None:
            raise
        write_failure_marker(run_dir, e)
        raise


def write_failure_marker(run_dir: str | os.PathLike, e: BaseException) -> None:
    """``run_dir``'s `failure_marker`: the error's line (rank 0's led by another rank's own, `peer_failures`) and
    its traceback."""
    run_dir, stop = Path(run_dir), interruption(e)
    if not run_dir.is_dir():
        return
    head = f"{type(e).__name__}: {e}" if stop is None else interrupted_message(stop[0], run_dir)
    head = led_by_peers(head, e, run_dir) if stop is None and process_rank() == "0" else head
    try:
        with atomic_path(failure_marker(run_dir)) as tmp:
            tmp.write_text(f"{head}\n\n" + "".join(traceback.format_exception(e)))
    except OSError:
        pass  # the original error matters more than the marker


class Terminated(BaseException):
    """A SIGTERM outside Lightning's loops (which install their own handler): merge, prune, export, extract
    and the save phase of training, or one Lightning only noted (`stop_if_sigterm`). A BaseException, as
    KeyboardInterrupt, so that no ``except Exception`` swallows it."""


def stop_if_sigterm(trainer) -> None:
    """Raise `Terminated` for a SIGTERM that Lightning's handler noted but did not act on. While ``fit`` or
    ``test`` runs, its handler only sets ``trainer.received_sigterm``, and its loops stop only between
    batches: a SIGTERM during the last test batch, ``on_test_end`` or the fit's last epoch after its last
    check would let the run finish as if none came (exit 0, a multirun going on). Call it after each."""
    if trainer.received_sigterm:
        raise Terminated("SIGTERM")


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
            return  # called by Lightning's own handler (fit, test): it stops its way, or `stop_if_sigterm` does
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
SWEEPING = ".sweeping"  # a multirun's claim on its sweep folder (jobs claim their own folders with RUNNING)
KILLED = ("the run in this folder (pid {pid}) stopped without finishing and without a word: killed (SIGKILL, "
          "out of memory) or its machine went down")

def check_run_folder(run_dir: str | os.PathLike, resumes_from: str | os.PathLike | None = None,
                     rerun: bool = False) -> None:
    """Refuse, as `RunFolderTaken`, an existing non-empty run folder that this run may not write into. Accepted: a
    new or empty folder (not counting what Hydra writes there before the job, ``.hydra/`` and ``<job>.log``, nor this
    run's ``.running`` claim), a failed run's (``FAILED``; a killed run's claim has been turned into one by now),
    the folder of the checkpoint being resumed (``resumes_from``), and, with ``rerun`` (a job CLI's
    ``overwrite=true`` on an earlier run of its own), a finished one. Anything else would have its files
    (``config.yaml``, ``csv/``, ...) replaced by this run's: a user's folder, ``hydra.run.dir=.`` in a project."""
    run_dir = Path(run_dir)
    if rerun or not run_dir.is_dir() or (run_dir / FAILED).is_file():
        return
    if resumes_from and run_dir.resolve() in Path(str(resumes_from)).resolve().parents:
        return
    ours = {".hydra", RUNNING, ".DS_Store", ".gitkeep"}  # and a file manager's or git's placeholder
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        ours.add(f"{HydraConfig.get().job.name}.log")
    found = sorted(p.name for p in run_dir.iterdir() if p.name not in ours and not p.name.startswith(RUNNING + ".new-"))
    if found:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise RunFolderTaken(f"run_dir {run_dir} is not empty ({found[0]}{more}) and holds no failed run to retry "
                             "(no FAILED file): its files would be replaced; give a new or empty folder", run_dir)


def output_root() -> Path:
    """Where run folders go unless told otherwise (``$MTL_OUTPUT_DIR``, else ``outputs``), as the configs'
    ``hydra.run.dir`` says, a leading ``~`` expanded (`mtl.cli.common.normalize_path_env`)."""
    return user_path(os.environ.get("MTL_OUTPUT_DIR") or "outputs")


def output_root_problem(error: BaseException) -> str | None:
    """One line naming ``MTL_OUTPUT_DIR`` (or the default root) and its value for an OS error met while making a run
    folder under it (a file in its place, a path that cannot be made); None for any other error."""
    filename = getattr(error, "filename", None)
    if not isinstance(error, OSError) or isinstance(error, FileExistsError) or not filename:
        return None
    root, path = Path(os.path.abspath(output_root())), Path(os.path.abspath(filename))
    if path != root and root not in path.parents:
        return None
    given = os.environ.get("MTL_OUTPUT_DIR")
    name = f"MTL_OUTPUT_DIR={given}" if given else f"the output root {output_root()} (MTL_OUTPUT_DIR is not set)"
    blocker = next((p for p in path.parents if p.exists()), None)
    why = (f"{blocker} is a file, not a folder" if blocker is not None and not blocker.is_dir()
           else f"{error.strerror or type(error).__name__}: {filename}")
    return f"{name} cannot hold run folders ({why}); set MTL_OUTPUT_DIR to a folder you can write to"


def override_value(overrides, key: str) -> str | None:
    """The value of a ``key=...`` override (``+``/``++``/``~`` prefixes allowed) among ``overrides``, if any."""
    for override in overrides or []:
        name, sep, value = str(override).partition("=")
        if sep and name.lstrip("+~") == key:
            return value
    return None


def given_on_command_line(config, key: str) -> bool:
    """Whether ``key`` (``hydra.run.dir``, ``hydra.sweep.dir``) was set on the command line, from Hydra's record of
    its overrides, read unresolved: an override such as ``hydra.run.dir=out/${hydra:job.name}`` is a string
    OmegaConf would resolve on access, and HydraConfig is not yet set when the callbacks ask."""
    from omegaconf import OmegaConf

    overrides = OmegaConf.select(config, "hydra.overrides.hydra", default=None)
    if overrides is None:
        return False
    return override_value(OmegaConf.to_container(overrides, resolve=False), key) is not None


def file_in_the_way(key: str, folder: str | os.PathLike, given: bool = False) -> str | None:
    """One line naming ``key`` (``hydra.run.dir``, ``hydra.sweep.dir``) and its value when a file stands where that
    folder, or a folder on the way to it, is to be made (Hydra's bare "[Errno 17] File exists" otherwise); None
    when nothing is in the way, or when a file on the way lies in the output root and ``key`` is the configs'
    default (not ``given`` on the command line): the folder is then MTL_OUTPUT_DIR's, and `output_root_problem`
    names that."""
    path = Path(os.path.abspath(folder))
    if path.exists() and not path.is_dir():
        return f"{key}={folder} is a file, not a folder; pick a new folder"
    blocker = next((p for p in path.parents if p.exists()), None)
    root = Path(os.path.abspath(output_root()))
    if blocker is None or blocker.is_dir() or (not given and (path == root or root in path.parents)):
        return None
    return f"{key}={folder}: {blocker} is a file, not a folder; pick a new folder"


def holds_nothing(run_dir: str | os.PathLike, empty_log: bool = False) -> bool:
    """``run_dir`` is missing or holds nothing a run wrote: at most Hydra's ``<job>.log`` (empty, with
    ``empty_log``: a folder Hydra has just made for this run), and this process's own claim."""
    from hydra.core.hydra_config import HydraConfig

    log = f"{HydraConfig.get().job.name}.log" if HydraConfig.initialized() else None
    try:
        entries = list(Path(run_dir).iterdir())
    except FileNotFoundError:
        return True
    except OSError:  # a file, or unreadable: not an empty run folder
        return False
    return all((p.name == log and p.is_file() and not (empty_log and p.stat().st_size))
               or (p.name == RUNNING and is_mine(owner_of(p))) for p in entries)


@contextlib.contextmanager
def claims_run_folder(run_dir: str | os.PathLike, rank0: bool = True, key: str = "hydra.run.dir") -> Iterator[None]:
    """Hold ``run_dir/.running`` while a job runs in it: a second run given the same folder
    (``hydra.run.dir=...`` twice at once) is refused with `RunFolderTaken` instead of mixing its logs, model
    and metrics with the first's. A marker whose process is gone is a killed run's: it is taken over and
    the folder marked ``FAILED`` (unless it already is), so the new attempt treats what the killed one left
    (checkpoints, curves, a finishing record written before its last outputs) as a failed attempt's; only a
    claim made after the folder's finishing record (a later command's) leaves a finished run unmarked. Only DDP's
    rank 0 claims (the other ranks share its folder).
    A folder that does not exist yet (an in-process run) is made here, so two such runs given one new folder
    cannot both start, and removed again (with the parents made for it) when the run leaves it empty.
    ``key``: the setting that chooses the folder, for the refusal's advice."""
    if not rank0:
        yield
        return
    marker = Path(run_dir) / RUNNING
    made = make_parents(marker.parent)
    try:
        # before the claim: a dead claim older than the folder's finishing record makes the run unfinished
        finished = holds_finished_run(marker.parent)
        stale = claim(marker, f"run_dir {run_dir}", key)
        if stale is not None and not (marker.parent / FAILED).exists() and not finished:
            with atomic_path(marker.parent / FAILED) as tmp:
                tmp.write_text(KILLED.format(pid=stale) + "\n")
        try:
            yield
        finally:
            release(marker)
    finally:
        remove_empty(made)


def claim(marker: Path, what: str, key: str, holder: str = "run") -> int | None:
    """Create ``marker`` for this process (pid, host, process start time), refusing a live claim by another
    process as `RunFolderTaken`; returns the pid of a dead claim taken over (None if there was none).

    The marker appears with its content at once (a hard link of a written file), so no reader sees it
    empty; a dead claim is replaced in place under an exclusive lock on the marker, so of two processes
    taking over one stale claim the second finds the first's live claim and is refused."""
    mine = json.dumps({"pid": os.getpid(), "host": _HOST, "start": _started(os.getpid())}).encode()
    for _ in range(5):
        if _create(marker, mine):
            return None
        try:
            fd = os.open(marker, os.O_RDONLY)  # read-only: another user's marker is still read, and refused
        except FileNotFoundError:
            continue  # released meanwhile: create it again
        try:
            _lock(fd)
            if os.fstat(fd).st_nlink == 0:
                continue  # released while this process waited for the lock
            owner = _parse(os.pread(fd, 4096, 0))
            if owner is not None and not is_mine(owner) and holds(owner):
                where = "" if on_this_host(owner) else f" on {owner['host']}"
                raise RunFolderTaken(f"{what} is in use by another {holder} (pid {owner['pid']}{where}); give each "
                                     f"{holder} its own folder ({key}); if that {holder} is gone, delete {marker}",
                                     marker.parent)
            try:  # left by a process that no longer runs: this one's now
                with open(marker, "r+b") as f:
                    f.truncate(0)
                    f.write(mine)
            except PermissionError:
                raise RunFolderTaken(f"{what}: {marker} is left by a run that no longer runs but this user cannot "
                                     f"replace it; delete it", marker.parent) from None
            return owner["pid"] if owner is not None and not is_mine(owner) else None
        finally:
            os.close(fd)  # and with it the lock
    raise RunFolderTaken(f"{what}: could not claim it ({marker} keeps changing)", marker.parent)


def _create(marker: Path, content: bytes) -> bool:
    """Make ``marker`` holding ``content`` unless it exists (False then)."""
    tmp = marker.with_name(f"{marker.name}.new-{os.getpid()}")
    tmp.write_bytes(content)
    try:
        os.link(tmp, marker)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create, then write
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _lock(fd: int) -> None:
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):  # no POSIX locks here (or not on this file system): the takeover is unguarded
        return


def release(marker: Path) -> None:
    """Remove this process's claim; another's (also one of the same pid on another host) stays."""
    if is_mine(owner_of(marker)):
        marker.unlink(missing_ok=True)


_HOST = socket.gethostname()


def on_this_host(owner: dict) -> bool:
    """Whether a claim was made on this host (a marker without a host, from older versions, counts as this one's)."""
    return owner.get("host") in (None, _HOST)


def is_mine(owner: dict | None) -> bool:
    """Whether a claim is this process's: its pid on this host. A claim of the same pid made on another host (a shared
    file system) is another run's."""
    return owner is not None and owner["pid"] == os.getpid() and on_this_host(owner)


def _started(pid: int) -> str | None:
    """The process's start time (Linux: clock ticks since boot), which a reused pid does not share."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holds(owner: dict) -> bool:
    """Whether the claim's process still runs. A claim made on another host (a shared file system) cannot be
    checked from here and counts as held; on this host a live pid with another start time is a reused pid."""
    if not on_this_host(owner):
        return True
    if not alive(owner["pid"]):
        return False
    start, now = owner.get("start"), _started(owner["pid"])
    return start is None or now is None or start == now


def owner_of(marker: Path) -> dict | None:
    """The claim in ``marker``: {"pid", "host", "start"}; a bare pid (older markers) is {"pid"}."""
    try:
        return _parse(marker.read_bytes())
    except OSError:
        return None


def _parse(text: bytes) -> dict | None:
    try:
        data = json.loads(text.decode().strip())
    except JSON_ERRORS:
        return None
    if isinstance(data, int) and not isinstance(data, bool):
        return {"pid": data}
    if isinstance(data, dict) and isinstance(data.get("pid"), int):
        return data
    return None
