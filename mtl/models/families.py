"""Model families: every class a model folder can hold, looked up by the ``family`` key of its config.

A family is an ``nn.Module`` class with a ``config`` property (plain JSON data, including
``"family": <name>``) and a ``from_config(cfg)`` classmethod that rebuilds it; ``mtl.load_model``
then loads the safetensors weights into it. Configs without the key are ``"multitask"``. A family's
``CONFIG_KEYS`` names the keys its configs must hold (a missing one is refused naming it).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from mtl.registry import Registry

MODELS: "Registry[type[nn.Module]]" = Registry("model family")
DEFAULT_FAMILY = "multitask"


def model_from_config(cfg: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) model of any registered family from its stored config; a structural plan
    stored with it (a pruned model) is re-applied to the rebuilt architecture (mtl.models.surgery)."""
    from mtl.models.surgery import PLAN_KEY, apply_plan

    if not isinstance(cfg, dict):
        raise TypeError(f"a model config must be a dict (a model's .config), got {type(cfg).__name__}")
    base = {k: v for k, v in cfg.items() if k != PLAN_KEY}
    family = base.get("family", DEFAULT_FAMILY)
    cls = MODELS.get(family)
    missing = [k for k in getattr(cls, "CONFIG_KEYS", ()) if k not in base]
    if missing:
        raise ValueError(f"model config has no {missing[0]!r} key (family {family!r} needs "
                         f"{', '.join(cls.CONFIG_KEYS)})")
    model = cls.from_config(base)
    return apply_plan(model, cfg[PLAN_KEY]) if PLAN_KEY in cfg else model


# a (stacked) bias, or a router's gate / noise projection: ≥ 2-D, but not a layer the features pass through
_NOT_A_LAYER_WEIGHT = re.compile(r"(^|\.)(bias|b\d+)$|(^|\.)(routers?|gates?|noise)(\.|$)")


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module | None:
    """``build()`` on the meta device (shapes only, no memory), the caller's random stream untouched; None where a
    layer cannot be built there or a setting is bad (the real build, the caller's, then says which)."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return build()
        except Exception:  # noqa: BLE001
            return None


def last_shared_weight(model: nn.Module) -> nn.Parameter | None:
    """GradNorm's W (Chen et al. 2018: the weights of the last shared layer): the last shared parameter,
    in registration (forward) order, with ≥ 2 dims that is a layer's weight. None when there is none."""
    shared = {id(p) for p in model.shared_parameters()}
    found = None
    for name, p in model.named_parameters():
        if id(p) in shared and p.ndim >= 2 and not _NOT_A_LAYER_WEIGHT.search(name):
            found = p
    return found
