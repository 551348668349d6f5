"""Compressed storage of T task models as θ0 + τ_MTL + T bit-packed TALL masks, in one safetensors file.

Layout (tensor names inside the file; a store path is the file, or a folder holding `tall.safetensors`):

    theta0/<key>     θ0 of every merged key, in the model's dtype
    tau/<key>        τ_MTL in the compute dtype (float32 for half-precision models), so reconstruction
                     is exact with respect to `TallMasks.reconstruct` (θ0 + m_t ∘ τ_MTL rounded once to
                     the model's dtype; a τ_MTL rounded to fp16 first would give other weights)
    mask/<t>/<key>   task t's mask, np.packbits of the flattened bool mask (big bit order), ⌈n/8⌉ bytes
    kept/<key>       keys that are not merged (integer buffers, BN statistics under the BN rule)
    task/<t>/<key>   task t's own keys (its head), when the store was written from the model files

The JSON manifest (task names, λ_t, τ_MTL kind, BN rule, key order) sits in the header's
`__metadata__` under "mtlkit_tall", beside "weights_digest": `mtl.io.weights_digest` of every tensor,
as `mtl.save_model` writes it, checked whenever the store is opened (a flipped bit must not rebuild
other weights). For T tasks the store costs about (8 + T/8) bytes per merged parameter against 4·T
for T separate float32 models; for fp16/bf16 models (6 + T/8) against 2·T, so it only pays from T = 4
on (a larger store is written with a warning).
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.io import TALL_STORE_FILE

from .engine import KeyOptions, open_context, torch_threads
from .keys import BN_RULES
from .methods import SELECTS
from .safetensors_source import SafetensorsSource
from .sources import default_task_names, input_paths
from .state_source import MergeInputError, TensorInfo
from .streaming import SafetensorsWriter, output_file, resolve_output
from .tall import TallKernel, TallMasks, ties_options, _copied, check_merged, reconstruct_tensor

__all__ = ["write_tall_store", "save_tall_masks", "open_store", "TallStore", "load_task_model", "store_report"]

log = logging.getLogger(__name__)

STORE_FILE = TALL_STORE_FILE  # mtl.io knows the name too, to point mtl.load_model's users here
FORMAT_VERSION = 2  # 2: the header carries a weights digest (version 1 stores, written without one, still read)
_UNSEALED = "0" * 32  # the digest's place in the header, filled in once every tensor is written


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    n = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(packed.numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


def _packed_info(info: TensorInfo) -> TensorInfo:
    return TensorInfo(((info.numel + 7) // 8,), torch.uint8)


def _check_tasks(tasks: Sequence[str], T: int) -> list[str]:
    if isinstance(tasks, (str, bytes)):  # would be read character by character, as finetuned= would
        raise TypeError(f"tasks must be a list of {T} names (one per fine-tuned model), not the string {tasks!r}")
    tasks = [str(t) for t in tasks]
    if len(tasks) != T or len(set(tasks)) != T:
        raise ValueError(f"tasks must be {T} distinct names, got {tasks}")
    return tasks


def _specs(order, kinds, infos, tau_dtypes, T, task_key_infos) -> list[tuple[str, TensorInfo]]:
    specs = []
    for k in order:
        info = infos[k]
        if kinds[k] == "merge":
            specs.append((f"theta0/{k}", info))
            specs.append((f"tau/{k}", TensorInfo(info.shape, tau_dtypes[k])))
            specs += [(f"mask/{t}/{k}", _packed_info(info)) for t in range(T)]
        else:
            specs.append((f"kept/{k}", info))
    for t, ks in enumerate(task_key_infos):
        specs += [(f"task/{t}/{k}", i) for k, i in ks.items()]
    return specs


def _write(out, overwrite: bool, specs, manifest: dict[str, Any], entries: Iterator[tuple[str, torch.Tensor]]) -> Path:
    path, _ = resolve_output(out, STORE_FILE)
    meta = {"format": "pt", "mtlkit_tall": json.dumps(manifest), "weights_digest": _UNSEALED}
    with output_file(out, STORE_FILE, overwrite=overwrite) as f:
        w = SafetensorsWriter(f, specs, meta)
        for name, tensor in entries:
            w.write(name, tensor)
        w.finish()
        _seal(f)
    _warn_if_larger(path, w.nbytes, specs, len(manifest["tasks"]))
    return path


def _full_models_bytes(specs, T: int) -> int:
    """Bytes of the T task models a store replaces: θ0-sized weights each, plus each task's own keys."""
    base = sum(i.nbytes for n, i in specs if n.startswith(("theta0/", "kept/")))
    return T * base + sum(i.nbytes for n, i in specs if n.startswith("task/"))


