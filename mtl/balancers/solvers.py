"""Exact solvers on the T x T Gramian G = J Jᵀ of the task gradients (float64 throughout).

**MGDA** (``min_norm_weights``). MGDA's direction (Sener & Koltun 2018) is d* = Σ_t α_t g_t with
α = argmin_{α ∈ Δ} αᵀ G α. Two solvers share one stopping rule, the Frank-Wolfe duality gap

    gap(α) = αᵀGα − min_i (Gα)_i  ≥  (‖d‖² − ‖d*‖²) / 2,

so stopping at ``gap ≤ rtol · ‖d‖² + atol · max_i G_ii`` bounds the relative excess of the squared
norm by about 2·rtol. The step-size test of the original Frank-Wolfe loop does not bound it: with
unequal gradient norms the steps shrink long before the optimum is reached.

* ``"exact"`` (default): Wolfe's minimum-norm-point algorithm (Wolfe 1976), an active-set method that
  solves the affine sub-problems exactly and ends in a finite number of steps; float64 throughout.
* ``"frank_wolfe"``: the paper's solver (exact line search) with away steps, stopped on the gap.

**Nash-MTL** (``nash_weights``, Navon et al. 2022). The bargaining solution is α > 0 with
G α = 1/α elementwise: the unique minimiser of the strictly convex f(α) = ½ αᵀGα − Σ_t log α_t,
found by damped Newton steps to ``max_t |α_t (Gα)_t − 1| ≤ tol``. (The reference implementation's
sequence of convex programs stops after a fixed number of rounds, short of this point on badly scaled
or conflicting gradients, and returns equal weights when its solver fails.) No solution exists when
some convex combination of the gradients vanishes (0 in their convex hull, a Pareto-stationary point):
``None`` is returned: d = Σ a_t g_t with ‖d‖² ≤ T·ε·(Σ a_t ‖g_t‖)² (ε the machine epsilon of the dtype
the Gramian was formed in; the rounding of a combination scales with its own terms, not with the largest
gradient, so a task whose gradient is 1e-5 of another's still has its point) is within the Gramian's
rounding of zero; there Newton may "converge" to a huge α along the rounding's direction, or stop at
``max_iters``. The cheap tests come first: each Newton iterate's own combination (on a hull around 0 it
vanishes within a few steps), then the point's certificate that the hull is clear of 0 (g_t·d > 0 bounds
every combination above that floor: ``_hull_clear_of_zero``, a few T x T operations). Only where neither
decides (the bound is inconclusive, or Newton stops at ``max_iters``) is 0 in the hull tested directly, on
MGDA's min-norm point d* of the hull and on the min-norm point of the hull of the unit gradients (exact, by
face enumeration, for T ≤ 10: up to ~0.5 s at T = 10). ``max_iters`` steps that end above √tol on a hull
away from 0 raise `NashNotConverged` instead (a solution may well exist).

**IMTL-G** (``imtl_g_weights``): the paper's closed form on the Gramian (see the function).

Both report an even split between tasks with identical gradients (``split_between_identical``).
"""
from __future__ import annotations

import torch

SOLVERS = ("exact", "frank_wolfe")


def gramian_aggregator(weights_fn):
    """A TorchJD aggregator whose weights are ``weights_fn(gramian)`` (TorchJD imported on first use)."""
    from torchjd.aggregation import GramianWeightedAggregator, Weighting

    class _Weighting(Weighting):
        def forward(self, gramian: torch.Tensor, /) -> torch.Tensor:
            return weights_fn(gramian)

    return GramianWeightedAggregator(_Weighting())


def scale_free(weighting, fallback_to_mean: bool = False):
    """``weighting`` applied to G / trace(G). CAGrad's weights do not change when every gradient is
    scaled by the same factor, but TorchJD maps a Gramian whose trace is below 1e-4 to zero (a zero
    update; UPGrad / DualProj solve on unit rows instead, ``dual_cone_weights``), which
    small losses or a task with no valid pixel reach. ``fallback_to_mean``: all-zero weights (TorchJD's
    CAGrad when ‖g_w‖ vanishes) become the mean, the limit of the official CAGrad code."""

    def weights(gramian: torch.Tensor) -> torch.Tensor:
        T = gramian.shape[0]
        trace = gramian.diagonal().sum()
        mean = torch.full((T,), 1.0 / T, dtype=gramian.dtype, device=gramian.device)
        if not bool(trace > 0):  # every gradient is zero: any weights give the zero update
            return mean
        w = weighting(gramian / trace)
        return mean if fallback_to_mean and not bool(w.abs().sum() > 0) else w

    return weights


