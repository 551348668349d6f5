"""A config-group choice the composed config does not honour.

An ``experiment=`` file that sets a group's keys in full at ``_global_`` level (``scenes_slimmable`` keeps
its ``slim_resnet`` encoder under ``debug=smoke`` that way) also overwrites a group the user picks on the
command line: ``experiment=scenes_slimmable backbone=resnet18`` would train ``slim_resnet`` while the
run's ``overrides.yaml`` says ``backbone=resnet18``. Refused instead, naming both.
"""
from __future__ import annotations

import functools
from importlib import resources
from typing import Any, Sequence

__all__ = ["check_overrides", "check_choices_honoured", "check_added_keys"]

#: app-level nodes whose keys only the job itself reads (no constructor refuses an unknown one): the top
#: level, and these; a ``+key=`` added there is read by nothing
CLOSED_NODES = ("", "baselines", "viz", "eval", "calib")
#: closed nodes whose config lists every key the job reads: any added key there is refused, not only a near miss
#: (mtl-merge's and mtl-prune's eval: `+eval.split=val` would be ignored)
LISTED_NODES = ("eval",)
#: config groups a job reads with ``cfg.get`` and runs without (mtl/train.py: no logger, no callbacks), so
#: ``~logger`` / ``~callbacks`` are honoured rather than refused as a group the run needs
OPTIONAL_GROUPS = ("logger", "callbacks")


def check_overrides(cfg: Any, overrides: Sequence[str], config_modules: Sequence[str]) -> None:
    """Every check of the command line against the composed config (before the run folder is touched)."""
    from mtl.cli.switches import check_switches

    check_choices_honoured(cfg, overrides, config_modules)
    check_added_keys(cfg, overrides, app_settings(config_modules[0]))
    check_switches(cfg, config_modules[0])  # overwrite=no would read as true


