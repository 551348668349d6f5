"""GradDrop (Chen et al., NeurIPS 2020, "Just Pick a Sign", Algorithm 1 with leak 0 and f = identity).

At ``level="features"`` the layer of Algorithm 1 sits on the shared representation A (batch on dim 0):

    G_t = Σ_batch sign(A) ∘ ∇_A L_t                       (one value per unit of A)
    P   = ½ (1 + Σ_t G_t / Σ_t |G_t|)                      (gradient positive sign purity)
    M_t = 1[P > U] ∘ 1[G_t > 0] + 1[P < U] ∘ 1[G_t < 0],   U ~ Uniform(0, 1) per unit
    ∇_A ← Σ_t M_t ∘ ∇_A L_t                               (M_t tiled over the batch)

At ``level="params"`` TorchJD's ``GradDrop`` applies the last two lines to the task gradients w.r.t.
the shared parameters directly (no activation, so no sign(A) and no batch sum): a variant.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mtl.balancers.base import StepContext, register
from mtl.balancers.gradient import JacobianBalancer, backward_from_features, feature_list, full_precision


def sign_dropout(activation: torch.Tensor, task_grads: Sequence[torch.Tensor], uniform: torch.Tensor) -> torch.Tensor:
    """The gradient Algorithm 1 passes below the activation ``A`` (batch on dim 0), given each task's
    ∇_A L_t and one uniform draw per unit of A (shape ``A.shape[1:]``)."""
    grads = torch.stack([g.float() for g in task_grads])  # T x B x ...
    signed = (torch.sign(activation.detach().float()) * grads).sum(dim=1)  # G_t: T x ...
    total = signed.abs().sum(dim=0)
    # where every G_t is 0 (0/0) this gives ½; no G_t passes either sign test there anyway
    purity = 0.5 * (1 + signed.sum(dim=0) / total.clamp_min(torch.finfo(total.dtype).tiny))
    masks = ((purity > uniform) & (signed > 0)) | ((purity < uniform) & (signed < 0))  # T x ...
    return (masks.unsqueeze(1) * grads).sum(dim=0)


@register("graddrop")
class GradDropBalancer(JacobianBalancer):
    """Chen et al. 2020, gradient sign dropout (random per unit / coordinate; no per-task weights)."""

    def _make_aggregator(self):
        from torchjd.aggregation import GradDrop

        return GradDrop()

    def _features_backward(self, ctx: StepContext) -> bool | None:
        per_task = self._feature_gradients(ctx)
        if per_task is None:  # a non-finite task gradient, step skipped
            return False
        feats = feature_list(ctx.features)
        combined = []
        with full_precision(feats[0].device):
            for k, f in enumerate(feats):
                if f.dim() < 1:
                    raise ValueError("graddrop(level=features): each representation tensor needs a batch dimension "
                                     f"(dim 0), got shape {tuple(f.shape)}")
                uniform = torch.rand(f.shape[1:], device=f.device)
                combined.append(sign_dropout(f, [g[k] for g in per_task], uniform).to(f.dtype))
        self._set_weights([1.0] * len(self.tasks))
        backward_from_features(ctx, combined)
