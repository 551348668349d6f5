"""Concrete subspace merging (Tang et al. 2023): a shared mask over the task vectors, learned bi-level.

    θ(m, λ) = θ0 + Σ_t λ_t (m ⊙ τ_t)          m: one mask for all tasks, same shape as the weights

(BN running statistics merged under bn="merge" have no mask: they take no gradient.)

The mask is relaxed with the Concrete (Gumbel-sigmoid) distribution: with logits s and u ~ U(0, 1),
m = σ((s + log u − log(1 − u)) / temperature) lies in [0, 1] and is differentiable in s. Outer
problem: minimise the entropy of the merged model's predictions over s. Inner problem: the merge
given the mask — task arithmetic with a fixed λ (`concrete_ta`), or AdaMerging's λ
(`concrete_adamerging`, first-order: each outer step is preceded by `inner_steps` λ updates on the
same sampled mask, and after the mask is final AdaMerging runs `final_steps` more on it). With
`reset_inner` (the authors' code) λ restarts from its initial value before every outer step's inner
updates — Adam's moments carry on — so the mask's gradient is taken at one adaptation of λ from its
start, not at λ learned over all earlier masks (the inner gradient itself at the reset λ; the authors'
code takes it at the previous step's merge, docs/merging.md).

As in the authors' code (FusionBench, concrete_subspace), with `rescale` every mask — each step's draw
and the final one — is divided by its mean per tensor before it multiplies the task vectors,
m / mean(m), so that dropping about half of the entries does not halve the merge's step size. The
final mask (`final_mask`) is one Concrete draw from the learned logits (`"sample"`, the authors'
default), a Bernoulli(σ(s)) draw (`"bernoulli"`) or the threshold m = 1[σ(s) > threshold] (`"hard"`).
"""
from __future__ import annotations

import math

import torch

from mtl.registry import derived_seed

from .adamerging import callback_metrics
from .loop import Objective, mean, optimiser_step, step_gradients, step_progress
from .problem import MergeProblem

__all__ = ["FINAL_MASKS", "ConcreteMask"]

FINAL_MASKS = ("sample", "bernoulli", "hard")
#: offset of the final draw's seed: its own stream, so evaluating it (callbacks) leaves the learning's draws alone
_FINAL_SEED_OFFSET = 0x9E3779B9