@functools.lru_cache(maxsize=None)  # read by several checks of one command line; the files do not change
def app_config(app_module: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, defaults) of an app's primary config file(s): its own keys and values, and its defaults list as
    ``{group: option}`` (``override /group``, ``group@package`` read as ``group``)."""
    import yaml

    try:
        files = [f for f in resources.files(app_module.removeprefix("pkg://")).iterdir() if f.name.endswith(".yaml")]
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return {}, {}
    settings: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for f in files:
        data = yaml.safe_load(f.read_text()) or {}
        settings.update({k: v for k, v in data.items() if isinstance(k, str) and k != "defaults"})
        for entry in data.get("defaults") or []:
            if isinstance(entry, dict):
                defaults.update({str(k).split()[-1].lstrip("/").split("@")[0]: v for k, v in entry.items()})
    return settings, defaults


def app_settings(app_module: str) -> set[str]:
    """The top-level settings of an app: the keys of its primary config file(s) and the config groups of their
    defaults list (experiment and debug files set only these at ``_global_`` level)."""
    settings, defaults = app_config(app_module)
    return set(settings) | {g.split("/")[0] for g in defaults}


def check_removals(overrides: Sequence[str], app_module: str, groups: dict[str, set[str]]) -> str | None:
    """The first override that removes what the run needs, as a message: ``~key`` for a setting of the app's own
    config (``~optim.lr``: the code's default would be used and config.yaml would not record it), ``~group`` for a
    group its defaults list fills (``~balancer``), and ``group=null``, which Hydra refuses without naming the group.
    ``groups``: every config group's options."""
    settings, defaults = app_config(app_module)
    for arg in overrides:
        key, eq, value = arg.partition("=")
        if arg.startswith("~"):
            path = key[1:].strip()
            node: Any = settings
            for part in path.split("."):
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if isinstance(node, dict):
                return f"{arg}: {path} cannot be removed (the run reads it); set its keys instead ({path}.<key>=...)"
            if node is None and path in groups:  # mtl-prune's data: `data=null` would be read as a group choice
                return f"{arg}: {path} is a setting here, and null is its default: leave {arg} out"
            if node is not _MISSING:
                value = "null" if node is None else str(node).lower() if isinstance(node, bool) else node
                return f"{arg}: {path} cannot be removed (the run reads it); set it instead, e.g. {path}={value}"
            if defaults.get(path) is not None and path not in OPTIONAL_GROUPS:
                return f"{arg}: this run needs its {path} group; pick one of: {', '.join(sorted(groups.get(path, ())))}"
        elif eq and value.strip() == "null" and key.strip() in groups:
            group = key.strip()
            if group in settings and group not in defaults:  # the tool's own setting, a group elsewhere (mtl-prune's data)
                if settings[group] is None:
                    return f"{arg}: {group} is a setting here, not a config group, and null is its default: leave {group}= out"
                return f"{arg}: {group} is a setting here, not a config group, and cannot be removed (the run reads it)"
            if group not in defaults:  # a group of the shared configs this tool does not use (mtl-merge's task)
                from mtl.registry import closest

                near = closest(group, sorted(app_settings(app_module) - {group}))
                return f"{arg}: no setting {group}" + (f" (did you mean {near}?)" if near else "")
            optional = defaults[group] is None
            how = f"leave {group}= out for none" if optional else f"~{group} runs without one" \
                if group in OPTIONAL_GROUPS else f"{group} cannot be removed"
            return f"{arg}: a config group takes one of its options ({how}); {group} options: " \
                   f"{', '.join(sorted(groups[group]))}"
    return None


_MISSING = object()


def check_choices_honoured(cfg: Any, overrides: Sequence[str], config_modules: Sequence[str]) -> None:
    """Raise when an override ``group=option`` picked a group file whose ``name`` the composed config's
    ``group.name`` no longer has (and no ``group.name=`` override explains it)."""
    from omegaconf import DictConfig, OmegaConf

    args = [a.strip() for a in overrides if "=" in a and not a.startswith(("+", "~", "-"))]
    named = {a.split("=", 1)[0] for a in args}
    for arg in args:
        group, choice = arg.split("=", 1)
        if "." in group or "," in choice or choice.startswith(("[", "choice(", "range(")) or f"{group}.name" in named:
            continue
        node = cfg.get(group) if isinstance(cfg, DictConfig) else None
        if not isinstance(node, DictConfig) or "name" not in node:
            continue
        chosen = _option_name(group, choice, config_modules)
        actual = OmegaConf.select(node, "name", default=None)
        if chosen is not None and actual is not None and str(actual) != str(chosen):
            experiment = cfg.get("name") or "the experiment"
            raise ValueError(f"{arg} is overwritten by {experiment}'s own {group} settings ({group}.name={actual}): "
                             f"that experiment sets its {group} in full; drop {group}= or pick another experiment")


def _option_name(group: str, choice: str, config_modules: Sequence[str]) -> Any:
    import yaml

    for module in config_modules:
        try:
            file = resources.files(module) / group / f"{choice}.yaml"
            if file.is_file():
                data = yaml.safe_load(file.read_text()) or {}
                return data.get("name") if isinstance(data, dict) else None
        except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, yaml.YAMLError):
            continue
    return None


def check_added_keys(cfg: Any, overrides: Sequence[str], top: set[str] | None = None) -> None:
    """Raise for ``+key=value`` that adds, to a node only the job reads, a key that nearly matches another
    key there (``+seeed=3`` beside ``seed``, ``+viz.num_sample=3`` beside ``num_samples``): Hydra suggests
    ``+`` for any unknown key, and the job would ignore it without a word. ``top``: the app's top-level settings
    (`app_settings`); any other top-level key (``+foo=1``, ``+model.foo=1`` in mtl-train) is read by nothing."""
    from omegaconf import DictConfig

    from mtl.registry import closest

    for arg in overrides:
        if not arg.startswith("+") or arg.startswith("++") or "=" not in arg:
            continue
        path = arg[1:].split("=", 1)[0].strip()
        parent, _, key = path.rpartition(".")
        head = path.split(".", 1)[0]
        if top and head not in top and not _interpolated(cfg, head):
            close = closest(head, sorted(top))
            hint = f"did you mean {close}?" if close else f"the top-level settings are: {', '.join(sorted(top))}"
            raise ValueError(f"{arg}: no setting {head} ({hint}); nothing reads an added {head}")
        if parent not in CLOSED_NODES:
            continue
        node = cfg if not parent else cfg.get(parent)
        if not isinstance(node, DictConfig):
            continue
        others = [k for k in node.keys() if isinstance(k, str) and k != key]
        where = f"{parent}." if parent else ""
        close = closest(key, others, prefix=where)
        if _interpolated(cfg, path):  # a key another setting reads as ${key} is a real one
            continue
        if close:
            raise ValueError(f"{arg}: no setting {where}{key} (did you mean {close}?); nothing reads an "
                             f"added {where}{key}")
        if parent in LISTED_NODES:
            raise ValueError(f"{arg}: no setting {where}{key} ({parent} has {', '.join(sorted(others))}); nothing reads "
                             f"an added {where}{key}")


