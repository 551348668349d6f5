"""Safetensors files as lazy merge sources: single files and Hugging Face shard folders.

Headers are parsed here (no mapping needed for metadata); tensor bytes are either handed out from a
recycled `safe_open` mapping or `pread` straight into caller buffers (`read_into`), so nothing read stays
in our RSS longer than needed.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import sys
import threading
from pathlib import Path
from typing import Union

try:  # imported here: at EMFILE, importing it (a shared library) would fail too
    import resource
except ImportError:  # Windows
    resource = None

import torch

from mtl.folder_checks import JSON_ERRORS

from .state_source import MergeInputError, StateSource, TensorInfo

__all__ = ["SafetensorsSource", "ShardedSafetensorsSource", "SAFETENSORS_DTYPES", "DTYPE_CODES", "in_page_cache"]

Pathish = Union[str, os.PathLike]
_FD_LOCK = threading.Lock()

#: byte probes per range of `in_page_cache` (first and last byte included, evenly spaced)
PAGE_CACHE_PROBES = 8


def in_page_cache(fd: int, start: int, length: int) -> bool:
    """True when sampled bytes of [start, start + length) of `fd` are in the page cache: a one-byte
    `preadv` with RWF_NOWAIT returns it from the cache and fails instead of waiting for the disk. False
    when any probe misses, or where RWF_NOWAIT is not available (the caller then hints as before)."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or length <= 0:
        return False
    buf = [bytearray(1)]
    n = min(PAGE_CACHE_PROBES, length)
    try:
        for i in range(n):
            off = start + (length - 1) * i // max(n - 1, 1)
            if os.preadv(fd, buf, off, flag) != 1:
                return False
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: a file system without non-blocking reads
        return False
    return True


# safetensors dtype codes (format spec); the unsigned wide ints need a recent torch, hence getattr.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: dt
    for code, dt in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "BOOL": torch.bool,
    }.items()
    if dt is not None
}
DTYPE_CODES: dict[torch.dtype, str] = {dt: code for code, dt in SAFETENSORS_DTYPES.items()}



def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse the header ourselves (8-byte LE length + JSON): cheap metadata without mapping the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise MergeInputError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise MergeInputError(f"{path}: not a safetensors file (header length {n})")
            size = os.fstat(f.fileno()).st_size
            if 8 + n > size:  # else the data (or nothing) would be parsed as the header's JSON
                raise MergeInputError(f"{path}: truncated or not a safetensors file: its header length {n} runs past "
                                      f"the end of the file ({size} bytes)")
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicate_keys)
    except (OSError, *JSON_ERRORS) as e:
        raise MergeInputError(f"{path}: cannot read safetensors header: {e}") from e
    except _DuplicateKey as e:
        raise MergeInputError(f"{path}: tensor {e.args[0]!r} is listed twice in the safetensors header") from None
    if not isinstance(header, dict):
        raise MergeInputError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, 8 + n


def _check_layout(path: Path, infos: dict[str, TensorInfo], offsets: dict[str, tuple[int, int]], data_bytes: int) -> None:
    """The byte ranges the safetensors format requires (what `safe_open` checks, for the files we `pread`
    ourselves): each tensor's range holds exactly its shape × dtype bytes, and the ranges tile the data
    buffer in order, without gaps, overlaps or trailing bytes. Anything else would hand one tensor
    another's bytes, or the header's, without an error."""
    end = 0
    for k, (s, e) in sorted(offsets.items(), key=lambda kv: kv[1]):
        if e - s != infos[k].nbytes:
            raise MergeInputError(f"{path}: tensor {k!r} has data_offsets [{s}, {e}] ({e - s} bytes) but its shape "
                                  f"{list(infos[k].shape)} and dtype need {infos[k].nbytes}")
        if s != end:
            what = "overlaps the tensor before it" if s < end else f"leaves a gap at byte {end}"
            raise MergeInputError(f"{path}: tensor {k!r} (data_offsets [{s}, {e}]) {what}; not a valid safetensors file")
        end = e
    if end < data_bytes:  # a shorter file is refused as truncated by the caller
        raise MergeInputError(f"{path}: {data_bytes - end} bytes after the last tensor; not a valid safetensors file")


