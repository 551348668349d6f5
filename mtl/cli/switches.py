"""The on/off switches of a CLI (``overwrite``, ``store``, ``smoke_model``, ``linearize``, ``verbose``...) are
booleans. Hydra reads ``overwrite=no``, ``overwrite=maybe`` and ``${oc.env:X}`` (always text) as strings, and
every job reads a switch with a plain truth test, in which any non-empty string is true: ``overwrite=no`` would
replace an existing output. So each switch is checked once, before the run folder is touched: true, false, the
text ``true``/``false`` (any case, as an environment variable gives it) or the int ``1``/``0`` (as Hydra reads
``overwrite=1``; ``verbose`` takes them too), set to the bool; anything else (another int, a float) refused.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator

__all__ = ["as_switch", "check_switches"]

SHARED = "mtl.configs"  # the shared config groups, and mtl-train's own config
#: shared config groups (and ``strategy``, which experiment files set) whose settings only mtlkit's own classes read,
#: each bool there a plain switch (``balancer.skip_nonfinite``, ``merge.clamp``, ``data.augment``): unlike logger's
#: ``log_model=all`` or Lightning's trainer and callbacks arguments, which take more than a bool
OWN_GROUPS = ("backbone", "balancer", "data", "decoder", "merge", "prune", "strategy", "task")


def as_switch(key: str, value: Any) -> bool:
    """``value`` as a bool: True, False, the text "true"/"false" in any case, or the int 1/0; anything else is
    refused."""
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):  # Hydra's overwrite=1: an int that cannot be mistaken (not 2, not 1.0)
        return value == 1
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{key} must be true or false, got {value!r}")


def leaves(settings: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every setting in ``settings`` (a config as read from its YAML) that is no mapping."""
    for key, value in settings.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def bool_keys(settings: dict, prefix: str = "") -> Iterator[str]:
    """The dotted keys whose value in ``settings`` (an app's primary config, as read from its YAML) is a bool."""
    return (key for key, value in leaves(settings, prefix) if isinstance(value, bool))


def app_switches(app_module: str) -> set[str]:
    """The boolean settings of an app: those of its primary config file(s) (`mtl.cli.choices.app_config`), of the
    option files of a job app's own config groups (mtl-merge's ``eval.enabled``), and of the shared groups whose
    settings only mtlkit reads (`OWN_GROUPS`). Not logger, trainer, callbacks or hydra: their keys are arguments of
    other libraries' classes, some of which take more than a bool (``logger.wandb.log_model=all``)."""
    from mtl.cli.choices import app_config

    keys = set(bool_keys(app_config(app_module)[0])) | shared_switches()
    if app_module.removeprefix("pkg://") == SHARED:
        return keys
    return keys | group_switches(app_module)


@functools.lru_cache(maxsize=None)
def shared_switches() -> frozenset[str]:
    """The switches of the shared config groups of `OWN_GROUPS`, as their option files (and experiment files) give
    them."""
    return frozenset(k for k in group_switches(SHARED) if k.split(".", 1)[0] in OWN_GROUPS)


@functools.lru_cache(maxsize=None)
def group_switches(app_module: str) -> frozenset[str]:
    """The dotted keys that hold a bool in every option file of an app's config groups that sets them (a
    ``@package _global_`` file's at the top)."""
    import yaml
    from importlib import resources

    try:
        groups = [d for d in resources.files(app_module.removeprefix("pkg://")).iterdir() if d.is_dir()]
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return frozenset()
    switches: set[str] = set()
    others: set[str] = set()  # keys some file sets to a non-bool: not a switch
    for group in groups:
        for f in (f for f in group.iterdir() if f.name.endswith(".yaml")):
            text = f.read_text()
            data = yaml.safe_load(text)
            if not isinstance(data, dict):
                continue
            prefix = "" if "# @package _global_" in text.split("\n", 1)[0] else f"{group.name}."
            for key, value in leaves(data, prefix):
                (switches if isinstance(value, bool) else others).add(key)
    return frozenset(switches - others)


def check_switches(cfg: Any, app_module: str) -> None:
    """Every boolean setting of the app (`app_switches`) holds a bool in the composed ``cfg``: the text true/false is
    set to its bool, any other value is refused naming the key."""
    from omegaconf import OmegaConf, open_dict

    for key in sorted(app_switches(app_module)):
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if value is _ABSENT:
            continue  # not in this composition, or unset (`???`: `check_required` names it)
        switch = as_switch(key, value)
        if value is not switch:  # the text true/false: the job's truth tests and config.yaml get the bool
            with open_dict(cfg):
                OmegaConf.update(cfg, key, switch, merge=False)


_ABSENT = object()
