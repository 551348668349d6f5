"""A pool of models to merge (θ0 + fine-tuned model folders) and a pool of tasks to evaluate on.

Model folders come from `mtl-train`: each fine-tune knows its tasks, its architecture and (in its
meta) the data config it was trained on, so a merged model is evaluated on exactly that data.
A merged model is the merged shared weights plus every task's own head (heads are not merged).
"""
from __future__ import annotations

import copy
import inspect
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from mtl.io import CONFIG, WEIGHTS, load_state, read_checked_config, read_json, read_model_config, recorded_weights_digest
from mtl.models import MultiTaskModel, model_from_config
from mtl.models.decoders.base import DECODERS
from mtl.models.surgery import PLAN_KEY
from mtl.modes import eval_mode
from mtl.tasks import Task, create_task

from .sources import check_distinct_inputs

HEAD_PREFIX = "decoder.heads."


@dataclass
class Member:
    path: Path
    config: dict[str, Any]
    tasks: list[str]
    data: dict[str, Any] | None
    individual: dict[str, dict[str, float]] = field(default_factory=dict)


# families whose per-task weights are not under the decoder's `heads.` (the pool's one per-task place)
_OWN_WEIGHTS_ELSEWHERE = {"task_moe_vit": "each task's weights also live in task_heads.<t>, the MoE blocks' "
                                          "routers.<t> and task_embed.<t>, which a merged model cannot hold per task"}


@dataclass
class ModelPool:
    pretrained: Path
    members: list[Member]

    @classmethod
    def from_folders(cls, pretrained: str | Path, models: Sequence[str | Path], base_among: bool = False) -> "ModelPool":
        """``base_among``: θ0 may be one of ``models`` (for a method merging the models themselves, e.g. average;
        it then contributes its weights and its own tasks' heads)."""
        models = model_list(models, "models")
        if not models:
            raise ValueError("no fine-tuned models given: pass models=[folder,...] or pool=<manifest.json>")
        check_distinct_inputs(pretrained, models, ("pretrained", "models"), base_among=base_among)
        pre_cfg = read_checked_config(pretrained)["model"]  # edited configs named
        cfgs = [read_checked_config(m) for m in models]
        check_pool_configs(pretrained, pre_cfg, [(m, c["model"]) for m, c in zip(models, cfgs)])
        members = [Member(Path(m), c["model"], [t["name"] for t in c["model"]["tasks"]], c.get("meta", {}).get("data"),
                          c.get("meta", {}).get("test", {})) for m, c in zip(models, cfgs)]
        return cls(Path(pretrained), members)

    @classmethod
    def from_manifest(cls, path: str | Path, base_among: bool = False) -> "ModelPool":
        """The pool a manifest lists; ``base_among`` as for `from_folders`."""
        return cls.from_folders(*manifest_paths(path), base_among=base_among)

    @property
    def task_names(self) -> list[str]:
        return [t for m in self.members for t in m.tasks]

    @property
    def member_paths(self) -> list[Path]:
        return [m.path for m in self.members]

    def tasks(self) -> list[Task]:
        return [create_task(**t) for m in self.members for t in m.config["tasks"]]

    def merged_model(self, shared: dict[str, torch.Tensor]) -> MultiTaskModel:
        """One model with every member's tasks: `shared` weights + each task's own fine-tuned head."""
        cfg = copy.deepcopy(self.members[0].config)
        cfg["tasks"] = [t for m in self.members for t in m.config["tasks"]]
        plans = [m.config[PLAN_KEY] for m in self.members if isinstance(m.config.get(PLAN_KEY), dict)]
        if plans:  # fine-tunes of one pruned model: each plan covers the shared layers and its own head(s)
            cfg[PLAN_KEY] = {**plans[0], **{part: {k: v for p in plans for k, v in (p.get(part) or {}).items()}
                                            for part in ("modules", "layers")}}
        with torch.random.fork_rng(devices=[]):  # its random init is replaced below: not the caller's stream
            model = model_from_config(cfg)
        state = dict(shared)
        for m in self.members:
            own = load_state(m.path)
            state.update({k: v for k, v in own.items() if k.startswith(HEAD_PREFIX)})
        missing = [k for k in model.state_dict() if k not in state]
        if missing:
            raise ValueError(f"merged weights lack {missing[:5]} ({len(missing)} keys); was a key filter too strict?")
        model.load_state_dict({k: state[k] for k in model.state_dict()})
        return model.eval()

    def member_model(self, i: int) -> MultiTaskModel:
        from mtl.io import load_model

        return load_model(self.members[i].path)


