"""A multi-task model linearised around its starting point θ0 (tangent-space fine-tuning).

    f_lin(x; θ) = f(x; θ0) + J_θ f(x; θ0) · (θ − θ0)

(Ortiz-Jiménez et al., NeurIPS 2023, "Task Arithmetic in the Tangent Space"). Fine-tuning the
first-order Taylor expansion instead of the network keeps each task vector τ = θ − θ0 inside the
tangent space at θ0, where the model is linear in τ: adding task vectors adds their effects, which is
what task arithmetic assumes. The expansion covers the shared representation (backbone + neck, the
weights that are merged); task heads run on top of it unchanged (they are task-specific, never
merged). The product J·(θ − θ0) is one forward-mode pass (`torch.func.jvp`) computed together with
f(x; θ0), so no Jacobian is ever formed.

θ0 is stored in the model folder as buffers (`theta0.<name with / for .>`), so a linearised model
reloads with `mtl.load_model` like any other (`family: "linearized"`). Normalisation layers with
running statistics always use them (eval mode): the expansion is around one fixed function.
"""
from __future__ import annotations

from functools import reduce
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mtl.models.families import MODELS
from mtl.models.multitask import MultiTaskModel

__all__ = ["LinearizedModel", "linearize"]


class _Shared(nn.Module):
    """The shared representation as a function of the backbone/decoder parameters (for jvp)."""

    def __init__(self, backbone: nn.Module, decoder: nn.Module):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder.shared(self.backbone(x))


def _key(name: str) -> str:
    return name.replace(".", "/")


@MODELS.register("linearized")
class LinearizedModel(MultiTaskModel):
    """A `MultiTaskModel` whose shared representation is its first-order expansion around `theta0`.

    Its parameters (and state-dict keys) are the plain model's: θ. Build one from a trained model with
    `linearize(model)` (θ = θ0 there, so it predicts exactly as the model does).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.linear_names = [n for n, _ in self.named_parameters() if not n.startswith("decoder.heads.")]
        self.theta0 = nn.Module()
        for n in self.linear_names:
            self.theta0.register_buffer(_key(n), self._current(n).detach().clone())
        # not a registered child: the same backbone/decoder, seen as a function of their parameters
        object.__setattr__(self, "_shared_fn", _Shared(self.backbone, self.decoder))
        # running statistics from the start: Lightning restores each module's mode as captured before its
        # sanity validation and never calls train() again, so a model built here (family=linearized) kept
        # training-mode BN, whose in-place statistics update failed inside the jvp at the first step
        self.train(self.training)

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "family": "linearized"}

    def _current(self, name: str) -> torch.Tensor:
        # getattr, not named_parameters(): under torch.func.functional_call the module holds the
        # substituted tensors, which is what a learned merge differentiates through.
        return reduce(getattr, name.split("."), self)

    def point(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self.theta0, _key(n)) for n in self.linear_names}

    def reset_point(self) -> None:
        """Move the expansion point to the current weights (θ0 := θ)."""
        with torch.no_grad():
            for n in self.linear_names:
                getattr(self.theta0, _key(n)).copy_(self._current(n))

    def offset(self) -> dict[str, torch.Tensor]:
        """θ − θ0 per linearised parameter (differentiable in θ)."""
        return {n: self._current(n) - p for n, p in self.point().items()}

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        point = self.point()
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            # the expansion runs outside autocast (below): a bf16 batch autocast would have cast is cast here
            x = x.to(next(iter(point.values())).dtype)

        def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(self._shared_fn, params, (x,), strict=False)

        # forward-mode AD has no rule for the fused attention kernels (a ViT's first forward failed on
        # CPU): the math kernel computes the same attention from differentiable primitives
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # nor through autocast's casts (bf16-mixed): the expansion is computed in the weights' own dtype
        with sdpa_kernel([SDPBackend.MATH]), torch.autocast(x.device.type, enabled=False):
            out, tangent = torch.func.jvp(f, (point,), (self.offset(),))
        # a decoder may share several feature maps (a list): f(θ0) + J·Δθ for each of them
        return torch.utils._pytree.tree_map(torch.add, out, tangent)

    def train(self, mode: bool = True) -> "LinearizedModel":
        super().train(mode)
        for m in self.modules():  # the expansion is around a fixed function: running statistics only
            if isinstance(m, _BatchNorm) and m.track_running_stats:
                m.eval()
        return self


def linearize(model: MultiTaskModel) -> LinearizedModel:
    """A linearised copy of `model` expanded around its current weights (it predicts as `model` does).
    Plain multi-task models only (any backbone and decoder): other families' forward passes (width
    switches, per-task experts) and pruned architectures are not what the expansion rebuilds."""
    from mtl.io import require_model
    from mtl.models.surgery import plan_of

    require_model(model, "linearize")
    config = getattr(model, "config", None)
    family = config.get("family") if isinstance(config, dict) else None
    if type(model) is not MultiTaskModel or family != "multitask":
        what = family or type(model).__name__
        raise ValueError(f"linearize: family {what!r} cannot be linearised (only family='multitask' models, any "
                         "backbone and decoder)")
    if plan_of(model) is not None:
        raise ValueError("linearize: a pruned model cannot be linearised (its expansion point would be rebuilt at "
                         "the unpruned shapes); linearise the unpruned model, and prune after merging")
    ref = next(model.parameters())
    lin = LinearizedModel.from_config({**model.config, "family": "linearized"}).to(ref.device, ref.dtype)
    missing, unexpected = lin.load_state_dict(model.state_dict(), strict=False)
    bad = [k for k in missing if not k.startswith("theta0.")] + list(unexpected)
    if bad:
        raise ValueError(f"cannot linearise {type(model).__name__}: state dict keys differ ({bad[:5]})")
    lin.reset_point()
    return lin.train(model.training)
