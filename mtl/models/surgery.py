"""Structural plans: re-apply a stored change of layer sizes (e.g. pruned channels) to a fresh model.

A plan is plain JSON data stored under ``config.json["model"]["pruning"]``. Its ``"modules"`` entry maps
a module name to the sizes it had after the change::

    {"modules": {"backbone.body.conv1.0": {"attrs": {"out_channels": 12},
                                           "shapes": {"weight": [12, 3, 3, 3]}}}, ...}

``apply_plan`` rebuilds those modules' parameters and buffers empty at the stored shapes and sets the
integer attributes their ``forward`` reads (``out_channels``, ``num_features``, ``num_heads``...); the
safetensors weights loaded afterwards fill them. Nothing is unpickled and no code is executed: only
sizes travel. Whoever produced the plan (``pruning/``) also stores other data beside ``"modules"``
(kept channel indices, method); this module ignores it.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

PLAN_KEY = "pruning"


def plan_of(model: nn.Module) -> dict[str, Any] | None:
    return getattr(model, "pruning_plan", None)


def model_config(model: nn.Module) -> dict[str, Any]:
    """``model.config`` plus the structural plan the model carries, if any (what a model folder stores)."""
    cfg = dict(model.config)
    plan = plan_of(model)
    if plan is not None:
        cfg[PLAN_KEY] = copy.deepcopy(plan)
    return cfg


def _attr_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def apply_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Resize the modules named in ``plan["modules"]`` in place (weights uninitialised) and attach the plan."""
    if not isinstance(plan, dict) or not isinstance(plan.get("modules"), dict):
        raise ValueError(f"a structural plan needs a 'modules' mapping, got {type(plan).__name__}")
    for name, spec in plan["modules"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"plan names module {name!r}, which this architecture does not have") from None
        for attr, value in spec.get("attrs", {}).items():
            if not hasattr(module, attr):
                raise ValueError(f"plan sets {name}.{attr}, which {type(module).__name__} does not have")
            value = _attr_value(value)
            if attr not in _int_attrs(module) or not _is_int_attr(value):  # a plan carries sizes, nothing else
                raise ValueError(f"plan sets {name}.{attr} to {value!r}; a plan only changes integer sizes "
                                 f"(int or tuple of ints) that {type(module).__name__} holds")
            setattr(module, attr, value)
        for tensor, shape in spec.get("shapes", {}).items():
            shape = tuple(int(s) for s in shape)
            if tensor in module._parameters and module._parameters[tensor] is not None:
                old = module._parameters[tensor]
                module._parameters[tensor] = nn.Parameter(torch.empty(shape, dtype=old.dtype), old.requires_grad)
            elif tensor in module._buffers and module._buffers[tensor] is not None:
                module._buffers[tensor] = torch.empty(shape, dtype=module._buffers[tensor].dtype)
            else:
                raise ValueError(f"plan resizes {name}.{tensor}, which is not a parameter or buffer of {type(module).__name__}")
    model.pruning_plan = copy.deepcopy(plan)
    return model


def _is_int_attr(v: Any) -> bool:
    def is_int(i):
        return isinstance(i, int) and not isinstance(i, bool)

    return is_int(v) or (isinstance(v, tuple) and bool(v) and all(is_int(i) for i in v))


def _int_attrs(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and _is_int_attr(v)}


def _shapes(module: nn.Module) -> dict[str, list[int]]:
    tensors = {**module._parameters, **module._buffers}
    return {k: list(v.shape) for k, v in tensors.items() if v is not None}


def snapshot(model: nn.Module) -> dict[str, tuple[dict[str, Any], dict[str, list[int]]]]:
    """Sizes of every module (integer attributes and tensor shapes), to diff against after a change."""
    return {name: (_int_attrs(m), _shapes(m)) for name, m in model.named_modules()}


def diff_plan(before: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The ``"modules"`` part of a plan: what changed in ``model`` since ``snapshot`` took ``before``."""
    modules: dict[str, Any] = {}
    for name, m in model.named_modules():
        if name not in before:
            raise ValueError(f"module {name!r} appeared after the change; a plan can only resize modules")
        attrs0, shapes0 = before[name]
        attrs, shapes = _int_attrs(m), _shapes(m)
        d_attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items() if attrs0.get(k) != v}
        d_shapes = {k: v for k, v in shapes.items() if shapes0.get(k) != v}
        if d_attrs or d_shapes:
            modules[name] = {"attrs": d_attrs, "shapes": d_shapes}
    return modules
