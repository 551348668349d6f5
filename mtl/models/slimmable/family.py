"""``family: slimmable``: a MultiTaskModel whose encoder and task decoders run at chosen widths.

ECMT (Aich et al., ICCV 2023, "Efficient Controllable Multi-Task Architectures"): one slimmable
encoder + slimmable task decoders; ``set_widths(encoder=0.5, decoders={"depth": 1.0, "semseg": 0.25})``
picks the sub-network at run time, ``extract_subnetwork(widths=...)`` writes it out as a plain,
physically smaller ``multitask`` model.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from mtl.models.families import MODELS
from mtl.models.multitask import IMAGENET_MEAN, IMAGENET_STD, MultiTaskModel
from mtl.models.slimmable.decoder import SlimmableDecoder, decoder_key
from mtl.models.slimmable.layers import (SLIM_TYPES, OneValuePerChannel, SwitchableBatchNorm2d, apply_widths, channels_at,
                                         check_width, check_width_set, width_index, wkey)
from mtl.models.slimmable.resnet import ENCODER, SlimResNet
from mtl.modes import modes_restored
from mtl.tasks import Task, create_task

log = logging.getLogger(__name__)

Widths = dict[str, Any]  # {"encoder": float, "decoders": {task: float}}
ACTIVE = "active_widths"  # config key of the widths a saved model runs at (absent: full widths)


@MODELS.register("slimmable")
class SlimmableMultiTaskModel(MultiTaskModel):
    """Needs ``backbone.name: slim_resnet`` and ``decoder.name: slimmable`` with the same width set."""

    DEFAULT_PARTS = {"backbone": "slim_resnet", "decoder": "slimmable"}
    #: the training strategy that trains every width (without it only the full width learns)
    trains_with = "sandwich"

    def __init__(self, tasks: Sequence[Task], backbone: dict[str, Any], decoder: dict[str, Any] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        decoder = dict(decoder or {"name": "slimmable"})
        if decoder.get("name") == "slimmable" and "widths" not in decoder and isinstance(backbone, dict) \
                and backbone.get("widths"):  # one width set, given once (the CLI reads ${backbone.widths})
            decoder["widths"] = backbone["widths"]
        super().__init__(tasks, backbone, decoder, mean, std)
        if not isinstance(self.backbone, SlimResNet) or self.backbone.widths is None:
            raise ValueError(f"family 'slimmable' needs backbone.name=slim_resnet with a width set, "
                             f"got backbone {self._backbone_cfg.get('name')!r}")
        if not isinstance(self.decoder, SlimmableDecoder) or self.decoder.widths is None:
            raise ValueError(f"family 'slimmable' needs decoder.name=slimmable with a width set, "
                             f"got decoder {self._decoder_cfg.get('name')!r}")
        if self.backbone.widths != self.decoder.widths:
            raise ValueError(f"backbone.widths {list(self.backbone.widths)} and decoder.widths "
                             f"{list(self.decoder.widths)} must be the same width set")
        self._backbone_cfg["widths"] = list(self.backbone.widths)
        self._decoder_cfg["widths"] = list(self.decoder.widths)
        self._widths: Widths = {}
        self.set_widths(encoder=1.0, decoders=1.0)

    @property
    def config(self) -> dict[str, Any]:
        """Stores the active widths (``active_widths``) unless they are the full ones, so a folder
        saved after ``set_widths`` reloads at them and older folders load as before."""
        cfg = {**super().config, "family": "slimmable"}
        if self._widths != self.max_widths():
            cfg[ACTIVE] = self.widths
        return cfg

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "SlimmableMultiTaskModel":
        model = super().from_config({k: v for k, v in cfg.items() if k != ACTIVE})
        if cfg.get(ACTIVE) is not None:
            model.set_config(cfg[ACTIVE])
        return model

    @property
    def width_set(self) -> tuple[float, ...]:
        return self.backbone.widths

    # --- widths -------------------------------------------------------------------------------------
    @property
    def widths(self) -> Widths:
        """The current configuration ``{"encoder": w, "decoders": {task: w}}`` (a copy)."""
        return copy.deepcopy(self._widths)

    def max_widths(self) -> Widths:
        return {"encoder": 1.0, "decoders": {t: 1.0 for t in self.tasks}}

    def min_widths(self) -> Widths:
        w = self.width_set[0]
        return {"encoder": w, "decoders": {t: w for t in self.tasks}}

    def resolve_widths(self, encoder: float | None = None, decoders: float | Mapping[str, float] | None = None,
                       base: Widths | None = None, in_set: bool = True) -> Widths:
        """A full, checked configuration: values given here over ``base`` (default: the current one).
        ``in_set=False``: any width in (0, 1] passes (one outside the set can still be calibrated)."""
        base = copy.deepcopy(base if base is not None else self._widths) or self.max_widths()
        if encoder is not None:
            base["encoder"] = self._check(encoder, "encoder width", in_set)
        if decoders is not None:
            if isinstance(decoders, Mapping):
                unknown = [t for t in decoders if t not in self.tasks]
                if unknown:
                    raise KeyError(f"unknown task(s) {unknown} in decoder widths; this model has: {', '.join(self.tasks)}")
                for t, w in decoders.items():
                    base["decoders"][t] = self._check(w, f"decoder width of task {t!r}", in_set)
            else:
                w = self._check(decoders, "decoder width", in_set)
                base["decoders"] = {t: w for t in self.tasks}
        return base

    def set_widths(self, encoder: float | None = None, decoders: float | Mapping[str, float] | None = None) -> Widths:
        """``set_widths(encoder=0.5, decoders={"depth": 1.0, "semseg": 0.25})``; tasks not named keep
        their width, ``decoders=0.5`` sets all. Every width must be in ``width_set``. Returns the config."""
        cfg = self.resolve_widths(encoder, decoders)
        groups = {ENCODER: cfg["encoder"], **{decoder_key(t): w for t, w in cfg["decoders"].items()}}
        apply_widths(self, groups)
        self._widths = cfg
        return self.widths

    def set_config(self, widths: Mapping[str, Any]) -> Widths:
        """``set_widths`` from one dict ``{"encoder": w, "decoders": {...} or w}``."""
        self._check_keys(widths)
        return self.set_widths(widths.get("encoder"), widths.get("decoders"))

    @contextlib.contextmanager
    def at_widths(self, widths: Mapping[str, Any]) -> Iterator["SlimmableMultiTaskModel"]:
        saved = self.widths
        self.set_config(widths)
        try:
            yield self
        finally:
            self.set_config(saved)

    def _check(self, width: Any, what: str, in_set: bool = True) -> float:
        w = check_width(width, what)
        if not in_set:
            return w
        if width_index(self.width_set, w) is None:
            raise ValueError(f"{what} {width!r} is not in this model's width set {list(self.width_set)}; "
                             "widths outside it need BN recalibration first: model.calibrate_widths([w], batches) "
                             "(mtl-extract does it on calib.batches)")
        return self.width_set[width_index(self.width_set, w)]

    @staticmethod
    def _check_keys(widths: Mapping[str, Any]) -> None:
        if not isinstance(widths, Mapping):
            raise TypeError(f"widths must be a dict {{'encoder': w, 'decoders': {{task: w}}}}, got {widths!r}")
        extra = sorted(set(widths) - {"encoder", "decoders"})
        if extra:
            raise KeyError(f"unknown key(s) {extra} in widths; expected 'encoder' and 'decoders'")

    def upgrade_state(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Bring a stored state dict of an older layout up to this model's, in place (``mtl.load_model``
        calls it before checking shapes); returns the keys it changed. The one older layout: head norms
        with one row of statistics per head width instead of one per (encoder, head) width pair."""
        changed = []
        for name, m in self.named_modules():
            if not isinstance(m, SwitchableBatchNorm2d):
                continue
            for buf in ("running_means", "running_vars"):
                key = f"{name}.{buf}"
                upgraded = m.upgrade_stats(state[key]) if key in state else None
                if upgraded is not None:
                    state[key] = upgraded
                    changed.append(key)
        return changed

    def _check_new_widths(self, widths: Iterable[float], key: str) -> list[float]:
        """The ``widths`` outside the set, refused where the set cannot hold them beside its entries (data-free)."""
        outside = [w for w in widths if width_index(self.width_set, w) is None]
        check_width_set(self.width_set + tuple(outside), f"{key}: the width set {list(self.width_set)} plus {outside}:")
        return outside

    # --- BN recalibration for widths outside the set ----------------------------------------------------
    @torch.no_grad()
    def calibrate_widths(self, widths: Iterable[float], batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]]) -> list[float]:
        """Add ``widths`` to the width set: each gets its own BN statistics, estimated (cumulative
        average) from ``batches`` (images, or batch dicts with ``"image"``) — one pass per
        configuration a new row belongs to (the encoder at ``w``; every (encoder, decoder) pair with
        ``w`` for the heads' norms). Norms whose row already exists run on their stored statistics
        and are left as they were. If a batch fails, the model is left exactly as it was."""
        new = [check_width(w, "width to calibrate") for w in widths]
        trained = [w for w in new if width_index(self.width_set, w) is not None]
        if trained:  # said, not done in silence: a trained row's statistics are the ones it was trained with
            log.warning("calibrate_widths: %s already in the width set %s; their trained BN statistics are kept "
                        "(only widths outside the set are estimated)", trained, list(self.width_set))
        outside = self._check_new_widths(new, "calibrate_widths")
        batches = list(batches)
        if not batches:
            raise ValueError("calibrate_widths needs at least one batch")
        bns = [m for m in self.modules() if isinstance(m, SwitchableBatchNorm2d)]
        saved_widths = self.widths
        before = [(bn.widths, bn.running_means, bn.running_vars, bn.momentum, bn.num_batches_tracked.clone()) for bn in bns]
        cfgs = (self._backbone_cfg.get("widths"), self._decoder_cfg.get("widths"))
        old_set = self.width_set
        with modes_restored(self):  # every module's own mode comes back (a mixed model stays mixed)
            ok = False
            try:
                for w in new:
                    for bn in bns:
                        bn.add_width(w)
                full = bns[0].widths
                self.backbone.widths = self.decoder.widths = full
                self._backbone_cfg["widths"] = self._decoder_cfg["widths"] = list(full)
                fresh = [w for w in full if width_index(old_set, w) is None]
                done: set[tuple[int, int]] = set()  # (norm, row) estimated by an earlier pass of this call
                # two rounds: first the rows of one width (encoder, neck), then the heads' rows of an (encoder,
                # head) pair, so a head's statistics are those of the features it will get (stored ones)
                for paired, enc, dec in itertools.product((False, True), full, full):
                    if enc not in fresh and dec not in fresh:
                        continue
                    self.set_widths(encoder=enc, decoders=dec)
                    for i, bn in enumerate(bns):  # only new rows learn, each once; the others serve as they are
                        k = bn.row()
                        calibrating = (i, k) not in done and bool(bn.cond_key) == paired and (
                            bn.width in fresh or (bool(bn.cond_key) and bn.cond_width in fresh))
                        bn.train(calibrating)
                        if calibrating:
                            done.add((i, k))
                            bn.running_means[k].zero_()
                            bn.running_vars[k].fill_(1.0)
                            bn.momentum = None
                            bn.num_batches_tracked.zero_()
                    if not any(bn.training for bn in bns):
                        continue  # nothing left to estimate in this configuration
                    for b in batches:
                        images = b["image"] if isinstance(b, Mapping) else b
                        try:
                            self(images)
                        except OneValuePerChannel as e:
                            names = {m: n for n, m in self.named_modules()}
                            raise OneValuePerChannel(e.module, e.shape, (
                                f"calibrate_widths: width(s) {[w for w in (enc, dec) if w in fresh]} (encoder {enc}, decoders "
                                f"{dec}): layer {names.get(e.module, '?')} gets input {e.shape} from a batch of {len(images)} "
                                "image(s); BN statistics need more than one value per channel, so calibrate on batches "
                                "of at least 2 images")) from None
                ok = True
            finally:
                for bn, (ws, means, vars_, momentum, nbt) in zip(bns, before):
                    bn.momentum = momentum
                    bn.num_batches_tracked.copy_(nbt)
                    if not ok:  # roll back: no uncalibrated width may stay in the set
                        bn.widths, bn.running_means, bn.running_vars = ws, means, vars_
                if not ok:
                    self.backbone.widths = self.decoder.widths = old_set
                    self._backbone_cfg["widths"], self._decoder_cfg["widths"] = cfgs
                self.set_config(saved_widths)
        if outside:  # where these rows' statistics came from: a folder saved or extracted later says so
            meta = getattr(self, "meta", None) or {}
            record = {**meta.get("calibrated_widths", {}), **{wkey(w): {"batches": len(batches)} for w in outside}}
            self.meta = {**meta, "calibrated_widths": record}
        return list(self.width_set)

    # --- physically smaller sub-network -----------------------------------------------------------------
    @classmethod
    def check_width_values(cls, widths: Mapping[str, Any]) -> None:
        """What a ``widths`` request is without a model: its keys, and every value a width in (0, 1], named as
        ``resolve_widths`` names it (mtl-extract debug=smoke judges it before training its model)."""
        cls._check_keys(widths)
        dec = widths.get("decoders")
        named = {"encoder width": widths.get("encoder"),
                 **({f"decoder width of task {t!r}": w for t, w in dec.items()} if isinstance(dec, Mapping)
                    else {"decoder width": dec})}
        for what, w in named.items():
            if w is not None:
                check_width(w, what)

    def check_extraction(self, widths: Mapping[str, Any] | None = None) -> None:
        """Refuse a bad ``extract_subnetwork`` request before any data (mtl-extract: before its run folder): keys,
        tasks and values; a width outside the set is left to ``extract_subnetwork`` (mtl-extract calibrates it) unless
        the set could not hold it beside its entries."""
        self.check_width_values(widths or {})
        cfg = self.resolve_widths((widths or {}).get("encoder"), (widths or {}).get("decoders"), in_set=False)
        self._check_new_widths([cfg["encoder"], *cfg["decoders"].values()], "widths=")  # ones calibration would refuse

    def extract_subnetwork(self, widths: Mapping[str, Any] | None = None) -> MultiTaskModel:
        """A plain ``multitask`` model holding the sliced weights (and BN statistics) of the
        configuration ``widths`` (default: the current one); it computes what this model computes there."""
        self.check_width_values(widths or {})
        cfg = self.resolve_widths((widths or {}).get("encoder"), (widths or {}).get("decoders"))
        we = cfg["encoder"]
        bb = {k: v for k, v in self._backbone_cfg.items() if k != "widths"}
        bb.update(widths=None, stem=channels_at(self.backbone.stem[0].out_channels, we),
                  channels=[channels_at(st[0].conv1.out_channels, we) for st in self.backbone.stages],
                  depths=[len(st) for st in self.backbone.stages])
        neck = self.decoder.neck.refine[0].out_channels
        dec = {"name": "slimmable", "widths": None, "channels": channels_at(neck, we),
               "head_channels": {t: channels_at(self._hidden(t), cfg["decoders"][t]) for t in self.tasks}}
        tasks = [create_task(**t.to_config()) for t in self.tasks.values()]
        plain = MultiTaskModel(tasks, bb, dec, self.mean.flatten().tolist(), self.std.flatten().tolist())
        with self.at_widths(cfg):
            _copy_sliced(self, plain)
        plain.to(self.mean.device).train(self.training)
        plain.extraction_report = {"widths": copy.deepcopy(cfg)}  # the full configuration, unnamed widths included
        return plain

    def _hidden(self, task: str) -> int:
        first = self.decoder.heads[task].body[0]
        return first.out_channels if isinstance(first, nn.Conv2d) else first.out_features


@torch.no_grad()
def _copy_sliced(slim: nn.Module, plain: nn.Module) -> None:
    """Copy every slimmable layer's active slice into the same-named plain layer (same topology)."""
    targets = dict(plain.named_modules())
    for name, m in slim.named_modules():
        if not isinstance(m, SLIM_TYPES):
            continue
        t = targets[name]
        if isinstance(m, SwitchableBatchNorm2d):
            c, k = t.num_features, m.row()
            t.weight.copy_(m.weight[:c])
            t.bias.copy_(m.bias[:c])
            t.running_mean.copy_(m.running_means[k, :c])
            t.running_var.copy_(m.running_vars[k, :c])
            t.num_batches_tracked.copy_(m.num_batches_tracked)
        else:
            cin, cout = m.active()
            t.weight.copy_(m.weight[:cout, :cin])
            if m.bias is not None:
                t.bias.copy_(m.bias[:cout])
