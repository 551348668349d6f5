"""MultiTaskModel = backbone + decoder (shared part and one head per task)."""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from mtl.io import as_plain
from mtl.models.backbones import INIT_ONLY, create_backbone
from mtl.models.decoders import create_decoder
from mtl.models.families import MODELS, model_from_config
from mtl.tasks import Task, task_from_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) images in [0, 255] -> (x/255 - mean) / std, C = the model's mean channels;
    float input is taken as already normalised, in the model's dtype (``mean`` follows ``.to(dtype)``).
    Any other shape is refused naming ``model``'s family: uint8 would broadcast, and float failed deep inside
    a layer ("not enough values to unpack", a conv's channel count) naming nothing of ours."""
    if x.ndim != 4 or x.shape[1] != mean.shape[1]:
        family = "model" if model is None else model.config.get("family", type(model).__name__)
        hint = " (one image: x.unsqueeze(0))" if x.ndim == 3 and x.shape[0] == mean.shape[1] else ""
        raise ValueError(f"{family}: input must be (B, {mean.shape[1]}, H, W), got {tuple(x.shape)}{hint}")
    if x.dtype != torch.uint8:
        check_float_input(x, mean.dtype)
        return x
    # in float32, then in the model's own dtype: a model cast after load_model (.bfloat16()) takes uint8 too
    return ((x.float().div_(255.0) - mean.float()) / std.float()).to(mean.dtype)


def check_float_input(x: torch.Tensor, model_dtype: torch.dtype) -> None:
    """Float input must be in the model's dtype, or castable by an enclosing autocast (which casts every
    float dtype but float64); otherwise the first layer fails with torch's "Input type ... and bias type"."""
    if x.dtype == model_dtype:
        return
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(f"input images are {x.dtype} but the model's weights are {model_dtype}: pass uint8 images "
                    f"(normalised inside) or normalised float input as {model_dtype} (x.to({model_dtype}))")


def select_tasks(available: Iterable[str], tasks: Iterable[str] | str | None) -> list[str]:
    """The requested task names (all of ``available`` for None), checked: unknown or repeated names
    are errors naming them."""
    available = list(available)
    if tasks is None:
        return available
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in names if t not in available]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; this model has: {', '.join(available)}")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks repeated: {names}")
    return names


