"""Lazy state-dict sources: one read-only interface over dicts, modules, model folders and checkpoint files.

A source lists its keys with shape and dtype without loading anything, and hands out one tensor at a
time. Tensors it returns may share memory with the caller's objects or with a read-only file mapping:
callers must never modify them in place.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

__all__ = [
    "MergeInputError",
    "TensorInfo",
    "StateSource",
    "DictSource",
    "SafetensorsSource",
    "ShardedSafetensorsSource",
    "open_source",
    "open_sources",
    "load_state_dict",
    "SAFETENSORS_DTYPES",
]

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
SourceLike = Union[Mapping, nn.Module, Pathish, "StateSource"]


class MergeInputError(ValueError):
    """Bad merge input: mismatching models, non-finite values, too few models, unreadable files."""


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


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class StateSource(ABC):
    """Read-only, lazy access to a `{name: tensor}` mapping. `label` names it in error messages."""

    label: str = "<source>"

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def info(self, key: str) -> TensorInfo: ...

    @abstractmethod
    def get(self, key: str) -> torch.Tensor: ...

    def prefetch(self, key: str) -> None:
        """Hint that `key` will be read soon (file sources start the disk read)."""

    def file_span(self, key: str) -> tuple[int, int] | None:
        """(open file descriptor, byte offset) of `key`'s little-endian data where `read_into` would `pread`
        it from a file, else None — so that native code can read the bytes itself."""
        return None

    def read_into(self, key: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Copy flat entries [start, start + out.numel()) of `key` into `out` (same dtype) and return it."""
        x = self.get(key)
        if not x.is_contiguous():  # flatten once per key, not once per chunk
            cached = getattr(self, "_flat", None)
            if cached is None or cached[0] != key:
                cached = self._flat = (key, x.reshape(-1))
            x = cached[1]
        return out.copy_(x.reshape(-1)[start : start + out.numel()])

    def close(self) -> None:
        """Release cached file handles (tensors already handed out stay valid)."""

    def __contains__(self, key: str) -> bool:
        return key in self._key_set()

    def _key_set(self) -> set[str]:
        ks = getattr(self, "_keys_cache", None)
        if ks is None:
            ks = set(self.keys())
            self._keys_cache = ks
        return ks

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"


class DictSource(StateSource):
    """An in-memory state dict. `nn.Parameter`s are detached so nothing downstream can touch autograd state."""

    def __init__(self, mapping: Mapping[str, Any], label: str = "state dict"):
        bad = [k for k, v in mapping.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise MergeInputError(
                f"{label}: values must be tensors; not a tensor: {', '.join(map(repr, bad[:5]))}"
            )
        self._d = mapping
        self.label = label

    def keys(self) -> list[str]:
        return list(self._d.keys())

    def info(self, key: str) -> TensorInfo:
        t = self._d[key]
        return TensorInfo(tuple(t.shape), t.dtype)

    def get(self, key: str) -> torch.Tensor:
        t = self._d[key].detach()
        return t if t.device.type == "cpu" else t.cpu()


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
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeInputError(f"{path}: cannot read safetensors header: {e}") from e
    return header, 8 + n


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
        self.metadata = header.pop("__metadata__", None) or {}
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for k, v in header.items():
            try:
                dt = SAFETENSORS_DTYPES[v["dtype"]]
            except KeyError:
                raise MergeInputError(f"{path}: tensor {k!r} has unsupported dtype {v.get('dtype')}") from None
            self._infos[k] = TensorInfo(tuple(v["shape"]), dt)
            self._offsets[k] = tuple(v["data_offsets"])
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
                self._fd = os.open(self.path, os.O_RDONLY)
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
        from safetensors import safe_open

        return safe_open(self.path, framework="pt", device="cpu")

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
            weight_map = json.loads(index_path.read_text(), object_pairs_hook=_no_duplicate_keys)["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise MergeInputError(f"{index_path}: unreadable shard index: {e}") from e
        except _DuplicateKey as e:
            raise MergeInputError(f"{index_path}: tensor {e.args[0]!r} is listed twice in the index") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (index_path.parent / f).is_file()]
        if missing:
            raise MergeInputError(f"{index_path}: shard file(s) {', '.join(missing)} listed in the index do not exist")
        self._shards = {f: SafetensorsSource(index_path.parent / f) for f in files}
        self._where = {k: self._shards[f] for k, f in weight_map.items()}
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

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get(key)

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


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


def _torch_checkpoint(path: Path) -> DictSource:
    try:
        try:  # mmap keeps a zip-format checkpoint lazy; legacy formats cannot be mapped
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise MergeInputError(f"{path}: cannot load as a torch checkpoint (weights_only=True): {e}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning / common training checkpoints nest the weights
    if not isinstance(obj, Mapping):
        raise MergeInputError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict")
    return DictSource(obj, label=str(path))


def open_source(obj: SourceLike, label: str | None = None) -> StateSource:
    """Wrap a state dict, `nn.Module`, model folder, `.safetensors` file or torch checkpoint."""
    if isinstance(obj, StateSource):
        return obj
    if isinstance(obj, nn.Module):
        return DictSource(obj.state_dict(), label=label or f"module {type(obj).__name__}")
    if isinstance(obj, Mapping):
        return DictSource(obj, label=label or "state dict")
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        if p.is_dir():
            if (p / "model.safetensors").is_file():
                return SafetensorsSource(p / "model.safetensors")
            if (p / "model.safetensors.index.json").is_file():
                return ShardedSafetensorsSource(p / "model.safetensors.index.json")
            raise MergeInputError(f"{p}: model folder without model.safetensors (or its shard index)")
        if not p.is_file():
            raise MergeInputError(f"{p}: no such file or folder")
        if p.suffix == ".safetensors":
            return SafetensorsSource(p)
        return _torch_checkpoint(p)
    raise TypeError(
        f"cannot read a state dict from {type(obj).__name__}; "
        "expected a dict, nn.Module, model folder, .safetensors file or torch checkpoint"
    )


def open_sources(pretrained: SourceLike, finetuned) -> tuple[StateSource, list[StateSource]]:
    """Open the pretrained model and the list of fine-tuned ones, labelling in-memory inputs by position."""
    if isinstance(finetuned, (str, os.PathLike, Mapping, nn.Module, StateSource, torch.Tensor)):
        raise TypeError("finetuned must be a list of models (state dicts, modules, folders or files), not one model")
    fts = list(finetuned)
    pre = open_source(pretrained, label="pretrained")
    return pre, [open_source(f, label=f"finetuned[{i}]") for i, f in enumerate(fts)]


def load_state_dict(obj: SourceLike) -> dict[str, torch.Tensor]:
    """Materialise any source as an owned `{name: tensor}` dict (copies, so the result is safe to modify)."""
    src = open_source(obj)
    try:
        return {k: src.get(k).clone() for k in src.keys()}
    finally:
        if src is not obj:
            src.close()
