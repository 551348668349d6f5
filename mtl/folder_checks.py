"""What a model folder is checked against: the record its weights header keeps of the model config
(format, task kinds, a digest and a copy of the config), and the config keys a folder may not hold."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = "mtlkit.model/1"

#: what ``json.loads`` raises on text that is not JSON: a syntax or encoding error (ValueError: JSONDecodeError,
#: UnicodeDecodeError) or nesting too deep for the parser (RecursionError: ``'[' * 200000``)
JSON_ERRORS = (ValueError, RecursionError)


class ModelFolderError(ValueError):
    """A model folder is missing a file, holds a corrupt one, or does not match its config."""


def task_kinds(model_cfg: dict[str, Any]) -> dict[str, str]:
    return {t["name"]: t["kind"] for t in model_cfg.get("tasks", []) if isinstance(t, dict) and "name" in t and "kind" in t}


def config_record(model_cfg: dict[str, Any]) -> dict[str, str]:
    """The weights header's record of the model config: task kinds, the config's digest, and a copy of the
    config (to name the key of a config.json edited afterwards)."""
    return {"tasks": json.dumps(task_kinds(model_cfg)), "config_digest": config_digest(model_cfg),
            "config": canonical(model_cfg)}


def canonical(model_cfg: Any) -> str:
    return json.dumps(model_cfg, sort_keys=True, separators=(",", ":"))


def config_digest(model_cfg: Any) -> str:
    return hashlib.blake2b(canonical(model_cfg).encode(), digest_size=16).hexdigest()


def same_json(a: Any, b: Any) -> bool:
    """Equal as parsed JSON values: 1 and 1.0 are one number (tools such as jq rewrite 1.0 as 1), while
    true and 1 stay apart (in Python True == 1). Key order and layout are gone once parsed."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


#: the value `first_difference` gives for a key on one side only
MISSING = _Missing()


def first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first key path (``model.decoder.channels``, ``[i]`` for list items) where two JSON values differ
    (`same_json`: true and 1 differ), with the two values there (`MISSING` for a key on one side only); None when
    they are the same."""
    if same_json(a, b):
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            found = first_difference(a.get(k, MISSING), b.get(k, MISSING), f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found is not None:
                return found
    return path, a, b


def warn_if_newer(written_by: Any, file: Path) -> None:
    """A folder written by a newer mtlkit may hold settings this one does not know: said once, not refused."""
    def release(v: str) -> tuple[int, ...] | None:
        parts = str(v).split("+")[0].split(".")[:3]
        return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None

    from mtl import __version__

    theirs, ours = release(written_by), release(__version__)
    if theirs and ours and theirs > ours:
        log.warning("%s was written by mtlkit %s, newer than this %s: if it does not load as expected, upgrade",
                    file, written_by, __version__)


#: backbone keys naming where *initial* weights come from (timm's Hub download, a local file): a saved
#: model's own weights replace them, so `save_model` leaves them out and `load_model` refuses them
INIT_ONLY = ("pretrained", "checkpoint_path", "pretrained_cfg_overlay")
#: the ones that make timm read weights when a model is built (an overlay alone is only read with pretrained=true;
#: folders saved before it joined INIT_ONLY may hold one, and must still load)
_READS_WEIGHTS = ("pretrained", "checkpoint_path")


def initial_weight_source(v: Any, where: str) -> str | None:
    """The key path of the first set weight-source key in a stored model config, if any."""
    if isinstance(v, dict):
        for k, x in v.items():
            if k in _READS_WEIGHTS and x not in (None, False, "", {}):
                return f"{where}.{k}"
            found = initial_weight_source(x, f"{where}.{k}")
            if found:
                return found
    elif isinstance(v, list):
        for i, x in enumerate(v):
            found = initial_weight_source(x, f"{where}[{i}]")
            if found:
                return found
    return None


def check_header(header: dict[str, str], cfg: dict[str, Any], file: Path, cfg_file: Path) -> dict[str, Any]:
    """The weights file's own record of the model against config.json (folders written by
    `save_model`; a plain safetensors file without it is checked by keys, shapes and values only).
    Returns the model config to build: config.json's, or the header's copy where the two differ only in
    how numbers are written."""
    if header.get("format", "").startswith("mtlkit") and header["format"] != FORMAT:  # "pt": plain safetensors
        raise ModelFolderError(f"{file}: header key 'format' is {header['format']!r}; this mtlkit reads {FORMAT!r}")
    if "tasks" in header:
        try:
            stored = json.loads(header["tasks"])
            assert isinstance(stored, dict)
        except (*JSON_ERRORS, AssertionError):
            raise ModelFolderError(f"{file}: corrupt header key 'tasks'") from None
        kinds = task_kinds(cfg["model"])
        for name in sorted(set(stored) | set(kinds)):
            if name not in kinds or name not in stored:
                where, other = (cfg_file, file) if name not in kinds else (file, cfg_file)
                raise ModelFolderError(f"{where} has no task {name!r}, but {other} has it (the config and the "
                                       "weights must list the same tasks)")
            if stored.get(name) != kinds.get(name):
                raise ModelFolderError(
                    f"{cfg_file}: task {name!r} has kind {kinds.get(name)!r}, but {file} was saved with "
                    f"kind {stored.get(name)!r} for it (task heads do not fit another kind)")
    if "config_digest" not in header or header["config_digest"] == config_digest(cfg["model"]):
        return cfg["model"]
    try:
        saved = json.loads(header.get("config", ""))
    except JSON_ERRORS:
        saved = None
    if saved is None or config_digest(saved) != header["config_digest"]:  # no (or a corrupt) copy: name the whole key
        key = "model"
    elif same_json(saved, cfg["model"]):
        return saved  # only rewritten (jq writes 1.0 as 1): built from the saved copy, whose 16 stays an int
    else:
        key = first_difference(saved, cfg["model"], "model")[0]
    raise ModelFolderError(f"{cfg_file}: key {key!r} differs from the config {file} was saved with "
                           "(edited or corrupt); save the model again to change its config")
