"""Lazy state-dict sources: one read-only interface over dicts, modules, model folders and checkpoint files.

`open_source` picks the reader for an input; the interface lives in `merging.state_source`, the
safetensors readers in `merging.safetensors_source` (both re-exported here, the names callers use).
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from mtl.folder_checks import JSON_ERRORS
from mtl.io import run_folder_refusal, user_path
from mtl.torch_load import torch_load_refusal

from .safetensors_source import (
    DTYPE_CODES,
    SAFETENSORS_DTYPES,
    SafetensorsSource,
    ShardedSafetensorsSource,
)
from .state_source import DictSource, MergeInputError, StateSource, TensorInfo

__all__ = [
    "MergeInputError",
    "TensorInfo",
    "StateSource",
    "DictSource",
    "SafetensorsSource",
    "ShardedSafetensorsSource",
    "open_source",
    "open_sources",
    "check_distinct_inputs",
    "check_readable",
    "header_source",
    "load_state_dict",
    "SAFETENSORS_DTYPES",
    "DTYPE_CODES",
]

log = logging.getLogger(__name__)

Pathish = Union[str, os.PathLike]
SourceLike = Union[Mapping, nn.Module, Pathish, StateSource]


def _torch_checkpoint(path: Path) -> DictSource:
    try:
        try:  # mmap keeps a zip-format checkpoint lazy; legacy formats cannot be mapped
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise MergeInputError(torch_load_refusal(str(path), e)) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning / common training checkpoints nest the weights
    if not isinstance(obj, Mapping):
        raise MergeInputError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict")
    return DictSource(obj, label=str(path))


#: how to turn a `.bin` checkpoint folder into one mtlkit reads
CONVERT_TO_SAFETENSORS = ("convert it to safetensors (transformers: from_pretrained(folder).save_pretrained(out) "
                          "writes safetensors)")


def _no_safetensors(folder: Path) -> str:
    """Why a model folder cannot be read, and what to do (for folders of `.bin` checkpoints)."""
    convert = CONVERT_TO_SAFETENSORS
    if (folder / "pytorch_model.bin.index.json").is_file():
        return (f"{folder}: found sharded pytorch_model-*.bin checkpoints (pytorch_model.bin.index.json), "
                f"which are not supported; {convert}")
    if (folder / "pytorch_model.bin").is_file():
        return (f"{folder}: found pytorch_model.bin but no model.safetensors: pass the file path "
                f"{folder / 'pytorch_model.bin'}, or {convert}")
    return f"{folder}: model folder without model.safetensors (or its shard index)"


def open_source(obj: SourceLike, label: str | None = None, index_first: bool = False) -> StateSource:
    """Wrap a state dict, `nn.Module`, model folder, `.safetensors` file or torch checkpoint (`index_first`: see
    `weights_file`)."""
    if isinstance(obj, StateSource):
        return obj
    if isinstance(obj, nn.Module):
        return DictSource(obj.state_dict(), label=label or f"module {type(obj).__name__}")
    if isinstance(obj, Mapping):
        return DictSource(obj, label=label or "state dict")
    if isinstance(obj, (str, os.PathLike)):
        p = user_path(obj)  # a leading ~ as every mtlkit reader takes it
        f = weights_file(p, index_first)
        if p.is_dir():
            if all((p / name).is_file() for name in FOLDER_WEIGHTS):
                _warn_both_weight_files(p, f)
            return _checked(SafetensorsSource(f)) if f.name == FOLDER_WEIGHTS[0] else ShardedSafetensorsSource(f)
        if p.suffix == ".safetensors":
            return _checked(SafetensorsSource(p))
        return _torch_checkpoint(p)
    raise TypeError(
        f"cannot read a state dict from {type(obj).__name__}; "
        "expected a dict, nn.Module, model folder, .safetensors file or torch checkpoint"
    )


#: the names of files `open_source` reads as weights (a folder so named is a file given wrongly)
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
#: a model folder's weights: one file, or the index of its shards
FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def weights_file(path: Pathish, index_first: bool = False) -> Path:
    """The file `open_source` reads for a path: the path itself, or a folder's model.safetensors (else its shard
    index); a folder holding neither, a path that is not there, or a file named as no whole model (a shard index,
    one shard) is refused: `open_source` and `check_readable` both refuse through here. A folder holding both is
    read from model.safetensors, as transformers reads it, or with `index_first` from the index's shards, as
    mergekit reads it (a recipe's run, which promises mergekit's result)."""
    p = user_path(path)
    if p.is_dir():
        f = _folder_weights(p, index_first)
        if f is not None:
            return f
        if p.suffix in WEIGHT_FILE_SUFFIXES:  # named as a weights file (a shard, x.ckpt): not meant as a model folder
            raise MergeInputError(f"{p} is a folder, not a file")
        raise MergeInputError(run_folder_refusal(p) or _no_safetensors(p))
    if not p.is_file():
        raise MergeInputError(f"{p}: no such file or folder")
    _refuse_by_name(p)
    return p


def _folder_weights(folder: Path, index_first: bool) -> Path | None:
    """`weights_file`'s rule for a folder (None: it holds neither file)."""
    for name in FOLDER_WEIGHTS[::-1] if index_first else FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    return None


