"""Starting a run from a model folder (`init_from=`): its matching weights, and the architecture it
fixes when it is pruned or an extracted MoE sub-network, or linearized (its expansion point θ0)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mtl.io import load_state, read_model_config, recorded_weights_digest
from mtl.models import MultiTaskModel

__all__ = ["INITIAL_WEIGHTS", "check_encoder_match", "check_folder_tasks", "check_init_from", "check_linear_start",
           "check_one_start", "init_from_folder", "initial_weights", "keep_expansion_point", "folder_architecture",
           "resume_initial_weights", "start_record"]

log = logging.getLogger(__name__)


def init_from_folder(model: MultiTaskModel, folder: str | Path) -> dict[str, int]:
    """Copy every weight whose name and shape match from a model folder (fine-tuning start)."""
    source = load_state(folder)
    # a slimmable folder: of the model's width set, only then can its statistics' row counts tell the older layout
    # (one row per width) from the current one (one per width pair), as load_model reads it; of another set, k² rows
    # of the folder's could pass for k rows of the model's, so its rows are matched by width
    widths = _folder_widths(folder) if hasattr(model, "upgrade_state") else None
    if widths is not None and widths == [float(w) for w in model.width_set]:
        model.upgrade_state(source)
    elif widths is not None:
        _stats_by_width(model, source, widths, folder)
    own = model.state_dict()
    loaded = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    check_encoder_match(model, model.config, {k: v.shape for k, v in source.items()}, folder)
    shared = _shared_names(model)
    missed = sorted(shared - loaded.keys())
    if missed:  # a partial start is legitimate (other heads) but a half-loaded encoder is worth a word
        log.warning("init_from %s: %d of %d shared tensors not loaded (%s)", folder, len(missed),
                    len(shared), _why_missed(missed, source, own))
    model.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "total": len(own), "shared_missed": len(missed)}


def check_encoder_match(model: torch.nn.Module, config: dict[str, Any], shapes: dict[str, Any],
                        folder: str | Path) -> None:
    """Some of ``model``'s encoder tensors (its ``config``'s backbone) are in the folder (``shapes``: its tensors'
    shapes by name): heads or a neck alone would start a random encoder from "trained" weights."""
    own = model.state_dict()
    # weights, not counters: BN's 0-d num_batches_tracked has one name at every width and depth, so it always matches
    encoder = {k for k in _encoder_names(model) if own[k].is_floating_point()}
    if not any(k in shapes and tuple(shapes[k]) == tuple(own[k].shape) for k in encoder):
        raise ValueError(f"init_from={folder} (backbone {_backbone_name(read_model_config(folder)['model'])}): none of "
                         f"this model's {len(encoder)} encoder tensors (backbone {_backbone_name(config)}) "
                         "matches the folder's by name and shape; start from a folder trained with this backbone")


def check_init_from(cfg: Any, tasks) -> None:
    """`check_encoder_match` before the run folder (the load found it only after): the run's model as `build_module`
    builds it, on the meta device, against the shapes in the folder's weights header (no tensor read). A pruned or
    extracted folder (the run trains its architecture, a resume's too) is checked for the run's tasks instead
    (`check_folder_tasks`, from its config alone), a linearized folder for the run's family (`check_linear_start`).
    Left to the load: a slimmable model (its statistics are matched by width), a model the meta device cannot
    build."""
    from omegaconf import OmegaConf
    from safetensors import safe_open

    from mtl.io import WEIGHTS
    from mtl.models import MODELS, LinearizedModel, create_model
    from mtl.models.families import build_on_meta

    if not cfg.get("init_from"):
        return
    stored = read_model_config(cfg.init_from)["model"]
    if _fixes_architecture(stored):  # a resume's too: its architecture comes from the folder
        return check_folder_tasks(cfg.init_from, stored, tasks)
    if cfg.get("ckpt_path"):
        return
    family = cfg.get("family") or "multitask"  # (a known name: check_model_settings checked it)
    check_linear_start(cfg.init_from, issubclass(MODELS.get(family), LinearizedModel))
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    model = build_on_meta(lambda: create_model(tasks, backbone=backbone, family=family,
                                               decoder=OmegaConf.to_container(cfg.decoder, resolve=True)))
    if model is None or hasattr(model, "upgrade_state"):
        return
    with safe_open(str(Path(cfg.init_from) / WEIGHTS), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    check_encoder_match(model, {"backbone": backbone}, shapes, cfg.init_from)  # (model.config reads meta buffers)


def _why_missed(missed: list[str], source: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str:
    """How many shared tensors the folder lacks by name and how many it holds in another shape, each with its
    first example (a shape one with both shapes)."""
    absent = [k for k in missed if k not in source]
    reshaped = [k for k in missed if k in source]
    parts = [f"{len(absent)} absent from the folder, e.g. {absent[0]}"] if absent else []
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape, e.g. {k}: {tuple(source[k].shape)} in the folder, "
                     f"{tuple(own[k].shape)} here")
    return "; ".join(parts)


def _encoder_names(model: MultiTaskModel) -> set[str]:
    """The encoder's state-dict names: its ``backbone.`` tensors, or the shared ones for a family whose encoder
    has no such module (task_moe_vit: everything but the heads and routers)."""
    names = {k for k in model.state_dict() if k.startswith("backbone.")}
    return names or _shared_names(model)


def _backbone_name(config: dict[str, Any]) -> str:
    backbone = config.get("backbone")
    return repr(backbone.get("name") if isinstance(backbone, dict) else backbone)


def _folder_widths(folder: str | Path) -> list[float] | None:
    stored = (read_model_config(folder)["model"].get("backbone") or {}).get("widths")
    return None if stored is None else [float(w) for w in stored]


def _stats_by_width(model: MultiTaskModel, source: dict[str, torch.Tensor], theirs: list[float],
                    folder: str | Path) -> None:
    """A slimmable folder of another width set: its BatchNorm statistics rows (one per width, or per (cond, own)
    width pair) have the model's shape for any set of as many widths, so matched by position they would give one
    width another's statistics. Each of ``source``'s statistics tensors becomes the model's own with the rows of
    the widths both sets share copied from the folder's (in place); the others keep the model's initial values and
    are named in a warning."""
    from mtl.models.slimmable.layers import SwitchableBatchNorm2d, width_index

    lacking: set[float] = set()
    for name, m in model.named_modules():
        if not isinstance(m, SwitchableBatchNorm2d):
            continue
        k, kf = len(m.widths), len(theirs)
        for buf in ("running_means", "running_vars"):
            key, own = f"{name}.{buf}", getattr(m, buf)
            src = source.get(key)
            if src is None or src.dim() != 2 or src.shape[1] != own.shape[1]:
                continue  # absent or of another channel count: the name and shape filter tells it
            older = m.cond_key and src.shape[0] == kf  # one row per own width, shared by every cond width
            if not older and src.shape[0] != (kf * kf if m.cond_key else kf):
                source.pop(key)  # rows of no known layout: never loaded by position
                continue
            out = own.detach().clone()
            for row in range(out.shape[0]):
                j, i = divmod(row, k) if m.cond_key else (None, row)
                fi = width_index(theirs, m.widths[i])
                fj = 0 if j is None else width_index(theirs, m.widths[j])
                if fi is None or fj is None:
                    lacking.update(w for w in (m.widths[i], None if j is None else m.widths[j])
                                   if w is not None and width_index(theirs, w) is None)
                    continue
                out[row] = src[fi if older or j is None else fj * kf + fi]
            source[key] = out
    if lacking:
        log.warning("init_from %s: the folder's width set %s lacks width(s) %s of this model's %s: their BatchNorm "
                    "statistics keep their initial values (recalibrate them with model.calibrate_widths); the shared "
                    "widths' statistics are copied by width", folder, theirs, sorted(lacking), list(model.width_set))


def keep_expansion_point(model: MultiTaskModel, folder: str | Path) -> None:
    """A linearized (tangent-space) start keeps its expansion point θ0: a plain model would drop it (and
    predict another function), and a linearized model started from plain weights expands around them."""
    from mtl.models import LinearizedModel

    linear_source = check_linear_start(folder, isinstance(model, LinearizedModel))
    if isinstance(model, LinearizedModel) and not linear_source:
        model.reset_point()  # else the expansion would stay around the random initialisation
        log.info("family=linearized: expanding around the weights of %s", folder)


def check_linear_start(folder: str | Path, linear: bool) -> bool:
    """A linearized folder (returned: whether it is one) starts only a linearized model (``linear``): a plain one
    would drop its expansion point θ0. From its config alone (before the run folder, and again at the load)."""
    linear_source = read_model_config(folder)["model"].get("family") == "linearized"
    if linear_source and not linear:
        raise ValueError(f"init_from={folder} is a linearized (tangent-space) model: continue it with "
                         "family=linearized (its expansion point θ0 comes with it); a plain model, or linearize=true "
                         "(which expands around the loaded weights), would drop its θ0")
    return linear_source


def start_record(folder: str | Path) -> dict[str, Any]:
    """What a fine-tune's meta records of its start: the folder, its weights digest, and the digests of every
    model it descends from (``start_weights_digests``, nearest first), so that a merge pool recognises its θ0
    even when the start was itself a fine-tune (θ0 → ft1 → ft2: ft2 − θ0 is still a task vector of θ0)."""
    record: dict[str, Any] = {"init_from": str(Path(folder).resolve())}
    digest = recorded_weights_digest(folder)
    if digest:  # the path alone misses a θ0 rebuilt in place; merge pools compare this
        record["init_from_weights_digest"] = digest
    meta = read_model_config(folder).get("meta") or {}
    # an older start records only its own start; a linearised θ0 stands for the plain θ0 it was made from
    ancestors = meta.get("start_weights_digests") or [meta.get("init_from_weights_digest")]
    chain = [d for d in [digest, *ancestors, meta.get("linearized_from_weights_digest")] if d]
    if chain:
        record["start_weights_digests"] = list(dict.fromkeys(chain))
    return record


def _shared_names(model: MultiTaskModel) -> set[str]:
    """State-dict names of the weights every task uses (the model's ``shared_parameters``; the
    ``backbone.`` tensors for a model without them)."""
    if not hasattr(model, "shared_parameters"):
        return {k for k in model.state_dict() if k.startswith("backbone.")}
    ids = {id(p) for p in model.shared_parameters()}
    return {k for k, p in model.named_parameters() if id(p) in ids}


def folder_architecture(folder: str | Path, tasks) -> MultiTaskModel | None:
    """The architecture of a pruned model folder (its config carries a structural plan) or of an extracted
    MoE sub-network, for fine-tuning it as it is; None for an ordinary folder (its weights initialise this
    run's architecture)."""
    from mtl.models import model_from_config
    from mtl.models.surgery import PLAN_KEY, apply_plan

    stored = read_model_config(folder)["model"]
    if not _fixes_architecture(stored):
        return None
    check_folder_tasks(folder, stored, tasks)
    if (stored.get("decoder") or {}).get("experts_kept") is not None:
        return _extracted_architecture(folder, stored, tasks)
    names = sorted(t["name"] for t in stored["tasks"])
    dropped = sorted(set(names) - {t.name for t in tasks})
    log.warning("%s is pruned: training its pruned architecture (its backbone and decoder replace this run's)%s",
                folder, f"; without the heads of {dropped}" if dropped else "")
    base = model_from_config({**{k: v for k, v in stored.items() if k != PLAN_KEY},
                              "tasks": [t.to_config() for t in tasks]})
    return apply_plan(base, _restricted_plan(stored[PLAN_KEY], base) if dropped else stored[PLAN_KEY])


def check_folder_tasks(folder: str | Path, stored: dict[str, Any], tasks) -> None:
    """The run's ``tasks`` are the pruned or extracted folder's (its model config ``stored``) or a subset of them:
    a pruned model has no head sized for another task's pruned layers, an extracted sub-network no router for it.
    From the config alone (before the run folder, and again as the architecture is built)."""
    names = sorted(t["name"] for t in stored["tasks"])
    extra = sorted({t.name for t in tasks} - set(names))
    if not extra:
        return
    if (stored.get("decoder") or {}).get("experts_kept") is not None:  # kept for its own tasks only
        raise ValueError(f"{folder} holds a sub-network extracted for tasks {names} (decoder.experts_kept); fine-tune "
                         f"it on those tasks or a subset of them ({extra} have no router there), or start from the "
                         "full model's folder")
    # a new head would meet the pruned shared channels at its original width
    raise ValueError(f"{folder} holds a pruned model for tasks {names}; fine-tune it on those tasks or a subset "
                     f"of them ({extra} have no head sized for its pruned layers)")


def _fixes_architecture(stored: dict[str, Any]) -> bool:
    """A folder's model config that the run trains as it is: pruned (a structural plan) or an extracted MoE
    sub-network (``decoder.experts_kept``)."""
    from mtl.models.surgery import PLAN_KEY

    return PLAN_KEY in stored or (stored.get("decoder") or {}).get("experts_kept") is not None


def _extracted_architecture(folder: str | Path, stored: dict[str, Any], tasks) -> MultiTaskModel:
    """A task-routed MoE sub-network (``mtl-extract``: ``decoder.experts_kept``) fine-tuned as it is: built
    from this run's config it would get every expert back, the dropped ones at random."""
    from mtl.models import model_from_config

    log.warning("%s is an extracted sub-network: training its architecture (its backbone and decoder, with the "
                "experts it kept, replace this run's)", folder)
    return model_from_config({**stored, "tasks": [t.to_config() for t in tasks]})


def _restricted_plan(plan: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """The plan less the entries of modules ``model`` lacks: the heads of tasks a single-task fine-tune of a
    pruned multi-task model drops (per-task pools pruned once, merged later under one shared plan)."""
    if not isinstance(plan, dict):
        return plan  # apply_plan names what is wrong with it
    names = {n for n, _ in model.named_modules()}
    out = dict(plan)
    for part in ("modules", "layers"):
        if isinstance(plan.get(part), dict):
            out[part] = {k: v for k, v in plan[part].items() if k in names}
    return out


#: the backbone keys whose weights a run starts from (a file, timm's Hub weights); a resume's checkpoint replaces them
INITIAL_WEIGHTS = ("checkpoint_path", "pretrained")


def initial_weights(backbone: Any) -> dict[str, Any]:
    """Where the backbone's initial weights come from: its set ``backbone.checkpoint_path`` / ``pretrained``, kept
    in the run's checkpoints (the hyperparameter ``initial_weights``) as the start record ``init_from``'s is."""
    return {k: backbone[k] for k in INITIAL_WEIGHTS if backbone.get(k)}


def resume_initial_weights(cfg: Any, ckpt: dict[str, Any]) -> None:
    """A resume keeps the initial weights its checkpoint's run started from: ``backbone.checkpoint_path`` /
    ``pretrained`` left out are set to the checkpoint's (config.yaml names them as an uninterrupted run's does), the
    same ones are accepted (the file is not read, the Hub not asked: the checkpoint's weights replace them), others
    are refused in one line. A checkpoint from before the record was kept: this run's are recorded as given."""
    from omegaconf import open_dict

    stored = (ckpt or {}).get("hyper_parameters") or {}
    if "initial_weights" not in stored:
        return
    then, now = stored["initial_weights"] or {}, initial_weights(cfg.backbone)
    for key, value in now.items():
        same = then.get(key) is not None and (Path(str(value)).resolve() == Path(str(then[key])).resolve()
                                               if key == "checkpoint_path" else value == then[key])
        if not same:
            was = "none (its run did not start from one)" if then.get(key) is None else _written(then[key])
            raise ValueError(f"backbone.{key}={_written(value)} differs from the checkpoint's start {was}: its run "
                             "started from those weights (the checkpoint's replace both) and config.yaml would name "
                             f"these; resume without backbone.{key} (the checkpoint's start is kept)")
    with open_dict(cfg.backbone):
        cfg.backbone.update(then)


def check_one_start(cfg: Any) -> None:
    """``init_from`` with ``backbone.checkpoint_path`` / ``pretrained``: the folder's weights would replace the file's
    (or the Hub's) once read, and config.yaml would name both as the start; refused in one line."""
    given = initial_weights(cfg.backbone) if cfg.get("init_from") else {}
    if given:
        key, value = next(iter(given.items()))
        raise ValueError(f"init_from={cfg.init_from} and backbone.{key}={_written(value)} both set the run's initial "
                         f"weights: the folder's would replace the backbone's, read for nothing; drop "
                         f"backbone.{key} (or init_from, to start from the backbone's weights)")


def _written(value: Any) -> Any:
    """A value as an override writes it (``true``, not Python's ``True``)."""
    return str(value).lower() if isinstance(value, bool) else value
