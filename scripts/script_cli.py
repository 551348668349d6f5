"""The scripts' command-line convention, as mtlkit's CLIs have it: a user error (a missing file or
folder, a bad option value, an unknown name) ends the script with one ``error:`` line and exit status 1,
not a traceback. ``MTL_VERBOSE=1`` (or ``HYDRA_FULL_ERROR=1``) shows the traceback instead.

    if __name__ == "__main__":
        run(main)
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable

#: what a user's input raises (mtlkit's ModelFolderError is a ValueError, UnknownNameError a KeyError)
USER_ERRORS = (OSError, ValueError, KeyError, TypeError)


def run(main: Callable[[], Any]) -> None:
    # read now: scripts that compose mtlkit configs reset MTL_VERBOSE (mtl.cli.common.prepare)
    traceback_wanted = "1" in (os.environ.get("MTL_VERBOSE"), os.environ.get("HYDRA_FULL_ERROR"))
    try:
        code = main()
    except USER_ERRORS as e:
        if traceback_wanted:
            raise
        from mtl.cli.common import one_line

        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # some mains return their results, not a status


def require_positive(args: Any, names: Iterable[str], least: int = 1) -> None:
    """Refuse count options below ``least`` (1: counts; 0: a count where none is valid, such as --warmup)
    before any work: ``--NAME must be ≥ LEAST, got V`` (a ValueError, which `run` prints as one ``error:``
    line). ``names`` are argparse destinations; None (unset) passes, and a list (``nargs``) is checked item by
    item."""
    for name in names:
        value = getattr(args, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v < least:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ {least}, got {v}")
