"""Model folders (``model.safetensors`` + ``config.json``) and atomic file writing."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mtl.atomic import PERMISSION_ERRNOS, STORAGE_ERRNOS, atomic_path, user_path  # noqa: F401  (user_path: mtl.io's too)
from mtl.registry import check_bool
from mtl.folder_checks import (FORMAT, INIT_ONLY, JSON_ERRORS, ModelFolderError, check_header, config_record,  # noqa: F401
                               initial_weight_source, warn_if_newer)  # (FORMAT, INIT_ONLY, ModelFolderError: re-exported)

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: the file a TALL store folder holds (merging.storage writes it); known here by name only, so that
#: load_model can point at the loader without mtl importing merging (which builds on mtl)
TALL_STORE_FILE = "tall.safetensors"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` atomically as strict JSON (see `strict_json`: a diverged loss's NaN becomes null)."""
    text = json.dumps(strict_json(obj, Path(path).name), indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def as_plain(value: Any) -> Any:
    """``value`` as plain Python, so that one setting compares equal however it was given: a list or tuple as a
    list (a tuple in Python, a list in a config), a numpy scalar (np.float32(0.3) from a grid) or a 0-d real
    tensor (a learned coefficient) as the number it holds (any other integer or real, np.longdouble or a Fraction,
    as an int or float), a 1-d real numpy array or tensor (one λ per task from
    ``np.linspace`` or a sweep) as the list of its numbers, at any depth of lists and mappings (a mapping as a
    dict: a balancer's or backbone's settings go into checkpoints, which torch.load(weights_only=True) reads)."""
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: as_plain(v) for k, v in value.items()}
    if _real_1d(value):
        return [as_plain(v) for v in value.tolist()]  # np.longdouble's list holds np.longdouble
    # type, not isinstance: np.float64 subclasses float, yet pickles (into checkpoints) as a numpy scalar
    if isinstance(value, numbers.Number) and type(value) not in (bool, int, float):
        plain = value.item() if hasattr(value, "item") else value
        if type(plain) in (bool, int, float):
            return plain
        # no Python number from .item() (np.longdouble's is itself; Fraction has none): never recorded raw
        if isinstance(plain, numbers.Integral):
            return int(plain)
        return float(plain) if isinstance(plain, numbers.Real) else plain
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_complex:
        return value.item()
    return value


def _real_1d(value: Any) -> bool:
    """A 1-d numpy array or tensor of real numbers (not bool, complex or objects)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.dtype.kind in "iuf"
    return isinstance(value, torch.Tensor) and value.dim() == 1 and (value.dtype.is_floating_point or (
        not value.dtype.is_complex and value.dtype != torch.bool))


def is_plain_json(v: Any) -> bool:
    """True for values JSON holds as they are (no tensors, arrays or objects, at any depth)."""
    if isinstance(v, (str, int, float, bool, type(None))):
        return True
    if isinstance(v, (list, tuple)):
        return all(is_plain_json(x) for x in v)
    return isinstance(v, dict) and all(isinstance(k, str) and is_plain_json(x) for k, x in v.items())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if path.is_dir():  # a run folder given for the JSON file in it: name the files it holds
        held = sorted(p.name for p in path.glob("*.json"))
        raise IsADirectoryError(f"{path} is a folder, not a JSON file"
                                + (f"; it holds {', '.join(held)}" if held else ""))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except JSON_ERRORS as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def strict_json(obj: Any, where: str, string_keys: bool = False) -> Any:
    """``obj`` as strict JSON values, for files other tools read (a model folder's config.json): tensors and
    numpy scalars become numbers/lists, a non-finite float becomes null (JSON has no NaN; a diverged
    run's NaN metric must not make the folder unreadable outside Python), anything else is refused
    naming its key path. A key that is not a string is refused where ``string_keys`` (a model folder: it
    would come back as a string) or where its string clashes with another key; elsewhere it becomes its string."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            clash = not isinstance(k, str) and (str(k) in obj or str(k) in out)  # one value would be lost
            if not isinstance(k, str) and (string_keys or clash):  # a model folder's key would come back a string
                raise TypeError(f"{where}[{k!r}]: JSON object keys are strings, got {type(k).__name__}"
                                + (f" (clashes with key {str(k)!r})" if clash else ""))
            out[str(k)] = strict_json(v, f"{where}.{k}", string_keys)
        return out
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, f"{where}[{i}]", string_keys) for i, v in enumerate(obj)]
    if isinstance(obj, (str, bool, int, type(None))):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (numbers.Integral, numbers.Real)):  # before tolist: np.longdouble's is itself
        return strict_json(as_plain(obj), where, string_keys)
    if isinstance(obj, torch.Tensor) or hasattr(obj, "tolist"):
        return strict_json(obj.tolist(), where, string_keys)
    raise TypeError(f"{where}: cannot store {type(obj).__name__} in JSON")


