"""A multi-task model's prunable layers, from Torch-Pruning's dependency graph.

A *layer* is one group of coupled channels (a conv's output channels plus every BatchNorm, residual
partner and consumer input that must shrink with them), named after its root module. Its *units* are
channels, or whole attention heads for a ViT block's ``qkv`` projection (pruning heads keeps the
attention scale, so the pruned model computes exactly what the masked one does), or sets of channels
that removal only takes together (``pruning.ties``: GhostNet's cheap branch).

Two ways to remove units, with the same result for BatchNorm/ReLU networks:
  * ``mask``: zero every coupled weight of the units in place (a search can try and undo cheaply);
  * ``remove``: shrink the tensors for real through the dependency graph and return the structural plan.
Task output layers are protected (their output channels are the task's predictions).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from mtl.models.slimmable.layers import _Sliced
from mtl.models.surgery import diff_plan, snapshot
from mtl.modes import eval_mode
from mtl.registry import meant
from pruning import ties
from pruning.flops import FlopsEstimate

if TYPE_CHECKING:  # imported where used: torch_pruning imports timm (seconds), which `import pruning` does not need
    import torch_pruning as tp

log = logging.getLogger(__name__)

PRUNABLE_DECODERS = ("hps",)
PRUNABLE_FAMILIES = ("multitask",)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


class PruningError(ValueError):
    """The model (or a layer of it) cannot be pruned as asked."""


@dataclass
class Dep:
    module: str                 # name of the module whose tensors shrink
    is_out: bool                # its output side (rows of a weight, norm affine) or its input side
    local: list[list[int]]      # per unit of the layer: this module's indices


@dataclass
class Layer:
    name: str                   # root module (a conv or linear whose output channels lead the group)
    size: int                   # units before pruning
    unit: str = "channels"      # "channels", "heads" or "channel sets"
    channels_per_unit: int = 1  # root channels of one unit (a head: its q, k and v rows)
    deps: list[Dep] = field(default_factory=list)
    flops: float = 0.0          # FLOPs of the conv/linear members and attention (per sample), for ordering
    removed_before: int = 0     # units earlier rounds removed (`pruning.prune` sets it): ratios count the original width

    @property
    def original_size(self) -> int:
        """Units before the first round: what a ``ratio`` is a fraction of."""
        return self.size + self.removed_before

    def channel_idxs(self, units: Iterable[int]) -> list[int]:
        """Root-module channel indices of the given units."""
        root = next(d for d in self.deps if d.module == self.name and d.is_out)
        return sorted(i for u in units for i in root.local[u])


def output_layers(model: nn.Module) -> dict[str, str]:
    """{task: name of the last conv/linear in its head}: the task's prediction layer, never pruned."""
    heads = getattr(getattr(model, "decoder", None), "heads", None)
    if not isinstance(heads, nn.ModuleDict):
        raise PruningError(f"{type(model).__name__}: no decoder.heads, so the task output layers to protect are unknown")
    out = {}
    for task, head in heads.items():
        last = [n for n, m in head.named_modules() if isinstance(m, (_ConvNd, nn.Linear))]
        if not last:
            raise PruningError(f"decoder.heads.{task}: no conv or linear output layer found")
        out[task] = f"decoder.heads.{task}" + (f".{last[-1]}" if last[-1] else "")  # "": the head is the layer
    return out


def check_prunable(model: nn.Module, allow_pruned: bool = False) -> None:
    """Families and decoders whose structure this pruner does not know yet are refused up front."""
    from mtl.io import require_model
    from mtl.models.surgery import model_config

    require_model(model, "prune")  # a folder path: say how to load it, not "no config"
    if not isinstance(getattr(model, "config", None), dict):
        raise PruningError(f"{type(model).__name__} is not an mtlkit model family (no config); cannot prune it")
    decoder = getattr(model, "decoder", None)
    check_prunable_config(model_config(model), type(model).__name__, type(decoder).__name__, allow_pruned)


