"""The read-only source interface every merge reads through, and its in-memory implementation.

A source lists its keys with shape and dtype without loading anything, and hands out one tensor at a
time. Tensors it returns may share memory with the caller's objects or with a read-only file mapping:
callers must never modify them in place. File readers: `merging.safetensors_source`; the factory that
picks one: `merging.sources.open_source`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MergeInputError", "TensorInfo", "StateSource", "DictSource"]


class MergeInputError(ValueError):
    """Bad merge input: mismatching models, non-finite values, too few models, unreadable files."""


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

    def label_of(self, key: str) -> str:
        """What holds `key`, for error messages: the source's `label` unless it spans files."""
        return self.label

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
        named = [k for k in mapping if not isinstance(k, str)]
        if named:  # key filters and reports match names as strings
            raise MergeInputError(f"{label}: keys must be strings (tensor names); key {named[0]!r} is a "
                                  f"{type(named[0]).__name__}")
        sparse = [k for k, v in mapping.items() if v.layout != torch.strided]
        if sparse:  # the kernels add dense tensors in place
            raise MergeInputError(f"{label}: tensor {sparse[0]!r} is {mapping[sparse[0]].layout}; merges take dense "
                                  "tensors (convert it with .to_dense())")
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
