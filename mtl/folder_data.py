"""The data config a model folder records (``meta.data``): written so that any machine can rebuild the data
(mtl-extract, mtl-prune and mtl-merge calibrate and evaluate on it), and checked when it is read back.

Dataset files (``root``, ``path``, ...) are the data itself: a missing one is an error naming the key.
``cache_dir`` only caches data mtlkit generates (scenes, zoo): it never pins the machine that wrote the folder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

#: data settings naming the dataset's own files or folders (read relative to the working directory)
DATASET_PATHS = ("path", "root", "splits_file", "class_mapping")
CACHE = "cache_dir"


def _absolute(v: Any) -> Any:
    if isinstance(v, str) and v:
        return str(Path(v).expanduser().resolve())
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return [_absolute(x) for x in v]
    return v  # null, or a class-mapping table of ints


def data_record(data_kw: Mapping[str, Any]) -> dict[str, Any]:
    """``data_kw`` as a model folder records it: file and folder settings absolute (rebuilt from any working
    directory), and a ``cache_dir`` that is this machine's default cache left out, so that each machine
    rebuilding the data caches it in its own default ($MTL_DATA_CACHE, else ~/.cache/mtlkit), not in a
    path of the machine that trained (the CLI resolves the default to an absolute path before training)."""
    from mtl.data.hf import default_cache_dir

    record = {k: _absolute(v) if k in (*DATASET_PATHS, CACHE) else v for k, v in data_kw.items()}
    default = str(default_cache_dir(str(data_kw.get("name"))).resolve())
    if record.get(CACHE) == default:
        del record[CACHE]
    return record


def _usable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.R_OK | os.W_OK | os.X_OK)


def rebuild_config(stored: Mapping[str, Any], given: Mapping[str, Any], file: str | os.PathLike,
                   setting: str) -> dict[str, Any]:
    """A folder's recorded data config (``stored``, from ``file``'s meta.data) updated by ``given`` (the
    command's ``setting``, e.g. ``calib.data``), checked for this machine. A recorded ``cache_dir`` that is
    not a writable folder here (a copy from another machine, an older folder that recorded its writer's
    default) is dropped with a warning: the data is generated again in this machine's default cache.
    A recorded dataset file or folder that does not exist here is refused naming the key. A ``given`` naming
    another dataset (``name``) is a whole data config of its own: nothing recorded applies to it, nor is checked."""
    if "name" in given and given["name"] != stored.get("name"):
        return dict(given)
    data = dict(stored)
    for key, value in stored.items():
        if key in given:
            continue
        if key == CACHE and value is not None and not _usable(Path(str(value)).expanduser()):
            log.warning("%s: key meta.data.cache_dir=%s is not a writable folder here; the data is cached in this "
                        "machine's default instead ($MTL_DATA_CACHE, else ~/.cache/mtlkit)", file, value)
            del data[key]
        elif key in DATASET_PATHS:
            for p in value if isinstance(value, list) else [value]:
                if isinstance(p, str) and p and not Path(p).expanduser().exists():
                    raise FileNotFoundError(f"{file}: key meta.data.{key}={p!r}: no such file or folder here (the "
                                            f"data the model was trained on); copy it there or pass {setting}.{key}=<path>")
    return {**data, **given}
