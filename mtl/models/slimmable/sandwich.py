"""``strategy: sandwich``: how a slimmable multi-task model trains (Yu & Huang 2019; Aich et al. 2023).

Each step trains the widest configuration on the labels (the module's standard step, with the
configured balancer), then, accumulating gradients before the one optimiser step:

* the smallest configuration (``train_min``) and ``num_random`` random ones (encoder width and every task decoder's
  width drawn independently from the width set) — the *sandwich rule*;
* with ``inplace_distill``, the sub-networks learn from the widest network's predictions of this very
  step (detached) instead of the labels — *in-place distillation*;
* with ``cikd``, Configuration-Invariant KD: the sub-network's shared representation (encoder + neck)
  is pulled towards the widest network's (detached) by a mean-squared error weighted ``cikd_weight``.
  ``cikd_match`` says how the channel counts are reconciled:

  - ``projection``: a learned 1x1 convolution maps the sub-width features to the full width's
    channels (FitNets-style; the decoders never see the projection);
  - ``slice``: the sub-width features must equal the widest network's *first* channels — the same
    channels a decoder reads at that encoder width — so the representation the decoders consume is
    itself made width-invariant, with no extra parameters.

  ``cikd_level`` says which features: ``neck`` (the fused representation all heads read) or ``stages``
  (every multi-scale encoder feature the neck fuses, one loss per stage, averaged) — the encoder-level
  form, closer to the paper's wording. The widest network's stage features are taken from this step's
  own training pass (a hook on the encoder), so the stage form costs no extra forward pass.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtl.models.slimmable.family import SlimmableMultiTaskModel
from mtl.models.slimmable.layers import channels_at
from mtl.registry import check_bool, check_int, check_number
from mtl.strategies import STRATEGIES, TrainingStrategy
from mtl.tasks import Task

log = logging.getLogger(__name__)


def distill_loss(task: Task, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """How far a sub-network's raw output is from the widest network's, per kind of output."""
    if task.kind in ("semseg", "classification"):  # class logits: KL(teacher || student) over classes
        return F.kl_div(F.log_softmax(student.float(), 1), F.softmax(teacher.float(), 1), reduction="none").sum(1).mean()
    if task.kind == "edges":  # binary logits
        return F.binary_cross_entropy_with_logits(student.float(), torch.sigmoid(teacher.float()))
    if task.kind == "normals":  # directions, as the task's own loss reads them: 1 − cos(student, teacher)
        # an L1 on the raw vectors rewarded their length too, which the cosine loss ignores: lengths grew
        # ~50x, the cosine's gradient (∝ 1/length) vanished and normals stalled at every width
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()
    return F.l1_loss(student.float(), teacher.float())  # regression-like outputs


@STRATEGIES.register("sandwich")
class Sandwich(TrainingStrategy):
    def __init__(self, model: nn.Module, num_random: int = 2, train_min: bool = True, inplace_distill: bool = True,
                 cikd: bool = True, cikd_weight: float = 0.1, cikd_match: str = "projection", cikd_level: str = "neck"):
        super().__init__()
        if not isinstance(model, SlimmableMultiTaskModel):
            family = getattr(model, "config", {}).get("family", type(model).__name__)
            raise ValueError(f"strategy 'sandwich' needs a model of family 'slimmable', got {family!r}")
        # named, never bool("no") (true) or int(1.5) (1): an ablation switch must do what it says
        check_int("strategy.num_random", num_random, low=0)
        for key, value in (("train_min", train_min), ("inplace_distill", inplace_distill), ("cikd", cikd)):
            check_bool(f"strategy.{key}", value)
        if not train_min and num_random == 0:  # no sub-network left: what strategy.name=sandwich exists to prevent
            raise ValueError("strategy.train_min=false with strategy.num_random=0 trains the full width only; the narrower "
                             "widths never learn and keep their initial statistics (keep train_min=true or set "
                             "num_random >= 1)")
        self.num_random, self.train_min = num_random, train_min
        if len(model.width_set) < 2:  # the smallest and random widths are the full one: each step trains it again
            log.warning("strategy 'sandwich' with the width set %s: every sub-network is the full one (no width to "
                        "switch to); give backbone.widths at least two entries", list(model.width_set))
        check_number("strategy.cikd_weight", cikd_weight)
        # weight 0 is CI-KD off: no projections, so gradient clipping sees the same parameter list as
        # ``cikd=false`` (zero gradients of idle projections change its float rounding)
        self.cikd_weight = float(cikd_weight)
        self.inplace_distill, self.cikd = bool(inplace_distill), bool(cikd) and self.cikd_weight > 0
        if cikd_match not in ("projection", "slice"):
            raise ValueError(f"strategy.cikd_match must be 'projection' or 'slice', got {cikd_match!r}")
        self.cikd_match = cikd_match
        if cikd_level not in ("neck", "stages"):
            raise ValueError(f"strategy.cikd_level must be 'neck' or 'stages', got {cikd_level!r}")
        self.cikd_level = cikd_level
        # full-width channels of each matched feature: the neck's output, or every encoder stage the neck reads
        fulls = [model.decoder.neck.refine[0].out_channels] if cikd_level == "neck" else list(model.backbone.channels)
        # one projection per (feature, sub-width of the set): sub-width channels -> full-width channels.
        # Initialised on a fork of the random stream, so that a run with and one without CI-KD draw the same
        # random widths and batches afterwards: the ablation is paired, its difference is CI-KD's alone.
        with torch.random.fork_rng(devices=[]):
            self.proj = nn.ModuleDict({
                self._key(w, i, cikd_level): nn.Conv2d(channels_at(full, w), full, 1)
                for i, full in enumerate(fulls) for w in model.width_set if w < 1.0
            }) if self.cikd and cikd_match == "projection" else nn.ModuleDict()
        self._stage_hook = None
        self._teacher_stages: list[torch.Tensor] | None = None

    def idle_parameters(self) -> bool:
        # one projection per sub-width of the set, and a step samples only some widths
        return len(self.proj) > 0

    @staticmethod
    def _key(width: float, stage: int = 0, level: str = "neck") -> str:
        w = f"{width:g}".replace(".", "_")
        return w if level == "neck" else f"s{stage}_{w}"

    def cikd_loss(self, z: torch.Tensor, teacher_z: torch.Tensor, width: float, stage: int = 0) -> torch.Tensor:
        if self.cikd_match == "slice":
            return F.mse_loss(z, teacher_z[:, : z.shape[1]])
        return F.mse_loss(self.proj[self._key(width, stage, self.cikd_level)](z), teacher_z)

    def stages_loss(self, feats: list[torch.Tensor], teachers: list[torch.Tensor], width: float) -> torch.Tensor:
        """Mean over the encoder's output stages of each stage's CI-KD loss."""
        return torch.stack([self.cikd_loss(f, t, width, i) for i, (f, t) in enumerate(zip(feats, teachers))]).mean()

    def _remove_stage_hook(self) -> None:
        if self._stage_hook is not None:
            self._stage_hook.remove()
            self._stage_hook = None

    def configs(self, model: SlimmableMultiTaskModel) -> list[dict[str, Any]]:
        ws = model.width_set
        out = [model.min_widths()] if self.train_min else []
        for _ in range(self.num_random):
            pick = lambda: ws[int(torch.randint(len(ws), (1,)))]  # noqa: E731  (global RNG: seeded runs repeat)
            out.append({"encoder": pick(), "decoders": {t: pick() for t in model.tasks}})
        return out

    def before_forward(self, module: Any, batch: dict[str, torch.Tensor]) -> None:
        module.model.set_config(module.model.max_widths())
        self._remove_stage_hook()  # a skipped step (non-finite loss) never reached after_backward
        self._teacher_stages = None
        if self.cikd and self.cikd_level == "stages":
            def keep_first(_mod: nn.Module, _inp: Any, out: list[torch.Tensor]) -> None:
                if self._teacher_stages is None:  # the standard pass's, not a balancer's recompute
                    self._teacher_stages = [f.detach() for f in out]
            self._stage_hook = module.model.backbone.register_forward_hook(keep_first)

    def after_backward(self, module: Any, batch: dict[str, torch.Tensor], ctx: Any) -> dict[str, torch.Tensor]:
        from mtl.balancers import freeze_norm_stats  # imported here: balancers import the model world

        model: SlimmableMultiTaskModel = module.model
        x = batch["image"]
        size = tuple(x.shape[-2:])
        self._remove_stage_hook()
        teacher_z = ctx.features.detach()
        teacher_stages = self._teacher_stages
        if self.cikd and self.cikd_level == "stages" and teacher_stages is None:
            raise RuntimeError("strategy.cikd_level=stages: the widest pass's encoder features were not seen "
                               "(before_forward must precede the step's forward pass)")
        teacher = None
        if self.inplace_distill:
            with torch.no_grad(), freeze_norm_stats(model):
                teacher = {t: p.detach() for t, p in model.heads(teacher_z, size).items()}
        sums = {"task": torch.zeros((), device=x.device), "cikd": torch.zeros((), device=x.device)}
        try:
            for cfg in self.configs(model):
                model.set_config(cfg)
                feats = model.backbone(model.normalize(x))
                z = model.decoder.shared(feats)
                preds = model.heads(z, size)
                task_loss = sum(
                    (distill_loss(task, preds[t], teacher[t]) if teacher is not None
                     else task.loss(preds[t], batch[task.target_key])) * task.weight
                    for t, task in model.tasks.items())
                loss = task_loss
                if self.cikd and cfg["encoder"] < 1.0:
                    ci = (self.stages_loss(feats, teacher_stages, cfg["encoder"]) if self.cikd_level == "stages"
                          else self.cikd_loss(z, teacher_z, cfg["encoder"]))
                    loss = loss + self.cikd_weight * ci
                    sums["cikd"] += ci.detach()
                sums["task"] += task_loss.detach()
                module.manual_backward(loss)
        finally:
            self._teacher_stages = None
            model.set_config(model.max_widths())
        n = max(1, self.num_random + int(self.train_min))
        return {"train/slim/sub_loss": sums["task"] / n, "train/slim/cikd": sums["cikd"] / n}