def safetensors_os_error(error: Exception) -> OSError | None:
    """safetensors' I/O error (a full disk: ``I/O error: ... (os error 28)``) as the OSError it is, errno
    kept, so that ``atomic_path`` names the output; None for any other error."""
    found = re.search(r"os error (\d+)", str(error))
    code = int(found.group(1)) if found else next(  # some builds print the reason only
        (c for c in STORAGE_ERRNOS + PERMISSION_ERRNOS if os.strerror(c) in str(error)), None)
    return None if code is None else OSError(code, os.strerror(code))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the permissions of any other file we write: it creates
    its file 0600, so a shipped folder would be unreadable to other users and containers."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        err = safetensors_os_error(e)
        if err is None:
            raise
        raise err from e
    if metadata and len(metadata) > 1:
        _sort_header_metadata(path)
    usual_permissions(path)


def usual_permissions(path: str | os.PathLike) -> None:
    """Give a file safetensors created (0600) the permissions ``open()`` would have (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _sort_header_metadata(path: str | os.PathLike) -> None:
    """Rewrite the header's ``__metadata__`` in key order. safetensors writes it from a hash map, in an
    order that changes from process to process, so two saves of the same model differed in their bytes
    (and checksums). The rewritten header has the same length, so the data section does not move."""
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) > n:  # escaping unlike the writer's: keep its header rather than move the data
            return
        f.seek(8)
        f.write(raw + b" " * (n - len(raw)))


def is_model_folder(path: str | os.PathLike) -> bool:
    """``path`` holds a model folder's two files (what ``save_model`` may replace)."""
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


#: what ``mtl-export format=folder`` writes beside the two files (mtl.exporters.api's CARD and REPORT): its
#: record of the weights it exported, stale once they are replaced
_EXPORT_RECORDS = ("README.md", "export.json")
#: what file managers and editors leave in any folder they show or open (JupyterLab's checkpoints of an opened
#: config.json): no user data, dropped with the old folder when it is replaced
FOLDER_METADATA = (".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints")


def holds_user_files(path: str | os.PathLike) -> bool:
    """The folder ``path`` holds something besides `FOLDER_METADATA`: a folder holding only a .DS_Store is as
    empty to a writer replacing it as one holding nothing."""
    return any(p.name not in FOLDER_METADATA for p in Path(path).iterdir())


def stale_records(path: str | os.PathLike, caller: str = "save_model") -> list[str]:
    """The files besides its own two that replacing the model folder ``path`` removes with a warning: an
    mtl-export ``format=folder`` output's card and report, which describe the old weights. `FOLDER_METADATA`
    goes too, unnamed. Anything else there (a user's notes, another tool's card) is refused by name: replacing
    the folder would delete it."""
    path = Path(path)
    extra = sorted(p.name for p in path.iterdir() if p.name not in (CONFIG, WEIGHTS, *FOLDER_METADATA))
    try:
        exported = read_json(path / "export.json").get("format") == "folder"
    except (OSError, ValueError, AttributeError):
        exported = False
    stale = [n for n in extra if exported and n in _EXPORT_RECORDS]
    kept = [n for n in extra if n not in stale]
    if kept:
        raise FileExistsError(f"{caller}: {path} holds {', '.join(kept)} besides the model folder's {CONFIG} and "
                              f"{WEIGHTS}; replacing the folder would delete them: move them out or choose another path")
    return stale


