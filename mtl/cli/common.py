"""What every mtlkit CLI does the same way."""
from __future__ import annotations

import os
import sys
import warnings


def prepare() -> None:
    # Lightning and torch are chatty about things users cannot act on in a CPU demo.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")


def finish(run_dir) -> None:
    """Every CLI run ends by printing its run folder as the last line."""
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"run_dir: {os.path.abspath(str(run_dir))}", flush=True)
