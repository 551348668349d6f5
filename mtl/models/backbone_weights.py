"""Checks on ``backbone.checkpoint_path``: timm loads a features_only model's weights with strict=False
(it drops the classifier), so a file whose keys match nothing, or only part of the backbone, would
leave random weights behind a log line. Here every tensor the features need must come from the file."""
from __future__ import annotations

import inspect
import os
import pickle
import re
from pathlib import Path
from typing import Any

from torch import nn

from mtl.registry import check_bool

#: BatchNorm fills a missing counter itself; files saved without it load fine
_FILLED_BY_TORCH = ".num_batches_tracked"
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                            r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def check_initial_weights(pretrained: object, checkpoint_path: object) -> None:
    """``backbone.pretrained`` and ``backbone.checkpoint_path`` by value, reading no weights: the backbone checks them
    when built, `mtl.train` before the run folder (whose test build leaves them out)."""
    check_bool("backbone.pretrained", pretrained)  # bool("no") is True: a string would start a Hub download
    if checkpoint_path:
        check_file(checkpoint_path)


def check_file(path: object) -> None:
    """``backbone.checkpoint_path`` names a file (timm's own error names neither the path nor the key); `mtl.train`
    checks it before the run folder too."""
    if not isinstance(path, (str, os.PathLike)):  # Path(5) would say "expected str, bytes or os.PathLike object"
        raise ValueError(f"backbone.checkpoint_path must be a file path, got {path!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"backbone.checkpoint_path={path}: no such file")


def missing_from_file(body: nn.Module, name: str, path: str, kwargs: dict[str, Any]) -> None:
    """Refuse a checkpoint file that lacks a tensor ``body`` (the features_only model) needs, in one line
    naming the file, how many are missing and the first. Keys are read as timm reads them (``module.``
    stripped, EMA or ``state_dict`` picked) and matched exactly, as timm loads them into the plain model (its
    feature wrapper's ``stages_0`` is ``stages.0`` there); a file in a layout timm's own filter converts
    (OpenCLIP, DINOv2, ...) is judged after that conversion."""
    from timm.models import load_state_dict

    if (getattr(body, "pretrained_cfg", None) or {}).get("custom_load"):
        return  # the model's own loader (e.g. a JAX .npz) reads the file: its names are not a state dict's
    plain = _plain_model(name, kwargs, "meta")
    names = plain_names(body, plain.state_dict())
    needed = list(names.values())
    state = load_state_dict(path)
    file_keys = list(state)
    missing = _not_covered(needed, file_keys)
    if missing and _not_covered(needed, _converted_keys(name, state, kwargs)):
        first = missing[0]
        hint = _features_hint(names, file_keys, name) or _prefix_hint(first, file_keys)
        raise ValueError(f"backbone.checkpoint_path={path}: the file lacks {len(missing)} of the {len(needed)} tensors "
                         f"timm's {name!r} features need (first: {first}; the file has {len(file_keys)} keys, "
                         f"e.g. {file_keys[0] if file_keys else '(none)'}){hint}")


def plain_names(body: nn.Module, plain_keys: Any) -> dict[str, str]:
    """Each tensor of ``body`` (a features_only model) the file must hold, mapped to its name in timm's plain model."""
    plain = set(plain_keys)
    return {k: plain_name(k, plain) or k.removeprefix("model.")
            for k in body.state_dict() if not k.endswith(_FILLED_BY_TORCH)}


def plain_name(key: str, plain: set[str] | dict[str, Any]) -> str | None:
    """A features_only model's key as timm's plain model (keys ``plain``) names it, None if it has none: a ViT's
    feature getter holds it under ``model.``, and a flattened Sequential child ``stages_0`` is ``stages.0`` (timm
    joins the two names with '_'; which '_' it was is read off the plain model's own keys)."""
    key = key if key in plain else key.removeprefix("model.")
    first, dot, rest = key.partition(".")
    joined = (first[:i] + "." + first[i + 1:] + dot + rest for i, c in enumerate(first) if c == "_")
    return next((k for k in (key, *joined) if k in plain), None)


def _not_covered(needed: list[str], file_keys: list[str]) -> list[str]:
    have = set(file_keys)
    return [k for k in needed if k not in have]


def _plain_model(name: str, kwargs: dict[str, Any], device: str) -> nn.Module:
    """timm's plain model (the one a file is loaded into before the features wrapper), on ``device``; a model whose
    construction needs real tensors (``.item()`` in its __init__) is built on the CPU instead of "meta"."""
    import timm
    import torch

    kw = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
    try:
        with torch.device(device):
            return timm.create_model(name, pretrained=False, **kw)
    except Exception:
        if device == "cpu":
            raise
        return _plain_model(name, kwargs, "cpu")


def _features_hint(names: dict[str, str], file_keys: list[str], name: str) -> str:
    """Say so when the file's keys are a features_only model's (``stem_0.weight`` for timm's ``stem.0.weight``)."""
    have = set(file_keys)
    flat = next(((k, p) for k, p in names.items() if k != p and k in have and p not in have), None)
    if flat is None:
        return ""
    return (f"; its keys look like a features-only state dict ({flat[0]!r} where timm's {name!r} has {flat[1]!r}, "
            "which timm does not load): save the plain model's state_dict instead, with the names "
            f"timm.create_model({name!r}).state_dict() has")


def _converted_keys(name: str, state: dict[str, Any], kwargs: dict[str, Any]) -> list[str]:
    """The keys of the file's ``state`` after the conversion timm applies on load (the model module's
    ``checkpoint_filter_fn``), [] when the module has none or it fails on this file."""
    import timm

    convert = getattr(inspect.getmodule(timm.models.model_entrypoint(name)), "checkpoint_filter_fn", None)
    if convert is None:
        return []
    plain = _plain_model(name, kwargs, "cpu")  # a converter may read the model's tensors
    try:
        return list(convert(state, plain))
    except Exception:  # a converter meeting a file it was not written for: the file's own names stand
        return []


def _prefix_hint(key: str, file_keys: list[str]) -> str:
    """Say so when the file holds the key under a prefix, and how to fix it (an mtlkit folder's ``backbone.body.``:
    init_from; any other: strip it)."""
    tail = "." + key
    prefixed = next((k for k in file_keys if ("." + k).endswith(tail)), None)
    if prefixed is None:
        return ""
    prefix = prefixed[: len(prefixed) - len(tail) + 1]
    # mtlkit's own backbone.body. only: mmpretrain's or a DINO teacher's plain backbone. is no model folder
    fix = ("an mtlkit model folder's weights: start from the folder with init_from=<folder>"
           if prefix == "backbone.body." else f"strip it: re-save the state dict with the keys less {prefix!r}")
    return f"; the file names it {prefixed!r}: its keys carry the prefix {prefix!r} ({fix})"


def shape_mismatch(error: Exception, name: str, path: str) -> str | None:
    """One line for torch's 'size mismatch for <key>' load error (one line per tensor): the file, the first
    key, both shapes and the count; None when ``error`` is another one."""
    found = _SIZE_MISMATCH.findall(str(error))
    if not found:
        return None
    key, theirs, ours = found[0]
    return (f"backbone.checkpoint_path={path}: {key} has shape ({theirs}) in the file, ({ours}) in timm's {name!r} "
            f"as built ({len(found)} tensor(s) differ in shape; were the weights saved for another variant or "
            "other settings?)")


def unpickling_refusal(error: BaseException, path: str) -> str | None:
    """One line (`mtl.torch_load.torch_load_refusal`'s) for a torch file a weights-only load refused (a pickled
    datetime or numpy scalar beside the weights; timm re-raises torch's refusal as a RuntimeError advising
    weights_only=False, which runs the file's code): the file, the blocked global and how to re-save it. None when
    ``error`` is another one."""
    from mtl.torch_load import blocked_global, torch_load_refusal

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, pickle.UnpicklingError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    line = torch_load_refusal(f"backbone.checkpoint_path={path}", cause)
    if not blocked_global(cause):  # no checkpoint at all (a text file): nothing to re-save
        return line
    return line + "; re-save the state dict alone (torch.save(state_dict, file)) or as .safetensors (safetensors.torch.save_file)"
