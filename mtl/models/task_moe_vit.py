"""Task-routed MoE ViT (M3ViT, Liang et al., NeurIPS 2022): a small ViT whose every ``decoder.every``-th
block (by default every second) replaces its MLP with E experts and top-k routing conditioned on the
task, either by one gate per task or by one gate that sees a learned task embedding.

The backbone is task-conditioned, so ``forward(x, tasks)`` runs it once per requested task (the blocks
before the first MoE layer are computed once and shared); all tasks' tokens go through one sparse
dispatch per MoE layer. ``forward(x, tasks=[t])`` runs only task t's routed experts.

Training extras reach the trainer through two hooks: ``aux_loss()`` ({task: loss}, load balance
cv²(importance) + cv²(load) weighted by ``balance_weight`` plus the optional Mod-Squad task–expert
mutual-information term) and ``shared_representation = False`` (no single tensor every head reads,
so representation-level balancers refuse; the aux losses reach the shared weights directly).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl.models.decoders.hps import create_head
from mtl.models.families import MODELS
from mtl.models.multitask import IMAGENET_MEAN, IMAGENET_STD, normalize_images, select_tasks
from mtl.models.moe import StackedExperts, TopKRouter, check_top_k, task_expert_mutual_information
from mtl.registry import check_bool, check_int, check_number, unknown_settings
from mtl.tasks import Task, task_from_config

log = logging.getLogger(__name__)

GATES = ("per_task", "task_embedding")
VIT_DEFAULTS = {"img_size": 64, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0}
MOE_DEFAULTS = {"channels": None, "num_experts": 16, "top_k": 4, "expert_hidden": None, "every": 2, "gate": "per_task",
                "renormalize": None, "noisy": True, "balance_weight": 0.01, "mi_weight": 0.0, "experts_kept": None}


class TaskMoE(nn.Module):
    """E stacked expert MLPs shared by all tasks, task-conditioned top-k routers, sparse dispatch."""

    def __init__(self, dim: int, tasks: Sequence[str], num_experts: int, top_k: int, expert_hidden: int, gate: str,
                 renormalize: bool, noisy: bool, kept: Sequence[int] | None = None):
        super().__init__()
        kept = list(range(num_experts)) if kept is None else [int(e) for e in kept]
        bad = [e for e in kept if not 0 <= e < num_experts]
        if bad or len(set(kept)) != len(kept) or not kept:
            raise ValueError(f"decoder.experts_kept {kept} must be distinct expert ids in [0, {num_experts}) "
                             f"(num_experts={num_experts}){f'; out of range: {bad}' if bad else ''}")
        if len(kept) < int(top_k):
            raise ValueError(f"decoder.experts_kept keeps {len(kept)} expert(s), fewer than top_k={top_k}")
        check_top_k(top_k, num_experts)
        self.num_experts, self.top_k, self.gate_kind = int(num_experts), int(top_k), gate
        self.register_buffer("expert_ids", torch.tensor(kept, dtype=torch.long), persistent=False)
        self.experts = StackedExperts(len(kept), dim, expert_hidden)
        make = lambda: TopKRouter(dim, num_experts, top_k, renormalize, noisy)  # noqa: E731
        if gate == "per_task":
            self.routers = nn.ModuleDict({t: make() for t in tasks})
        else:
            self.router = make()
            # N(0, 1): the gate reads LayerNorm output (unit scale), so distinct random embeddings route
            # tasks apart from init, as M3ViT's one-hot task code does; zeros made every task route alike
            # and left the MI loss at its stationary point (MI = 0, zero gradient)
            self.task_embed = nn.ParameterDict({t: nn.Parameter(torch.randn(dim)) for t in tasks})
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self.stats_in_training = False  # whether ``stats`` come from a training-mode forward

    #: what a forward overwrites besides its output (the last forward's routing statistics); a measuring
    #: forward on a live model (``mtl.modes.eval_mode``) puts them back, so a pending aux loss survives it
    FORWARD_STATE = ("stats", "stats_in_training")

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``copy.deepcopy``, SWA/EMA's ``AveragedModel``, ``torch.save(model)``) leave
        out the last forward's statistics: a training forward's ``balance`` / ``mean_probs`` belong to its
        autograd graph, which torch cannot copy. A copy starts as a new module: no pending aux loss."""
        state = super().__getstate__()
        state["stats"], state["stats_in_training"] = {}, False
        return state

    def route(self, task: str, h: torch.Tensor):
        if self.gate_kind == "per_task":
            return self.routers[task](h, self._selectable())
        return self.router(h + self.task_embed[task], self._selectable())

    def _selectable(self) -> torch.Tensor | None:
        return None if len(self.expert_ids) == self.num_experts else self.expert_ids

    def forward(self, h: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
        """``h``: (T·B, N, D), task-major (rows of task i are the i-th block of B)."""
        shape = h.shape
        chunks = h.reshape(len(tasks), -1, shape[-1])
        index, weight, self.stats, self.stats_in_training = [], [], {}, self.training
        for task, tokens in zip(tasks, chunks):
            r = self.route(task, tokens)
            index.append(r.index)
            weight.append(r.weight)
            if not _exporting():  # usage statistics: training and analysis only, not part of the graph
                self.stats[task] = {"balance": r.balance, "mean_probs": r.probs.mean(0),
                                    "counts": torch.bincount(self.expert_ids[r.index].flatten(),
                                                             minlength=self.num_experts).detach()}
        flat = chunks.reshape(-1, shape[-1])
        index, weight = torch.cat(index), torch.cat(weight)
        if _exporting():  # ONNX has no data-dependent dispatch: every expert on every token, same outputs
            # zeros shaped from a tensor, not from len(): a traced len() would fix the batch size
            weight = weight.to(flat.dtype)
            gates = torch.zeros_like(weight[:, :1]).repeat(1, len(self.expert_ids)).scatter(-1, index, weight)
            return torch.einsum("te,eto->to", gates, self.experts.dense(flat)).view(shape)
        return self.experts.sparse(flat, index, weight).view(shape)


def _exporting() -> bool:
    """Inside torch.onnx.export (either exporter) or torch.export."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, moe: TaskMoE | None = None):
        from timm.layers import Mlp  # here, not at import: see mtl.models.backbones
        from timm.models.vision_transformer import Attention

        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.mlp = moe if moe is not None else Mlp(dim, mlp_hidden)
        self.is_moe = moe is not None

    def forward(self, x: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + (self.mlp(self.norm2(x), tasks) if self.is_moe else self.mlp(self.norm2(x)))


@MODELS.register("task_moe_vit")
class TaskMoEViT(nn.Module):
    """``TaskMoEViT(tasks, backbone={...ViT sizes...}, decoder={...MoE and head settings...})``; keys and
    defaults: VIT_DEFAULTS, MOE_DEFAULTS (a null value means the default). ``decoder.channels``: the task
    heads' width (a 1x1 projection from embed_dim; null: embed_dim). ``decoder.renormalize`` null means
    ``top_k > 1`` and is stored resolved. ``_stored=True`` (set by ``from_config`` only; create_model refuses it
    as no option): a saved folder's settings, which may hold ``top_k=1`` with ``renormalize=true`` (the default
    before 2026-12-06); it loads with a warning instead of the refusal a new model gets."""

    CONFIG_KEYS = ("tasks",)
    #: what create_model names when a setting is passed beside backbone= / decoder= instead of in them
    PART_SETTINGS = {"backbone": tuple(VIT_DEFAULTS), "decoder": tuple(MOE_DEFAULTS)}
    DEFAULT_PARTS = {"backbone": {}, "decoder": {}}  # VIT_DEFAULTS, MOE_DEFAULTS

    shared_representation = False

    def __init__(self, tasks: Sequence[Task], backbone: dict[str, Any] | None = None, decoder: dict[str, Any] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *, _stored: bool = False):
        super().__init__()
        if not tasks:
            raise ValueError("a TaskMoEViT needs at least one task")
        self.tasks = {t.name: t for t in tasks}
        if len(self.tasks) != len(tasks):
            raise ValueError(f"task names must be unique, got {[t.name for t in tasks]}")
        self._vit = _merge_known(VIT_DEFAULTS, backbone, "backbone")
        self._vit.pop("name", None)
        self._moe = _merge_known(MOE_DEFAULTS, decoder, "decoder")
        self._moe.pop("name", None)
        v, m = self._vit, self._moe
        _check_moe_settings(m, _stored)
        dim, depth, heads, every = int(v["embed_dim"]), int(v["depth"]), int(v["num_heads"]), int(m["every"])
        if dim % heads:
            raise ValueError(f"backbone.embed_dim={dim} is not divisible by backbone.num_heads={heads}")
        if int(v["img_size"]) % int(v["patch_size"]):
            raise ValueError(f"backbone.img_size={v['img_size']} is not divisible by backbone.patch_size={v['patch_size']}")
        if not 1 <= every <= depth:  # every > depth: no MoE layer at all
            raise ValueError(f"decoder.every={every} must be in [1, backbone.depth={depth}]")
        if m["gate"] not in GATES:
            raise ValueError(f"decoder.gate must be one of {GATES}, got {m['gate']!r}")
        n_exp, mlp_hidden = int(m["num_experts"]), int(dim * float(v["mlp_ratio"]))
        check_top_k(int(m["top_k"]), n_exp, "decoder.")
        expert_hidden = m["expert_hidden"]
        if expert_hidden is None:  # the dense MLP split into E experts: same parameters, k/E of its FLOPs
            if mlp_hidden % n_exp:
                raise ValueError(f"decoder.num_experts={n_exp} does not divide the MLP hidden size {mlp_hidden} "
                                 "(embed_dim x mlp_ratio); change num_experts or set decoder.expert_hidden")
            expert_hidden = mlp_hidden // n_exp
        self.moe_layers = [i for i in range(depth) if i % every == every - 1]
        kept = m["experts_kept"] or [None] * len(self.moe_layers)
        if len(kept) != len(self.moe_layers):
            raise ValueError(f"decoder.experts_kept has {len(kept)} entries, the model has {len(self.moe_layers)} MoE layers")
        grid = int(v["img_size"]) // int(v["patch_size"])
        self.patch_embed = nn.Conv2d(3, dim, int(v["patch_size"]), stride=int(v["patch_size"]))
        self.pos_embed = nn.Parameter(torch.randn(1, dim, grid, grid) * 0.02)
        names = list(self.tasks)
        moes = iter(kept)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_hidden, TaskMoE(dim, names, n_exp, int(m["top_k"]), int(expert_hidden), m["gate"],
                                                  m["renormalize"], m["noisy"], next(moes))
                  if i in self.moe_layers else None)
            for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        channels = dim if m["channels"] is None else m["channels"]
        self.task_heads = nn.ModuleDict({t.name: TaskHead(t, dim, channels) for t in tasks})
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.record_usage = False
        self._usage: dict[str, torch.Tensor] = {}

    # --- config round trip -----------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return {"family": "task_moe_vit", "tasks": [t.to_config() for t in self.tasks.values()],
                "backbone": {"name": "task_moe_vit", **copy.deepcopy(self._vit)},
                "decoder": {"name": "task_moe_vit", **copy.deepcopy(self._moe)},
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "TaskMoEViT":
        tasks = [task_from_config(t) for t in cfg["tasks"]]
        return cls(tasks, cfg.get("backbone"), cfg.get("decoder"), cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD),
                   _stored=True)

    # --- forward ----------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_images(x, self.mean, self.std, self)

    def encode(self, x: torch.Tensor, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """{task: (B, D, h, w) token map} after the task-conditioned backbone."""
        if not tasks:  # as the multitask family: no task, no prediction
            return {}
        x = self.normalize(x)  # first: it names a wrong shape (no batch dimension, not 3 channels)
        self._check_input_size(x)
        f = self.patch_embed(x)
        b, d, h, w = f.shape
        pos = self.pos_embed if self.pos_embed.shape[-2:] == (h, w) else \
            F.interpolate(self.pos_embed, size=(h, w), mode="bicubic", align_corners=False)
        tok = (f + pos).flatten(2).transpose(1, 2)
        first = self.moe_layers[0] if self.moe_layers else len(self.blocks)
        for blk in self.blocks[:first]:  # task-independent prefix: once for all tasks
            tok = blk(tok, tasks)
        tok = tok.repeat(len(tasks), 1, 1)
        for blk in self.blocks[first:]:
            tok = blk(tok, tasks)
        if self.record_usage:
            self._record(tasks)
        maps = self.norm(tok).transpose(1, 2).reshape(len(tasks), b, d, h, w)
        return dict(zip(tasks, maps))

    def _check_input_size(self, x: torch.Tensor) -> None:
        """The strided patch embedding drops a remainder of rows / columns and the heads upsample back over
        them, so an edge would be predicted from pixels never seen: refused, as timm's ViTs do."""
        patch, (h, w) = self.patch_embed.stride[0], (int(n) for n in x.shape[-2:])
        if h % patch or w % patch:
            raise ValueError(f"task_moe_vit: input {h}x{w} is not divisible by backbone.patch_size={patch} (the patch "
                             f"embedding would drop its last {h % patch} row(s) and {w % patch} column(s)); resize or "
                             f"pad the images to a multiple of {patch}")

    def shared(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every task's backbone output (per task: the backbone is task-conditioned)."""
        return self.encode(x, list(self.tasks))

    def heads(self, z: dict[str, torch.Tensor], out_size: tuple[int, int], tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        return {t: self.task_heads[t](z[t], out_size) for t in self._check_tasks(tasks)}

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        names = self._check_tasks(tasks)
        return self.heads(self.encode(x, names), tuple(x.shape[-2:]), names)

    def _check_tasks(self, tasks: Iterable[str] | None) -> list[str]:
        return select_tasks(self.tasks, tasks)

    # --- MoE bookkeeping ----------------------------------------------------------------------
    def moe_modules(self) -> list[TaskMoE]:
        return [self.blocks[i].mlp for i in self.moe_layers]

    def aux_loss(self) -> dict[str, torch.Tensor]:
        """Per task: balance_weight × Σ_layers cv²(importance) + cv²(load), minus mi_weight × the
        task–expert mutual information shared equally by the tasks of the last forward (training
        mode only; empty otherwise)."""
        moes = self.moe_modules()
        layers = [m.stats for m in moes if m.stats]
        # an eval forward's statistics (usage counts, calibration) are no training loss, even once train() is back
        if not layers or not self.training or not all(m.stats_in_training for m in moes):
            return {}
        bw, mw = float(self._moe["balance_weight"]), float(self._moe["mi_weight"])
        tasks = list(layers[0])
        out = {t: bw * sum(s[t]["balance"] for s in layers) for t in tasks}
        if mw and len(tasks) > 1:
            mi = sum(task_expert_mutual_information(torch.stack([s[t]["mean_probs"] for t in tasks])) for s in layers)
            out = {t: v - mw * mi / len(tasks) for t, v in out.items()}
        return out

    def _record(self, tasks: Sequence[str]) -> None:
        for t in tasks:
            counts = torch.stack([m.stats[t]["counts"] for m in self.moe_modules()]).cpu()
            self._usage[t] = self._usage.get(t, 0) + counts

    @property
    def usage_rows(self) -> list[str]:
        return [f"block {i}" for i in self.moe_layers]

    #: what ``expert_usage`` counts: (token, top-k slot) pairs, so each token adds k per MoE layer
    usage_unit = "routed tokens"

    def expert_usage(self, reset: bool = False) -> dict[str, torch.Tensor]:
        """Tokens routed to each expert, {task: (moe layers, E)}, since the last reset."""
        out = dict(self._usage)
        if reset:
            self._usage = {}
        return out

    # --- parameter groups -------------------------------------------------------------------
    def task_parameters(self, task: str) -> list[nn.Parameter]:
        own = list(self.task_heads[task].parameters())
        for m in self.moe_modules():
            own += list(m.routers[task].parameters()) if m.gate_kind == "per_task" else [m.task_embed[task]]
        return [p for p in own if p.requires_grad]

    def shared_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for t in self.tasks for p in self.task_parameters(t)}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    # --- single-task extraction ---------------------------------------------------------------
    def extract_subnetwork(self, task: str, calib: Any, min_share: float = 0.0) -> "TaskMoEViT":
        from mtl.models.task_moe_extract import extract_task

        return extract_task(self, task, calib, min_share)

    def check_extraction(self, task: str, calib: Any, min_share: float = 0.0) -> None:
        """Refuse a bad ``extract_subnetwork`` request before any data is routed."""
        from mtl.models.task_moe_extract import check_request

        check_request(self, task, calib, min_share)


class TaskHead(nn.Module):
    """A 1x1 projection to the head width, then the task's head (as in decoder=hps)."""

    def __init__(self, task: Task, dim: int, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, channels, 1) if channels != dim else nn.Identity()
        self.head = create_head(task, channels)

    def forward(self, z: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return self.head(self.proj(z), out_size)


def _merge_known(defaults: dict[str, Any], given: dict[str, Any] | None, where: str) -> dict[str, Any]:
    given = {k: v for k, v in dict(given or {}).items() if v is not None}
    if given.get("name") not in (None, "task_moe_vit"):  # first: another backbone's keys are not the problem
        raise ValueError(f"{where}.name must be 'task_moe_vit' for family task_moe_vit, got {given['name']!r}")
    unknown = sorted(set(given) - set(defaults) - {"name"})
    if unknown:
        raise ValueError(unknown_settings(where, unknown, list(defaults)))
    return {**defaults, **given}


def _check_moe_settings(m: dict[str, Any], stored: bool) -> None:
    """Each MoE setting by its decoder key: int(2.5) or bool("no") would build another model than asked.
    Resolves ``renormalize`` null in place."""
    for key in ("every", "num_experts", "top_k"):
        check_int(f"decoder.{key}", m[key], low=1)
    for key in ("expert_hidden", "channels"):
        if m[key] is not None:
            check_int(f"decoder.{key}", m[key], low=1, note=" or null")
    if m["renormalize"] is None:
        m["renormalize"] = m["top_k"] > 1
    for key in ("renormalize", "noisy"):
        check_bool(f"decoder.{key}", m[key])
    if m["renormalize"] and m["top_k"] == 1:
        why = "the one kept gate weight p/p is always 1, so the task loss gives the router no gradient"
        if not stored:
            raise ValueError(f"decoder.renormalize=true with decoder.top_k=1: {why}; leave decoder.renormalize "
                             "null (raw probability for top_k=1, as the Switch Transformer) or set it false")
        log.warning("decoder.top_k=1 with decoder.renormalize=true (a folder saved before 2026-12-06): %s; "
                    "outputs are as saved, but training it further leaves its routers to the balance loss", why)
    for key in ("balance_weight", "mi_weight"):
        check_number(f"decoder.{key}", m[key])
