"""A Hydra callback for multiruns (``-m``, sweeps): a sweep folder holding another sweep's results is
refused before the sweeper writes into it, and a multirun ends, like every run, with its folder as the
last line.

Each job prints its own ``run_dir:``; a sweeper may print more after the last job (Optuna's best value),
so the sweep folder — the jobs' parent, with Hydra's sweep files — is printed once the sweep is done.
"""
from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mtl.atomic import make_parents, remove_empty
from mtl.cli.failures import (FAILED, RUNNING, SWEEPING, RunFolderTaken, claim, file_in_the_way, holds, is_mine,
                              on_this_host, given_on_command_line, owner_of, release)


def jobs_not_failed(sweep_dir: str | Path) -> list[str]:
    """Job folders of an earlier sweep in ``sweep_dir`` that did not fail (finished or still running);
    empty when there was no sweep there (no ``multirun.yaml``, and no job folder with its ``.hydra`` record:
    Hydra's Optuna sweeper writes no multirun.yaml) or every job failed."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    recorded = (sweep_dir / "multirun.yaml").is_file()
    return sorted(p.name for p in sweep_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and not (p / FAILED).exists()
                  and (recorded or (p / ".hydra").is_dir()))


def set_aside_failed_jobs(sweep_dir: str | Path) -> list[str]:
    """Move an earlier sweep's failed job folders in ``sweep_dir`` (all its jobs failed: `jobs_not_failed` is empty)
    to ``<n>.failed`` (``<n>.failed.2``, ... where that exists: nothing is deleted), so that every ``<n>/`` is the
    new sweep's own job: one it does not run would otherwise pass for one of its trials. Job folders are those
    named by Hydra's default ``hydra.sweep.subdir`` (the job number) holding a FAILED marker; any other folder, and
    one a run still holds (its live ``.running`` claim), stays. Returns the folders moved."""
    sweep_dir = Path(sweep_dir)
    moved = []
    for p in sorted(sweep_dir.iterdir(), key=lambda p: (len(p.name), p.name)):  # 2 before 10
        # FAILED marks a job folder, also one refused before its .hydra record (FAILED and the job's log only)
        if not p.is_dir() or not p.name.isdigit() or not (p / FAILED).is_file() or _held(p / RUNNING):
            continue
        aside, k = p.with_name(f"{p.name}.failed"), 2
        while aside.exists():
            aside, k = p.with_name(f"{p.name}.failed.{k}"), k + 1
        os.replace(p, aside)
        moved.append(aside.name)
    return moved


class PrintSweepDir(Callback):
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        # Hydra's sweeper rewrites <sweep dir>/multirun.yaml before any job runs (and so before a job
        # refuses a finished folder): the earlier sweep's record would be lost. Hydra turns a callback's
        # exception into a warning, so exit here (nothing is written yet: no run_dir line).
        from mtl.cli.sweep_checks import sweep_problem

        given = given_on_command_line(config, "hydra.sweep.dir")
        problem = sweep_problem(config) or file_in_the_way("hydra.sweep.dir", config.hydra.sweep.dir, given)
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            sys.exit(1)
        sweep_dir = Path(config.hydra.sweep.dir)
        # a sweep running into this folder now (it has not written its multirun.yaml record yet, or its
        # jobs are still running): two sweeps would interleave their job folders and records
        try:
            made = make_parents(Path(os.path.abspath(sweep_dir)))
        except OSError as e:  # said here: Hydra would turn it into a warning and fail later on the same path
            from mtl.cli.failures import output_root_problem

            print(f"error: {output_root_problem(e) or e}", file=sys.stderr, flush=True)
            sys.exit(1)
        MADE_SWEEP_DIR[:] = [tuple(made)] if made else []  # an existing (even empty) folder is not ours to remove
        sweep_dir.mkdir(parents=True, exist_ok=True)  # (a file in its place is refused as before)
        try:
            claim(sweep_dir / SWEEPING, f"hydra.sweep.dir {sweep_dir}", "hydra.sweep.dir", holder="sweep")
        except RunFolderTaken as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        atexit.register(release, sweep_dir / SWEEPING)  # also when a job's failure ends the sweep early
        kept = jobs_not_failed(sweep_dir)
        if kept:
            release(sweep_dir / SWEEPING)
            shown = ", ".join(kept[:5]) + (", ..." if len(kept) > 5 else "")
            print(f"error: hydra.sweep.dir {sweep_dir} holds an earlier sweep (multirun.yaml; job folders that did "
                  f"not fail: {shown}); pick a new folder (the default is a new timestamped one)",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        moved = set_aside_failed_jobs(sweep_dir)
        if moved:
            print(f"WARNING: hydra.sweep.dir {sweep_dir} held an earlier sweep whose jobs all failed: its job folders "
                  f"were moved to {', '.join(moved)}", file=sys.stderr, flush=True)
        stop_children_on_sigterm(sweep_dir)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from mtl.cli.common import finish

        release(Path(config.hydra.sweep.dir) / SWEEPING)
        restore_sigterm()
        finish(config.hydra.sweep.dir)


#: the folders this multirun made (its sweep folder first, then the parents made for it), while they may still be
#: removed unused (`remove_unused_sweep_dir`)
MADE_SWEEP_DIR: list[tuple[Path, ...]] = []


def remove_unused_sweep_dir() -> None:
    """A sweep refused by its launcher before any job (the local Ray cluster too small for one) leaves no
    folder behind: the one it made, holding only the sweeper's multirun.yaml and the sweep's claim, is
    removed with the parents made for it."""
    if not MADE_SWEEP_DIR:
        return
    made = MADE_SWEEP_DIR.pop()
    sweep_dir = made[0]
    if not sweep_dir.is_dir() or any(p.name not in ("multirun.yaml", SWEEPING) for p in sweep_dir.iterdir()):
        return
    release(sweep_dir / SWEEPING)
    (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
    remove_empty(list(made))


#: the running multirun's folder, for the interruption's last line (cli_main prints it)
INTERRUPTED_SWEEP: list[Path] = []


def stop_children_on_sigterm(sweep_dir: Path) -> None:
    """A SIGTERM to the sweep's process stops the sweep, not only its launcher: jobs that run in child
    processes (launcher=joblib's workers, submitit_local's jobs) are sent SIGTERM too, so each stops and
    marks its folder FAILED as a single run does, instead of training on, orphaned, after the sweep has
    exited without a word. The sweep then ends with ``error: interrupted by SIGTERM`` and its folder."""
    import signal
    import threading

    from mtl.cli.failures import Terminated

    if threading.current_thread() is not threading.main_thread():
        return
    INTERRUPTED_SWEEP[:] = [sweep_dir]

    def handler(signum, frame):
        jobs = _children(os.getpid())  # only the job processes: each holds its folder's claim (the DataLoader
        for pid in {o["pid"] for m in sweep_dir.glob(f"*/{RUNNING}") if (o := owner_of(m)) and o["pid"] in jobs
                    and on_this_host(o)}:
            try:  # workers they started must stop with them, as a single run stops, not be shot first)
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        # the jobs mark their folders FAILED and release their claims; leaving first would let the launcher's
        # teardown kill them mid-write
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(_held(m) for m in sweep_dir.glob(f"*/{RUNNING}")):
            time.sleep(0.2)
        raise Terminated("SIGTERM")

    _PREVIOUS[:] = [signal.signal(signal.SIGTERM, handler)]


_PREVIOUS: list = []  # the SIGTERM handler before the sweep's, put back when it ends (in-process sweeps)


def restore_sigterm() -> None:
    import signal
    import threading

    if _PREVIOUS and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _PREVIOUS.pop())
    INTERRUPTED_SWEEP.clear()


def _held(marker: Path) -> bool:
    owner = owner_of(marker)
    return owner is not None and not is_mine(owner) and holds(owner)


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; elsewhere none are found)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out