def _warn_if_larger(path: Path, stored: int, specs, T: int) -> None:
    """τ_MTL is kept in float32 for half-precision models (6 + T/8 bytes per merged parameter against 2·T
    for the models themselves), so a store of few fp16/bf16 models can outgrow them: said, not hidden."""
    full = _full_models_bytes(specs, T)
    if stored > full:
        log.warning("TALL store %s holds %d bytes, more than the %d of the %d task models it replaces (τ_MTL is "
                    "kept in float32 so that every task model rebuilds bit for bit: about 6 + T/8 bytes per "
                    "merged parameter for fp16/bf16 models, 8 + T/8 for float32)", path, stored, full, T)


def _seal(f) -> None:
    """Write the digest of the finished file's tensors into its header. The header goes first in a
    streamed file, so it holds a same-length placeholder until the tensors are on disk; they are then
    read back once (`mtl.io.weights_digest` hashes them in key order, not in the order written)."""
    from mtl.io import weights_digest

    f.flush()
    src = SafetensorsSource(f.name)
    try:
        digest = weights_digest(src.keys(), src.get)
    finally:
        src.close()
    with open(f.name, "rb") as r:
        (n,) = struct.unpack("<Q", r.read(8))
        field = b'"weights_digest":"'
        at = 8 + r.read(n).index(field + _UNSEALED.encode() + b'"') + len(field)
    f.seek(at)
    f.write(digest.encode())
    f.seek(0, os.SEEK_END)


def _manifest(tasks, lam, mtv, bn, order, kinds, task_keys) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "tasks": list(tasks),
        "lam": list(lam),
        "mtv": mtv,
        "bn": bn,  # how the BN statistics in kept/ were made (θ0's, the fine-tunes' average, or merged)
        "order": list(order),
        "merged": [k for k in order if kinds[k] == "merge"],
        "task_keys": [list(ks) for ks in task_keys],
        "mask_bitorder": "big",
    }


def check_store_output(out, inputs: Sequence[Path], overwrite: bool) -> None:
    """The store may go to `out`: not an input folder or file, nor inside or around one (writing there,
    `overwrite` above all, would destroy or alter an input model), and no store there unless `overwrite`."""
    from mtl.io import check_output_apart

    check_output_apart(Path(out), list(inputs))
    path, _ = resolve_output(out, STORE_FILE)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")


