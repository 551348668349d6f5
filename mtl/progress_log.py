"""Progress lines for plain loops that reach log files and CI logs too (no Lightning, no live display).

mtl-merge's λ grids, evaluations over tasks and learned-merging steps print ``ProgressLog`` lines:
``[eval] val 1/2 (50%) 0.91 tasks/s eta 0:00:01 semseg miou 0.41``. Training's ``TextProgressBar``
(mtl/progress.py) formats its lines with the same ``progress_line``.
"""
from __future__ import annotations

import logging
import re
import sys
import time
from datetime import timedelta
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


#: progress lines also go here; the CLIs' logging config sends this logger to the job's own log file
#: (``train.log``, ``merge.log``, ...) only. Not propagated: a notebook with INFO logging on the console
#: would otherwise see every line twice.
PROGRESS_LOGGER = logging.getLogger("mtl.progress")
PROGRESS_LOGGER.propagate = False


def emit(text: str, stream: TextIO | None = None) -> None:
    """One progress line: printed (stdout unless ``stream``) and logged to ``mtl.progress``."""
    print(text, file=stream or sys.stdout, flush=True)
    PROGRESS_LOGGER.info(text)


def summary_console():
    """The rich Console for the CLIs' summary tables and lines (the one place they are made): in a terminal
    as wide as it is; written to a file or a pipe (a SLURM log, ``cmd > log``), tables 160 columns wide
    instead of rich's 80, which cut widths, paths and values to "…", and text lines and table titles
    never wrapped, so that grep finds a whole line. Markup is off: the lines carry paths and values (a sweep
    folder ``task=[semseg,depth]``) that rich would otherwise read as style tags and drop."""
    import os

    from rich.console import Console

    tty = sys.stdout.isatty()
    wide = None if tty or os.environ.get("COLUMNS") else 160
    return Console(width=wide, soft_wrap=not tty, markup=False)


def strip_ansi(text: str) -> str:
    """Text without terminal colour codes (some libraries colour their messages; a log line should not)."""
    return _ANSI.sub("", text)


def format_duration(seconds: float) -> str:
    """Whole seconds as H:MM:SS."""
    return str(timedelta(seconds=int(max(seconds, 0))))


def progress_line(prefix: str, done: int, total: int | None, seconds: float, unit: str = "it", note: str = "") -> str:
    """``<prefix> 40/100 (40%) 3.10 it/s eta 0:00:19 <note>`` (no count, percentage or ETA without a total)."""
    rate = done / max(seconds, 1e-9)
    of = f"/{total}" if total else ""
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    eta = f" eta {format_duration((total - done) / rate)}" if total and rate > 0 else ""
    return f"{prefix} {done}{of}{pct} {rate:.2f} {unit}/s{eta} {note}".rstrip()


class ProgressLog:
    """Progress of a plain loop as text lines: the first item, then at most one line every
    ``every_seconds`` (0: every item), and the last. ``update(done, note)`` after each item."""

    def __init__(self, prefix: str, total: int | None = None, unit: str = "it", every_seconds: float = 30.0,
                 stream: TextIO | None = None, enabled: bool = True):
        if every_seconds < 0:
            raise ValueError(f"every_seconds must be >= 0, got {every_seconds}")
        self.prefix, self.total, self.unit = prefix, total, unit
        self.every_seconds, self.stream, self.enabled = float(every_seconds), stream, enabled
        self.start = self._last = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self._last < self.every_seconds and done != 1 and done != self.total):
            return
        self._last = now
        emit(progress_line(self.prefix, done, self.total, now - self.start, self.unit, note), self.stream)