class SafetensorsSource(StateSource):
    """A `.safetensors` file read lazily through `safe_open`.

    `get_tensor` returns a view of a read-only mapping; its pages count towards our RSS for as long as
    the mapping lives, so a handle is recycled after `handle_budget` bytes have been served (and large
    tensors get a handle of their own). That keeps peak memory near the tensors actually in use.
    """

    def __init__(self, path: Pathish, handle_budget: int = 16 << 20):
        self.path = Path(path)
        self.label = str(self.path)
        header, self._data_start = _read_safetensors_header(self.path)
        meta = header.pop("__metadata__", None)  # absent or null: none (as safe_open); [], 0, false, "" are refused
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise MergeInputError(f"{path}: not a valid safetensors file: its header's __metadata__ must be an object "
                                  f"mapping names to strings, got {json.dumps(meta)[:80]}")
        self.metadata = meta or {}
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for k, v in header.items():
            if not isinstance(v, dict):
                raise MergeInputError(f"{path}: tensor {k!r} has a malformed header entry {v!r}")
            try:
                dt = SAFETENSORS_DTYPES[v["dtype"]]
            except KeyError:
                raise MergeInputError(f"{path}: tensor {k!r} has unsupported dtype {v.get('dtype')}") from None
            try:
                shape, (s, e) = tuple(int(d) for d in v["shape"]), v["data_offsets"]
                self._offsets[k] = (int(s), int(e))
                if min(shape, default=0) < 0 or not 0 <= int(s) <= int(e):
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise MergeInputError(f"{path}: tensor {k!r} has a malformed header entry {v}") from None
            self._infos[k] = TensorInfo(shape, dt)
        need = self._data_start + max((e for _, e in self._offsets.values()), default=0)
        size = os.path.getsize(self.path)
        if size < need:  # a truncated copy or download: said here, not deep inside a read
            raise MergeInputError(f"{path}: truncated safetensors file: its header needs {need} bytes, the file has {size}")
        _check_layout(self.path, self._infos, self._offsets, size - self._data_start)
        self._budget = handle_budget
        self._handle = None
        self._served = 0
        self._fd: int | None = None

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def prefetch(self, key: str) -> None:
        """Ask the kernel to start reading a tensor's bytes (helps when the file is not in page cache).
        Skipped when the bytes are already cached: there the hint only walks cached pages (~12 % of a
        cached task-arithmetic merge's CPU time)."""
        if not hasattr(os, "posix_fadvise"):
            return
        s, e = self._offsets[key]
        if e > s:
            fd, start = self._file(), self._data_start + s
            if not in_page_cache(fd, start, e - s):
                os.posix_fadvise(fd, start, e - s, os.POSIX_FADV_WILLNEED)

    def _file(self) -> int:
        with _FD_LOCK:  # the chunked kernels read from several threads
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY)
                except OSError as e:
                    raise (_too_many_open_files(self.path) if e.errno == errno.EMFILE else e) from None
            return self._fd

    def file_span(self, key: str) -> tuple[int, int] | None:
        if sys.byteorder != "little" or type(self).read_into is not SafetensorsSource.read_into:
            return None  # a subclass that reads its own way must be read through `read_into`
        return self._file(), self._data_start + self._offsets[key][0]

    def read_into(self, key: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """`pread` straight from the file into `out`: no mapping, so nothing read stays in our RSS."""
        info = self._infos[key]
        if sys.byteorder != "little" or out.dtype != info.dtype or not out.is_contiguous():
            return super().read_into(key, start, out)
        size = out.element_size()
        if start < 0 or start + out.numel() > info.numel:
            raise IndexError(f"{key!r}: entries [{start}, {start + out.numel()}) outside 0..{info.numel}")
        fd = self._file()
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        pos = self._data_start + self._offsets[key][0] + start * size
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise MergeInputError(f"{self.path}: file ends inside tensor {key!r}")
            done += n
        return out

    def _open(self):
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(self.path, framework="pt", device="cpu")
        except SafetensorError as e:
            if f"os error {errno.EMFILE}" in str(e):
                raise _too_many_open_files(self.path) from None
            raise MergeInputError(f"{self.path}: {e}") from None

    def get(self, key: str) -> torch.Tensor:
        if key not in self._infos:
            raise KeyError(f"{key!r} not in {self.path}")
        nbytes = self._infos[key].nbytes
        if nbytes >= self._budget:
            h = self._open()
            try:
                return h.get_tensor(key)
            finally:
                h.__exit__(None, None, None)
        if self._handle is None or self._served + nbytes > self._budget:
            self._drop_handle()
            self._handle = self._open()
        self._served += nbytes
        return self._handle.get_tensor(key)

    def _drop_handle(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._served = None, 0

    def close(self) -> None:
        self._drop_handle()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class ShardedSafetensorsSource(StateSource):
    """A folder sharded the Hugging Face way: `model.safetensors.index.json` maps names to shard files."""

    def __init__(self, index_path: Pathish):
        index_path = Path(index_path)
        self.label = str(index_path.parent)
        try:
            index = json.loads(index_path.read_text(), object_pairs_hook=_no_duplicate_keys)
        except (OSError, *JSON_ERRORS) as e:
            raise MergeInputError(f"{index_path}: unreadable shard index: {e}") from e
        except _DuplicateKey as e:
            raise MergeInputError(f"{index_path}: tensor {e.args[0]!r} is listed twice in the index") from None
        if not isinstance(index, dict) or "weight_map" not in index:
            raise MergeInputError(f"{index_path}: unreadable shard index: it has no \"weight_map\" (tensor name → "
                                  "shard file)")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise MergeInputError(f"{index_path}: unreadable shard index: \"weight_map\" must map tensor names to "
                                  "shard file names")
        escaping = [f for f in weight_map.values() if Path(f).is_absolute() or ".." in Path(f).parts]
        if escaping:  # an index names files beside it; one that reaches elsewhere is not a shard of this folder
            raise MergeInputError(f"{index_path}: shard file {escaping[0]!r} lies outside the index's folder")
        files = sorted(set(weight_map.values()))
        folders = [f for f in files if (index_path.parent / f).is_dir()]
        if folders:
            raise MergeInputError(f"{index_path}: shard file {folders[0]} listed in the index is a folder, not a file")
        missing = [f for f in files if not (index_path.parent / f).is_file()]
        if missing:
            raise MergeInputError(f"{index_path}: shard file(s) {', '.join(missing)} listed in the index do not exist")
        self._shards = {f: SafetensorsSource(index_path.parent / f) for f in files}
        self._where = {k: self._shards[f] for k, f in weight_map.items()}
        self._last: SafetensorsSource | None = None  # the shard `get` read from last
        for k, f in weight_map.items():
            if k not in self._shards[f]._infos:
                raise MergeInputError(f"{index_path}: tensor {k!r} is mapped to {f}, which does not hold it")
        for f, shard in self._shards.items():
            extra = [k for k in shard.keys() if weight_map.get(k) != f]
            if extra:
                where = weight_map.get(extra[0])
                why = f"the index maps it to {where}" if where else "the index does not list it"
                raise MergeInputError(f"{shard.path}: tensor {extra[0]!r} is in this shard but {why}")

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, key: str) -> TensorInfo:
        return self._where[key].info(key)

    def label_of(self, key: str) -> str:
        return str(self._where[key].path) if key in self._where else self.label

    def get(self, key: str) -> torch.Tensor:
        shard = self._where[key]
        if self._last is not None and self._last is not shard:
            # each shard recycles its mapping only after 16 MB of its own reads: a shard read last would keep
            # up to that much mapped (and counted in RSS) per shard for the rest of the merge
            self._last._drop_handle()
        self._last = shard
        return shard.get(key)

    def prefetch(self, key: str) -> None:
        self._where[key].prefetch(key)

    def file_span(self, key: str) -> tuple[int, int] | None:
        if type(self).read_into is not ShardedSafetensorsSource.read_into:
            return None  # a subclass that reads its own way must be read through `read_into`
        return self._where[key].file_span(key)

    def read_into(self, key: str, start: int, out: torch.Tensor) -> torch.Tensor:
        return self._where[key].read_into(key, start, out)

    def close(self) -> None:
        for s in self._shards.values():
            s.close()


def _too_many_open_files(path: Path) -> OSError:
    """EMFILE, said with its cure: a streaming merge holds every input file open at once (docs/merging.md)."""
    soft = f" ({resource.getrlimit(resource.RLIMIT_NOFILE)[0]} allowed)" if resource else ""
    return OSError(errno.EMFILE, f"too many open files{soft} opening {path}: a streaming merge holds every "
                                 "input open at once; raise the limit (ulimit -n) above the number of inputs and shards, "
                                 "or merge fewer inputs")


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen
