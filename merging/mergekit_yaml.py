"""mergekit's YAML merge configurations, read and run by mtlkit (`mergekit-yaml config.yml out`).

A mergekit configuration names `merge_method`, `base_model`, the `models` (each with its own
`parameters`) and merge-level `parameters`. mtlkit runs the methods it reproduces bit for bit under
`convention="mergekit"` (docs/merging.md, "mergekit's rules"): `linear`, `task_arithmetic`, `ties`,
`dare_ties`, `dare_linear`. Everything else a configuration can say — other methods, layer `slices`,
parameter gradients and tensor filters, tokenizer surgery, dtype conversion — is refused by name,
never skipped: a merge that silently dropped part of its recipe would not be the merge asked for.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .mergekit import DTYPES as _DTYPES  # the names mergekit's `dtype_from_name` takes
from .mergekit import dtype_name as _name
from .run_outputs import MERGEKIT_RECIPE
from .sources import CONVERT_TO_SAFETENSORS, MergeInputError, open_source, weights_read

__all__ = ["MergekitPlan", "read_mergekit_yaml", "merge_mergekit_yaml", "YAML_METHODS"]

log = logging.getLogger(__name__)

#: mergekit reads a model folder holding both model.safetensors and a shard index from the index's shards
#: (transformers and mtlkit's other merges read model.safetensors): a recipe's run follows mergekit
INDEX_FIRST = True
#: mergekit's method names that mtlkit runs, and the parameters each reads
YAML_METHODS: dict[str, tuple[str, ...]] = {
    "linear": ("weight", "normalize"),
    "task_arithmetic": ("weight", "density", "lambda", "normalize", "rescale", "int8_mask"),
    "ties": ("weight", "density", "lambda", "normalize", "rescale", "int8_mask"),
    "dare_ties": ("weight", "density", "lambda", "normalize", "rescale", "int8_mask"),
    "dare_linear": ("weight", "density", "lambda", "normalize", "rescale", "int8_mask"),
}
#: what mergekit makes of the base model listed under another spelling, which it takes for one more model
_SUMMED = "a zero task vector, whose weight counts in the divisor when normalize is true"
_SIGN_MASKED = "a zero task vector, which never enters the sign-masked sum or divisor: an entry doing nothing"
_AS_ONE_MORE = {"linear": "the base averaged in twice, once per spelling", "task_arithmetic": _SUMMED,
                "dare_linear": _SUMMED, "ties": _SIGN_MASKED, "dare_ties": _SIGN_MASKED}
#: parameters mergekit reads per model (the rest are read once, from the top-level `parameters`)
PER_MODEL = ("weight", "density")
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
_REFUSED_KEYS = {
    "slices": "layer slices (frankenmerges) are not supported: list whole `models`",
    "modules": "per-module configurations are not supported: list whole `models`",
    "tokenizer": "tokenizer surgery is not supported: mtlkit copies the base model's tokenizer files",
    "chat_template": "setting a chat template is not supported: mtlkit copies the base model's tokenizer files",
}


@dataclass(frozen=True)
class MergekitPlan:
    """What a mergekit YAML asks for, in `merging.merge_to_file` terms."""

    source: Path                      # the YAML file
    method: str                       # mergekit's name (also mtlkit's under convention="mergekit")
    pretrained: Path                  # base_model (linear without one: the first model, for keys and files)
    finetuned: list[Path]             # the models merged (the base model left out, as mergekit does)
    hparams: dict[str, Any] = field(default_factory=dict)  # weight/density per model, lam, normalize, rescale
    out_dtype: torch.dtype | None = None                   # out_dtype (or dtype) when the YAML sets one
    compute_dtype: torch.dtype | None = None               # dtype (mergekit's arithmetic) when the YAML sets one
    text: str = ""                                         # the YAML as read (a run folder keeps it)

    def kwargs(self) -> dict[str, Any]:
        return {"convention": "mergekit", **self.hparams}


def read_mergekit_yaml(path: str | os.PathLike) -> MergekitPlan:
    """Parse and check a mergekit configuration; model paths are read from the current directory,
    as mergekit reads them. Every problem is a `ValueError` naming the file and the key."""
    import yaml

    src = Path(path).expanduser()
    if src.is_dir():
        raise IsADirectoryError(f"{src}: is a directory, not a mergekit configuration file: give the recipe's .yml")
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such mergekit configuration file")
    text = src.read_text()
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{src}: not valid YAML ({str(e).splitlines()[0]})") from None
    where = f"{src}"
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a mapping with merge_method and models, got {type(cfg).__name__}")
    for key in cfg:
        if key in _REFUSED_KEYS:
            raise ValueError(f"{where}: {key}: {_REFUSED_KEYS[key]}")
        if key not in _TOP_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}; valid: {', '.join(_TOP_KEYS)}")
    method = cfg.get("merge_method")
    if method not in YAML_METHODS:
        raise ValueError(f"{where}: merge_method: {method!r} is not one mtlkit runs; implemented: "
                         f"{', '.join(YAML_METHODS)} (mergekit's slerp, della, breadcrumbs, model_stock, passthrough, "
                         "... are not)")
    tok = cfg.get("tokenizer_source")
    if tok not in (None, "base"):
        raise ValueError(f"{where}: tokenizer_source: {tok!r} is not supported: mtlkit copies the base model's "
                         "tokenizer files (tokenizer_source: base)")
    models = cfg.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError(f"{where}: models: expected a non-empty list of {{model: <folder>, parameters: ...}}")
    top = _params(cfg.get("parameters"), f"{where}: parameters", YAML_METHODS[method])
    base_ref = cfg.get("base_model")
    base = _folder(base_ref, f"{where}: base_model", src) if base_ref is not None else None
    if base is None and method != "linear":
        raise ValueError(f"{where}: base_model: {method} merges task vectors θ_t − θ0 and needs a base model")
    entries: list[tuple[Path, dict[str, Any], str, bool]] = []  # (folder, own parameters, label, is the base)
    seen: dict[Path | frozenset[Path], str] = {}  # keyed by `weights_read`
    for i, entry in enumerate(models):
        label = f"{where}: models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"{label}: expected {{model: <folder>, parameters: ...}}, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ValueError(f"{label}: unknown key(s) {extra}; valid: model, parameters")
        folder = _folder(entry["model"], f"{label}.model", src)
        weights = weights_read(folder, INDEX_FIRST)  # a linked model.safetensors is the model it links to
        if weights in seen:
            raise ValueError(f"{label}.model: {entry['model']!r} is {seen[weights]} again; mergekit refuses "
                             "a model listed twice (give it one entry with the weight you mean)")
        seen[weights] = f"models[{i}]"
        is_base = base is not None and entry["model"] == base_ref  # mergekit tells models apart by their spelling
        if not is_base and _same(folder, base):
            raise ValueError(f"{label}.model: {entry['model']!r} is base_model ({base_ref!r}) spelled differently; "
                             f"mergekit would merge it as one more model ({_AS_ONE_MORE[method]}): spell it as "
                             "base_model does")
        own = _params(entry.get("parameters"), f"{label}.parameters", YAML_METHODS[method])
        shared = sorted(k for k in own if k not in PER_MODEL)
        if shared:
            raise ValueError(f"{label}.parameters: {shared[0]} is a merge-level parameter that mergekit reads only "
                             "from the top-level parameters: move it there")
        entries.append((folder, own, label, is_base))
    if method == "linear":  # no task vectors: mergekit averages the base model in, as the last input
        if base is not None and not any(e[3] for e in entries):
            entries.append((base, {}, f"{where}: base_model (linear averages it in as one more model)", True))
    else:
        for _, own, label, is_base in entries:
            if is_base and own:
                log.warning("%s: the base model's task vector is zero and mergekit leaves it out; its "
                            "parameters %s are unused", label, sorted(own))
        entries = [e for e in entries if not e[3]]
    if not entries:
        raise ValueError(f"{where}: models: nothing to merge besides the base model")
    hparams: dict[str, Any] = {}
    for key in PER_MODEL:
        if key not in YAML_METHODS[method]:
            continue
        values = [own.get(key, top.get(key)) for _, own, _, _ in entries]
        missing = [label for (_, _, label, _), v in zip(entries, values) if v is None]
        if key == "weight" and missing:
            raise ValueError(f"{missing[0]}: parameters.weight is required by mergekit's {method} (set it per "
                             "model or under the top-level parameters)")
        if all(v is not None for v in values):
            hparams[key] = values[0] if len(set(values)) == 1 else values
        elif key == "density" and any(v is not None for v in values):  # mergekit's default: 1.0
            hparams[key] = [1.0 if v is None else v for v in values]
    for key in ("normalize", "rescale"):
        if key in top:
            hparams[key] = _bool(top[key], f"{where}: parameters.{key}")
    if "lambda" in top:
        hparams["lam"] = top["lambda"]
    if "int8_mask" in top:
        log.info("%s: int8_mask only changes mergekit's memory use; mtlkit's masks are booleans already", where)
    compute, out_dtype = _dtypes(cfg, where)
    if method == "linear" and compute is not None:  # mergekit rounds linear's inputs and result to dtype
        hparams["dtype"] = _name(compute)
    pretrained = base if base is not None else entries[0][0]
    return MergekitPlan(src, method, pretrained, [e[0] for e in entries], hparams, out_dtype, compute, text)


def merge_mergekit_yaml(path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                        threads: int | None = None, shard_size: int | str | None = None,
                        seed: int | None = None) -> Path:
    """Run a mergekit configuration with mtlkit's streaming engine and write a Hugging Face folder
    (`mergekit-yaml path out`) holding the recipe as `mergekit_config.yml`, as mergekit's does. `seed`
    makes the DARE methods repeat (mergekit's draws do not)."""
    plan = read_mergekit_yaml(path)
    check_dtypes(plan)
    return run_plan(plan, out, overwrite=overwrite, threads=threads, shard_size=shard_size, seed=seed)


def run_plan(plan: MergekitPlan, out: str | os.PathLike, *, overwrite: bool = False, threads: int | None = None,
             shard_size: int | str | None = None, seed: int | None = None) -> Path:
    from .streaming import merge_to_file

    kwargs = plan.kwargs()
    if seed is not None:
        if plan.method not in ("dare_ties", "dare_linear"):
            raise ValueError(f"seed draws DARE's drop masks; {plan.method} draws nothing")
        kwargs["seed"] = seed
    return merge_to_file(plan.method, plan.pretrained, plan.finetuned, out, overwrite=overwrite, threads=threads,
                         shard_size=shard_size, index_first=INDEX_FIRST, **_output_files(plan, out), **kwargs)


def check_output(plan: MergekitPlan, out: str | os.PathLike, *, overwrite: bool = False,
                 shard_size: int | str | None = None) -> None:
    """`run_plan`'s checks on `out` (`merging.streaming.output_target`: file names alone), for a job to make before
    its run folder."""
    from .streaming import output_target

    output_target(plan.pretrained, plan.finetuned, out, overwrite=overwrite, shard_size=shard_size,
                  **_output_files(plan, out))


def _output_files(plan: MergekitPlan, out: str | os.PathLike) -> dict[str, Any]:
    """A recipe writes a whole Hugging Face folder: the base's files, and the recipe, as mergekit's output holds it.
    A .safetensors `out` is refused in the recipe's terms (not as merge_to_file's copy_files, which it never set)."""
    if Path(out).suffix == ".safetensors":
        raise ValueError(f"{out}: a mergekit recipe writes a Hugging Face folder (weights, the base model's config "
                         f"and tokenizer files, {MERGEKIT_RECIPE}), as mergekit does, not a .safetensors file: "
                         "give a folder path")
    return {"copy_files": True, "extra_files": {MERGEKIT_RECIPE: plan.text}}


def check_dtypes(plan: MergekitPlan) -> None:
    """mergekit writes `out_dtype` (else `dtype`); mtlkit writes the base model's dtype (each tensor's own
    when the base mixes dtypes, so there only a recipe without both keys runs): they must agree.
    mergekit computes in `dtype` (unset: the models' own); mtlkit in float32 (float64 for float64 models):
    where they differ, the values may too — say so. Not for linear: mergekit sums in float32 too, and
    mtlkit rounds its inputs and result to `dtype` as mergekit does."""
    source = open_source(plan.pretrained, index_first=INDEX_FIRST)
    try:
        dtypes = {source.info(k).dtype for k in source.keys()}
    finally:
        source.close()
    have = ", ".join(sorted(_name(d) for d in dtypes))
    if plan.out_dtype is not None and dtypes != {plan.out_dtype}:
        asks = f"{plan.source}: out_dtype (else dtype) asks for {_name(plan.out_dtype)} weights"
        if len(dtypes) > 1:  # no one out_dtype is the base's: only leaving both unset writes its dtypes
            raise ValueError(f"{asks}, but the base model's tensors have several dtypes ({have}); mtlkit writes "
                             "each tensor in its own dtype and does not convert: remove dtype and out_dtype")
        raise ValueError(f"{asks}; mtlkit writes the base model's dtype ({have}) and does not convert: set "
                         f"out_dtype: {have}, or remove dtype and out_dtype")
    ours = torch.float64 if dtypes == {torch.float64} else torch.float32
    theirs = plan.compute_dtype or (next(iter(dtypes)) if len(dtypes) == 1 else None)
    if plan.method != "linear" and theirs is not None and theirs != ours:
        log.warning("%s: mergekit computes this recipe in %s (%s) and mtlkit in %s, so values can differ by more "
                    "than the last bit (rounding ties magnitudes: TIES and DARE may keep other entries); dtype: "
                    "%s with out_dtype: %s gives mergekit's bytes", plan.source, _name(theirs),
                    "its dtype" if plan.compute_dtype else "dtype unset: the models' own", _name(ours), _name(ours),
                    have)


def _params(node: Any, where: str, valid: tuple[str, ...]) -> dict[str, Any]:
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise ValueError(f"{where}: expected a mapping of parameter names to values, got {node!r}")
    out = {}
    for key, value in node.items():
        if key not in valid:
            raise ValueError(f"{where}: {key} is not a parameter of this merge_method; valid: {', '.join(valid)}")
        if isinstance(value, list):
            kind = ("a tensor filter list" if any(isinstance(v, dict) for v in value)
                    else "a gradient (interpolated over the layers)")
            raise ValueError(f"{where}.{key}: {value!r} is {kind}; mtlkit takes one value per model")
        if isinstance(value, dict):
            raise ValueError(f"{where}.{key}: {value!r} is a filtered value; mtlkit takes one value per model")
        if key in ("normalize", "rescale", "int8_mask"):
            out[key] = _bool(value, f"{where}.{key}")
            continue
        number = _number(value)
        if number is None:
            raise ValueError(f"{where}.{key}: expected a number, got {value!r}")
        if key == "density" and number <= 0:
            raise ValueError(f"{where}.{key}: {value!r} would drop every entry (mergekit refuses it too); the kept "
                             "fraction lies in (0, 1]")
        out[key] = min(number, 1.0) if key == "density" else number  # mergekit keeps everything at density ≥ 1
    return out


def _number(value: Any) -> float | None:
    """A finite number, also from a string: YAML 1.1 reads `5e-1` (no dot) as one, and mergekit's
    pydantic models convert it."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


#: the strings pydantic (v2, lax mode) reads as booleans, compared lower-cased, as it compares them
_BOOL_STRINGS = {"true": True, "1": True, "yes": True, "on": True, "t": True, "y": True,
                 "false": False, "0": False, "no": False, "off": False, "f": False, "n": False}


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, (int, float)) and value in (0, 1):  # pydantic's bool takes 0, 1, 0.0 and 1.0 too
        return bool(value)
    if isinstance(value, str) and value.lower() in _BOOL_STRINGS:  # a quoted "false" is false to mergekit too
        return _BOOL_STRINGS[value.lower()]
    raise ValueError(f"{where}: expected true or false, got {value!r} (mergekit's pydantic also reads 0/1 and "
                     "the strings true/false, yes/no, on/off, t/f, y/n, 1/0)")


def _folder(ref: Any, where: str, src: Path) -> Path:
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{where}: expected a model folder path, got {ref!r}")
    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
            return path
        if any(path.glob("pytorch_model*.bin")):  # mergekit reads them; a recipe's run here reads safetensors
            raise MergeInputError(f"{where}: {ref!r} holds pytorch_model*.bin checkpoints but no model.safetensors; "
                                  f"a recipe's models are safetensors folders: {CONVERT_TO_SAFETENSORS}")
        raise MergeInputError(f"{where}: {ref!r} holds no model.safetensors (nor its shard index "
                              "model.safetensors.index.json): not a model folder")
    if path.is_file():
        hint = f": {CONVERT_TO_SAFETENSORS}" if path.suffix == ".bin" else ""
        raise MergeInputError(f"{where}: {ref!r} is a file; a recipe lists model folders (model.safetensors or its "
                              f"shard index, with config.json){hint}")
    if "+" in ref and Path(ref.split("+", 1)[0]).expanduser().is_dir():
        raise ValueError(f"{where}: {ref!r} applies a LoRA adapter (model+lora), which mtlkit does not; merge the "
                         "adapter into its model first and give that folder")
    hint = ""
    if not path.is_absolute() and (src.parent / path).is_dir():
        hint = (f" (a folder of that name is beside {src.name}: paths are read from the current directory, as "
                "mergekit reads them; run from there or give an absolute path)")
    elif "/" in ref and not path.is_absolute() and not ref.startswith("."):
        hint = " (a Hugging Face Hub id? mtlkit reads local folders only: download it and give its path)"
    raise MergeInputError(f"{where}: {ref!r} is not a folder{hint}")


def _same(a: Path, b: Path | None) -> bool:
    return b is not None and weights_read(a, INDEX_FIRST) == weights_read(b, INDEX_FIRST)


def _dtypes(cfg: dict[str, Any], where: str) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(dtype, the output's dtype: out_dtype, else dtype), as mergekit names them."""
    given = {}
    for key in ("dtype", "out_dtype"):
        name = cfg.get(key)
        if name is None:
            continue
        dtype = _DTYPES.get(name.removeprefix("torch.")) if isinstance(name, str) else None
        if dtype is None:
            raise ValueError(f"{where}: {key}: {name!r} is not a dtype mergekit takes; valid: {', '.join(_DTYPES)}")
        given[key] = dtype
    return given.get("dtype"), given.get("out_dtype", given.get("dtype"))