def check_prunable_config(cfg: dict[str, Any], who: str, decoder_class: str = "decoder",
                          allow_pruned: bool = False) -> None:
    """`check_prunable` from a model config (a folder's ``config.json["model"]``: family, decoder, a stored
    ``pruning`` plan), so a folder is judged before its weights and data are read; ``who`` names the model."""
    from mtl.models.surgery import PLAN_KEY

    family = cfg.get("family", "multitask")
    if family not in PRUNABLE_FAMILIES:
        raise PruningError(f"model family {family!r} ({who}) cannot be pruned yet; "
                           f"prunable families: {', '.join(PRUNABLE_FAMILIES)}")
    dec = (cfg.get("decoder") or {}).get("name", "hps")
    if dec not in PRUNABLE_DECODERS:
        raise PruningError(f"module 'decoder' ({decoder_class}, decoder {dec!r}) cannot be pruned yet; "
                           f"prunable decoders: {', '.join(PRUNABLE_DECODERS)}")
    if not allow_pruned and cfg.get(PLAN_KEY) is not None:
        raise PruningError("this model was pruned already; prune the original model again instead "
                           "(plans do not compose yet)")


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, (list, tuple)) else [out]


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    # the graph is traced through autograd: a frozen parameter (requires_grad=False) leaves no trace,
    # and its layers would silently drop out of pruning; its flags are restored afterwards. The trace runs
    # in eval mode (no BN statistics move; Torch-Pruning switches to it anyway) and every mode comes back
    import torch_pruning as tp

    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.enable_grad(), eval_mode(model):
            return tp.DependencyGraph().build_dependency(model, example, output_transform=_outputs, verbose=False)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _unhandled(dg: tp.DependencyGraph, m: nn.Module) -> str | None:
    """Why the dependency graph's pruner would resize ``m`` wrongly or fail on it (None: it will not)."""
    if isinstance(m, _Sliced):
        return "is a slimmable layer (it runs a width-chosen slice of its weight; choose a width instead)"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        buffers = {n for n, b in m.named_buffers(recurse=False) if b is not None}
        missing = m.track_running_stats and not {"running_mean", "running_var"} <= buffers
        extra = sorted(buffers - {"running_mean", "running_var", "num_batches_tracked"})
        if missing or extra:
            return (f"keeps running statistics the pruner does not resize (buffers {sorted(buffers)}, "
                    "not running_mean/running_var alone)")
    # an unknown module type is traced as an element-wise op: its parameters would be guessed at
    import torch_pruning as tp

    if dg.get_pruner_of_module(m) is None or tp.ops.module2type(m) == tp.ops.OPTYPE.ELEMENTWISE:
        return "holds parameters the dependency graph has no pruner for"
    return None


def _is_qkv(model: nn.Module, name: str) -> nn.Module | None:
    if not name.endswith(".qkv"):
        return None
    parent = model.get_submodule(name.rsplit(".", 1)[0])
    return parent if hasattr(parent, "num_heads") and hasattr(parent, "head_dim") else None


_RESIDUAL_SCALES = ("LayerScale", "LayerScale2d")


def check_module_names(model: nn.Module, names: Iterable[str], what: str = "ignored_layers") -> None:
    """Every one of ``names`` is a module of ``model`` (``model.named_modules()``), else a `PruningError` naming the
    unknown ones with the module names close to them."""
    known = [n for n, _ in model.named_modules()]
    unknown = [n for n in names if n not in set(known)]
    if unknown:
        raise PruningError(f"{what} names unknown module(s) {unknown}{meant(unknown, known)}; the model's module "
                           "names are those of model.named_modules() (print(mtl.load_model(<model folder>)) shows them)")