def dual_cone_weights(gramian: torch.Tensor, weighting: str, reg_eps: float) -> torch.Tensor:
    """TorchJD's ``UPGrad`` / ``DualProj`` weights (``weighting``), solved on the unit rows. Both project
    Jᵀu onto the dual cone {x : g_j·x ≥ 0 ∀j}: Jᵀw with w = argmin_{v ≥ u} vᵀGv. Scaling row j by
    1/‖g_j‖ leaves the cone as it is, so the program is solved on the unit rows' Gramian D G D (D =
    diag(1/‖g_j‖); a zero gradient keeps scale 1, its constraint is empty) from the preference u' = D⁻¹u,
    and w = D w'. There ``reg_eps``·I (after TorchJD's division by the trace, the number of non-zero
    tasks) weighs every task alike whatever the spread of the gradient norms; on G / trace(G) a task
    whose ‖g_t‖² was under ~reg_eps of Σ‖g‖² left the constraint set. quadprog needs a positive definite
    matrix, which (near-)parallel gradients at a tiny ``reg_eps`` are not: such a step is solved at
    TorchJD's default 1e-4."""
    import torchjd.aggregation as agg

    G = gramian.detach().to("cpu", torch.float64)
    G = (G + G.T) / 2
    T = G.shape[0]
    norms = G.diagonal().clamp_min(0).sqrt()
    if not bool((norms > 0).any()):  # every gradient is zero: any weights give the zero update
        return torch.full((T,), 1.0 / T, dtype=gramian.dtype, device=gramian.device)
    scale = torch.where(norms > 0, norms, torch.ones_like(norms))
    cls = getattr(agg, f"{weighting}Weighting")

    def solve(eps: float) -> torch.Tensor:
        pref = scale / T  # D⁻¹ times TorchJD's default preference, the mean
        try:  # TorchJD >= 0.17 takes a projector; older releases took reg_eps directly
            from torchjd._linalg._dual_cone import QuadprogProjector

            w = cls(pref_vector=pref, projector=QuadprogProjector(reg_eps=eps))
        except ImportError:
            w = cls(pref_vector=pref, reg_eps=eps)
        return w(G / scale[:, None] / scale[None, :])

    try:
        from qpsolvers.exceptions import QPError
        not_definite: tuple[type[Exception], ...] = (ValueError, QPError)
    except ImportError:
        not_definite = (ValueError,)
    try:
        w = solve(reg_eps)
    except not_definite:
        w = solve(max(reg_eps, 1e-4))
    return (w / scale).to(gramian.device, gramian.dtype)


def duality_gap(gramian: torch.Tensor, alpha: torch.Tensor) -> tuple[float, float]:
    """(gap, ‖d‖²) of the combination ``alpha`` (see the module docstring)."""
    g_alpha = gramian @ alpha
    sq = float(alpha @ g_alpha)
    return sq - float(g_alpha.min()), sq


def min_norm_weights(gramian: torch.Tensor, solver: str = "exact", rtol: float = 1e-10, atol: float = 1e-14,
                     max_iters: int = 10_000) -> torch.Tensor:
    """α on the simplex minimising αᵀGα (returned in the Gramian's dtype and device)."""
    if solver not in SOLVERS:
        raise ValueError(f"mgda: solver must be one of {SOLVERS}, got {solver!r}")
    if rtol < 0 or atol < 0 or max_iters < 1:
        raise ValueError(f"mgda: need rtol >= 0, atol >= 0, max_iters >= 1 (got {rtol}, {atol}, {max_iters})")
    G = gramian.detach().to("cpu", torch.float64)
    G = (G + G.T) / 2
    n = G.shape[0]
    scale = float(G.diagonal().max())
    if not torch.isfinite(G).all() or scale <= 0.0:  # all gradients zero (or non-finite: left to the caller)
        return torch.full((n,), 1.0 / n, dtype=gramian.dtype, device=gramian.device)
    G = G / scale  # the tolerances are relative to the largest squared gradient norm
    alpha = (_wolfe if solver == "exact" else _frank_wolfe)(G, rtol, atol, max_iters)
    return split_between_identical(G, alpha).to(gramian.device, gramian.dtype)


