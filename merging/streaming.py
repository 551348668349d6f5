"""File-to-file merging: tensors are read one at a time and written as they are produced.

The safetensors library writes a whole dict at once, so the format is written here directly: an 8-byte
little-endian header length, a JSON header (dtype, shape, data_offsets per tensor, padded with spaces
to a multiple of 8), then the raw little-endian bytes in header order. Output shapes and dtypes are
known before any tensor is computed (they are the inputs'), so the header comes first and each tensor
is appended as soon as it exists. The output is written under a temporary name (`mtl.io.atomic_path`)
and renamed at the end, so an interrupted merge leaves nothing at the output path.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mtl.atomic import OutputExists
from mtl.io import atomic_path, holds_user_files, read_json, user_path
from mtl.registry import check_bool

from .engine import KeyOptions, open_context, produce, torch_threads
from .kernels import DEFAULT_CHUNK, Chunks, Streamed, chunked_streams, fused_kernel
from .hf import SHARD, base_files, check_replaceable, copy_base_files, is_merge_card, model_card, parse_size, write_sharded
from .methods import create_method
from .run_outputs import MERGEKIT_RECIPE
from .safetensors_source import DTYPE_CODES
from .sources import check_output_apart_from_inputs
from .state_source import MergeInputError, TensorInfo

__all__ = ["SafetensorsWriter", "merge_to_file", "output_file", "output_target", "resolve_output", "writes_hf_folder"]


class SafetensorsWriter:
    """Writes a safetensors file whose layout is fixed up front; tensors must then come in that order."""

    def __init__(self, f: BinaryIO, specs: Sequence[tuple[str, TensorInfo]], metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        for name, info in specs:
            if name in header:
                raise ValueError(f"duplicate tensor name {name!r}")
            if info.dtype not in DTYPE_CODES:
                raise ValueError(f"{name!r}: dtype {info.dtype} has no safetensors code")
            header[name] = {"dtype": DTYPE_CODES[info.dtype], "shape": list(info.shape), "data_offsets": [off, off + info.nbytes]}
            off += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keeps the data section 8-byte aligned, as the reference writer does
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        self._f = f
        self._specs = list(specs)
        self._next = 0
        self.nbytes = 8 + len(raw) + off

    def write(self, name: str, tensor: torch.Tensor | Streamed) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"unexpected tensor {name!r}: every declared tensor was written")
        want, info = self._specs[self._next]
        if name != want or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise ValueError(
                f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} does not match the declared "
                f"{want!r} {info.shape} {info.dtype}"
            )
        if isinstance(tensor, Streamed):
            n = 0
            for piece in tensor:
                self._put(piece)
                n += piece.numel()
            if n != info.numel:
                raise ValueError(f"tensor {name!r}: {n} entries were produced, {info.numel} declared")
        else:
            self._put(tensor.detach())
        self._next += 1

    def _put(self, tensor: torch.Tensor) -> None:
        t = tensor.contiguous().reshape(-1)
        if sys.byteorder != "little" and t.element_size() > 1:
            t = t.view(torch.uint8).reshape(-1, t.element_size()).flip(1).reshape(-1)
        if t.numel():
            self._f.write(memoryview(t.view(torch.uint8).numpy()))

    def finish(self) -> None:
        if self._next != len(self._specs):
            missing = [n for n, _ in self._specs[self._next : self._next + 3]]
            raise ValueError(f"{len(self._specs) - self._next} declared tensors were not written: {missing}...")


def resolve_output(out: str | os.PathLike, filename: str = "model.safetensors") -> tuple[Path, Path | None]:
    """A `.safetensors` path is the file itself; anything else is a folder receiving `filename`.

    Returns the file path and the folder we would have to create (None if it exists or is not ours).
    """
    out = user_path(out)
    if out.suffix == ".safetensors":
        if out.is_dir():  # said before the work; overwrite=true must never replace a folder with a file
            raise IsADirectoryError(f"{out} is a folder; a .safetensors output is a file: choose another path")
        return out, None
    return out / filename, (None if out.exists() else out)


def _earlier_hf_merge(folder: Path) -> list[Path]:
    """What a Hugging Face style merge left in `folder` that a single-file merge there would contradict:
    its shards, their index, its model card (a README.md of anyone else's is never touched) and, beside
    weights being replaced, the mergekit recipe that made them (an earlier merge's only beside its mtlkit card, as
    `check_replaceable` counts it: anyone else's recipe is kept)."""
    card, recipe = folder / "README.md", folder / MERGEKIT_RECIPE
    # shards as `check_replaceable` counts them (merging.hf.SHARD: model-00001-of-00003.safetensors): a user's
    # model-best-of-3.safetensors is no shard, never deleted
    shards = [*(p for p in folder.glob("model-*.safetensors") if SHARD.fullmatch(p.name)),
              *(p for p in (folder / "model.safetensors.index.json",) if p.exists())]
    ours = is_merge_card(card)
    found = [*shards, *([card] if ours else [])]
    if ours and recipe.is_file() and (shards or (folder / "model.safetensors").exists()):  # (both need overwrite=True)
        found.append(recipe)
    return sorted(found)


@contextmanager
def output_file(out: str | os.PathLike, filename: str, overwrite: bool = False, fsync: bool = False) -> Iterator[BinaryIO]:
    """An open file for `out` (see `resolve_output`) that appears there only if the block completes.

    A folder that does not exist yet is written whole under a temporary name (`mtl.io.atomic_path`),
    so an interrupted write leaves neither the file nor an empty folder.
    """
    path, new_dir = resolve_output(out, filename)
    if path.exists() and not overwrite:
        raise OutputExists(path)
    with atomic_path(new_dir if new_dir is not None else path, overwrite=overwrite) as tmp:
        if new_dir is not None:
            tmp.mkdir()
            tmp = tmp / filename
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def merge_to_file(
    method: str,
    pretrained,
    finetuned,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    select: str = "radix",
    fsync: bool = False,
    threads: int | None = None,
    metadata: dict[str, str] | None = None,
    shard_size: int | str | None = None,
    copy_files: bool | None = None,
    fused: bool = True,
    chunk: int | None = None,
    extra_files: Mapping[str, str] | None = None,
    index_first: bool = False,
    **kwargs: Any,
) -> Path:
    """Merge with bounded memory, writing the result to `out`. Same methods, hyperparameters and key
    options as `merging.merge`; the TIES global threshold uses the radix select by default. `fsync`
    flushes before the rename; `threads` sets torch's intra-op threads for the call.

    `out` is a `.safetensors` file, or a folder. A folder receives `model.safetensors` unless it is a
    Hugging Face folder: when `shard_size` is given (bytes or "5GB"), `copy_files=True`, or the base
    model is a Hugging Face folder (a shard index, or a `config.json` that is not mtlkit's), the whole
    folder is written: shards with `model.safetensors.index.json` (default shard size 5GB), the base
    folder's non-weight files (config, tokenizer, ...) and a README.md model card with the recipe.
    Returns the written file's path, or the folder's in the Hugging Face case. `extra_files`
    ({file name: text}, e.g. a mergekit recipe's `mergekit_config.yml`) go into that folder with the rest.
    An input folder holding both model.safetensors and a shard index is read from model.safetensors (transformers'
    rule), or with `index_first=True` from the index's shards (mergekit's), with a warning either way.

    `fused=True` (default) runs task arithmetic, average, TIES and mergekit's task arithmetic through
    the chunked kernels (`merging.kernels`: `chunk` entries at a time — default 524,288 for task
    arithmetic and the average, 262,144 for the others — inputs read with `pread`, all
    operations on a chunk while it is in cache, chunks spread over `threads` worker threads (default:
    torch's thread count); memory bounded by the chunk, identical results);
    `fused=False`, and every other method, uses the whole-tensor kernels.
    """
    for key, value in (("fsync", fsync), ("fused", fused)):
        check_bool(key, value)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int ≥ 1, got {threads!r}")
    out = user_path(out)  # a leading ~ is $HOME's, as the readers take it
    if not isinstance(finetuned, (str, os.PathLike, Mapping)):
        finetuned = list(finetuned)  # read twice: the check below, then the merge
    target = output_target(pretrained, finetuned, out, overwrite=overwrite, shard_size=shard_size,
                           copy_files=copy_files, extra_files=extra_files)
    path, hf_folder, size, overwrite, copies = target.path, target.hf_folder, target.size, target.overwrite, target.copies
    folder, stale = target.folder, target.stale
    opts, hp = KeyOptions.split(dict(kwargs))
    convention = hp.get("convention", "paper")
    m = create_method(method, **hp)
    kernel = fused_kernel(m) if fused else None
    if chunk is not None and fused_kernel(m) is None:  # said, not ignored: it sets only the chunked kernels' size
        raise ValueError(f"chunk applies to the chunked kernels; {method!r} has none (it runs whole tensors): "
                         "leave chunk=None")
    ctx = open_context(pretrained, finetuned, opts, m.min_models(), method, keep_base=hf_folder,
                       base_among=not m.uses_task_vectors, index_first=index_first)
    streamed = None
    try:
        if kernel is not None:
            n_chunk = chunk if chunk is not None else getattr(kernel, "chunk", DEFAULT_CHUNK)
            ctx.chunks = Chunks(ctx, n_chunk, workers=threads or torch.get_num_threads())
            streamed = chunked_streams(m, kernel, ctx.chunks)
        # the chunked kernels parallelise over chunks, each operation on one thread
        with torch_threads(1 if kernel is not None else threads):
            m.prepare(ctx, select)
            plan = ctx.plan
            specs = [(k, plan.infos[k]) for k in plan.order]
            meta = {"format": "pt", "mtlkit_method": method, "mtlkit_convention": convention,
                    "mtlkit_hparams": json.dumps(m.hp, default=str)}
            meta.update(metadata or {})
            if hf_folder:
                with atomic_path(path, overwrite=overwrite) as tmp:
                    tmp.mkdir()
                    write_sharded(tmp, specs, produce(m, ctx, streamed), size, meta)
                    if copies:
                        copy_base_files(Path(pretrained), tmp, replaced=set(extra_files or ()))
                    (tmp / "README.md").write_text(model_card(method, m.hp, pretrained, finetuned, convention))
                    for name, text in (extra_files or {}).items():  # the base's files of these names were not copied
                        (tmp / name).write_text(text)
                    if fsync:
                        for f in tmp.iterdir():
                            with open(f, "rb+") as fh:
                                os.fsync(fh.fileno())
                return path
            with output_file(out, path.name, overwrite=overwrite, fsync=fsync) as f:
                w = SafetensorsWriter(f, specs, meta)
                for key, tensor in produce(m, ctx, streamed):
                    w.write(key, tensor)
                w.finish()
            for old in stale:
                old.unlink()
            if any(p.name == "README.md" for p in stale):
                (folder / "README.md").write_text(model_card(method, m.hp, pretrained, finetuned, convention))
    finally:
        if ctx.chunks is not None:
            ctx.chunks.close()
        ctx.close()
    return path


@dataclass(frozen=True)
class OutputTarget:
    """Where and how `merge_to_file` writes (`output_target`)."""

    path: Path           # the file written, or the Hugging Face folder
    hf_folder: bool      # a whole Hugging Face folder (shards, index, base files, model card)
    size: int            # shard size in bytes
    overwrite: bool      # replace what is there (also: an empty folder taken as a Hugging Face output)
    copies: bool         # the base folder's non-weight files are copied in
    folder: Path | None  # the folder a single model.safetensors goes into, where an earlier merge may lie
    stale: list[Path]    # that earlier merge's files, which this one replaces


def output_target(pretrained, finetuned, out: str | os.PathLike, *, overwrite: bool = False,
                  shard_size: int | str | None = None, copy_files: bool | None = None,
                  extra_files: Mapping[str, str] | None = None) -> OutputTarget:
    """`merge_to_file`'s checks on its output (arguments as there), from paths and file names alone, no tensor
    read: it calls this, and a job before its run folder, so that both refuse alike."""
    check_bool("overwrite", overwrite)  # bool("no") is True: a text "no" would replace an existing output
    out = user_path(out)  # a leading ~ is $HOME's, as the readers take it
    if copy_files is not None:
        check_bool("copy_files", copy_files)
    hf_folder = writes_hf_folder(pretrained, out, shard_size=shard_size, copy_files=copy_files)
    if shard_size is not None and not hf_folder:
        raise ValueError(f"{out}: shard_size needs a folder output, not a .safetensors file")
    if copy_files and Path(out).suffix == ".safetensors":
        raise ValueError(f"{out}: copy_files=True copies the base folder's files beside the weights, which needs a "
                         "folder output, not a .safetensors file")
    if copy_files and not (isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).is_dir()):
        raise ValueError("copy_files=True copies the base model folder's non-weight files (config, tokenizer), but "
                         f"pretrained is {'a state dict' if isinstance(pretrained, Mapping) else repr(str(pretrained))}, not a folder: give its folder, or copy_files=None")
    if extra_files and not hf_folder:
        raise ValueError(f"{out}: extra_files are written into a Hugging Face folder output; pass shard_size or "
                         "copy_files=True (and a folder path)")
    bad = [n for n in (extra_files or {}) if not n or Path(n).name != n or n.startswith(".")]
    if bad:
        raise ValueError(f"extra_files: {bad[0]!r} is not a plain file name")
    size = parse_size(shard_size if shard_size is not None else "5GB")
    check_output_apart_from_inputs(out, pretrained, finetuned)
    target = Path(out)
    if target.exists() and not target.is_dir() and target.suffix != ".safetensors":
        raise NotADirectoryError(f"{target} is a file, not a folder: the merge writes a folder (or give a "
                                 ".safetensors path); choose another path")
    path = target if hf_folder else resolve_output(out)[0]
    # model.safetensors written beside an earlier merge's shards, index or model card would leave two sets of
    # weights and a README describing the old merge: those are replaced too (config, tokenizer are kept),
    # whether `out` names the folder or its model.safetensors
    folder = path.parent if not hf_folder and path.name == "model.safetensors" and path.parent.is_dir() else None
    stale = _earlier_hf_merge(folder) if folder is not None else []
    empty_dir = target.is_dir() and not holds_user_files(target)  # (a .DS_Store alone counts as empty)
    if path.exists() and not overwrite and not (hf_folder and empty_dir):
        raise OutputExists(path)
    weights = [p.name for p in stale if p.name not in ("README.md", MERGEKIT_RECIPE)]
    if weights and not overwrite:  # another model's shards: replaced only on request
        raise FileExistsError(f"{folder} holds sharded weights ({', '.join(weights)}); pass overwrite=True to "
                              "replace them with the merged model.safetensors")
    overwrite = overwrite or (hf_folder and empty_dir)
    if hf_folder and path.is_dir() and holds_user_files(path) and not any(path.glob("*.safetensors")):
        # overwrite replaces an earlier merged folder, never a folder of something else
        raise FileExistsError(f"{path} exists and holds no .safetensors weights (not an earlier merge); refusing to "
                              "replace it: choose another path or remove it yourself")
    copies = copy_files is not False and isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).is_dir()
    if hf_folder and path.is_dir() and overwrite:
        copied = [p.name for p in base_files(Path(pretrained), extra_files or ())] if copies else []
        check_replaceable(path, [*copied, *(extra_files or ())])
    return OutputTarget(path, hf_folder, size, overwrite, copies, folder, stale)


def writes_hf_folder(pretrained, out: str | os.PathLike, *, shard_size: int | str | None = None,
                     copy_files: bool | None = None) -> bool:
    """Whether `merge_to_file` (arguments as there) writes `out` as a whole Hugging Face folder, whose key plan
    then keeps every θ0 tensor: one rule for it and for a job's header check before its run folder."""
    return Path(out).suffix != ".safetensors" and (
        shard_size is not None or bool(copy_files) or (copy_files is None and _is_hf_folder(pretrained)))


def _is_hf_folder(obj) -> bool:
    """A folder with a shard index, or with a config.json that mtlkit did not write."""
    if not isinstance(obj, (str, os.PathLike)) or not Path(obj).is_dir():
        return False
    folder = Path(obj)
    if (folder / "model.safetensors.index.json").is_file():
        return True
    if not (folder / "config.json").is_file():
        return False
    try:
        cfg = read_json(folder / "config.json")
    except (OSError, ValueError) as e:  # read_json: "<file>: not valid JSON (...)", also when nested too deep
        raise MergeInputError(str(e)) from None
    return isinstance(cfg, dict) and not str(cfg.get("format", "")).startswith("mtlkit")