class LayerGraph:
    """The prunable layers of ``model`` (the model itself is not modified by building this: weights, buffers,
    ``requires_grad`` flags and every module's train/eval mode stay as they were)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, ignored_layers: Sequence[str] = (),
                 allow_pruned: bool = False):
        check_prunable(model, allow_pruned)
        self.model = model
        self.example = example
        names = {m: n for n, m in model.named_modules()}
        self.protected = output_layers(model)
        self.ignored = set(ignored_layers or ())
        check_module_names(model, sorted(self.ignored))
        # timm's LayerScale scales the residual stream, which is never pruned (its LayerNorms tie it
        # together): left whole without the user listing every block's ls1/ls2
        scales = [n for m, n in names.items() if type(m).__name__ in _RESIDUAL_SCALES and n not in self.ignored]
        self.ignored |= set(scales)
        dg = build_graph(model, example)
        self._check_handled(dg, names)
        ignored_params = {id(p) for n in self.ignored for p in model.get_submodule(n).parameters()}
        modules = dict(model.named_modules())
        attention = {n: a for n in modules if (a := _is_qkv(model, n)) is not None}
        self.estimate = FlopsEstimate(model, example, attention)
        protected = [model.get_submodule(n) for n in self.protected.values()]
        self.layers: list[Layer] = []
        self.skipped: dict[str, str] = {n: "LayerScale of the residual stream (never pruned): left whole" for n in scales}
        for group in dg.get_all_groups(ignored_layers=protected):
            layer = self._layer(dg, group, names, ignored_params)
            if layer is not None:
                self.layers.append(layer)
        if not self.layers:
            why = "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:3])
            raise PruningError("no prunable layer found (every channel group touches a protected or ignored layer"
                               + (f", or was left whole: {why}" if why else "") + ")")
        self.by_name = {l.name: l for l in self.layers}

    def __repr__(self) -> str:
        return (f"LayerGraph({type(self.model).__name__}: {len(self.layers)} prunable layers "
                f"({sum(l.size for l in self.layers)} units), {len(self.protected)} protected, "
                f"{len(self.skipped)} skipped, {len(self.ignored)} ignored)")

    def _check_handled(self, dg: tp.DependencyGraph, names: dict[nn.Module, str]) -> None:
        for m, name in names.items():
            if name in self.ignored or any(name.startswith(i + ".") for i in self.ignored):
                continue
            if list(m.children()) or not any(True for _ in m.parameters(recurse=False)):
                continue
            why = _unhandled(dg, m)
            if why:
                raise PruningError(f"module {name!r} ({type(m).__name__}) {why}; pass ignored_layers=['{name}'] "
                                   "to leave it and every channel it touches unpruned")

    def _layer(self, dg, group, names, ignored_params) -> Layer | None:
        root_module = group[0].dep.target.module
        root = names[root_module]
        deps: list[Dep] = []
        size = len(group[0].idxs)
        attn = _is_qkv(self.model, root)
        unit_of = (lambda c: c) if attn is None else (lambda c: (c % (attn.num_heads * attn.head_dim)) // attn.head_dim)
        n_units = size if attn is None else attn.num_heads
        for item in group:
            target = item.dep.target.module
            if isinstance(target, nn.Parameter):
                self.skipped[root] = "touches a parameter outside any module (e.g. a position embedding)"
                return None
            if not isinstance(target, nn.Module) or target not in names:
                continue  # reshapes, element-wise ops: no tensors of their own
            name = names[target]
            if any(id(p) in ignored_params for p in target.parameters(recurse=False)):
                self.skipped[root] = f"touches ignored layer {name!r}"
                return None
            if isinstance(target, (nn.LayerNorm, nn.GroupNorm)):
                # it normalises over the channels it would lose: masking and removal differ (and a
                # GroupNorm's channel count must stay a multiple of its groups)
                self.skipped[root] = f"touches {type(target).__name__} {name!r} (normalises across channels)"
                return None
            extra = [n for n, _ in target.named_parameters(recurse=False) if n not in ("weight", "bias")]
            if isinstance(target, (_ConvNd, nn.Linear)) and extra:  # e.g. timm's ScaledStdConv2d `gain`
                self.skipped[root] = f"touches {type(target).__name__} {name!r} (its {extra} would not be resized)"
                return None
            if isinstance(target, _ConvNd) and target.groups > 1 and not (
                    target.groups == target.in_channels == target.out_channels):
                # grouped, or depthwise with a channel multiplier (input j feeds outputs k·j … k·j+k−1):
                # channels are tied to their group; not handled
                mult = (f", a depthwise convolution with channel multiplier {target.out_channels // target.groups}"
                        if target.groups == target.in_channels else "")
                self.skipped[root] = (f"touches grouped convolution {name!r} (groups={target.groups}, "
                                      f"{target.in_channels} in, {target.out_channels} out{mult})")
                return None
            local: list[list[int]] = [[] for _ in range(n_units)]
            for idx, r in zip(item.idxs, item.root_idxs):
                local[unit_of(int(r))].append(int(idx))
            deps.append(Dep(name, dg.is_out_channel_pruning_fn(item.dep.handler), local))
        members = {d.module for d in deps}
        flops = sum(self.estimate.leaf.get(m, 0.0) for m in members) + self.estimate.attn.get(root, 0.0)
        if attn is not None:
            if not ties.consistent(dg, root_module, root, deps, n_units, names):
                self.skipped[root] = "removing a head removes channels outside the head"
                return None
            return Layer(root, n_units, "heads", attn.head_dim * 3, deps, flops)
        untangled = ties.untangle(dg, root_module, root, deps, n_units, names, Dep)
        if isinstance(untangled, str):
            self.skipped[root] = untangled
            return None
        deps, per_unit = untangled
        if per_unit > 1:  # tied root channels go together
            return Layer(root, len(deps[0].local), "channel sets", per_unit, deps, flops)
        return Layer(root, n_units, "channels", 1, deps, flops)

    # --- masks ------------------------------------------------------------------------------
    @torch.no_grad()
    def mask(self, model: nn.Module, layer: Layer, units: Iterable[int]) -> None:
        """Zero every weight coupled to ``units`` of ``layer`` in ``model`` (a copy of the graph's model)."""
        units = list(units)
        for dep in layer.deps:
            idx = torch.tensor(sorted(i for u in units for i in dep.local[u]), dtype=torch.long)
            if idx.numel() == 0:
                continue
            m = model.get_submodule(dep.module)
            for pname, p in m.named_parameters(recurse=False):
                if p.ndim == 0:
                    continue
                if isinstance(m, NORMS) or p.ndim == 1:
                    if isinstance(m, NORMS) or dep.is_out:
                        p[idx] = 0
                elif dep.is_out or (isinstance(m, _ConvNd) and m.groups > 1):
                    p[idx] = 0
                else:
                    p[:, idx] = 0

    # --- FLOPs estimate for a set of removed units -----------------------------------------------
    def total_flops(self) -> float:
        """Per-sample FLOPs as the report counts them (conv/linear, attention products, the rest)."""
        return self.estimate.total()

    def flops_after(self, removed: dict[str, set[int]]) -> float:
        """Per-sample FLOPs once ``removed`` ({layer: units}) are gone (exact for conv/linear and attention;
        the rest is assumed not to shrink)."""
        r_out: dict[str, int] = {}
        r_in: dict[str, int] = {}
        r_heads: dict[str, int] = {}
        for lname, units in removed.items():
            layer = self.by_name[lname]
            if layer.unit == "heads":
                r_heads[lname] = len(set(units))
            for (module, is_out), idxs in ties.planned(layer.deps, sorted(set(units))).items():
                bucket = r_out if is_out else r_in
                bucket[module] = bucket.get(module, 0) + len(idxs)
        return self.estimate.after(r_out, r_in, r_heads)

    # --- physical removal --------------------------------------------------------------------
    def remove(self, removed: dict[str, Iterable[int]], source: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
        """A pruned copy of ``source`` (default: the graph's model) without ``removed`` units, and its plan."""
        unknown = [n for n in removed if n not in self.by_name]
        if unknown:
            raise PruningError(f"no prunable layer named {unknown[0]!r}")
        model = copy.deepcopy(source if source is not None else self.model).eval()
        before = snapshot(model)
        # pruning replaces each shrunk tensor with a new nn.Parameter (trainable): frozen ones stay frozen
        trainable = {n: p.requires_grad for n, p in model.named_parameters()}
        dg = build_graph(model, self.example)
        kept: dict[str, Any] = {}
        for layer in self.layers:  # every layer, pruned or not, so the plan lists the whole model
            lname = layer.name
            units = sorted(set(int(u) for u in removed.get(lname, ())))
            if len(units) >= layer.size:
                raise PruningError(f"layer {lname!r}: cannot remove all {layer.size} {layer.unit}")
            if units:
                root = model.get_submodule(lname)
                pruner = dg.get_pruner_of_module(root)
                group = dg.get_pruning_group(root, pruner.prune_out_channels, layer.channel_idxs(units))
                expected = ties.planned(layer.deps, units)
                widths = ties.widths(model, expected)
                group.prune()
                wrong = ties.mismatch(model, expected, widths)
                if wrong:
                    raise PruningError(f"pruning layer {lname!r} {wrong}; "
                                       f"pass ignored_layers=['{lname}'] to leave it whole")
                attn = _is_qkv(model, lname)
                if attn is not None:
                    attn.num_heads -= len(units)
                    if hasattr(attn, "attn_dim"):
                        attn.attn_dim = attn.num_heads * attn.head_dim
            kept[lname] = {"unit": layer.unit, "size": layer.size,
                           "kept": [u for u in range(layer.size) if u not in set(units)]}
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])
        plan = {"modules": diff_plan(before, model), "layers": kept}
        return model, plan


def describe(graph: LayerGraph, fn: Callable[[Layer], Any] | None = None) -> list[dict[str, Any]]:
    return [{"layer": l.name, "unit": l.unit, "size": l.size, "flops": l.flops, **(fn(l) if fn else {})} for l in graph.layers]