def not_a_model(fn: str, got: Any, takes: str = "a model (nn.Module)") -> TypeError:
    """The one-line error of a function given something else than a model; a folder path (a common slip)
    is pointed at `load_model`."""
    hint = "; load a model folder with mtl.load_model(path) first" if isinstance(got, (str, os.PathLike)) else ""
    return TypeError(f"{fn} takes {takes}, got {type(got).__name__}{hint}")


def require_model(model: Any, fn: str) -> None:
    """Refuse anything but an ``nn.Module`` as `not_a_model` says, before an AttributeError deep inside ``fn``."""
    if not isinstance(model, nn.Module):
        raise not_a_model(fn, model)


def first_non_finite(weights: nn.Module | Mapping[str, torch.Tensor]) -> str | None:
    """The key of the first floating tensor (weight or buffer) of a model or state dict holding a NaN or an
    infinity, else None: what `load_model` refuses, checked before a folder is written."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    return next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def check_not_a_file(path: Path, caller: str) -> None:
    """A file where a model folder is to be written is refused, never replaced: `save_model` at the end, and a job
    writing a model folder (`mtl.cli.jobs.start_run`, ``caller="output"``) before its work, in the same words."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{caller}: {path} is a file, not a model folder; remove it or choose another path")


def save_model(model, path: str | os.PathLike, meta: dict[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write ``path/model.safetensors`` + ``path/config.json`` atomically.

    The weights file's header also records each task's kind and digests of the model config and of
    the weights, so `load_model` refuses a folder whose files were edited, swapped or corrupted.
    ``meta`` (provenance: data, training, merge or pruning records) defaults to the model's own
    ``.meta`` (set by `load_model`, pruning and extraction), so a reloaded model saved again keeps it;
    pass ``meta={}`` to drop it. Taken from ``.meta``, its ``test`` metrics are left out when the config
    records ``active_widths`` (a slimmable model at chosen widths: its run tested the full widths).
    ``overwrite`` defaults to True, unlike every other writer (extract, export, merge_to_file, ...: False): an
    existing model folder at ``path`` is replaced whole. It replaces an earlier model folder only: one holding other files is refused naming them,
    except an mtl-export ``format=folder`` output's card and report (README.md, export.json), which
    describe the old weights and are removed with a warning, and a file manager's or editor's metadata
    (`FOLDER_METADATA`: ``.DS_Store``, ``.ipynb_checkpoints/``, ...), dropped; a folder holding only that is
    replaced as an empty one.
    """
    from mtl import __version__
    from mtl.models.surgery import model_config

    check_bool("overwrite", overwrite)  # bool("no") is True: a text "no" would replace an existing folder
    path = user_path(path)
    if not isinstance(getattr(model, "config", None), dict):
        raise not_a_model("save_model", model, "an mtlkit model (mtl.create_model, mtl.load_model, a merged, pruned "
                                               "or extracted one: it describes itself in .config)")
    inherited = meta is None
    if inherited:
        meta = getattr(model, "meta", None)
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"save_model: meta must be a dict, got {type(meta).__name__}")
    widths = model.config.get("active_widths")
    if inherited and widths and "test" in (meta or {}):
        log.warning("save_model: meta.test left out of %s: those are the full widths' test metrics and this slimmable "
                    "model is saved at widths %s (pass meta= to store metrics measured at them)", path, widths)
        meta = {k: v for k, v in meta.items() if k != "test"}
    meta = strict_json(meta or {}, "meta", string_keys=True)
    check_not_a_file(path, "save_model")
    if overwrite and path.is_dir() and holds_user_files(path) and not is_model_folder(path):
        # overwrite replaces an earlier model folder, never a run folder or anything else that happens to be there
        raise FileExistsError(f"save_model: {path} exists and is not a model folder (no {CONFIG} + {WEIGHTS}); "
                              "refusing to replace it: choose another path or remove it yourself")
    stale = stale_records(path) if overwrite and is_model_folder(path) else []
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    cast = next((k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32), None)
    if cast is not None:  # load_model rebuilds float32 models and never casts (a cast changes values)
        raise ValueError(f"save_model: key {cast!r} is {state[cast].dtype}; model folders hold float32 weights "
                         "(call model.float() first; cast after loading for half-precision inference)")
    diverged = first_non_finite(state)
    if diverged is not None:  # load_model refuses such a folder: never write one
        raise ValueError(f"save_model: key {diverged!r} holds NaN or infinite values (a diverged run?); "
                         f"nothing was written to {path}")
    model_cfg = strict_json(model_config(model), "model", string_keys=True)
    cfg = {"format": FORMAT, "mtlkit_version": __version__, "model": model_cfg, "meta": meta}
    header = {"format": FORMAT, **config_record(model_cfg), "weights_digest": _weights_digest(state)}
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.mkdir()
        save_safetensors(state, tmp / WEIGHTS, metadata=header)
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, allow_nan=False) + "\n")
    if stale:
        log.warning("save_model: removed %s from %s: mtl-export's record of the weights now replaced",
                    " and ".join(stale), path)
    return path


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    return weights_digest(state.keys(), state.__getitem__)


def weights_digest(keys: Iterable[str], get: Callable[[str], torch.Tensor]) -> str:
    """The digest `save_model` writes into a weights file's header, over ``get(k)`` for the sorted keys
    (one tensor at a time: a streaming reader checks a file without holding it)."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(keys):
        t = get(k).detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_weights_digest(file: str | os.PathLike, header: dict[str, str], keys: Iterable[str],
                         get: Callable[[str], torch.Tensor], error: type[Exception] | None = None) -> None:
    """Refuse a weights file whose tensors differ from the digest its header records (an edited or
    corrupt copy of a `save_model` file); files without one (plain safetensors) pass."""
    if "weights_digest" in header and header["weights_digest"] != weights_digest(keys, get):
        raise (error or ModelFolderError)(f"{file}: weights differ from the digest in its header (corrupt or edited file)")


def run_folder_refusal(path: str | os.PathLike) -> str | None:
    """'<path> is a run folder ...; did you mean <path>/model?' when `path` is a training run's folder (it holds
    ``model/`` and neither a config nor weights of its own), else None: every reader of model folders (mtl-merge's
    of any weights too) says it in these words."""
    path = user_path(path)
    own = (CONFIG, WEIGHTS, f"{WEIGHTS}.index.json")
    if not any((path / f).exists() for f in own) and (path / "model" / CONFIG).is_file():
        return f"{path} is a run folder, not a model folder; did you mean {path / 'model'}?"
    return None


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model folder, its format and task list checked (errors name file and key)."""
    path = user_path(path)
    store = path if path.name == TALL_STORE_FILE and path.is_file() else path / TALL_STORE_FILE
    if store.is_file() and not (path / CONFIG).exists():
        raise ModelFolderError(f"{path} is a TALL store, not a model folder: rebuild task t's weights with "
                               f"merging.load_task_model({str(path)!r}, t) and load them into mtl.load_model(<that "
                               "task's fine-tuned folder>) (docs/merging.md, TALL compressed storage)")
    if not path.is_dir():
        what = "no such folder" if not path.exists() else "not a model folder"
        raise ModelFolderError(f"{path}: {what} (expected a directory with {WEIGHTS} and {CONFIG})")
    file = path / CONFIG
    if refusal := run_folder_refusal(path):
        raise ModelFolderError(refusal)
    if not file.exists() and (path / WEIGHTS).is_file():  # e.g. `mtl-merge eval=none`: merged weights alone
        raise ModelFolderError(f"{path} holds weights ({WEIGHTS}) but no {CONFIG}: a bare state dict (as "
                               "`mtl-merge eval=none` writes), not a model folder; load it with "
                               "safetensors.torch.load_file, or rerun the merge with evaluation (merge.lam=<λ>) for "
                               "a model folder")
    try:
        cfg = read_json(file)
    except (FileNotFoundError, IsADirectoryError, ValueError) as e:
        raise ModelFolderError(str(e)) from None
    if not isinstance(cfg, dict):  # a list, null or string holds no key at all: say what it is
        raise ModelFolderError(f"{file}: must be a JSON object, got {_json_type(cfg)}")
    if "model" not in cfg and ("architectures" in cfg or "model_type" in cfg):
        raise ModelFolderError(f"{file}: a Hugging Face model config (model_type={cfg.get('model_type')!r}), not an "
                               "mtlkit model folder; merge such checkpoints with merging.merge / merging.merge_to_file "
                               "or mtl-merge eval=none (docs/merging.md, LLM checkpoints)")
    for key in ("model", "format"):
        if key not in cfg:
            raise ModelFolderError(f"{file}: missing key {key!r}" + (f" (this mtlkit reads {FORMAT!r})" if key == "format" else ""))
    if not isinstance(cfg["model"], dict):
        raise ModelFolderError(f"{file}: key 'model' must be an object, got {_json_type(cfg['model'])}")
    if cfg["format"] != FORMAT:
        raise ModelFolderError(f"{file}: key 'format' is {cfg['format']!r}; this mtlkit reads {FORMAT!r}")
    for key in ("tasks", "backbone"):
        if key not in cfg["model"]:
            raise ModelFolderError(f"{file}: missing key 'model.{key}'")
    tasks = cfg["model"]["tasks"]
    if not isinstance(tasks, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("kind"), str) for t in tasks):
        raise ModelFolderError(f"{file}: key 'model.tasks' must be a list of {{'name': ..., 'kind': ...}} objects")
    if not tasks:
        raise ModelFolderError(f"{file}: key 'model.tasks' is empty; a model has at least one task")
    if not isinstance(cfg.get("meta", {}), dict):
        raise ModelFolderError(f"{file}: key 'meta' must be an object, got {_json_type(cfg['meta'])}")
    unknown = sorted(set(cfg) - {"format", "mtlkit_version", "model", "meta"})
    if unknown:  # e.g. a misspelt "metadata": its content would be dropped without a word
        log.warning("%s: unknown top-level key(s) %s ignored (a model folder holds format, mtlkit_version, model, meta)",
                    file, unknown)
    warn_if_newer(cfg.get("mtlkit_version"), file)
    fetch = initial_weight_source(cfg["model"], "model")
    if fetch:  # the folder's own weights replace them: honouring one would only reach the Hub or read another file
        raise ModelFolderError(f"{file}: key '{fetch}' makes the model read initial weights (the Hub or a file); a "
                               "model folder holds its weights and never loads others: remove the key")
    return cfg


def _json_type(value: Any) -> str:
    """What a JSON value is, as an error names it (``null``, ``list``, ``str``)."""
    return "null" if value is None else type(value).__name__


def _read_weights(file: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a weights file; ``tensors=False``: the header only (no tensor read)."""
    if file.is_dir():  # as read_json says of a config.json that is a folder
        raise ModelFolderError(f"{file} is a folder, not a safetensors file")
    if not file.is_file():
        raise ModelFolderError(f"{file}: file not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), header
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise ModelFolderError(f"{file}: corrupt or unreadable safetensors file ({e})") from None


def recorded_weights_digest(path: str | os.PathLike) -> str | None:
    """The weights digest `save_model` wrote into a model folder's header (no tensor read); None for a
    folder without one. Loading the weights checks it, so it identifies them."""
    file = Path(path) / WEIGHTS
    return _read_weights(file, tensors=False)[1].get("weights_digest") if file.is_file() else None


def read_checked_config(path: str | os.PathLike) -> dict[str, Any]:
    """A model folder's config.json checked against its weights file's header (task kinds, config digest),
    without reading any tensor: for callers that plan from configs before loading weights (merge pools)."""
    path = Path(path)
    cfg = read_model_config(path)
    cfg["model"] = check_header(_read_weights(path / WEIGHTS, tensors=False)[1], cfg, path / WEIGHTS, path / CONFIG)
    return cfg


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a model folder's weights, with errors that name the file (an edited file included: the
    digest its header records is checked, as `load_model` does)."""
    file = Path(path) / WEIGHTS
    state, header = _read_weights(file)
    check_weights_digest(file, header, state.keys(), state.__getitem__)
    check_finite(file, state)
    return state


def check_finite(file: str | os.PathLike, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights read from ``file`` that hold a NaN or an infinity (`first_non_finite`), naming the key: what
    every reader of a model folder's weights (`load_model`, `load_state`: init_from, merge pools) refuses."""
    bad = first_non_finite(state)
    if bad is not None:
        raise ModelFolderError(f"{file}: key {bad!r} holds NaN or infinite values")


def model_skeleton(path: str | os.PathLike):
    """The model a folder's config describes, built on the meta device: its modules and shapes, no weights read (the
    config checked against the weights file's header, as `read_checked_config`); None where it cannot be built there."""
    path = user_path(path)
    return _build(read_checked_config(path)["model"], path / CONFIG, meta=True)


def _build(model_cfg: dict[str, Any], cfg_file: Path, meta: bool = False):
    """The model a folder's config describes; ``meta``: on the meta device (shapes only, no memory), None where the
    model cannot be built there (the real build then checks as before)."""
    from mtl.models import model_from_config
    from mtl.models.families import build_on_meta

    if meta:
        return build_on_meta(lambda: model_from_config(model_cfg))
    try:
        # the random init the stored weights replace: not the caller's stream
        with torch.random.fork_rng(devices=[]):
            return model_from_config(model_cfg)
    except Exception as e:  # any malformed value: the config, not the caller, is at fault
        raise ModelFolderError(f"{cfg_file}: cannot build the model ({type(e).__name__}: {e})") from None


def _check_fit(model: nn.Module, state: dict[str, torch.Tensor], file: Path, cfg_file: Path) -> list[str]:
    """The stored ``state`` against ``model``'s keys, shapes and dtypes, an older layout converted first (in place;
    returns the keys converted)."""
    upgraded = model.upgrade_state(state) if hasattr(model, "upgrade_state") else []
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise ModelFolderError(f"{file}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise ModelFolderError(f"{file}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for k, v in expected.items():
        t = state[k]
        if tuple(t.shape) != tuple(v.shape):
            raise ModelFolderError(
                f"{file}: key {k!r} has shape {tuple(t.shape)}, the config in {cfg_file} expects {tuple(v.shape)}")
        if t.dtype != v.dtype:  # save_model stores float32 only; a cast would change values
            raise ModelFolderError(f"{file}: key {k!r} has dtype {t.dtype}, the model expects {v.dtype}")
    return upgraded


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild the model stored in a model folder (no code from the folder is ever executed).

    Refused with a `ModelFolderError` naming the file (and key): a missing, truncated or corrupt file,
    an unknown format, a config that does not match the weights (keys, shapes, dtypes, task kinds,
    digests written by `save_model`), and NaN or infinite weights.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_model takes the path of a model folder, got {type(path).__name__}"
                        + (" (already a model: use it as it is)" if isinstance(path, torch.nn.Module) else ""))
    path = user_path(path)
    cfg = read_model_config(path)
    file, cfg_file = path / WEIGHTS, path / CONFIG
    state, header = _read_weights(file)
    cfg["model"] = check_header(header, cfg, file, cfg_file)
    stored = dict(state)  # the digest covers the tensors as stored, before any conversion
    # checked (and an older layout converted) on a meta-device build, before any real tensor is allocated: a config
    # asking for a huge head is refused here, not after building it; the real build only where meta cannot
    skeleton = _build(cfg["model"], cfg_file, meta=True)
    upgraded = _check_fit(skeleton, state, file, cfg_file) if skeleton is not None else None
    model = _build(cfg["model"], cfg_file)
    if skeleton is None:
        upgraded = _check_fit(model, state, file, cfg_file)
    if upgraded:
        log.info("%s: %d key(s) of an older layout converted on loading (e.g. %r)", file, len(upgraded), upgraded[0])
    check_finite(file, state)
    check_weights_digest(file, header, stored.keys(), stored.__getitem__)
    model.load_state_dict(state)
    model.meta = cfg.get("meta", {})
    return model.to(map_location).eval()


def check_output_apart(output: Path, inputs: list[Path]) -> None:
    """Refuse an output folder that is an input folder, lies inside one or holds one (resolved paths):
    writing it (``overwrite=true`` replaces the whole folder) would destroy or alter the input."""
    out = output.resolve()
    for src in inputs:
        path = src.resolve()
        how = ("is" if out == path else "lies inside" if path in out.parents
               else "holds" if out in path.parents else None)
        if how:
            what = "input model folder" if path.is_dir() else "input file"
            raise ValueError(f"output={output} {how} the {what} {src}; write the result elsewhere")
