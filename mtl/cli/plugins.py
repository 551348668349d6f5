"""Hydra plugins mtlkit configs use, and the extra that installs each: a missing one is one error
line naming the extra, not Hydra's "could not find hydra/launcher/joblib"."""
from __future__ import annotations

import importlib.util
from typing import Sequence

#: command-line choice -> (module it needs, its Hydra plugin package or None, mtlkit extra)
PLUGINS = {
    "launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "launchers"),
    "launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "launchers"),
    "launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "launchers"),
    "launcher=ray": ("ray", None, "ray"),  # mtlkit's own launcher (mtl.launchers); needs only ray
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "launchers"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "launchers"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "launchers"),
    "hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "sweeps"),
    "hparams_search=optuna_dwa": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "sweeps"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "sweeps"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check_plugins(overrides: Sequence[str]) -> str | None:
    """The message for the first override whose Hydra plugin is not installed, else None."""
    for arg in overrides:
        key = arg.lstrip("+~")
        if key in PLUGINS:
            module, package, extra = PLUGINS[key]
            if not _installed(module):
                what = f"the Hydra plugin {package}" if package else module
                return f"{key} needs {what}: pip install 'mtlkit[{extra}]'"
    return None


def register_plugins() -> None:
    """Enter mtlkit's own Hydra plugins (the Ray launcher) before a Hydra app starts."""
    from mtl.launchers import register

    register()