def _interpolated(cfg: Any, path: str) -> bool:
    """Whether any value of `cfg` (unresolved) reads ``${path}``."""
    import re

    from omegaconf import OmegaConf

    pattern = re.compile(r"\$\{\s*" + re.escape(path) + r"\s*[}.\[]")

    def walk(v: Any) -> bool:
        if isinstance(v, str):
            return bool(pattern.search(v))
        if isinstance(v, dict):
            return any(walk(x) for x in v.values())
        if isinstance(v, list):
            return any(walk(x) for x in v)
        return False

    return walk(OmegaConf.to_container(cfg, resolve=False))


def near_setting(message: str, app_module: str, cause: BaseException | None = None) -> str:
    """Hydra reads ``task=depth`` for a setting the app lacks as a config group and advises ``+task=depth``,
    which then fails as an unknown setting: name the app's own setting it nearly matches (mtl-extract's
    ``tasks``) instead. ``app_module``: the app's config package (its primary config and groups only).
    A misspelt dotted key (``trainer.max_epoch=3``) gets the same advice, and ``+`` then fails too: named with
    the key of its node it nearly matches, from ``cause`` (OmegaConf's error: the node and the missing key).
    The opposite, ``+launcher=joblib`` for a group the app already has, gets Hydra's defaults-list syntax
    as advice ("use 'override launcher: joblib'"): the command-line spelling is named instead."""
    import re

    import yaml

    from mtl.registry import closest

    from mtl.cli.common import _group_options

    m = re.match(r"Multiple values for ([\w/]+)\. To override a value use 'override [\w/]+: (.+)'$", message)
    if m is not None:
        group, choice = m.groups()
        return f"+{group}={choice} adds a second {group}, and the config already has one: write {group}={choice}"
    m = re.match(r"Could not override '([\w.]+)'", message)
    if m is not None and "." in m.group(1):
        return _near_nested(m.group(1), cause) or message
    if m is None:
        return message
    name, known = m.group(1), set(_group_options([app_module]))
    try:
        files = [f for f in resources.files(app_module.removeprefix("pkg://")).iterdir() if f.name.endswith(".yaml")]
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        files = []
    for f in files:  # the top-level keys of the app's own config files
        data = yaml.safe_load(f.read_text())
        known.update(k for k in (data or {}) if isinstance(k, str) and k != "defaults")
    near = closest(name, sorted(known - {name}))
    return f"no setting {name!r} (did you mean {near}?)" if near else message


def _near_nested(path: str, cause: BaseException | None) -> str | None:
    """'no setting a.b.c (did you mean a.b.d?)' for an override of `path` whose key `cause` (OmegaConf's
    ``Key ... is not in struct``) misses in its node; None when nothing there is close."""
    from mtl.registry import close_names

    node, missing = getattr(cause, "parent_node", None), getattr(cause, "full_key", None)
    if node is None or not isinstance(missing, str) or not (path == missing or path.startswith(f"{missing}.")):
        return None
    parent, _, key = missing.rpartition(".")
    names = close_names(key, [k for k in node.keys() if isinstance(k, str) and k != key])
    if not names:
        return None
    where, rest = (f"{parent}." if parent else ""), path[len(missing):]  # each name in full: a.b or a.c
    return f"no setting {path} (did you mean {' or '.join(where + n + rest for n in names)}?)"