def save_tall_masks(tall: TallMasks, out, tasks: Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """Write an in-memory `TallMasks` as a store, task heads (`tall.task_tensors`) included: the same
    format `write_tall_store` writes from the model files, under the same guard on `out`."""
    check_store_output(out, tall.inputs, overwrite)
    T = tall.num_tasks
    tasks = _check_tasks(tasks or [f"task{t}" for t in range(T)], T)
    kinds = {k: ("merge" if k in tall.tau else "kept") for k in tall.order}
    infos = {k: TensorInfo(tuple(tall.merged[k].shape), tall.dtypes[k]) for k in tall.order}
    tau_dtypes = {k: v.dtype for k, v in tall.tau.items()}
    heads = tall.task_tensors
    tk_infos = [{k: TensorInfo(tuple(v.shape), v.dtype) for k, v in h.items()} for h in heads]
    specs = _specs(tall.order, kinds, infos, tau_dtypes, T, tk_infos)

    def entries():
        for k in tall.order:
            if kinds[k] == "merge":
                yield f"theta0/{k}", tall.pretrained[k].to(tall.dtypes[k])
                yield f"tau/{k}", tall.tau[k]
                for t in range(T):
                    yield f"mask/{t}/{k}", pack_mask(tall.masks[t][k])
            else:
                yield f"kept/{k}", tall.kept[k]
        for t, h in enumerate(heads):
            for k, v in h.items():
                yield f"task/{t}/{k}", v

    manifest = _manifest(tasks, tall.lam, tall.mtv, tall.bn, tall.order, kinds, [list(h) for h in heads])
    return _write(out, overwrite, specs, manifest, entries())


def write_tall_store(
    pretrained,
    finetuned,
    out,
    lam: float | Sequence[float] | Mapping[str, float] = 0.4,
    mtv: str = "sum",
    *,
    tasks: Sequence[str] | None = None,
    include_task_keys: bool = True,
    overwrite: bool = False,
    select: str = "radix",
    k: float = 20,
    merge_func: str = "mean",
    trim: str = "global",
    threads: int | None = None,
    **key_options: Any,
) -> Path:
    """Compute TALL masks and write the store tensor by tensor (memory stays near T+3 tensors).

    `tasks` names the fine-tuned models (default: the task of each single-task model folder, else the
    folder/file names, else task0..); a ``{task: λ}`` `lam` names them the same way. With
    `include_task_keys`, each model's task-specific keys (its head) are stored too, so
    `load_task_model` returns complete task models. Returns the store file's path.
    """
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    opts, rest = KeyOptions.split(dict(key_options))
    if rest:
        raise TypeError(f"write_tall_store: unknown option(s) {', '.join(sorted(rest))}")
    fts = list(finetuned) if not isinstance(finetuned, (str, os.PathLike, dict)) else finetuned
    check_store_output(out, input_paths(pretrained, fts), overwrite)
    kernel = TallKernel(lam, mtv, ties_options(mtv, k, merge_func, trim))
    ctx = open_context(pretrained, fts, opts, 1, "write_tall_store")
    try:
        T = ctx.T
        tasks = _check_tasks(tasks or default_task_names(fts), T)
        with torch_threads(threads):
            kernel.prepare(ctx, select, tasks)
        plan = ctx.plan
        task_keys = plan.task_specific if include_task_keys else [[] for _ in range(T)]
        tk_infos = [{k_: ctx.sources[t + 1].info(k_) for k_ in ks} for t, ks in enumerate(task_keys)]
        specs = _specs(plan.order, plan.kind, plan.infos, plan.compute, T, tk_infos)

        def entries():
            for key in ctx.iter_keys(plan.order):
                if plan.kind[key] == "merge":
                    pre, mtv_t, ms = kernel.tensor(ctx, key)
                    check_merged(ctx, key, pre, mtv_t)
                    yield f"theta0/{key}", ctx.raw_pre(key)
                    yield f"tau/{key}", mtv_t
                    for t, m in enumerate(ms):
                        yield f"mask/{t}/{key}", pack_mask(m)
                else:
                    yield f"kept/{key}", _copied(ctx, key)
            for t, ks in enumerate(task_keys):
                for key in ks:
                    yield f"task/{t}/{key}", ctx.sources[t + 1].get(key)

        manifest = _manifest(tasks, kernel.lams, mtv, opts["bn"], plan.order, plan.kind, task_keys)
        with torch_threads(threads):
            return _write(out, overwrite, specs, manifest, entries())
    finally:
        ctx.close()


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
            if need(f"mask/{t}/{k}") != _packed_info(tau):
                raise bad(f"mask/{t}/{k} must be {(tau.numel + 7) // 8} packed bytes (uint8) for {tau.numel} entries")
    for t, ks in enumerate(task_keys):
        for k in ks:
            need(f"task/{t}/{k}")
    if held - named:  # a key the manifest's order lost would be left out of every rebuilt model
        raise bad(f"tensor {sorted(held - named)[0]!r} is not in the manifest")


class TallStore:
    """Read access to a TALL store; tensors are read lazily, one at a time."""

    def __init__(self, store):
        p = Path(store)
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
        except (KeyError, json.JSONDecodeError):
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
        if version >= 2 and not (isinstance(meta.get("weights_digest"), str) and meta["weights_digest"] != _UNSEALED):
            raise MergeInputError(f"{self.path}: not a valid TALL store: its header has no weights_digest "
                                  f"(a version {version} store is written with one; corrupt or edited file)")
        check_weights_digest(self.path, meta, self.src.keys(), self.src.get, error=MergeInputError)

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
