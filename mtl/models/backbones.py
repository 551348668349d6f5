"""Backbones: any timm model by name, returning a list of feature maps (B, C_i, H_i, W_i) (channels-last
stages, timm's output_fmt NHWC, are permuted to it).

CNNs use timm's ``features_only`` mode; ViTs too (timm turns their token grid into a feature map
through ``forward_intermediates``), so one wrapper serves both. Backbones of our own (e.g. the
slimmable ``slim_resnet``) register in ``BACKBONES`` and take precedence over timm names; each has
``channels``/``reductions`` lists like ``TimmBackbone``.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Sequence

import torch
from torch import nn

from mtl.models.backbone_weights import check_initial_weights, missing_from_file, shape_mismatch, unpickling_refusal
from mtl.io import INIT_ONLY  # noqa: F401  (re-exported: the backbone keys a model folder leaves out)
from mtl.registry import Registry, UnknownNameError, check_indices, check_kwargs, closest

BACKBONES: "Registry[type[nn.Module]]" = Registry("backbone")


#: TimmBackbone's own settings; any other backbone key is passed on to timm.create_model
OWN_SETTINGS = ("out_indices", "pretrained", "checkpoint_path")
#: what timm raises when a fixed-size model gets another size: a ViT's patch embedding, MaxViT's window / grid
#: partition, CoAtNet's relative-position table added to attention of another shape
TIMM_SIZE_ERRORS = re.compile(r"doesn't match model|must be divisible by (window|grid)|"
                              r"must match the size of tensor b")


def unknown_keyword(error: Exception, kwargs: dict[str, Any]) -> str | None:
    """The caller's key a TypeError says was unexpected (timm passes unknown keys to the model class)."""
    match = re.search(r"unexpected keyword argument '(\w+)'", str(error)) if isinstance(error, TypeError) else None
    return match.group(1) if match and match.group(1) in kwargs else None


