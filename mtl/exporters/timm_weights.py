"""``format=timm``: the backbone as a plain timm checkpoint.

mtlkit's backbone wraps ``timm.create_model(name, features_only=True)``, whose state-dict keys differ
from the plain model's (ViTs gain a ``model.`` prefix) and which drops what the features never use
(the classifier, a ViT's final norm, stages after the last ``out_indices``). The export maps the keys
back onto the plain model so that

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": ".../model.safetensors"}, **model_args)

loads with no missing key. Tensors the multi-task backbone never had are filled so that they cannot
pass for trained ones: the classifier is zero (zero logits), everything else keeps timm's own
initialisation (seeded) — every such key is listed in ``export.json`` and the model card. The trained
maps are the backbone's ``out_indices`` (``features_only=True, out_indices=...``, the card's call).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from safetensors import SafetensorError

from mtl.exporters.api import EXPORTERS, ExportError, Source, trained_image_size
from mtl.io import safetensors_os_error, usual_permissions
from mtl.models.backbone_weights import plain_name
from mtl.models.backbones import INIT_ONLY
from mtl.models.multitask import IMAGENET_MEAN, IMAGENET_STD
from mtl.models.surgery import PLAN_KEY
from mtl.modes import eval_mode

TIMM_FILE = "model.safetensors"
_BUILD_ONLY = ("out_indices", *INIT_ONLY, "features_only")


def model_args(backbone_cfg: dict[str, Any]) -> dict[str, Any]:
    """The kwargs a plain ``timm.create_model`` needs to rebuild this architecture."""
    return {k: v for k, v in backbone_cfg.items() if k not in ("name", *_BUILD_ONLY)}


def check_timm_tasks(tasks: list[str], names: list[str]) -> None:
    """Every task, in any order, is the whole backbone; a subset is refused (read by `resolve_tasks`, so
    mtl-export refuses it before its run folder)."""
    if set(tasks) != set(names):
        raise ValueError(f"format=timm exports the shared backbone only, which serves every task; tasks={tasks} "
                         "does not apply (leave tasks unset)")


def timm_body(model: torch.nn.Module, config: dict[str, Any]) -> tuple[torch.nn.Module, str]:
    """``model.backbone``'s timm model and name; else the ExportError saying the model has none (``config``: the
    model's config, whose backbone name the error gives)."""
    backbone = getattr(model, "backbone", None)
    body, name = getattr(backbone, "body", None), getattr(backbone, "name", None)
    if body is None or name is None:
        bb = (config.get("backbone") or {}).get("name") if isinstance(config.get("backbone"), dict) else None
        family = config.get("family", "multitask")
        what = f"backbone {bb!r} is not a timm model" if bb else f"the {family!r} family has no separate backbone"
        raise ExportError(f"format=timm needs a timm backbone (model.backbone.body); {what}: export it with "
                          "format=onnx or format=folder")
    return body, name


def check_timm_model(config: dict[str, Any], skeleton: torch.nn.Module | None) -> None:
    """What format=timm refuses that a model's config shows, no tensor read (read by `check_model_config`, so
    mtl-export refuses it before its run folder): no timm backbone (`timm_body`, judged on ``skeleton``, the model
    built on the meta device from the config; skipped without one), or a pruning plan that resizes a backbone
    module (timm rebuilds the unpruned architecture). A slimmable backbone is no timm model."""
    if skeleton is not None:
        timm_body(skeleton, config)
    plan = config.get(PLAN_KEY)
    modules = plan.get("modules") if isinstance(plan, dict) else None
    resized = [m for m in modules if m.startswith("backbone.body.")] if isinstance(modules, dict) else []
    if resized:
        raise ExportError(f"format=timm: the model's pruning plan (config.json key 'model.{PLAN_KEY}') resizes "
                          f"backbone module {resized[0]!r} ({len(resized)} in all); timm rebuilds only the unpruned "
                          "architecture: export it with format=onnx or format=folder")


