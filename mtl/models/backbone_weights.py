"""Checks on ``backbone.checkpoint_path``: timm loads a features_only model's weights with strict=False
(it drops the classifier), so a file whose keys match nothing, or only part of the backbone, would
leave random weights behind a log line. Here every tensor the features need must come from the file."""
from __future__ import annotations

import inspect
import re
from typing import Any

from torch import nn

#: BatchNorm fills a missing counter itself; files saved without it load fine
_FILLED_BY_TORCH = ".num_batches_tracked"
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                            r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def flat_key(key: str) -> str:
    """A key with '_' read as '.': timm's feature wrappers name a flattened ``stages.0`` child ``stages_0``,
    so both sides are compared in this form."""
    return key.replace("_", ".")


def _plain(body_key: str) -> str:
    """A features_only key as the plain model names it (a ViT's feature getter holds it as ``model``)."""
    return flat_key(body_key.removeprefix("model."))


def missing_from_file(body: nn.Module, name: str, path: str, kwargs: dict[str, Any]) -> None:
    """Refuse a checkpoint file that lacks a tensor ``body`` (the features_only model) needs, in one line
    naming the file, how many are missing and the first. Keys are read as timm reads them (``module.``
    stripped, EMA or ``state_dict`` picked); a file in a layout timm's own filter converts (OpenCLIP, DINOv2,
    ...) is judged after that conversion."""
    from timm.models import load_state_dict

    if (getattr(body, "pretrained_cfg", None) or {}).get("custom_load"):
        return  # the model's own loader (e.g. a JAX .npz) reads the file: its names are not a state dict's
    needed = [k for k in body.state_dict() if not k.endswith(_FILLED_BY_TORCH)]
    file_keys = list(load_state_dict(path))
    missing = _not_covered(needed, file_keys)
    if missing and _not_covered(needed, _converted_keys(name, path, kwargs)):
        first, hint = missing[0].removeprefix("model."), _prefix_hint(missing[0], file_keys)
        raise ValueError(f"backbone.checkpoint_path={path}: the file lacks {len(missing)} of the {len(needed)} tensors "
                         f"timm's {name!r} features need (first: {first}; the file has {len(file_keys)} keys, "
                         f"e.g. {file_keys[0] if file_keys else '(none)'}){hint}")


def _not_covered(needed: list[str], file_keys: list[str]) -> list[str]:
    have = {flat_key(k) for k in file_keys}
    return [k for k in needed if _plain(k) not in have]


def _converted_keys(name: str, path: str, kwargs: dict[str, Any]) -> list[str]:
    """The file's keys after the conversion timm applies on load (the model module's ``checkpoint_filter_fn``),
    [] when the module has none or it fails on this file."""
    import timm
    from timm.models import load_state_dict

    convert = getattr(inspect.getmodule(timm.models.model_entrypoint(name)), "checkpoint_filter_fn", None)
    if convert is None:
        return []
    plain = timm.create_model(name, pretrained=False, **{k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"})
    try:
        return list(convert(load_state_dict(path), plain))
    except Exception:  # a converter meeting a file it was not written for: the file's own names stand
        return []


def _prefix_hint(key: str, file_keys: list[str]) -> str:
    """Say so when the file holds the key under a prefix (an mtlkit folder's ``backbone.body.``)."""
    tail = "." + _plain(key)
    prefixed = next((k for k in file_keys if ("." + flat_key(k)).endswith(tail)), None)
    if prefixed is None:
        return ""
    prefix = prefixed[: len(prefixed) - len(tail) + 1]
    folder = " (an mtlkit model folder's weights: start from the folder with init_from=<folder>)" \
        if prefix.startswith("backbone.") else ""
    return f"; the file names it {prefixed!r}: its keys carry the prefix {prefix!r}{folder}"


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
