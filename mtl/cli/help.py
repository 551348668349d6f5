"""``--help`` of every mtlkit CLI: the app's usage, its own config groups with their options, and the
config the given overrides compose.

Hydra's own listing walks only the primary config folder: it missed the groups the job CLIs share
from ``mtl.configs`` (``merge=``, ``prune=``, ``format=`` ...) and showed the other apps' folders
for ``mtl-train``. Here the groups come from the app's defaults list, the options from the folders.
"""
from __future__ import annotations

import sys
from importlib import resources
from typing import Any, Sequence

HELP_FLAGS = {"--help", "-h"}


def _defaults(config_module: str) -> tuple[str, list[tuple[str, Any]]]:
    """The app's primary config name and its ``(group, default)`` entries (``hydra`` left out)."""
    from omegaconf import OmegaConf

    (primary,) = [f for f in resources.files(config_module).iterdir() if f.name.endswith(".yaml")]
    entries = []
    for entry in OmegaConf.to_container(OmegaConf.load(str(primary))).get("defaults", []):
        if not isinstance(entry, dict):
            continue  # _self_
        ((key, value),) = entry.items()
        key = key.replace("override ", "").replace("optional ", "").strip()
        if key != "hydra":
            entries.append((key, value))
    return primary.name[: -len(".yaml")], entries


def app_help(prog: str, doc: str, config_modules: Sequence[str], overrides: Sequence[str],
             header: str = "") -> str:
    from omegaconf import OmegaConf

    from mtl.cli.common import _group_options, hydra_message
    from mtl.cli.in_process import compose_in_process

    config_name, entries = _defaults(config_modules[0])
    options = _group_options(config_modules)
    lines = [f"{prog}: {doc.strip()}" if doc else prog, "",
             "Configuration groups (group=option, the default in [brackets]):"]
    for group, default in entries:
        chosen = set(default) if isinstance(default, list) else {default}
        names = [f"[{o}]" if o in chosen else o for o in sorted(options.get(group, ()))]
        lines.append(f"  {group}: {', '.join(names) or '(none)'}")
    lines += ["", "Any other key is set as key=value; +key=value adds one the config does not list.",
              "debug=smoke runs in seconds; verbose=true shows full tracebacks. Docs: docs/ in the repository.",
              ""]
    try:
        cfg, _ = compose_in_process(config_modules[0], config_name, overrides, run_dir="<run_dir>")
    except Exception as e:  # a bad override: say so, the groups above still help
        lines.append(f"(config not shown: {hydra_message(e)})")
    else:
        cfg.pop("hydra", None)
        lines += [header or "Config (with the overrides given):", OmegaConf.to_yaml(cfg).rstrip()]
    return "\n".join(lines)


def print_help_if_asked(hydra_main, config_modules: Sequence[str], argv: list[str]) -> bool:
    """Print the help and return True when ``--help``/``-h`` is among the arguments."""
    if not HELP_FLAGS.intersection(argv[1:]):
        return False
    module = sys.modules.get(getattr(hydra_main, "__module__", ""), None)
    doc = (getattr(module, "__doc__", None) or "").strip()
    doc = doc.split("``: ", 1)[-1] if doc.startswith("``") else doc  # "``mtl-merge``: merge ..." -> "merge ..."
    prog = "mtl-" + config_modules[0].rsplit(".", 1)[-1].replace("_app", "") \
        if config_modules[0] != "mtl.configs" else "mtl-train"
    overrides, jobs = first_job([a for a in argv[1:] if a not in HELP_FLAGS])
    # a -m sweep: its first job's config stands for all of them
    header = f"Config of the sweep's first job (-m: {jobs}):" if jobs else ""
    print(app_help(prog, doc, config_modules, overrides, header), flush=True)
    return True


def first_job(args: list[str]) -> tuple[list[str], str]:
    """The overrides of a ``-m`` sweep's first job (``task=semseg,depth`` -> ``task=semseg``; ``-m`` dropped)
    and a note on what was swept ("" when nothing was)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = any(a in ("-m", "--multirun") for a in args)
    args = [a for a in args if a not in ("-m", "--multirun")]
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # a malformed override: the config composition names it
        return args, ""
    # an interval (an Optuna search range) has no first value: its key shows the config's own setting
    sampled = {ov.input_line: ov.get_key_element() for ov in parsed if ov.is_interval_sweep()}
    swept = {ov.input_line: f"{ov.get_key_element()}={next(iter(ov.sweep_string_iterator()))}"
             for ov in parsed if ov.is_sweep_override() and ov.input_line not in sampled}
    if not swept and not sampled:
        return args, "multirun" if multirun else ""
    note = ", ".join([*(["swept " + ", ".join(a.split("=", 1)[0] for a in swept)] if swept else []),
                      *(f"{k} searched in an interval (shown: the config's own value)" for k in sampled.values())])
    return [swept.get(a, a) for a in args if a not in sampled], note
