"""What every mtlkit CLI does the same way."""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path


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


def compose_in_process(config_module: str, config_name: str, overrides, run_dir=None):
    """Compose a CLI's Hydra config without running the app (notebooks, tests, scripts) and point its
    output at `run_dir` (default ``outputs/<name>/runs/<time>``); returns ``(cfg, run_dir)``.

    Safe inside another Hydra app (mtl-merge builds its smoke pool with mtl-train's config): the
    outer app's global Hydra state is restored afterwards.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf import OmegaConf

    outer = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=config_module, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
    finally:
        restore_gh_from_backup(outer)
    if run_dir is None:
        run_dir = Path("outputs") / cfg.name / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = str(run_dir)
    return cfg, Path(run_dir)
