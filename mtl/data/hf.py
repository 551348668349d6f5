"""What every on-disk data source shares: the cache location, Arrow columns as arrays, and a quiet
HF ``datasets`` (its progress bars hidden while mtlkit reads or writes its own caches)."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from mtl.atomic import home_folder, make_parents, missing_parents, user_path


def default_cache_dir(kind: str) -> Path:
    """Where generated data of one kind (``scenes``, ``zoo``) is cached when no ``cache_dir`` is given:
    ``$MTL_DATA_CACHE/<kind>``, else ``~/.cache/mtlkit/<kind>``, where ``~`` must be an absolute home folder
    (`mtl.atomic.home_folder`: else a ValueError asking for HOME or MTL_DATA_CACHE). The CLI's ``paths.data_cache`` +
    ``/<kind>`` resolves to the same folder, so Python and CLI runs share one cache."""
    cache = os.environ.get("MTL_DATA_CACHE")
    return (user_path(cache) if cache else Path(home_folder()) / ".cache" / "mtlkit") / kind


def cache_root(kind: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder generated data of one kind is cached in: ``cache_dir``, else `default_cache_dir`, with a
    leading ``~`` expanded (``MTL_DATA_CACHE="~/cache"``): the writer would make a literal ``./~`` folder,
    while the reader (``datasets.load_from_disk``) expands it and finds nothing there."""
    return default_cache_dir(kind) if cache_dir is None else user_path(str(cache_dir))


def check_cache_writable(entry: Path, marker: str) -> None:
    """Before a missing cache entry is generated (``entry/marker`` absent; a complete entry, even in a read-only
    cache, is only read): its cache folder can be made and written. Raises one line naming the cache folder (a
    file in its place, a folder that cannot be created or written), so that a job refuses it before its run
    folder exists. The folders made to find out stay (empty): removing them again raced with a second run that had
    seen them and was about to write its entry there."""
    if (entry / marker).exists():
        return
    root = entry.parent
    hint = "set MTL_DATA_CACHE or data.cache_dir to a writable folder"
    missing = missing_parents(root)
    above = missing[-1].parent if missing else root
    if not above.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"data cache {root}: {above} is a file, not a folder; {hint}")
    try:
        make_parents(root)
    except OSError as e:
        raise OSError(e.errno, f"data cache {root}: cannot create {e.filename or root} ({os.strerror(e.errno)}); "
                               f"{hint}") from None
    if missing:
        return
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"data cache {root}: cannot write in this folder to add {entry.name}; "
                                            f"{hint}")


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide HF datasets' progress bars for the duration, restoring the user's setting after."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def load_cached(entry: Path, data: Path):
    """``datasets.load_from_disk(data)`` of one of mtlkit's cache entries (folder ``entry``): a corrupt one (a
    truncated Arrow file after a full disk or an interrupted copy) is refused in one line naming ``entry``,
    which, deleted, is rebuilt on the next use."""
    import datasets

    try:
        with quiet_datasets():
            return datasets.load_from_disk(str(data))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise corrupt_cache_entry(entry, e) from None


def read_cache_json(entry: Path, name: str) -> dict:
    """The JSON file ``name`` of cache entry ``entry`` (mtlkit's own record beside the data); a missing or
    truncated one (an interrupted copy) is refused like a corrupt Arrow file, naming ``entry``."""
    from mtl.io import read_json

    try:
        return read_json(entry / name)
    except (OSError, ValueError) as e:
        raise corrupt_cache_entry(entry, e) from None


def corrupt_cache_entry(entry: Path, error: BaseException) -> ValueError:
    """The one-line error for a cache entry that cannot be read; deleting ``entry`` fixes it."""
    why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"{entry}: corrupt data cache entry ({why}); delete this folder and it is rebuilt on the next run")


def arrow_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column, possibly of (nested) equal-length lists, as one (N, ...) array, no per-row work."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n, shape = len(arr), []
    while True:
        if arr.null_count:  # checked at every level: a None row would otherwise read as a list of length 0
            first = int(np.flatnonzero(~arr.is_valid().to_numpy(zero_copy_only=False))[0])
            row = first // int(np.prod(shape)) if shape else first
            raise ValueError(f"column holds missing values: row {row} " + ("has a missing (None) entry in its list"
                                                                            if shape else "is missing (None)"))
        if isinstance(arr, pa.ExtensionArray):  # e.g. datasets' Array2D/Array3D
            arr = arr.storage
        elif pa.types.is_fixed_size_list(arr.type):
            shape.append(arr.type.list_size)
            arr = arr.flatten()
        elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            lengths = np.diff(arr.offsets.to_numpy())
            if len(lengths) and (lengths != lengths[0]).any():
                raise ValueError("list column has rows of different lengths; cannot stack it into a tensor")
            shape.append(int(lengths[0]) if len(lengths) else 0)
            arr = arr.flatten()
        else:
            break
    return arr.to_numpy(zero_copy_only=False).reshape(n, *shape)