class ConcreteMask:
    def __init__(self, problem: MergeProblem, temperature: float = 0.5, initial_logits: float = 0.0,
                 lr: float = 1e-3, seed: int = 0, threshold: float = 0.5, rescale: bool = True,
                 final_mask: str = "sample"):
        self.check(temperature, initial_logits, threshold, rescale, final_mask)
        self.problem, self.temperature, self.threshold = problem, float(temperature), float(threshold)
        self.rescale, self.final_mask, self.seed = rescale, final_mask, int(seed)
        # BN running statistics (problem.no_grad) take no gradient, so a mask over them could never learn:
        # they are merged unmasked, θ0 + Σ_t λ_t τ_t, as bn="merge" merges them without a mask
        self.logits = {k: torch.full_like(v, float(initial_logits), requires_grad=True)
                       for k, v in problem.theta0.items() if k not in problem.no_grad}
        self.opt = torch.optim.Adam(list(self.logits.values()), lr=lr)
        self.gen = torch.Generator(device=problem.device).manual_seed(int(seed))

    @staticmethod
    def check(temperature: float, initial_logits: float, threshold: float, rescale: bool = True,
              final_mask: str = "sample") -> None:
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        if not 0 <= threshold < 1:  # σ(s) lies in (0, 1): a threshold ≥ 1 (or NaN) would keep nothing
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if not math.isfinite(initial_logits):
            raise ValueError(f"initial_logits must be finite, got {initial_logits}")
        if not isinstance(rescale, bool):  # "false" would be truthy
            raise ValueError(f"rescale must be true or false, got {rescale!r}")
        if final_mask not in FINAL_MASKS:
            raise ValueError(f"unknown final_mask {final_mask!r}; valid: {', '.join(FINAL_MASKS)}")

    def sample(self, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A relaxed mask in [0, 1], differentiable in the logits (one Gumbel-sigmoid draw per entry)."""
        out = {}
        for k, s in self.logits.items():
            u = torch.rand(s.shape, generator=gen or self.gen, device=s.device, dtype=s.dtype).clamp_(1e-6, 1 - 1e-6)
            out[k] = torch.sigmoid((s + torch.log(u) - torch.log1p(-u)) / self.temperature)
        return out

    def scaled(self, mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With `rescale`, each tensor's mask divided by its mean (differentiably); an all-zero mask stays zero."""
        if not self.rescale:
            return mask
        out = {}
        for k, m in mask.items():
            m = m.to(self.logits[k].dtype)
            out[k] = m / m.mean().clamp_min(torch.finfo(m.dtype).tiny)
        return out

    def probabilities(self) -> dict[str, torch.Tensor]:
        return {k: torch.sigmoid(s.detach()) for k, s in self.logits.items()}

    def hard(self) -> dict[str, torch.Tensor]:
        """The thresholded binary mask: σ(s) > threshold."""
        return {k: p > self.threshold for k, p in self.probabilities().items()}

    def final(self) -> dict[str, torch.Tensor]:
        """The mask the result applies to the task vectors, as `final_mask` and `rescale` say: bool for
        `"hard"` without rescaling, else in the logits' dtype. The draws of `"sample"` and `"bernoulli"`
        come from their own generator seeded from `seed`: the same logits give the same final mask."""
        if self.final_mask == "hard":
            mask = self.hard()
            return mask if not self.rescale else self.scaled(mask)
        gen = torch.Generator(device=self.problem.device).manual_seed(derived_seed(self.seed, _FINAL_SEED_OFFSET))
        with torch.no_grad():
            if self.final_mask == "sample":
                mask = self.sample(gen)
            else:
                mask = {k: torch.bernoulli(p, generator=gen) for k, p in self.probabilities().items()}
            return self.scaled(mask)

    def apply_step(self, step: int) -> None:
        optimiser_step(self.opt, "lr")
        self.opt.zero_grad(set_to_none=True)
        for k, s in self.logits.items():
            s = s.detach()
            if not torch.isfinite(s).all():
                at = tuple(int(i) for i in (~torch.isfinite(s)).nonzero()[0])
                raise FloatingPointError(f"mask logit of tensor {k!r} at {at} became {float(s[at])} at step {step}; "
                                         "lower lr")

    def run(self, objective: Objective, frozen, steps: int, trace, label: str, coefficients,
            inner=None, inner_steps: int = 1, progress: bool = True, callback=None, callback_every: int = 0,
            reset_inner: bool = False) -> None:
        """`coefficients()` gives the current (rows, T) coefficients; `inner` (a CoefficientLearner) is
        updated `inner_steps` times per outer step on the same mask draw, with the mask held fixed
        (with `reset_inner`, from its initial value each time). A callback sees the model the result would
        be were the mask phase to end at that step: the final mask built from the current logits, at the λ
        the coefficient phase starts from (with `reset_inner` its initial value, not the inner-adapted λ the
        mask's gradient was taken at), so with no coefficient steps after it the last one sees the result."""

        def result_coefficients() -> torch.Tensor:
            return inner.initial() if inner is not None and reset_inner else coefficients().detach()

        bar = step_progress(label, steps, progress)
        for step in range(1, steps + 1):
            m = self.scaled(self.sample())
            if inner is not None:
                fixed = {k: v.detach() for k, v in m.items()}
                if reset_inner:
                    inner.reset()
                for _ in range(inner_steps):
                    step_gradients(self.problem, inner.merged(fixed), objective, frozen, step)
                    inner.apply_step(step)
            group_of = inner.layout.group_of if inner else {k: 0 for k in self.problem.keys}
            merged = self.problem.merged(coefficients().detach(), group_of, m)
            losses = step_gradients(self.problem, merged, objective, frozen, step)
            self.apply_step(step)
            with torch.no_grad():
                density = float(sum(float(p.sum()) for p in self.probabilities().values())
                                / sum(p.numel() for p in self.logits.values()))
            seconds, extra = trace.elapsed(), {"mask_mean_probability": density}
            if callback is not None and callback_every and (step % callback_every == 0 or step == steps):
                with torch.no_grad():  # the result as it would be built now: final mask, λ the final phase starts at
                    final = {k: m.to(self.logits[k].dtype) for k, m in self.final().items()}
                    merged = self.problem.merged(result_coefficients(), group_of, final)
                    extra.update(callback_metrics(callback, step, self.problem.state(merged)))
            trace.add(step, losses, seconds, extra, "mask")
            bar.update(step, f"objective {mean(losses) * len(losses):.4f} mask p̄ {density:.3f}")
