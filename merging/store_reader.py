"""Reading a TALL store (`merging.storage` writes it): the manifest checked against the file's tensors
and the digest in its header, then task models rebuilt lazily, one tensor at a time."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mtl.folder_checks import JSON_ERRORS

from .engine import check_merged_variance
from .keys import BN_RULES, is_bn_variance
from .safetensors_source import SafetensorsSource
from .state_source import MergeInputError, TensorInfo
from .storage import UNSEALED, FORMAT_VERSION, STORE_FILE, packed_info, unpack_mask
from .tall import reconstruct_tensor

__all__ = ["TallStore", "open_store", "opened_store", "load_task_model", "store_report"]


def _check_store(path: Path, manifest: Any, src: SafetensorsSource) -> None:
    """The manifest against the file's header, before any task model is rebuilt: a store edited or
    written by other code must not rebuild a model with a key missing or a mask short of bits
    (np.unpackbits pads with zeros, which would read as "off")."""
    def bad(what: str) -> MergeInputError:
        return MergeInputError(f"{path}: not a valid TALL store: {what}")

    def names(field: str) -> list[str]:
        v = manifest.get(field)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise bad(f"manifest field {field!r} must be a list of names, got {v!r}")
        return v

    tasks, order, merged = names("tasks"), names("order"), names("merged")
    if not tasks or len(set(tasks)) != len(tasks):
        raise bad(f"task names must be distinct and at least one, got {tasks}")
    lam = manifest.get("lam")
    if not isinstance(lam, list) or len(lam) != len(tasks) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in lam):
        raise bad(f"manifest field 'lam' must hold one finite λ ≥ 0 per task ({len(tasks)}), got {lam!r}")
    if manifest.get("mtv") not in ("sum", "ties"):
        raise bad(f"manifest field 'mtv' must be 'sum' or 'ties', got {manifest.get('mtv')!r}")
    if manifest["version"] >= 2 and manifest.get("bn") not in BN_RULES:  # version 1 stores did not record it
        raise bad(f"manifest field 'bn' must be one of {list(BN_RULES)}, got {manifest.get('bn')!r}")
    if manifest.get("mask_bitorder", "big") != "big":
        raise bad(f"mask_bitorder {manifest['mask_bitorder']!r} (masks are packed big-endian)")
    task_keys = manifest.get("task_keys")
    if not isinstance(task_keys, list) or len(task_keys) != len(tasks) or not all(
            isinstance(ks, list) and all(isinstance(k, str) for k in ks) for ks in task_keys):
        raise bad(f"manifest field 'task_keys' must hold one list of names per task ({len(tasks)})")
    if not set(merged) <= set(order):
        raise bad(f"merged key {sorted(set(merged) - set(order))[0]!r} is not in the key order")
    held, merged_set, named = set(src.keys()), set(merged), set()

    def need(name: str) -> TensorInfo:
        if name not in held:
            raise bad(f"tensor {name!r} is missing")
        named.add(name)
        return src.info(name)

    for k in order:
        if k not in merged_set:
            need(f"kept/{k}")
            continue
        pre, tau = need(f"theta0/{k}"), need(f"tau/{k}")
        if pre.shape != tau.shape:
            raise bad(f"theta0/{k} has shape {list(pre.shape)} but tau/{k} {list(tau.shape)}")
        for t in range(len(tasks)):
            if need(f"mask/{t}/{k}") != packed_info(tau):
                raise bad(f"mask/{t}/{k} must be {(tau.numel + 7) // 8} packed bytes (uint8) for {tau.numel} entries")
    for t, ks in enumerate(task_keys):
        for k in ks:
            need(f"task/{t}/{k}")
    if held - named:  # a key the manifest's order lost would be left out of every rebuilt model
        raise bad(f"tensor {sorted(held - named)[0]!r} is not in the manifest")


#: stores whose digest this process checked, by (path, inode, size, mtime, digest): rewritten files are checked again
_VERIFIED: set[tuple] = set()


class TallStore:
    """Read access to a TALL store; tensors are read lazily, one at a time."""

    def __init__(self, store):
        from mtl.io import user_path

        p = user_path(store)  # a leading ~ is $HOME's, as write_tall_store takes it
        if p.is_dir():
            p = p / STORE_FILE
        if not p.is_file():
            raise MergeInputError(f"{store}: no TALL store ({STORE_FILE}) found")
        self.path = p
        self.src = SafetensorsSource(p)
        try:
            self.manifest = self._checked_manifest()
        except BaseException:
            self.src.close()
            raise
        self.tasks: list[str] = self.manifest["tasks"]
        self.merged_keys: list[str] = self.manifest["merged"]
        self._merged = set(self.merged_keys)

    def _checked_manifest(self) -> dict[str, Any]:
        p = self.path
        try:
            manifest = json.loads(self.src.metadata["mtlkit_tall"])
        except (KeyError, *JSON_ERRORS):
            raise MergeInputError(f"{p}: not a TALL store (no mtlkit_tall manifest)") from None
        if not isinstance(manifest, dict):
            raise MergeInputError(f"{p}: not a valid TALL store: its mtlkit_tall manifest must be a JSON object, "
                                  f"got a {type(manifest).__name__}")
        version = manifest.get("version")
        if version not in (1, FORMAT_VERSION) or isinstance(version, bool):
            raise MergeInputError(f"{p}: unsupported TALL store version {version!r} (this mtlkit reads 1 and {FORMAT_VERSION})")
        _check_store(p, manifest, self.src)
        self._check_digest(version)
        return manifest

    def _check_digest(self, version: int) -> None:
        """Every tensor against the digest written at save (one pass over the file), as `mtl.load_model`
        checks a model folder: a flipped bit in τ_MTL or a mask would otherwise load as other weights."""
        from mtl.io import check_weights_digest

        meta = self.src.metadata
        if version >= 2 and not (isinstance(meta.get("weights_digest"), str) and meta["weights_digest"] != UNSEALED):
            raise MergeInputError(f"{self.path}: not a valid TALL store: its header has no weights_digest "
                                  f"(a version {version} store is written with one; corrupt or edited file)")
        st = os.stat(self.path)
        seen = (str(Path(self.path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, meta.get("weights_digest"))
        if seen in _VERIFIED:  # this very file was checked in this process: load_task_model in a loop reads it once
            return
        check_weights_digest(self.path, meta, self.src.keys(), self.src.get, error=MergeInputError)
        _VERIFIED.add(seen)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_index(self, task: int | str) -> int:
        if isinstance(task, int) and not isinstance(task, bool):
            if not 0 <= task < self.num_tasks:
                raise IndexError(f"task index {task} out of range (store has {self.num_tasks} tasks)")
            return task
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; store tasks: {', '.join(self.tasks)}")
        return self.tasks.index(task)

    def mask(self, task: int | str, key: str) -> torch.Tensor:
        t = self.task_index(task)
        return unpack_mask(self.src.get(f"mask/{t}/{key}"), self.src.info(f"tau/{key}").shape)

    def task_model(self, task: int | str, include_task_keys: bool = True) -> dict[str, torch.Tensor]:
        t = self.task_index(task)
        out = {}
        for k in self.manifest["order"]:
            if k in self._merged:
                tau = self.src.get(f"tau/{k}")
                pre = self.src.get(f"theta0/{k}")
                out[k] = reconstruct_tensor(pre.to(tau.dtype), tau, self.mask(t, k), pre.dtype)
                if is_bn_variance(k):  # a store written before the writer refused it
                    check_merged_variance(k, out[k], f"of the TALL model of task {self.tasks[t]!r} in {self.path}")
            else:
                out[k] = self.src.get(f"kept/{k}").clone()
        if include_task_keys:
            for k in self.manifest["task_keys"][t]:
                out[k] = self.src.get(f"task/{t}/{k}").clone()
        return out

    def merged(self) -> dict[str, torch.Tensor]:
        """θ0 + τ_MTL (the multi-task model the masks are applied to)."""
        out = {}
        for k in self.manifest["order"]:
            if k in self._merged:
                tau, pre = self.src.get(f"tau/{k}"), self.src.get(f"theta0/{k}")
                out[k] = torch.add(pre.to(tau.dtype), tau).to(pre.dtype)
                if is_bn_variance(k):
                    check_merged_variance(k, out[k], f"of the multi-task model θ0 + τ_MTL in {self.path}")
            else:
                out[k] = self.src.get(f"kept/{k}").clone()
        return out

    def report(self) -> dict[str, Any]:
        """Bytes stored against T full task models (each: θ0-sized weights + its own task keys)."""
        sections: dict[str, int] = {}
        for name in self.src.keys():
            sec = name.split("/", 1)[0]
            sections[sec] = sections.get(sec, 0) + self.src.info(name).nbytes
        base = sum(self.src.info(f"theta0/{k}" if k in self._merged else f"kept/{k}").nbytes for k in self.manifest["order"])
        full = [base + sum(self.src.info(f"task/{t}/{k}").nbytes for k in self.manifest["task_keys"][t]) for t in range(self.num_tasks)]
        stored = self.path.stat().st_size
        return {
            "tasks": self.num_tasks,
            "bytes_stored": stored,
            "bytes_full_models": sum(full),
            "ratio": stored / max(sum(full), 1),
            "sections": sections,
            "merged_params": sum(self.src.info(f"tau/{k}").numel for k in self.merged_keys),
        }

    def close(self) -> None:
        self.src.close()

    def __repr__(self) -> str:
        return f"TallStore({str(self.path)!r}: tasks {self.tasks}, {len(self.merged_keys)} merged tensors)"

    def __enter__(self) -> "TallStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(store) -> TallStore:
    """A `TallStore` for a path (close it, or use it in a `with` block), or the given store itself."""
    return store if isinstance(store, TallStore) else TallStore(store)


@contextmanager
def opened_store(store) -> Iterator[TallStore]:
    """The store, closed afterwards if it was opened here (a caller's `TallStore` stays open)."""
    if isinstance(store, TallStore):
        yield store
        return
    with TallStore(store) as s:
        yield s


def load_task_model(store, task: int | str, include_task_keys: bool = True) -> dict[str, torch.Tensor]:
    """Task `task`'s state dict (θ0 + m_t ∘ τ_MTL, copied keys, and its own keys if stored)."""
    with opened_store(store) as s:
        return s.task_model(task, include_task_keys)


def store_report(store) -> dict[str, Any]:
    """Sizes of a TALL store (a path or an open `TallStore`): bytes stored, bytes of the T full task
    models it replaces and their ratio, per section."""
    with opened_store(store) as s:
        return s.report()