def split_between_identical(G: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``alpha`` with the summed weight of each group of identical gradients (‖g_s − g_t‖² = G_ss + G_tt −
    2 G_st = 0, to float64 rounding of G) split equally inside the group. Any split gives the same
    update; the solvers' own choice (one task of the group takes it all) would report an arbitrary one."""
    diag = G.diagonal()
    same = (diag[:, None] + diag[None, :] - 2 * G) <= 8 * torch.finfo(G.dtype).eps * float(diag.max())
    alpha, grouped = alpha.clone(), torch.zeros(len(alpha), dtype=torch.bool)
    for t in range(len(alpha)):
        group = same[t] & ~grouped
        if not grouped[t] and int(group.sum()) > 1:
            alpha[group] = alpha[group].mean()
        grouped |= group
    return alpha


def _stop(G: torch.Tensor, alpha: torch.Tensor, rtol: float, atol: float) -> tuple[bool, int]:
    g_alpha = G @ alpha
    sq = float(alpha @ g_alpha)
    j = int(torch.argmin(g_alpha))
    return sq - float(g_alpha[j]) <= rtol * sq + atol, j


def _frank_wolfe(G: torch.Tensor, rtol: float, atol: float, max_iters: int) -> torch.Tensor:
    """Frank-Wolfe with away steps (Lacoste-Julien & Jaggi 2015): the plain loop converges
    sublinearly and stalls on ill-conditioned hulls; away steps make it linear on the simplex."""
    n = G.shape[0]
    alpha = torch.full((n,), 1.0 / n, dtype=G.dtype)
    for _ in range(max_iters):
        done, j = _stop(G, alpha, rtol, atol)
        if done:
            break
        g_alpha = G @ alpha
        support = alpha > 0
        a = int(torch.where(support, g_alpha, torch.full_like(g_alpha, -torch.inf)).argmax())
        if float(g_alpha[a] - alpha @ g_alpha) > float(alpha @ g_alpha - g_alpha[j]) and alpha[a] < 1:
            d = alpha.clone()  # away from vertex a
            d[a] -= 1.0
            step_max = float(alpha[a] / (1 - alpha[a]))
        else:
            d = -alpha.clone()  # towards vertex j
            d[j] += 1.0
            step_max = 1.0
        curv = float(d @ G @ d)  # exact line search of f(α) = αᵀGα along d
        slope = float(alpha @ G @ d)
        gamma = step_max if curv <= 0 else min(step_max, max(0.0, -slope / curv))
        alpha = (alpha + gamma * d).clamp_min(0.0)
        alpha = alpha / alpha.sum()
    return alpha


def _affine_min_norm(GS: torch.Tensor) -> torch.Tensor:
    """μ minimising μᵀ G_S μ subject to Σμ = 1 (no sign constraint): a KKT linear system."""
    k = GS.shape[0]
    kkt = torch.zeros(k + 1, k + 1, dtype=GS.dtype)
    kkt[:k, :k] = GS
    kkt[:k, k] = kkt[k, :k] = 1.0
    rhs = torch.zeros(k + 1, dtype=GS.dtype)
    rhs[k] = 1.0
    sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)  # robust if degenerate
    mu = sol[:k]
    return mu / mu.sum()


def _wolfe(G: torch.Tensor, rtol: float, atol: float, max_iters: int) -> torch.Tensor:
    n = G.shape[0]
    active = [int(torch.argmin(G.diagonal()))]
    lam = torch.ones(1, dtype=G.dtype)
    tiny = 1e-15
    seen: set[tuple] = set()
    for _ in range(max_iters):
        alpha = torch.zeros(n, dtype=G.dtype)
        alpha[active] = lam
        done, j = _stop(G, alpha, rtol, atol)
        if done or j in active:  # j in the active set: no further progress is possible numerically
            break
        state = (tuple(active), tuple(lam.tolist()))
        if state in seen:  # a cycle (G indefinite from rounding: an affine "minimiser" is a saddle): stalled
            break
        seen.add(state)
        active.append(j)
        lam = torch.cat([lam, lam.new_zeros(1)])
        for _ in range(len(active) + 1):  # minor cycles: each drops at least one point
            mu = _affine_min_norm(G[active][:, active])
            if bool((mu > tiny).all()):
                lam = mu
                break
            # move from lam towards mu until the first coordinate hits zero, then drop it
            falling = mu <= tiny
            denom = lam[falling] - mu[falling]
            theta = float(torch.where(denom > 0, lam[falling] / denom.clamp_min(tiny), torch.ones_like(denom)).min())
            theta = min(max(theta, 0.0), 1.0)
            lam = (1 - theta) * lam + theta * mu
            keep = lam > tiny
            if bool(keep.all()):
                keep[int(torch.argmin(lam))] = False
            active = [a for a, k in zip(active, keep.tolist()) if k]
            lam = lam[keep]
            lam = lam / lam.sum()
    alpha = torch.zeros(n, dtype=G.dtype)
    alpha[active] = lam
    return alpha


