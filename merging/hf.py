"""Hugging Face model folders out: sharded safetensors with `model.safetensors.index.json`, the base
model's non-weight files (config, tokenizer, ...) and a model card stating the merge recipe.

Shards are planned from the output's shapes and dtypes before any tensor is computed (tensors in
output order, a new shard when the next tensor would take the shard's tensor bytes past `shard_size`;
a tensor larger than that gets a shard of its own), named `model-00001-of-0000N.safetensors` as
`transformers` does; one shard is written as plain `model.safetensors` without an index. As with
transformers' `max_shard_size`, `shard_size` bounds the tensor bytes: each file also holds its
safetensors header (8 bytes and a JSON entry per tensor) on top.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Collection, Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from mtl.io import FOLDER_METADATA

from .run_outputs import MERGEKIT_RECIPE
from .sources import TensorInfo

__all__ = ["parse_size", "plan_shards", "write_sharded", "base_files", "copy_base_files", "check_replaceable",
           "is_merge_card", "model_card", "WEIGHT_FILES", "ABOUT_OTHER_WEIGHTS"]

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # the weight file names `shard_names` gives
_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# Files that hold weights (ours replace them; other formats, ONNX and its external data included, would
# contradict them) or describe the base model's weights. Subfolders (onnx/, openvino/) are never copied.
WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|keras|msgpack|gguf|onnx|onnx_data|onnx\.data|tflite"
                          r"|mlmodel|ot)$|.*\.index\.json$|README\.md$", re.IGNORECASE)
# Files describing weights the merge does not write: copied, they would make the output claim them (peft
# and transformers load an adapter for any folder holding adapter_config.json; mergekit_config.yml is the
# recipe that made the base, not the merge).
ABOUT_OTHER_WEIGHTS = {"adapter_config.json": "a PEFT adapter's settings (its adapter_model.* weights are not copied)",
                       "mergekit_config.yml": "the mergekit recipe that made the base model, not this merge"}


def parse_size(size: int | float | str) -> int:
    """Bytes from an int (or a whole float such as 1e9) or a string like "5GB", "500MB", "2GiB"; the result
    must be a whole number of bytes, at least 1."""
    hint = "give a whole number of bytes ≥ 1, or a size with a unit such as '2GB' or '500MB'"
    if isinstance(size, bool):
        raise ValueError(f"shard_size must be bytes or a size like '5GB' / '500MB', got {size!r}")
    if isinstance(size, (int, float)):
        if not math.isfinite(size):
            raise ValueError(f"shard_size {size!r} is not a number of bytes: {hint}")
        n = Fraction(size)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if m and m.group(2).upper() == "B":  # mergekit's --out-shard-size reads "5B" as 5 billion parameters
            raise ValueError(f"shard_size {size!r}: sizes are bytes, given with a unit ('2GB', '500MB') or as a "
                             "plain integer; 'B' is not accepted (mergekit reads '5B' as 5 billion parameters)")
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"shard_size must be bytes or a size like '5GB' / '500MB', got {size!r}")
        n = Fraction(m.group(1)) * _UNITS[m.group(2).upper()]  # exact: "1.5MB" is 1,500,000 bytes, no float rounding
    if n.denominator != 1:
        raise ValueError(f"shard_size {size!r} is {float(n):g} bytes, not a whole number of bytes: {hint}")
    if n < 1:
        raise ValueError(f"shard_size {size!r} is {int(n)} bytes; a shard holds at least 1 byte: {hint}")
    return int(n)


def plan_shards(specs: Sequence[tuple[str, TensorInfo]], shard_size: int) -> list[list[tuple[str, TensorInfo]]]:
    shards: list[list[tuple[str, TensorInfo]]] = [[]]
    used = 0
    for name, info in specs:
        if shards[-1] and used + info.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append((name, info))
        used += info.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_sharded(folder: Path, specs: Sequence[tuple[str, TensorInfo]], tensors: Iterable[tuple[str, torch.Tensor]],
                  shard_size: int, metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `tensors` (in `specs` order) into shards inside `folder` (a fresh temporary folder)."""
    from .streaming import SafetensorsWriter  # streaming imports this module

    plan = plan_shards(specs, shard_size)
    names = shard_names(len(plan))
    it = iter(tensors)
    weight_map = {}
    for file, shard in zip(names, plan):
        with open(folder / file, "wb") as f:
            w = SafetensorsWriter(f, shard, metadata)
            for _ in shard:
                name, tensor = next(it)
                w.write(name, tensor)
                weight_map[name] = file
            w.finish()
    if next(it, None) is not None:
        raise ValueError("more tensors were produced than declared")
    if len(plan) > 1:
        total = sum(info.nbytes for _, info in specs)
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return [folder / n for n in names]