@EXPORTERS.register("timm")
def export_timm(source: Source, out: Path, tasks: list[str], seed: int = 0) -> dict[str, Any]:
    """Write ``model.safetensors`` + timm's ``config.json`` (so ``timm.create_model("local-dir:<out>")``
    works too). ``tasks`` does not apply: the backbone serves all of them, so a subset is refused."""
    check_timm_tasks(tasks, list(getattr(source.model, "tasks", {}) or []))
    import timm
    from timm.models import save_for_hf

    backbone = getattr(source.model, "backbone", None)
    body, name = timm_body(source.model, source.config)
    args = model_args(source.config.get("backbone", {}))
    with torch.random.fork_rng(devices=[]):  # a library call: the caller's random stream stays as it was
        torch.random.default_generator.manual_seed(seed)  # the CPU generator only (manual_seed also seeds CUDA's)
        plain = timm.create_model(name, pretrained=False, **args)
    target = plain.state_dict()
    plain_key_of = _plain_keys(target)
    mapped, unmapped = {}, []
    for key, value in body.state_dict().items():
        plain_key = plain_key_of(key)
        if plain_key not in target or target[plain_key].shape != value.shape:
            unmapped.append(key)
            continue
        mapped[plain_key] = value
    if unmapped:
        key = unmapped[0]
        plain_key = plain_key_of(key)
        what = (f"has shape {tuple(body.state_dict()[key].shape)}, timm's {name!r} {tuple(target[plain_key].shape)}"
                if plain_key in target else f"has no counterpart in timm's {name!r}")
        raise ExportError(f"format=timm: backbone key {key!r} {what} "
                          f"({len(unmapped)} in all); the backbone was changed beyond what timm can rebuild "
                          "(a pruned or slimmed backbone: export it with format=onnx or format=folder)")
    classifier = _classifier_keys(plain)
    filled = {"zeroed": [], "timm_init": []}
    for key, value in target.items():
        if key in mapped:
            continue
        if key in classifier:
            mapped[key] = torch.zeros_like(value)
            filled["zeroed"].append(key)
        else:
            mapped[key] = value
            filled["timm_init"].append(key)
    plain.load_state_dict(mapped, strict=True)
    preprocessing = _own_preprocessing(source)
    # not timm's ImageNet recipe for `name`, nor its provenance (hub id, tag, licence): these weights are ours
    own = {k: v for k, v in plain.pretrained_cfg.items()
           if k not in ("hf_hub_id", "url", "license", "tag", "origin_url", "paper_ids", "paper_name", "notes")}
    if own.get("pool_size") and "input_size" in preprocessing:
        own["pool_size"] = _pool_size(plain, preprocessing["input_size"], getattr(backbone, "channels_last", False))
    plain.pretrained_cfg = {**own, "tag": "mtlkit", **preprocessing}
    try:
        save_for_hf(plain, str(out), model_args=args, safe_serialization=True)
    except SafetensorError as e:  # a full disk: raised as the OSError it is, which atomic_path names the output by
        err = safetensors_os_error(e)
        if err is None:
            raise
        raise err from e
    if not (out / TIMM_FILE).is_file():
        raise ExportError(f"timm's save_for_hf wrote no {TIMM_FILE} in {out}")
    usual_permissions(out / TIMM_FILE)  # timm writes through safetensors' save_file: 0600 otherwise
    # the maps the tasks were trained on; timm's features_only default (every stage) would add untrained ones
    out_indices = [int(i) for i in body.feature_info.out_indices]
    return {
        "file": TIMM_FILE,
        "timm_name": name,
        "model_args": args,
        "out_indices": out_indices,
        "trained_keys": len(mapped) - len(filled["zeroed"]) - len(filled["timm_init"]),
        "filled_keys": filled,
        "untrained_modules": untrained_modules(plain, filled["timm_init"]),
        "load": _load_snippet(name, {**args, "features_only": True, "out_indices": out_indices}),
        "load_plain": _load_snippet(name, args),
        "preprocessing": preprocessing,
    }


def _plain_keys(target: dict[str, torch.Tensor]):
    """Map a features_only key to the plain model's (``target``'s): `plain_name`."""
    return lambda key: plain_name(key, target)


def untrained_modules(plain: torch.nn.Module, keys: list[str]) -> list[str]:
    """The modules (a feature stage such as ``layer4``, else the key's top-level module such as ``norm``)
    holding keys left at timm's initialisation, in model order: what ``forward_features`` runs untrained."""
    stages = [f["module"] for f in getattr(plain, "feature_info", None) or [] if isinstance(f, dict) and f.get("module")]
    found: list[str] = []
    for key in keys:
        owner = next((s for s in stages if key.startswith(s + ".")), key.split(".")[0])
        if owner not in found:
            found.append(owner)
    return found


def _own_preprocessing(source: Source) -> dict[str, Any]:
    """The multi-task model's input recipe, in timm's pretrained_cfg terms, so that timm's data pipeline
    (``resolve_data_config`` / ``create_transform`` on ``local-dir:<out>``) feeds the weights what they
    were trained on: the model's mean/std, its training image size, resize without a centre crop."""
    def short(v):  # the float32 buffers' values as written in the config (0.485, not 0.48500001430511475)
        return tuple(float(f"{x:.7g}") for x in v)

    cfg = {"mean": short(source.config.get("mean", IMAGENET_MEAN)), "std": short(source.config.get("std", IMAGENET_STD)),
           "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear"}
    size = trained_image_size(source)
    if size is not None:
        cfg["input_size"] = (3, *size)
    return cfg


def _pool_size(plain: torch.nn.Module, input_size: tuple[int, ...], channels_last: bool) -> tuple[int, int] | None:
    """timm's ``pool_size``, the final feature map's (H, W) at ``input_size`` (its test-time pooling uses it
    as a kernel), measured by one forward of zeros; timm's own value is for its default input size. None
    (as timm's own export writes when the input size changes) where the map is not 4-D."""
    with torch.no_grad(), eval_mode(plain):
        features = plain.forward_features(torch.zeros(1, *input_size))
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        return None
    return tuple(int(n) for n in (features.shape[1:3] if channels_last else features.shape[-2:]))


def _classifier_keys(model: torch.nn.Module) -> set[str]:
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return {k for k in model.state_dict() if any(k == f"{c}.weight" or k == f"{c}.bias" for c in names)}


def _load_snippet(name: str, args: dict[str, Any]) -> str:
    extra = "".join(f", {k}={v!r}" for k, v in args.items())
    return (f'timm.create_model("{name}", pretrained=True, '
            f'pretrained_cfg_overlay={{"file": "<folder>/{TIMM_FILE}"}}{extra})')


export_timm.check_tasks = check_timm_tasks  # type: ignore[attr-defined]  # read by resolve_tasks
export_timm.check_model = check_timm_model  # type: ignore[attr-defined]  # read by check_model_config