def _refuse_by_name(p: Path) -> None:
    """A file whose name says it is not a whole model (a shard index, one `.bin` shard), refused before it is read
    (torch.load would fail on an index's "{" as a bad pickle)."""
    if p.name.endswith((".safetensors.index.json", ".bin.index.json")):
        fix = (f"pass its folder {p.parent}" if p.name.endswith(".safetensors.index.json") else
               f"sharded pytorch_model-*.bin checkpoints are not supported; {CONVERT_TO_SAFETENSORS}")
        raise MergeInputError(f"{p} is a Hugging Face shard index, not a model: {fix}")
    if re.fullmatch(r"pytorch_model-\d+-of-\d+\.bin", p.name):  # one shard is not a model
        raise MergeInputError(f"{p}: one shard of a sharded pytorch_model-*.bin checkpoint, which is not "
                              "supported; convert the whole checkpoint to safetensors")


#: how a file torch.save wrote begins: a zip archive (torch >= 1.6), else a pickle (protocol 2+)
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def check_readable(path: Pathish, index_first: bool = False) -> None:
    """The file a path's model is read from (`weights_file`) is there, opens and is what its name says, said in one
    line naming it: checked before a run folder is made, not found by the merge after it. No tensor is read: a
    safetensors file's header parses (a shard index's: each shard it names is there, and its header parses), a torch
    checkpoint begins as torch.save writes one (a zip: one holding its data.pkl). `index_first`: see `weights_file`."""
    f = weights_file(path, index_first)
    try:
        with open(f, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise MergeInputError(f"{f}: cannot be read ({e.strerror or e})") from None
    src = header_source(f)
    if src is not None:
        src.close()
    elif not head.startswith(TORCH_MAGIC):
        raise MergeInputError(torch_load_refusal(str(f), ValueError(
            "empty file" if not head else "neither a zip archive nor a pickle, as torch.save writes")))
    elif head == TORCH_MAGIC[0] and not _torch_archive(f):
        raise MergeInputError(torch_load_refusal(str(f), ValueError(
            "a zip archive without the data.pkl torch.save writes")))


def header_source(f: Path) -> StateSource | None:
    """`weights_file`'s file `f` as a source of its safetensors header(s) alone: keys, shapes and dtypes, with no
    tensor read (unlike `open_source`, no digest pass); None for a torch checkpoint, whose keys only loading it gives."""
    if f.name.endswith(".safetensors.index.json"):  # a folder's index (one given as a file: weights_file refused it)
        return ShardedSafetensorsSource(f)
    return SafetensorsSource(f) if f.suffix == ".safetensors" else None


def _torch_archive(path: Path) -> bool:
    """A zip is torch.save's when it holds a `<name>/data.pkl` (its names only: no tensor is read)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


_WARNED_BOTH: set[tuple[Path, str]] = set()


def _warn_both_weight_files(folder: Path, read: Path) -> None:
    """A folder with model.safetensors and a shard index holds two sets of weights (`weights_file` picks `read`):
    which is read, and that the other tool reads the other. Said once per folder, since a merge opens its inputs more
    than once."""
    key = (folder.resolve(), read.name)
    if key in _WARNED_BOTH:
        return
    _WARNED_BOTH.add(key)
    if read.name == FOLDER_WEIGHTS[0]:
        what = f"reading {read} (as transformers does; mergekit reads the shards the index lists) and ignoring the shards"
    else:
        what = (f"reading the shards {read} lists (as mergekit does; transformers reads model.safetensors) and "
                "ignoring model.safetensors")
    log.warning("%s holds both model.safetensors and model.safetensors.index.json: %s; remove the set you do not "
                "mean", folder, what)


def _checked(src: "SafetensorsSource") -> "SafetensorsSource":
    """A file `save_model` wrote carries a digest of its tensors: an edited or corrupt copy is refused here,
    as `mtl.load_model` refuses it, instead of merging into a silently wrong model (one streamed pass)."""
    from mtl.io import check_weights_digest

    try:
        check_weights_digest(src.path, src.metadata, src.keys(), src.get, error=MergeInputError)
    except BaseException:
        src.close()
        raise
    return src


def open_sources(pretrained: SourceLike, finetuned, base_among: bool = False,
                 index_first: bool = False) -> tuple[StateSource, list[StateSource]]:
    """Open the pretrained model and the list of fine-tuned ones, labelling in-memory inputs by position
    (`check_distinct_inputs` first; `index_first`: see `weights_file`)."""
    if isinstance(finetuned, (str, os.PathLike, Mapping, nn.Module, StateSource, torch.Tensor)):
        raise TypeError("finetuned must be a list of models (state dicts, modules, folders or files), not one model")
    fts = list(finetuned)
    check_distinct_inputs(pretrained, fts, base_among=base_among, index_first=index_first)
    pre = open_source(pretrained, label="pretrained", index_first=index_first)
    return pre, [open_source(f, label=f"finetuned[{i}]", index_first=index_first) for i, f in enumerate(fts)]


def check_distinct_inputs(pretrained, finetuned: Sequence[Any], names: tuple[str, str] = ("pretrained", "finetuned"),
                          base_among: bool = False, index_first: bool = False) -> None:
    """Refuse, in one line naming both entries, a fine-tuned model given by path that is an earlier one again (it, or
    its task vector, would count twice) or, unless ``base_among`` (a method that merges the models themselves: average,
    mergekit's linear), the pretrained model (a zero task vector counted as a model), compared on the resolved
    weights each path reads (a symlink, ``./a`` and ``a/model.safetensors`` are ``a``, also where model.safetensors is
    itself a link, as in a Hugging Face cache). ``names``: what the caller calls the two arguments (``models`` on the
    command line; `index_first`: see `weights_file`)."""
    def weights(x: Any) -> Path | None:
        return weights_read(x, index_first) if isinstance(x, (str, os.PathLike)) else None  # in memory: nothing to compare

    pre, seen = weights(pretrained), {}
    for i, f in enumerate(finetuned):
        w = weights(f)
        if w is None:
            continue
        label = f"{names[1]}[{i}] ({str(f)!r})"
        if w == pre and not base_among:
            raise MergeInputError(f"{label} is {names[0]} ({str(pretrained)!r}): its task vector is zero, merged as one "
                                  f"more model it only dilutes the others; list the fine-tuned models alone")
        if w in seen:
            j = seen[w]
            what = "it would count twice" if base_among else "its task vector would count twice"  # no τ in an average
            raise MergeInputError(f"{label} is {names[1]}[{j}] ({str(finetuned[j])!r}) again: {what}; list each model once")
        seen[w] = i


def weights_read(path: Pathish, index_first: bool = False) -> Path | frozenset[Path]:
    """What a model path reads, followed through links: a folder's file (as `weights_file` picks it), the set of
    shards its index names, else the resolved path: two inputs with the same one are the same model, however each
    is spelled."""
    p = user_path(path).resolve()
    f = _folder_weights(p, index_first) if p.is_dir() else None
    if f is None or f.name != FOLDER_WEIGHTS[1]:
        return f.resolve() if f is not None else p
    # not the index file: in a Hugging Face cache two revisions' indexes are often one blob while their shards differ
    try:
        names = set(json.loads(f.read_text())["weight_map"].values())
        return frozenset((p / n).resolve() for n in names) or p
    except (OSError, KeyError, TypeError, AttributeError, *JSON_ERRORS):  # unreadable: the folder; reading says why
        return p


def input_paths(pretrained, finetuned) -> list[Path]:
    """The inputs given by path (in-memory inputs have nothing an output could collide with)."""
    many = [] if isinstance(finetuned, (Mapping, nn.Module, StateSource)) else (
        [finetuned] if isinstance(finetuned, (str, os.PathLike)) else list(finetuned))
    return [Path(x) for x in [pretrained, *many] if isinstance(x, (str, os.PathLike))]


def default_task_names(finetuned: Sequence[Any]) -> list[str]:
    """The task of each single-task model folder (mtl-train's `<run>/model`), else the folder or file
    names, else task0, task1, ... — whichever is first unique."""
    if all(isinstance(f, (str, os.PathLike)) for f in finetuned):
        paths = [Path(f) for f in finetuned]
        for names in (_folder_tasks(paths), [p.name if p.is_dir() else p.stem for p in paths]):
            if names is not None and len(set(names)) == len(names):
                return names
    return [f"task{t}" for t in range(len(finetuned))]


def _folder_tasks(paths: Sequence[Path]) -> list[str] | None:
    from mtl.io import read_model_config

    names = []
    for p in paths:
        if not (p / "config.json").is_file():
            return None
        try:
            tasks = read_model_config(p).get("model", {}).get("tasks") or []
        except (ValueError, OSError):
            return None
        if len(tasks) != 1 or not isinstance(tasks[0], dict) or "name" not in tasks[0]:
            return None
        names.append(str(tasks[0]["name"]))
    return names


def check_output_apart_from_inputs(out, pretrained, finetuned) -> None:
    """Refuse an output that is, lies inside or holds an input given by path (writing it would replace
    or alter that input)."""
    from mtl.io import check_output_apart

    check_output_apart(Path(out), input_paths(pretrained, finetuned))


def load_state_dict(obj: SourceLike) -> dict[str, torch.Tensor]:
    """Materialise any source as an owned `{name: tensor}` dict (copies, so the result is safe to modify)."""
    src = open_source(obj)
    try:
        return {k: src.get(k).clone() for k in src.keys()}
    finally:
        if src is not obj:
            src.close()