@MODELS.register("multitask")
class MultiTaskModel(nn.Module):
    """``forward(x, tasks=None) -> {task: prediction}``; only the requested tasks' heads run.

    ``x`` may be uint8 (B, 3, H, W) in [0, 255] — normalised here, so a model folder is
    self-contained — or an already normalised float tensor.
    """

    CONFIG_KEYS = ("tasks", "backbone")
    #: what create_model builds for a backbone or decoder left out
    DEFAULT_PARTS = {"backbone": "resnet18", "decoder": "hps"}

    def __init__(
        self,
        tasks: Sequence[Task],
        backbone: dict[str, Any],
        decoder: dict[str, Any] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        if not tasks:
            raise ValueError("a MultiTaskModel needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        self.tasks = {t.name: t for t in tasks}
        self._backbone_cfg = part_config("backbone", backbone)
        self._decoder_cfg = part_config("decoder", decoder or "hps")
        bb = dict(self._backbone_cfg)
        self.backbone = create_backbone(bb.pop("name"), **bb)
        dec = dict(self._decoder_cfg)
        self.decoder = create_decoder(dec.pop("name"), self.backbone.channels, list(tasks), **dec)
        for key, v in (("mean", mean), ("std", std)):  # per RGB channel; std divides
            ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in v)
            if not ok or (key == "std" and min(v) <= 0):
                raise ValueError(f"model {key} must be 3 finite numbers (R, G, B){', each > 0' if key == 'std' else ''}, "
                                 f"got {v!r}")
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # --- config round trip -----------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return {
            "family": "multitask",
            "tasks": [t.to_config() for t in self.tasks.values()],
            "backbone": {k: copy.deepcopy(v) for k, v in self._backbone_cfg.items() if k not in INIT_ONLY},
            "decoder": copy.deepcopy(self._decoder_cfg),
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "MultiTaskModel":
        tasks = [task_from_config(t) for t in cfg["tasks"]]
        return cls(tasks, cfg["backbone"], cfg.get("decoder"), cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))

    # --- forward ----------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_images(x, self.mean, self.std, self)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """The representation all task heads read (what representation-level balancers use)."""
        return self.decoder.shared(self.backbone(self.normalize(x)))

    def heads(self, z: torch.Tensor, out_size: tuple[int, int], tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        names = self._check_tasks(tasks)
        return {t: self.decoder.head(t, z, out_size) for t in names}

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        names = self._check_tasks(tasks)
        return self.heads(self.shared(x), tuple(x.shape[-2:]), names)

    def _check_tasks(self, tasks: Iterable[str] | None) -> list[str]:
        return select_tasks(self.tasks, tasks)

    # --- parameter groups -------------------------------------------------------------------
    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [p for p in self.decoder.heads[task].parameters() if p.requires_grad]

    def shared_parameters(self) -> list[nn.Parameter]:
        head_ids = {id(p) for p in self.decoder.heads.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in head_ids]


def part_config(part: str, spec: Any, named: bool = True) -> dict[str, Any]:
    """A backbone or decoder given as its name or as a dict of settings, with its ``name`` when ``named`` (a
    family with one backbone of its own, task_moe_vit, takes settings alone); its numbers as plain Python's
    (`mtl.io.as_plain`: the settings are the model's config, which goes into checkpoints and config.json)."""
    if isinstance(spec, str):
        return {"name": spec}
    if not isinstance(spec, Mapping) or (named and not isinstance(spec.get("name"), str)):
        raise TypeError(f"{part} must be a name or a dict of settings with its 'name' (e.g. {{'name': "
                        f"{'resnet18' if part == 'backbone' else 'hps'!r}}}), got {spec!r}")
    return as_plain(dict(spec))


def create_model(
    tasks: Sequence[Task | dict[str, Any]] | None = None,
    backbone: str | dict[str, Any] | None = None,
    decoder: str | dict[str, Any] | None = None,
    *,
    config: dict[str, Any] | None = None,
    family: str | None = None,
    **kwargs: Any,
) -> MultiTaskModel:
    """Build a model from names and kwargs, e.g. ``create_model(["semseg", "depth"], backbone="test_resnet")``
    (family ``multitask`` when left out; a left-out backbone or decoder is the family's ``DEFAULT_PARTS``:
    ``resnet18`` / ``hps`` for multitask and linearized, ``slim_resnet`` / ``slimmable`` for slimmable, the
    default settings for task_moe_vit), or from a stored ``config`` (a model's ``.config``) alone. A task is a name, a Task or a task config keyed ``kind`` (its type:
    ``{"kind": "depth", "weight": 2.0}``; ``name`` is optional); a backbone or decoder is a name or a dict of
    settings with its ``name``. ``family`` picks the class in ``MODELS`` (e.g. ``"slimmable"``); all take
    (tasks, backbone, decoder)."""
    if config is not None:
        given = [k for k, v in (("tasks", tasks), ("backbone", backbone), ("decoder", decoder), ("family", family))
                 if v is not None] + list(kwargs)
        if given:  # the config describes the whole model: anything beside it would be dropped
            raise ValueError(f"create_model: config= describes the whole model; leave out {', '.join(given)} "
                             "(or edit those keys of the config)")
        return model_from_config(config)
    family = "multitask" if family is None else family
    cls = MODELS.get(family)
    defaults = getattr(cls, "DEFAULT_PARTS", None)
    if defaults is None and (backbone is None or decoder is None):
        raise ValueError(f"create_model: family {family} has no default backbone or decoder; pass backbone= and decoder=")
    backbone = defaults["backbone"] if backbone is None else backbone
    decoder = defaults["decoder"] if decoder is None else decoder
    if tasks is None:
        raise ValueError("create_model needs tasks (names, Task objects or task configs) or config=")
    if isinstance(tasks, (str, Task)):  # one task: create_model("depth"), not the letters of "depth"
        tasks = [tasks]
    if not isinstance(tasks, Iterable) or isinstance(tasks, Mapping):
        raise TypeError(f"create_model: tasks must be a list of task names, Tasks or task configs, got {tasks!r}")
    built = [task_from_config(t) for t in tasks]
    bb, dec = part_config("backbone", backbone, False), part_config("decoder", decoder, False)
    slim = [f"{part}={c['name']}" for part, c, name in (("backbone", bb, "slim_resnet"), ("decoder", dec, "slimmable"))
            if c.get("name") == name and c.get("widths", "default")]  # left out: the class's default width set
    if slim and family != "slimmable":  # another family would train them at full width only, silently
        raise ValueError(f"{' '.join(slim)} with a width set needs family=slimmable (got family={family}); "
                         "for plain layers at one width set its widths to null")
    check_family_options(cls, family, kwargs, {"backbone": bb, "decoder": dec})
    return cls(built, bb, dec, **kwargs)


def check_family_options(cls: type, family: str, kwargs: dict[str, Any], parts: dict[str, dict[str, Any]]) -> None:
    """Refuse a create_model keyword the family does not take (its class said "__init__() got an unexpected
    keyword argument"), saying so when it is a backbone or decoder setting given at the wrong level."""
    from mtl.registry import close_names

    options = _family_options(cls)
    unknown = [k for k in kwargs if options is not None and k not in options]
    if not unknown:
        return
    key, value = unknown[0], kwargs[unknown[0]]
    where = f"create_model: {key}={value!r} is no option of family {family} (its options: {', '.join(options)})"
    for part, spec in parts.items():
        if key in _part_settings(cls, part, spec):
            named = {**({"name": spec["name"]} if "name" in spec else {}), key: value}
            raise TypeError(f"{where}; it is a {part} setting: pass {part}={named!r}")
    known = [*options, *(f"{part}.{k}" for part, spec in parts.items() for k in _part_settings(cls, part, spec))]
    by_key = {k.split(".")[-1]: k for k in reversed(known)}  # a family option wins over a part's setting
    close = " or ".join(by_key[k] for k in close_names(key, by_key))
    raise TypeError(where + (f" (did you mean {close}?)" if close else ""))


def _family_options(cls: type) -> list[str] | None:
    """The keywords a family's constructor takes beside (tasks, backbone, decoder), read through a constructor
    that passes ``**kwargs`` on (linearized); None when it stays open-ended or no signature is readable. A
    leading underscore marks a flag only ``from_config`` sets (task_moe_vit's ``_stored``): no user option."""
    from mtl.registry import keyword_parameters

    try:
        params = keyword_parameters(cls).values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in ("self", "tasks", "backbone", "decoder") and not p.name.startswith("_")]


def _part_settings(cls: type, part: str, spec: dict[str, Any]) -> list[str]:
    """A backbone's or decoder's settings: the family's own (``PART_SETTINGS``), else those of the registered
    class its name picks; a timm backbone's own settings only (timm's keywords depend on the model)."""
    import inspect

    from mtl.models.backbones import BACKBONES, OWN_SETTINGS
    from mtl.models.decoders import DECODERS

    own = getattr(cls, "PART_SETTINGS", {}).get(part)
    if own is not None:
        return list(own)
    registry, name = (BACKBONES if part == "backbone" else DECODERS), spec.get("name")
    if name not in registry:
        return list(OWN_SETTINGS) if part == "backbone" else []
    params = inspect.signature(registry.get(name)).parameters
    return [n for n in params if n not in ("self", "in_channels", "tasks")]