def base_files(base: Path, replaced: Collection[str] = ()) -> list[Path]:
    """The base model folder's files a merge copies: its non-weight files (config, tokenizer, generation
    config, ...) but those the caller writes itself (`replaced`) and those describing weights that are not
    copied (`ABOUT_OTHER_WEIGHTS`)."""
    return [p for p in sorted(base.iterdir()) if p.is_file() and not WEIGHT_FILES.fullmatch(p.name)
            and not p.name.startswith(".") and p.name not in replaced and p.name not in ABOUT_OTHER_WEIGHTS]


def copy_base_files(base: Path, folder: Path, replaced: Collection[str] = ()) -> list[str]:
    """Copy `base_files` into `folder`; a file describing uncopied weights is left out with a warning."""
    for name in sorted(ABOUT_OTHER_WEIGHTS.keys() - set(replaced)):
        if (base / name).is_file():
            log.warning("%s is not copied into the merged folder: it is %s", base / name, ABOUT_OTHER_WEIGHTS[name])
    copied = base_files(base, replaced)
    for p in copied:
        shutil.copy2(p, folder / p.name)
    return [p.name for p in copied]


def is_merge_card(path: Path) -> bool:
    """`path` is a model card `model_card` wrote (a README of anyone else's is never replaced)."""
    return path.is_file() and "Made with mtlkit" in path.read_text(errors="replace")[:2000]


def check_replaceable(folder: Path, written: Collection[str]) -> None:
    """`overwrite` swaps a Hugging Face output folder whole for the new one (atomically), so the old folder may
    hold only what a merge writes: weight files named as `shard_names` names them, the shard index, an mtlkit
    model card, beside that card the mergekit recipe of an earlier `merge_mergekit_yaml`, and the files of
    `written` (this merge's copied base files and extra files). Anything else (a user's notes, checkpoints/,
    metrics.json, another README) is refused by name rather than deleted."""
    ours = is_merge_card(folder / "README.md")
    kept = [p.name + ("/" if p.is_dir() else "") for p in sorted(folder.iterdir())
            if p.name not in FOLDER_METADATA and not (p.is_file() and (
                SHARD.fullmatch(p.name) or p.name in (INDEX, *written)
                or (ours and p.name in ("README.md", MERGEKIT_RECIPE))))]
    if kept:
        more = f" (and {len(kept) - 5} more)" if len(kept) > 5 else ""
        raise FileExistsError(f"{folder} holds {', '.join(kept[:5])}{more}, which this merge does not write; "
                              "overwrite=True replaces the whole folder and would delete them: move them out or choose "
                              "another path")


def model_card(method: str, hparams: dict[str, Any], pretrained: Any, finetuned: Sequence[Any], convention: str) -> str:
    """A README.md stating how the model was made (enough to redo the merge)."""
    from mtl import __version__

    label = lambda m: str(m) if isinstance(m, (str, Path)) else type(m).__name__  # noqa: E731
    hp = json.dumps(hparams, default=str, sort_keys=True)
    models = "\n".join(f"- `{label(m)}`" for m in finetuned)
    return (
        "---\ntags:\n- merge\n- mtlkit\n---\n"
        f"# Merged model\n\nMade with mtlkit {__version__} (`merging.merge_to_file`).\n\n"
        f"- method: `{method}` (convention: `{convention}`)\n- hyperparameters: `{hp}`\n"
        f"- base model: `{label(pretrained)}`\n\nFine-tuned models merged:\n\n{models}\n\n"
        "Arithmetic in float32 (float64 for float64 inputs); every tensor is written back in the base "
        "model's dtype.\n"
    )