def manifest_paths(path: str | Path) -> tuple[Path, list[Path]]:
    """A pool manifest's `pretrained` folder and `models` folders (relative ones: the manifest's folder's)."""
    spec = read_json(path)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a pool manifest is a JSON object with keys 'pretrained' and 'models', "
                         f"got a {type(spec).__name__}")
    for key in ("pretrained", "models"):
        if key not in spec:
            raise ValueError(f"{path}: missing key {key!r}")
    if not isinstance(spec["pretrained"], str) or not spec["pretrained"]:
        raise ValueError(f"{path}: key 'pretrained' must be a folder path (a string), got {spec['pretrained']!r}")
    models = model_list(spec["models"], f'{path}: "models"')
    if not models:  # said here, naming the file, not later as "no fine-tuned models given"
        raise ValueError(f'{path}: "models" is empty; list at least one fine-tuned model folder')
    base = Path(path).parent
    resolve = lambda p: (base / p) if not Path(p).is_absolute() else Path(p)  # noqa: E731
    return resolve(spec["pretrained"]), [resolve(p) for p in models]


def check_pool_family(pretrained: str | Path, model_cfg: dict[str, Any]) -> None:
    """A family whose per-task weights a merged pool model cannot hold is refused, not found later as a key mismatch
    or a model missing its routers."""
    why = _OWN_WEIGHTS_ELSEWHERE.get(model_cfg.get("family"))
    if why:
        raise ValueError(f"{pretrained}: model family {model_cfg['family']!r} cannot be merged by a model pool yet: "
                         f"{why}; merge its state dicts with merging.merge(..., task_keys=...) and compose")


def check_task_names(names: Sequence[str]) -> None:
    """Every task of the pool has its own name: the merged model holds every member's heads side by side."""
    dup = sorted({t for t in names if names.count(t) > 1})
    if dup:
        raise ValueError(f"task name(s) {dup} appear in more than one fine-tuned model; rename the tasks")


def check_pool_configs(pretrained: str | Path, pre_cfg: dict[str, Any] | None,
                       members: Sequence[tuple[str | Path, dict[str, Any]]]) -> None:
    """What a pool must satisfy from config.json alone (its family, one θ0, one pruning plan, one architecture,
    distinct task names): `ModelPool.from_folders` and, before a job's run folder, `precheck_pool`. `pre_cfg`: θ0's
    config.json `model`, None where it does not read (nothing is compared with it then)."""
    if pre_cfg:
        check_pool_family(pretrained, _checked_arch(pretrained, pre_cfg))  # said before the members are compared
        check_same_pruning(pretrained, [m for m, _ in members])  # an unread θ0 would pass for an unpruned one
    check_same_start(pretrained, [m for m, _ in members])
    for i, (m, mc) in enumerate(members):
        _checked_arch(m, mc)
        for key in ("backbone", "decoder") if pre_cfg else ():
            if _arch(key, mc.get(key)) != _arch(key, pre_cfg.get(key)):
                raise ValueError(f"{m}: its {key} {mc.get(key)} differs from the pretrained model's "
                                 f"{pre_cfg.get(key)} ({pretrained}); models must share an architecture to merge")
        first, fc = members[0]
        if i and _arch("decoder", mc.get("decoder"), heads=True) != _arch("decoder", fc.get("decoder"), heads=True):
            raise ValueError(f"{m}: its decoder {mc.get('decoder')} builds task heads unlike {first}'s "
                             f"{fc.get('decoder')}; the merged model holds every member's head in one decoder")
    check_task_names([t["name"] for _, mc in members for t in mc.get("tasks", [])])


