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
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.io import TALL_STORE_FILE, user_path
from mtl.registry import check_bool

from .engine import KeyOptions, open_context, torch_threads
from .methods import SELECTS
from .safetensors_source import SafetensorsSource
from .sources import default_task_names, input_paths
from .state_source import TensorInfo
from .streaming import SafetensorsWriter, output_file, resolve_output
from .tall import TallKernel, TallMasks, ties_options, _copied, check_merged

__all__ = ["write_tall_store", "save_tall_masks", "check_store_output"]

log = logging.getLogger(__name__)

STORE_FILE = TALL_STORE_FILE  # mtl.io knows the name too, to point mtl.load_model's users here
FORMAT_VERSION = 2  # 2: the header carries a weights digest (version 1 stores, written without one, still read)
UNSEALED = "0" * 32  # the digest's place in the header, filled in once every tensor is written


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    n = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(packed.numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


def packed_info(info: TensorInfo) -> TensorInfo:
    return TensorInfo(((info.numel + 7) // 8,), torch.uint8)


def _check_tasks(tasks: Sequence[str], T: int) -> list[str]:
    if isinstance(tasks, (str, bytes)):  # would be read character by character, as finetuned= would
        raise TypeError(f"tasks must be a list of {T} names (one per fine-tuned model), not the string {tasks!r}")
    tasks = list(tasks)
    for i, t in enumerate(tasks):  # a name is how a task model is asked for: str(None) would store "None"
        if not isinstance(t, str):
            raise TypeError(f"tasks[{i}] must be a task name (a string), got {type(t).__name__} {t!r}")
        if not t.strip():
            raise ValueError(f"tasks[{i}] is {t!r}: a task name must not be empty or blank")
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
            specs += [(f"mask/{t}/{k}", packed_info(info)) for t in range(T)]
        else:
            specs.append((f"kept/{k}", info))
    for t, ks in enumerate(task_key_infos):
        specs += [(f"task/{t}/{k}", i) for k, i in ks.items()]
    return specs


def _write(out, overwrite: bool, specs, manifest: dict[str, Any], entries: Iterator[tuple[str, torch.Tensor]]) -> Path:
    path, _ = resolve_output(out, STORE_FILE)
    meta = {"format": "pt", "mtlkit_tall": json.dumps(manifest), "weights_digest": UNSEALED}
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
        at = 8 + r.read(n).index(field + UNSEALED.encode() + b'"') + len(field)
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

    check_bool("overwrite", overwrite)
    check_output_apart(user_path(out), list(inputs))
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
    check_bool("include_task_keys", include_task_keys)
    opts, rest = KeyOptions.split(dict(key_options))
    if rest:
        raise TypeError(f"write_tall_store: unknown option(s) {', '.join(sorted(rest))}")
    fts = list(finetuned) if not isinstance(finetuned, (str, os.PathLike, dict)) else finetuned
    out = user_path(out)  # a leading ~ is $HOME's, as load_task_model takes it
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
                    check_merged(ctx, key, pre, mtv_t, ms, tasks)
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