def imtl_g_weights(gramian: torch.Tensor) -> torch.Tensor:
    """IMTL-G (Liu et al. 2021): α with Σα = 1 whose d = Σ α_t g_t projects equally on every unit
    u_t = g_t/‖g_t‖, in the paper's difference form α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹ (rows of D: g_1 − g_t, of U:
    u_1 − u_t), written with M_ij = g_i·u_j = G_ij/‖g_j‖. Unlike α ∝ G⁻¹‖g‖ (a pseudo-inverse of a
    float32 Gramian, TorchJD's form), it stays exact when two gradients are (nearly) opposite and G is
    singular (there d → 0). A task whose gradient is all zero has no u_t: weight 0."""
    G = gramian.detach().to("cpu", torch.float64)
    G = (G + G.T) / 2
    T = G.shape[0]
    norms = G.diagonal().clamp_min(0).sqrt()
    alive = (norms > 0).nonzero().flatten()
    alpha = torch.zeros(T, dtype=G.dtype)
    if len(alive) == 0:
        return torch.full((T,), 1.0 / T, dtype=gramian.dtype, device=gramian.device)
    if len(alive) > 1:
        M = G[alive][:, alive] / norms[alive]
        DU = M[0, 0] - M[0, 1:][None, :] - M[1:, 0][:, None] + M[1:, 1:]  # (D Uᵀ)[k, l]
        g1U = M[0, 0] - M[0, 1:]
        rest = torch.linalg.pinv(DU.T) @ g1U  # solve for the row vector α_{2:T}; pinv: a singular D Uᵀ
        alpha[alive] = torch.cat([(1 - rest.sum()).reshape(1), rest])
    else:
        alpha[alive] = 1.0
    return split_between_identical(G, alpha).to(gramian.device, gramian.dtype)


_ENUMERATE_FACES_UP_TO = 10  # 2^T − 1 faces: ~1k small KKT solves (~0.5 s) at T = 10


def _hull_nearly_vanishes(G: torch.Tensor, norms: torch.Tensor, floor: float) -> bool:
    """Whether some a ≥ 0, a ≠ 0 has aᵀGa ≤ floor·(a·norms)² (``norms`` > 0): with b_t = a_t‖g_t‖ / Σ a_s‖g_s‖,
    whether the min-norm point of the hull of the unit gradients (Gramian Ĝ = D⁻¹GD⁻¹, D = diag(‖g_t‖)) has
    bᵀĜb ≤ floor. Up to ``_ENUMERATE_FACES_UP_TO`` tasks the minimum over the simplex is found exactly, by
    the stationary point of every face (the global minimiser is one of them, even where rounding leaves
    Ĝ slightly indefinite, which stalls Wolfe's method on an edge); above it, Wolfe's method on Ĝ."""
    Gu = G / norms[:, None] / norms[None, :]
    Gu = (Gu + Gu.T) / 2
    n = Gu.shape[0]
    b = min_norm_weights(Gu)
    sq = float(b @ Gu @ b)
    if sq <= floor:
        return True
    # f(x) = xᵀĜx ≥ f(b) + ∇f(b)·(x − b) − δ‖x − b‖² ≥ f(b) − 2·gap − 2δ on the simplex (λ_min(Ĝ) ≥ −δ)
    delta = max(0.0, -float(torch.linalg.eigvalsh(Gu)[0]))
    if n > _ENUMERATE_FACES_UP_TO or sq - 2 * duality_gap(Gu, b)[0] - 2 * delta > floor:
        return False
    best = float(Gu.diagonal().min())  # the vertices
    for mask in range(1, 1 << n):
        S = [t for t in range(n) if mask >> t & 1]
        if len(S) < 2:
            continue
        b = _affine_min_norm(Gu[S][:, S])
        if not bool(torch.isfinite(b).all()) or float(b.min()) < -1e-9:
            continue
        b = b.clamp_min(0.0)
        b = b / b.sum()
        best = min(best, float(b @ Gu[S][:, S] @ b))
    return best <= floor


def _hull_clear_of_zero(G: torch.Tensor, norms: torch.Tensor, alpha: torch.Tensor, floor: float) -> bool:
    """A certificate that no a ≥ 0 has aᵀGa ≤ floor·(a·norms)², read off a point α > 0 whose combination
    d = Σ α_t g_t has g_t·d > 0 for every t (the bargaining point: g_t·d = 1/α_t). In the unit-gradient terms
    of ``_hull_nearly_vanishes``, with β = Dα and c = min_t (Gα)_t / ‖g_t‖ = min_t (Ĝβ)_t, every b on the
    simplex has bᵀĜβ ≥ c, so by Cauchy-Schwarz on the positive semi-definite Ĝ + δI (λ_min(Ĝ) ≥ −δ, rounding)
    bᵀĜb ≥ c² / (βᵀĜβ + δ‖β‖²) − δ. True: that bound is above ``floor``, and the min-norm solves are not needed."""
    Gu = G / norms[:, None] / norms[None, :]
    delta = max(0.0, -float(torch.linalg.eigvalsh((Gu + Gu.T) / 2)[0]))
    c = float(((G @ alpha) / norms).min())
    beta = alpha * norms
    return c > 0 and c * c / (float(alpha @ G @ alpha) + delta * float(beta @ beta)) - delta > floor