def precheck_pool(pretrained: str | Path, models: Sequence[str | Path]
                  ) -> tuple[dict[str, Any], dict[str, str | None] | None]:
    """`check_pool_configs` for a job to run before its run folder; a folder that is missing or not an mtlkit model
    folder is left to the job's own checks (`start_run`, then `from_folders`, name it). Returns the pretrained
    model's config.json `model` ({} if unread) and the models' `{task: kind}` (None unless every one was read)."""
    def model_config(folder: str | Path) -> dict[str, Any] | None:  # checked as from_folders reads it: an edited one named
        folder = Path(folder)
        both = (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()
        return read_checked_config(folder)["model"] if both else None

    pre = model_config(pretrained) or {}
    read = [(m, model_config(m)) for m in models]
    check_pool_configs(pretrained, pre, [(m, mc) for m, mc in read if mc is not None])
    if any(mc is None for _, mc in read):
        return pre, None
    return pre, {t["name"]: t.get("kind") for _, mc in read for t in mc.get("tasks", [])}


def model_list(models: Any, where: str) -> list:
    """`models` as a list; one string (a single folder, or `models=a` without brackets on the command
    line) is refused: it would be taken character by character."""
    if isinstance(models, (str, os.PathLike)):
        raise ValueError(f"{where} must be a list of model folders, got the single path {str(models)!r} "
                         "(on the command line: models=[a,b])")
    if isinstance(models, Mapping) or not isinstance(models, Iterable):  # a dict's keys would pass as paths
        raise ValueError(f"{where} must be a list of model folder paths, got a {type(models).__name__}")
    out = list(models)
    bad = [m for m in out if not isinstance(m, (str, os.PathLike)) or not str(m)]
    if bad:
        raise ValueError(f"{where} must be a list of model folder paths; {bad[0]!r} is not one")
    return out


def _checked_arch(folder: str | Path, model_cfg: dict[str, Any]) -> dict[str, Any]:
    for key in ("backbone", "decoder"):
        if not isinstance(model_cfg.get(key), (dict, type(None))):
            raise ValueError(f"{Path(folder) / 'config.json'}: key 'model.{key}' must be a mapping, "
                             f"got {type(model_cfg[key]).__name__} {model_cfg[key]!r}")
    return model_cfg


def _arch(key: str, cfg: dict[str, Any] | None, heads: bool = False) -> dict[str, Any]:
    """What must match for weights to merge. A decoder's config is completed with its constructor's
    defaults (folders written before an option existed omit it); options that shape only the task heads
    (the class's `HEAD_OPTIONS`) are left out unless `heads`: every member brings its own heads, and the
    pretrained model's are never merged."""
    cfg = dict(cfg or {})
    if key != "decoder" or cfg.get("name") not in DECODERS:
        return cfg
    cls = DECODERS.get(cfg["name"])
    defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
    cfg = {**defaults, **cfg}
    return cfg if heads else {k: v for k, v in cfg.items() if k not in getattr(cls, "HEAD_OPTIONS", ())}


@torch.no_grad()
def evaluate(model: MultiTaskModel, task: str, datamodule, split: str, max_batches: int | None = None,
             device: str | torch.device | None = None, tally: dict[str, int] | None = None) -> dict[str, float]:
    """All metrics of one task on one split of its data module, on `device` (default: the model's);
    `tally["samples"]` receives how many samples were scored (fewer than the split's under `max_batches`).

    The caller's model is left as it was: a model on another device is evaluated as a copy moved
    there, and every module's train/eval mode is restored afterwards.
    """
    t = model.tasks[task]
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    if next(model.parameters()).device != device:
        model = copy.deepcopy(model).to(device)
    with eval_mode(model):
        return _evaluate(model, t, task, datamodule, split, max_batches, device, tally if tally is not None else {})


def _evaluate(model, t: Task, task: str, datamodule, split: str, max_batches: int | None, device,
              tally: dict[str, int]) -> dict[str, float]:
    metrics = {name: m.to(device) for name, m in t.metrics().items()}
    tally["samples"] = 0
    loader = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader, "train": datamodule.train_dataloader}[split]()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        pred = model(batch["image"].to(device, non_blocking=True), tasks=[task])[task]
        target = batch[t.target_key].to(device, non_blocking=True)
        tally["samples"] += len(target)
        for m in metrics.values():
            m.update(pred, target)
    return {name: float(m.compute()) for name, m in metrics.items()}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise any torch device string."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"eval.device={device!r} is not a device (cpu, cuda, cuda:1, auto): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"eval.device={device} but CUDA is not available here; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"eval.device={device} but torch sees {torch.cuda.device_count()} CUDA device(s) here "
                         "(cuda:0, ...); use cuda or auto")
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)  # torch.xpu, ...
    if device.type not in ("cpu", "cuda") and not getattr(backend, "is_available", lambda: False)():
        # torch.device takes any type it names (mps off a Mac, meta): moving a model there failed after the run folder
        raise ValueError(f"eval.device={device} but {device.type.upper()} is not available here; use cpu or auto")
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must compare equal
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def member_datamodule(member: Member, overrides: dict[str, Any] | None = None):
    from mtl.data import create_datamodule
    from mtl.folder_data import rebuild_config

    if not member.data:
        raise ValueError(f"{member.path}: its config.json has no meta.data, so its evaluation data is unknown")
    kw = rebuild_config(member.data, overrides or {}, member.path / "config.json", "eval.data")
    dm = create_datamodule(kw.pop("name"), **kw)
    dm.setup("test")
    return dm


def score(task: Task, metrics: dict[str, float]) -> float:
    """The task's primary metric."""
    return metrics[task.primary]


