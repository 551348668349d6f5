"""Mixture-of-Experts building blocks: stacked expert MLPs, top-k routing, sparse dispatch, the
load-balance and task–expert mutual-information losses.

Routing follows Shazeer et al. 2017 (noisy top-k gating) as used by M3ViT (Liang et al. 2022):
probabilities ``p = softmax(logits)`` over the E experts, each token keeps its ``k`` largest and
their weights are ``p`` at those experts (renormalised to sum to 1 by default when k > 1; with k = 1 the
renormalised weight p/p is always 1 and carries no gradient to the router, so k = 1 keeps the raw ``p`` as
the Switch Transformer, Fedus et al. 2021, does). The balance loss is
``cv²(importance) + cv²(load)`` with importance = Σ_tokens gate weight and load = (smooth estimate
of) the number of tokens each expert receives; ``cv²(x) = var(x) / (mean(x)² + 1e-10)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def check_top_k(k: int, num_experts: int, where: str = "") -> None:
    """``where`` prefixes the names in the message (``"decoder."`` for a model's config keys)."""
    if int(num_experts) < 1:
        raise ValueError(f"{where}num_experts must be >= 1, got {num_experts}")
    if not 1 <= int(k) <= int(num_experts):
        raise ValueError(f"{where}top_k must be between 1 and {where}num_experts={num_experts}, got {where}top_k={k}")


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation var/mean²; 0 for one value. The variance is the unbiased one, as
    the PyTorch MoE code M3ViT and TaskExpert build on computes it; Shazeer et al.'s TensorFlow code
    divides by n, a factor (n-1)/n smaller."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + eps)


def task_expert_mutual_information(probs_per_task: torch.Tensor) -> torch.Tensor:
    """Mod-Squad's MI(task; expert) with uniform P(task): ``probs_per_task[t]`` = P(expert | task t)
    (the task's mean routing distribution). MI = Σ_t,e P(t,e) log(P(t,e) / (P(t) P(e)))."""
    p_e_given_t = probs_per_task.float().clamp_min(1e-12)
    p_e_given_t = p_e_given_t / p_e_given_t.sum(-1, keepdim=True)
    n_tasks = p_e_given_t.shape[0]
    joint = p_e_given_t / n_tasks
    p_e = joint.sum(0, keepdim=True)
    return (joint * (joint.log() - math.log(1.0 / n_tasks) - p_e.log())).sum()


@dataclass
class Routing:
    """One routing decision for a set of tokens."""

    index: torch.Tensor     # (T, k) chosen experts (positions in the layer's expert list)
    weight: torch.Tensor    # (T, k) their gate weights
    probs: torch.Tensor     # (T, E_gate) full softmax over the gate's experts
    balance: torch.Tensor   # scalar cv²(importance) + cv²(load) over the selectable experts


class TopKRouter(nn.Module):
    """``logits = x W (+ noise in training)``, softmax over the E experts, then top-k.

    ``selectable`` (a subset of expert positions) restricts the choice without changing the
    softmax: an extracted sub-network keeps the parent's probabilities for the experts it holds.
    ``renormalize=None``: renormalise when ``top_k > 1`` (see the module docstring). ``True`` with
    ``top_k=1`` is not refused here: model folders saved with it must still load (the family refuses it
    for new models).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool | None = None, noisy: bool = True):
        super().__init__()
        check_top_k(top_k, num_experts)
        renormalize = int(top_k) > 1 if renormalize is None else bool(renormalize)
        self.num_experts, self.top_k, self.renormalize, self.noisy = int(num_experts), int(top_k), renormalize, bool(noisy)
        self.gate = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.noise = nn.Linear(dim, num_experts, bias=False) if noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)

    def forward(self, x: torch.Tensor, selectable: torch.Tensor | None = None) -> Routing:
        # Under mixed precision the router stays float32 (Switch Transformer's selective precision): bf16
        # logits tie at the k-th place for many tokens, routing them unlike the float32 model that is
        # loaded, exported and extracted.
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._route(x.float(), selectable)
        return self._route(x, selectable)

    def _route(self, x: torch.Tensor, selectable: torch.Tensor | None) -> Routing:
        clean = self.gate(x)
        logits, std = clean, None
        if self.noise is not None and self.training:
            std = F.softplus(self.noise(x)) + 1e-2
            logits = clean + torch.randn_like(clean) * std
        probs = logits.softmax(-1)
        cand = probs if selectable is None else probs[:, selectable]
        k = self.top_k
        if cand.shape[-1] < k:
            raise ValueError(f"top_k={k} but only {cand.shape[-1]} experts are selectable")
        top_w, top_i = cand.topk(k, dim=-1)
        weight = top_w / top_w.sum(-1, keepdim=True).clamp_min(1e-9) if self.renormalize else top_w
        importance = torch.zeros_like(cand).scatter(-1, top_i, weight).sum(0)
        if std is not None and k < cand.shape[-1]:
            sel = (lambda t: t) if selectable is None else (lambda t: t[:, selectable])
            load = _prob_in_top_k(sel(clean), sel(logits), sel(std), k).sum(0)
        else:  # no noise: the hard count (no gradient; importance still balances)
            load = torch.zeros_like(cand).scatter(-1, top_i, 1.0).sum(0)
        return Routing(top_i, weight, probs, cv_squared(importance) + cv_squared(load))


def _prob_in_top_k(clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer et al.'s smooth load: P(expert stays in the top k under fresh noise), per token."""
    top = noisy.topk(k + 1, dim=-1).values
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    is_in = noisy > top[:, k:k + 1]
    p_if_in = normal.cdf((clean - top[:, k:k + 1]) / std)
    p_if_out = normal.cdf((clean - top[:, k - 1:k]) / std)
    return torch.where(is_in, p_if_in, p_if_out)


class StackedExperts(nn.Module):
    """E two-layer MLPs (fc1 -> GELU -> fc2) stored as stacked weights (E, ·, ·)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        out_dim = out_dim or dim
        self.num_experts, self.dim, self.hidden, self.out_dim = int(num_experts), int(dim), int(hidden), int(out_dim)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, out_dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, out_dim))
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, one batched matmul per layer: (T, D) -> (E, T, D_out)."""
        h = F.gelu(torch.einsum("td,edh->eth", x, self.w1) + self.b1[:, None])
        return torch.einsum("eth,eho->eto", h, self.w2) + self.b2[:, None]

    def expert(self, e: int, x: torch.Tensor, weights: tuple | None = None) -> torch.Tensor:
        """Expert e on tokens x; `weights`: (w1, b1, w2, b2) already split per expert (see `sparse`)."""
        w1, b1, w2, b2 = weights if weights is not None else (self.w1, self.b1, self.w2, self.b2)
        return torch.addmm(b2[e], F.gelu(torch.addmm(b1[e], x, w1[e])), w2[e])

    def sparse(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``y_i = Σ_j weight[i, j] · expert_{index[i, j]}(x_i)``, running each expert only on the tokens
        routed to it: sort the (token, slot) pairs by expert, gather, run, scale, index_add back."""
        k = index.shape[1]
        if x.shape[0] == 0:
            return x.new_zeros(0, self.out_dim)
        flat = index.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x.index_select(0, token)
        # unbind once: its backward stacks the E expert gradients in one op, where indexing w1[e]
        # per expert would fill a full (E, ·, ·) zero gradient per expert and sum them
        split = tuple(p.unbind(0) for p in (self.w1, self.b1, self.w2, self.b2))
        ys = [self.expert(e, xe, split) for e, xe in enumerate(xs.split(counts)) if counts[e]]
        y = torch.cat(ys) * weight.reshape(-1)[order, None].to(x.dtype)
        return x.new_zeros(x.shape[0], self.out_dim).index_add_(0, token, y)