class NashNotConverged(ArithmeticError):
    """``nash_weights`` ran ``max_iters`` Newton steps without reaching ``√tol``; ``residual`` says how far."""

    def __init__(self, residual: float, max_iters: int):
        super().__init__(f"did not converge within max_iters={max_iters} (residual {residual:.3g})")
        self.residual = residual


def nash_weights(gramian: torch.Tensor, tol: float = 1e-10, max_iters: int = 100,
                 init: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor | None:
    """α > 0 with G α = 1/α (see the module docstring), or ``None`` when there is no such point: some
    combination Σ a_t g_t (a ≥ 0) is within √(T·eps)·Σ a_t ‖g_t‖ of vanishing (``eps``: the machine
    epsilon of the dtype the Gramian was formed in; default: its own dtype's). After
    ``max_iters`` steps the last iterate is returned if its residual is ≤ √tol: near nearly opposite
    gradients (α ~ 1e3 on the unit-scale G) float64 rounding alone keeps the residual around 1e-9, above
    the default tol. Otherwise `NashNotConverged` is raised: not converged is not the same as no point."""
    G = gramian.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(G).all()):
        raise ValueError("nash_weights: the Gramian is not finite (a task gradient is NaN or infinite)")
    G = (G + G.T) / 2
    n = G.shape[0]
    scale = float(G.diagonal().mean())
    if scale <= 0.0:  # every gradient is zero: the zero combination vanishes
        return None
    G = G / scale  # solve at unit scale, then α = α̂ / √scale
    floor = (torch.finfo(gramian.dtype).eps if eps is None else eps) * n
    norms = G.diagonal().clamp_min(0).sqrt()
    if bool((norms <= 0).any()):  # a zero gradient: its own combination vanishes
        return None

    def vanishes(a: torch.Tensor) -> bool:  # Σ a_t g_t is within its own rounding (ε·Σ a_t‖g_t‖) of zero
        return float(a @ G @ a) <= floor * float(a @ norms) ** 2

    def no_point() -> bool:  # the direct test of 0 in the hull, run only where Newton's point cannot rule it out
        return vanishes(min_norm_weights(G)) or _hull_nearly_vanishes(G, norms, floor)

    def point(a: torch.Tensor) -> torch.Tensor | None:
        if not _hull_clear_of_zero(G, norms, a, floor) and no_point():
            return None
        return (a / scale ** 0.5).to(gramian.device, gramian.dtype)

    alpha = torch.ones(n, dtype=G.dtype) if init is None else init.detach().to("cpu", G.dtype) * scale ** 0.5

    def f(a: torch.Tensor) -> float:
        return float(0.5 * a @ G @ a - torch.log(a).sum())

    for _ in range(max_iters):
        if vanishes(alpha):  # on a hull around 0, Newton runs off along a vanishing combination within a few steps
            return None
        g_alpha = G @ alpha
        residual = float((alpha * g_alpha - 1).abs().max())
        if residual <= tol:
            return point(alpha)
        grad = g_alpha - 1 / alpha
        try:
            step = -torch.linalg.solve(G + torch.diag(alpha.pow(-2)), grad)
        except torch.linalg.LinAlgError:  # α has run off to infinity along a vanishing combination
            return None
        shrinking = step < 0
        t = min(1.0, 0.99 * float((-alpha[shrinking] / step[shrinking]).min())) if shrinking.any() else 1.0
        if residual > 1e-2:  # far from the solution: Armijo backtracking (near it, full quadratic steps;
            f0, slope = f(alpha), float(grad @ step)  # there f's rounding would stall the test)
            while t > 1e-12 and f(alpha + t * step) > f0 + 1e-4 * t * slope:
                t *= 0.5
        alpha = alpha + t * step
        if not torch.isfinite(alpha).all() or float(alpha.max()) > 1e12:
            return None
    residual = float((alpha * (G @ alpha) - 1).abs().max())
    if residual <= tol ** 0.5:
        return None if vanishes(alpha) else point(alpha)
    if no_point():
        return None
    raise NashNotConverged(residual, max_iters)