def normalized(task: Task, merged: float, individual: float) -> float:
    """merged / individual for higher-is-better metrics, individual / merged otherwise; NaN where that is
    undefined (`normalized_undefined` says why)."""
    if normalized_undefined(task, merged, individual):
        return float("nan")
    if task.directions.get(task.primary, True):
        return merged / individual
    return individual / merged


def normalized_undefined(task: Task, merged: float | None, individual: float) -> str | None:
    """Why `normalized` has no value, or None: a score that is not finite, or a 0 it would divide by (a
    higher-is-better fine-tune's, a lower-is-better merged model's). `merged=None`: for any merged model,
    i.e. the fine-tuned reference alone."""
    higher = task.directions.get(task.primary, True)
    ratio = "merged / fine-tuned" if higher else "fine-tuned / merged"
    for who, value, divides in (("fine-tuned", individual, higher), ("merged", merged, not higher)):
        if value is None:
            continue
        if not math.isfinite(value):
            return f"the {who} model's {task.primary} is {value}"
        if divides and value == 0:
            return f"the {who} model's {task.primary} is 0 (normalized = {ratio})"
    return None


def _config(folder: str | Path) -> dict[str, Any] | None:
    """An mtlkit model folder's config.json; None for any other folder (a Hugging Face one, read by eval=none merges,
    a missing one) or one whose config.json does not read (its reader names that when the weights are loaded)."""
    if not (Path(folder) / "config.json").is_file():
        return None
    try:
        return read_model_config(folder)
    except ValueError:
        return None


def _shared_plan(folder: str | Path) -> dict[str, Any] | None:
    """The kept channels of every shared (non-head) layer of a pruned mtlkit model folder; None for an
    unpruned one or a folder that is not an mtlkit model (a Hugging Face folder)."""
    plan = ((_config(folder) or {}).get("model") or {}).get("pruning")
    if not isinstance(plan, dict):
        return None
    return {k: v.get("kept") for k, v in (plan.get("layers") or {}).items() if ".heads." not in k}


def check_same_pruning(pretrained: str | Path, models: Sequence[str | Path]) -> None:
    """Pruned models merge only when every shared layer kept the same channels: equal shapes alone do not
    say so, and θ_t − θ0 of different channels is meaningless."""
    ref = _shared_plan(pretrained)
    for m in models:
        plan = _shared_plan(m)
        if plan == ref:
            continue
        if ref is None or plan is None:
            which, other = (m, pretrained) if plan is not None else (pretrained, m)
            raise ValueError(f"{which} is pruned and {other} is not; only models pruned by one plan (the same "
                             "kept channels in every shared layer), or unpruned ones, merge")
        differ = sorted(k for k in set(ref) | set(plan) if ref.get(k) != plan.get(k))
        raise ValueError(f"{m} was pruned differently from {pretrained}: layer(s) {differ[:4]}"
                         + (" ..." if len(differ) > 4 else "") + " kept other channels; only models pruned by one "
                         "plan (the same kept channels in every shared layer) merge")


def _meta(folder: str | Path) -> dict[str, Any]:
    """An mtlkit model folder's meta; {} for any other folder (a Hugging Face one, read by eval=none merges)."""
    return (_config(folder) or {}).get("meta") or {}


def check_same_start(pretrained: str | Path, models: Sequence[str | Path]) -> None:
    """Task vectors θ_t − θ0 of fine-tunes of another θ0 mean nothing: a member that records the weights it
    descends from (mtl-train's meta.start_weights_digests, nearest first: θ0 → ft1 → ft2 records ft1's and θ0's;
    older folders only meta.init_from_weights_digest) must name the pool's θ0 among them. A linearised θ0 also
    stands for the plain θ0 it was made from (meta.linearized_from_weights_digest): tangent-space fine-tunes
    start from that one. Members without the record (older folders, other trainers) are trusted."""
    own = _meta(pretrained)
    starts = {d for d in (own.get("linearized_from_weights_digest"), recorded_weights_digest(pretrained)) if d}
    for m in models:
        if recorded_weights_digest(m) in starts:
            continue  # θ0 itself among the models (average: a soup with the base)
        meta = _meta(m)
        chain = meta.get("start_weights_digests") or [d for d in [meta.get("init_from_weights_digest")] if d]
        if chain and starts and not starts & set(chain):
            earlier = f", itself descending from {', '.join(chain[1:])}" if len(chain) > 1 else ""
            raise ValueError(f"{m}: fine-tuned from another θ0 ({meta.get('init_from', '?')}, weights digest "
                             f"{chain[0]}{earlier}) than the pool's pretrained {pretrained} (weights digest "
                             f"{' or '.join(sorted(starts))}); merge fine-tunes of one θ0")