def timm_keywords(name: str, error: TypeError) -> list[str]:
    """The keyword arguments of the timm class an unknown one was refused by (``VisionTransformer.__init__() got
    ...``: looked up in the module of the model's entrypoint), so a misspelling gets its hint; [] if unreadable."""
    import inspect

    import timm

    match = re.match(r"(\w+)\.__init__\(\)", str(error))
    try:
        module = inspect.getmodule(timm.models.model_entrypoint(name))
        params = inspect.signature(getattr(module, match.group(1))).parameters.values()
    except (AttributeError, TypeError, ValueError, RuntimeError):  # (no match, no such class, no signature)
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class TimmBackbone(nn.Module):
    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        **kwargs: Any,
    ):
        import timm  # here, not at import: it pulls in torchvision and torch._dynamo (seconds; pruning needs neither)

        super().__init__()
        if not isinstance(name, str):
            raise TypeError(f"backbone name must be a string, got {name!r} ({type(name).__name__})")
        if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
            close = difflib.get_close_matches(name, timm.list_models(), n=10, cutoff=0.6)
            raise UnknownNameError(
                f"unknown timm backbone {name!r}; similar names: {', '.join(close) or '(none)'}; "
                "all names: timm.list_models()"
            )
        check_initial_weights(pretrained, checkpoint_path)
        feature_kwargs: dict[str, Any] = {"features_only": True}
        if out_indices is not None:
            out_indices = check_indices("backbone.out_indices", out_indices)
            feature_kwargs["out_indices"] = tuple(out_indices)
        # timm handles local weights through pretrained_cfg_overlay; never a hub download here.
        if checkpoint_path:
            kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint_path)}
            pretrained = True
        self.name = name
        try:
            self.body = timm.create_model(name, pretrained=pretrained, **feature_kwargs, **kwargs)
        except Exception as e:
            unknown = unknown_keyword(e, kwargs)
            if unknown:  # a misspelt setting: named as the decoder's are, not as "<Class>.__init__() got ..."
                close = closest(unknown, [*OWN_SETTINGS, *timm_keywords(name, e)], cutoff=0.6, prefix="backbone.")
                raise TypeError(f"unknown setting backbone.{unknown}"
                                + (f" (did you mean {close}?)" if close else "")
                                + f"; the settings here are: {', '.join(OWN_SETTINGS)} and the keyword arguments of "
                                f"timm's {name!r} ({e})") from None
            mismatch = (shape_mismatch(e, name, checkpoint_path) or unpickling_refusal(e, checkpoint_path)
                        if checkpoint_path else None)
            if mismatch:
                raise ValueError(mismatch) from None
            if out_indices is not None and isinstance(e, (IndexError, AssertionError)):
                n = len(timm.create_model(name, features_only=True, **kwargs).feature_info)
                raise ValueError(f"backbone.out_indices={list(out_indices)}: {name} has {n} feature stages "
                                 f"(valid indices 0..{n - 1})") from None
            if not pretrained or checkpoint_path or isinstance(e, (TypeError, ValueError)):
                raise
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise RuntimeError(f"backbone.pretrained=true: timm could not get the weights of {name!r} ({first}); "
                               "give a local file with backbone.checkpoint_path=<file> (HF_HUB_OFFLINE=1 uses only "
                               "the local Hugging Face cache and fails at once)") from e
        if checkpoint_path:
            missing_from_file(self.body, name, str(checkpoint_path), kwargs)
        if out_indices is not None:  # negative ones resolve only now, against the model's stage count
            check_indices("backbone.out_indices", out_indices, stages=len(self.body.feature_info.info))
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.reductions: list[int] = list(self.body.feature_info.reduction())
        # timm's MambaOut (and Swin-like models) return stage outputs as (B, H, W, C); decoders read (B, C, H, W)
        self.channels_last = getattr(getattr(self.body, "output_fmt", None), "value", None) == "NHWC"
        # a model built with dynamic_img_size=True takes any size: its errors are never about img_size
        self.input_size = None if kwargs.get("dynamic_img_size") else _fixed_input_size(self.body, kwargs.get("img_size"))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        try:
            features = list(self.body(x))
        except (RuntimeError, AssertionError) as e:  # timm's own error names neither the size nor the fix
            got = tuple(int(n) for n in x.shape[-2:])
            if (self.input_size is None or got == self.input_size or isinstance(e, torch.OutOfMemoryError)
                    or not TIMM_SIZE_ERRORS.search(str(e))):
                raise
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            size = got[0] if got[0] == got[1] else f"[{got[0]},{got[1]}]"
            raise ValueError(f"backbone {self.name} is built for {self.input_size[0]}x{self.input_size[1]} inputs "
                             f"(timm sizes its windows / position tables by img_size) and failed on {got[0]}x{got[1]} "
                             f"({first}); build it with backbone.img_size={size} (mtl-train: ++backbone.img_size={size})") from e
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return features


def _fixed_input_size(body: nn.Module, img_size: Any) -> tuple[int, int] | None:
    """The input size a timm model that says it needs one (``pretrained_cfg["fixed_input_size"]``: windowed
    attention, position tables) was built for: ``img_size`` if given, else timm's default; None otherwise."""
    cfg = getattr(body, "pretrained_cfg", None) or {}
    if not cfg.get("fixed_input_size"):
        return None
    if img_size is None:
        img_size = tuple(cfg.get("input_size", ())[1:]) or None
    if isinstance(img_size, int):
        return (img_size, img_size)
    return tuple(int(n) for n in img_size) if img_size else None


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """``create_backbone("resnet18", out_indices=[1, 2, 3, 4])``: a registered backbone of ours
    (``BACKBONES``, e.g. ``slim_resnet``) or else any timm name."""
    if name in BACKBONES:
        cls = BACKBONES.get(name)
        check_kwargs(cls, kwargs, "backbone")
        return cls(**kwargs)
    return TimmBackbone(name, **kwargs)
