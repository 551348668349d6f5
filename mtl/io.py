"""Model folders (``model.safetensors`` + ``config.json``) and atomic file writing."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "mtlkit.model/1"


class ModelFolderError(ValueError):
    """A model folder is missing a file, holds a corrupt one, or does not match its config."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path`, on error it is removed.

    Works for files and folders, so no reader ever sees a half-written output.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporaries a killed writer of `path` left behind (SIGKILL runs no cleanup).

    Temporaries are named ``.<name>.tmp-<pid>-*`` (and ``.<name>.old-<pid>-``); one whose process no
    longer exists is stale. A live process's (including a reused pid's) is left alone.
    """
    if os.name != "posix":
        return
    for kind in ("tmp", "old"):
        head = f".{path.name}.{kind}-"
        for entry in path.parent.iterdir():
            pid = entry.name[len(head):].split("-", 1)[0] if entry.name.startswith(head) else ""
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot store {type(o).__name__} in JSON")


def save_model(model, path: str | os.PathLike, meta: dict[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write ``path/model.safetensors`` + ``path/config.json`` atomically."""
    from mtl import __version__
    from mtl.models.surgery import model_config

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    cfg = {"format": FORMAT, "mtlkit_version": __version__, "model": model_config(model), "meta": meta or {}}
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, default=_json_default) + "\n")
    return path


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"{path}: not a model folder (expected a directory with {WEIGHTS} and {CONFIG})")
    try:
        cfg = read_json(path / CONFIG)
    except (FileNotFoundError, ValueError) as e:
        raise ModelFolderError(str(e)) from None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ModelFolderError(f"{path / CONFIG}: missing key 'model'")
    for key in ("tasks", "backbone"):
        if key not in cfg["model"]:
            raise ModelFolderError(f"{path / CONFIG}: missing key 'model.{key}'")
    return cfg


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a model folder's weights, with errors that name the file."""
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise ModelFolderError(f"{file}: file not found")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFolderError(f"{file}: corrupt or unreadable safetensors file ({e})") from None


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild the model stored in a model folder (no code from the folder is ever executed)."""
    from mtl.models import model_from_config

    path = Path(path)
    cfg = read_model_config(path)
    try:
        model = model_from_config(cfg["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{path / CONFIG}: cannot build the model ({e})") from None
    state = load_state(path)
    expected = model.state_dict()
    file = path / WEIGHTS
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise ModelFolderError(f"{file}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise ModelFolderError(f"{file}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ModelFolderError(
                f"{file}: key {k!r} has shape {tuple(state[k].shape)}, the config in {path / CONFIG} expects {tuple(v.shape)}"
            )
    model.load_state_dict(state)
    model.meta = cfg.get("meta", {})
    return model.to(map_location).eval()
