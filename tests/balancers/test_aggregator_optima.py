"""Each aggregator's defining optimum on a battery of gradient matrices, checked against a formulation
written here (a float64 QP for MGDA and CAGrad, the closed-form conditions for IMTL-G, PCGrad and
Nash-MTL), never against the library under test. The battery holds random, 120°-conflicting,
×100-norm-spread and near-parallel gradients for T ∈ {2, 3, 6}, P ∈ {10, 1000}."""
import cvxpy as cp
import pytest
import torch

from mtl.balancers import StepContext, create_balancer
from gradient_battery import battery
from mtl.balancers.solvers import NashNotConverged, nash_weights

BATTERY = [pytest.param(J, id=name) for name, J in battery()]


def aggregate(name: str, J: torch.Tensor, level: str = "params", **kw) -> torch.Tensor:
    """The balancer's shared-parameter update for losses L_t = ⟨θ, g_t⟩ (so its Jacobian is J); with
    level=features the representation z = θ carries the same Jacobian."""
    T, P = J.shape
    theta = torch.nn.Parameter(torch.zeros(P))
    z = theta * 1.0
    names = [f"t{i}" for i in range(T)]
    losses = {t: z @ J[i] for i, t in enumerate(names)}
    ctx = StepContext(losses, [theta], {t: [] for t in names}, z)
    torch.manual_seed(0)
    create_balancer(name, names, level=level, **kw).backward(ctx)
    return theta.grad.double()


def min_norm_qp(J: torch.Tensor) -> torch.Tensor:
    G = (J.double() @ J.double().T).numpy()
    a = cp.Variable(G.shape[0])
    cp.Problem(cp.Minimize(cp.quad_form(a, cp.psd_wrap(G))), [a >= 0, cp.sum(a) == 1]).solve(cp.CLARABEL)
    return torch.tensor(a.value) @ J.double()


@pytest.mark.parametrize("level", ["params", "features"])
@pytest.mark.parametrize("J", BATTERY)
def test_mgda_is_the_min_norm_point_of_the_hull(J, level):
    T = J.shape[0]
    d = aggregate("mgda", J, level) / T  # mtlkit scales the convex combination by T
    ref = min_norm_qp(J)
    assert d.norm() <= ref.norm() * (1 + 1e-4) + 1e-6 * J.norm(dim=1).max()
    # optimality without any solver: ⟨d, g_t⟩ ≥ ‖d‖² for every t (d is then the min-norm hull point)
    Jd = J.double() @ d
    assert Jd.min() >= (d @ d) * (1 - 1e-4) - 1e-6 * J.norm(dim=1).max() ** 2


@pytest.mark.parametrize("J", BATTERY)
def test_mgda_frank_wolfe_option_meets_its_stated_tolerance(J):
    T = J.shape[0]
    d = aggregate("mgda", J, solver="frank_wolfe", rtol=1e-6) / T
    ref = min_norm_qp(J)
    # stopping at gap <= rtol ||d||^2 bounds the squared-norm excess by 2 rtol (docs/balancers.md)
    assert d.norm() ** 2 <= ref.norm() ** 2 * (1 + 2.5e-6) + 1e-9 * J.norm(dim=1).max() ** 2


@pytest.mark.parametrize("J", BATTERY)
def test_imtl_g_projects_equally_on_every_unit_gradient(J):
    d = aggregate("imtl_g", J)
    u = J.double() / J.double().norm(dim=1, keepdim=True)
    proj = u @ d
    assert (proj.max() - proj.min()) <= 1e-5 * d.norm()


@pytest.mark.parametrize("eps", [1e-3, 3e-4, 0.0])
def test_imtl_g_on_nearly_opposite_gradients_follows_the_closed_form(eps):
    """g1 = (1, 0), g2 = (−2, ε): d = (α1 − 2α2, α2 ε), u2 ≈ (−1, 0), so d·u1 = d·u2 needs α1 = 2α2, and
    Σα = 1 gives α = (2/3, 1/3), d = (0, ε/3); × T = 2 in mtlkit. A float32 Gramian is singular at
    ε = 3e-4, where a pseudo-inverse of it stepped (−10, 0): uphill for task 1."""
    d = aggregate("imtl_g", torch.tensor([[1.0, 0.0], [-2.0, eps]]), level="params")
    assert d.tolist() == pytest.approx([0.0, 2 * eps / 3], abs=1e-6)


def test_imtl_g_with_more_tasks_than_dimensions_projects_equally():
    """(1,0), (0,1), (1,1)/√2-direction: equal projections on three units in 2-D force d = 0."""
    d = aggregate("imtl_g", torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    assert d.abs().max() < 1e-6


@pytest.mark.parametrize("J", [c for c in BATTERY if c.id.startswith("T2")])
def test_pcgrad_leaves_no_conflict_for_two_tasks(J):
    d = aggregate("pcgrad", J)
    Jd = J.double() @ d
    assert Jd.min() >= -1e-5 * J.double().norm(dim=1).max() * d.norm()


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("J", BATTERY)
def test_dual_cone_aggregators_leave_no_conflict(J, name):
    # UPGrad and DualProj land in the dual cone {d : ⟨g_t, d⟩ ≥ 0 ∀t}, a task 100× smaller in norm included
    d = aggregate(name, J)
    cos = (J.double() @ d) / (J.double().norm(dim=1) * d.norm()).clamp_min(1e-30)
    assert cos.min() >= -1e-4, cos


def test_a_small_task_stays_in_the_dual_cone():
    # the case TorchJD's default regulariser (1e-4 of the trace) got wrong: cosine −0.25 with task 3
    J = torch.tensor([[1.0, 0, 0.2], [-0.9, 0.3, 0.0], [0.1, -0.8, 0.5]]) * torch.tensor([[1.0], [10.0], [0.1]])
    for name in ("upgrad", "dualproj"):
        d = aggregate(name, J)
        cos = (J.double() @ d) / (J.double().norm(dim=1) * d.norm())
        assert cos.min() >= -1e-4, (name, cos)
    with pytest.raises(ValueError, match="reg_eps must be in"):
        create_balancer("upgrad", ["a", "b"], reg_eps=-1)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("ratio", [1e2, 1e3, 1e4, 1e5, 1e6])
def test_dual_cone_holds_whatever_the_spread_of_gradient_norms(name, ratio):
    # the dual cone {d : ⟨g_t, d⟩ ≥ 0 ∀t} does not depend on the rows' norms, so neither may the guarantee
    # (regularising G / trace(G) dropped the small task from ×1e4 on: cosine −0.09, then −0.67 at ×1e5)
    gen = torch.Generator().manual_seed(0)
    conflict = torch.tensor([[1.0, 0.0, 0.0], [-0.7071, 0.7071, 0.0]])
    three = torch.randn(3, 6, generator=gen) * torch.tensor([[1.0], [1 / ratio], [1 / ratio ** 0.5]])
    for J in (conflict * torch.tensor([[1.0], [1 / ratio]]), three):
        d = aggregate(name, J)
        cos = (J.double() @ d) / (J.double().norm(dim=1) * d.norm())
        assert cos.min() >= -1e-6, (name, ratio, cos)


@pytest.mark.parametrize("J", BATTERY)
def test_cagrad_reaches_the_optimum_of_its_primal_problem(J):
    c = 0.4
    T = J.shape[0]
    d = aggregate("cagrad", J, c=c) * (1 + c) / T  # back to TorchJD's g0 + c‖g0‖ u
    Jd = J.double()
    g0 = Jd.mean(0)
    # CAGrad (Liu et al. 2021): max_d min_t ⟨g_t, d⟩ subject to ‖d − g0‖ ≤ c‖g0‖, solved here directly
    x = cp.Variable(J.shape[1])
    prob = cp.Problem(cp.Maximize(cp.min(Jd.numpy() @ x)), [cp.norm(x - g0.numpy(), 2) <= c * float(g0.norm())])
    prob.solve(cp.CLARABEL)
    scale = float(Jd.norm(dim=1).max() * g0.norm())
    assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-4) + 1e-9
    assert float((Jd @ d).min()) >= prob.value - 2e-4 * scale  # Clarabel's default tolerance


@pytest.mark.parametrize("ratio", [1e2, 1e4, 1e5, 1e6])
def test_cagrad_reaches_its_primal_optimum_whatever_the_spread_of_gradient_norms(ratio):
    # its mean fallback (‖g_w‖ vanishing) fired on the trace-normalised ‖g_w‖ < 1e-4: from ×1e4 on the step
    # was the plain mean, min_t ⟨g_t, d⟩ −0.5 at ×7e5 where CAGrad's optimum is −0.22
    c = 0.4
    Jd = torch.tensor([[1000.0, 0.0, 0.0], [-1000 / ratio, 1000 / ratio, 0.0]], dtype=torch.float64)
    d = aggregate("cagrad", Jd.float(), c=c) * (1 + c) / 2
    g0 = Jd.mean(0)
    x = cp.Variable(3)
    prob = cp.Problem(cp.Maximize(cp.min(Jd.numpy() @ x)), [cp.norm(x - g0.numpy(), 2) <= c * float(g0.norm())])
    prob.solve(cp.CLARABEL)
    assert float((Jd @ d).min()) >= prob.value - 1e-4 * abs(prob.value), (ratio, (Jd @ d).tolist(), prob.value)


@pytest.mark.parametrize("J", BATTERY)
def test_nash_mtl_weights_meet_the_bargaining_stationarity_condition(J):
    """Navon et al. 2022: G α = 1/α elementwise (G the Gramian). mtlkit rescales α to sum to T, which
    keeps α_t (G α)_t equal across tasks: that scale-free form is what is checked."""
    T = J.shape[0]
    names = [f"t{i}" for i in range(T)]
    theta = torch.nn.Parameter(torch.zeros(J.shape[1]))
    losses = {t: theta @ J[i] for i, t in enumerate(names)}
    b = create_balancer("nash_mtl", names)
    b.backward(StepContext(losses, [theta], {t: [] for t in names}, None))
    w = torch.tensor([b.weights()[t] for t in names], dtype=torch.float64)
    G = J.double() @ J.double().T
    prod = w * (G @ w)
    # the Gramian is formed in float32 and the logged weights are float32: 1e-3 end to end
    assert float((prod.max() - prod.min()) / prod.mean()) <= 1e-3
    # the solver itself, on a float64 Gramian: the unscaled condition holds to its tolerance
    alpha = nash_weights(G)
    assert alpha is not None
    assert float((alpha * (G @ alpha) - 1).abs().max()) <= 1e-9


VANISHING = [  # 0 in the convex hull of the gradients: α_t (Gα)_t = 1 needs g_t·d > 0 for every t, so no point exists
    pytest.param([[1.0, 0.0], [-1.0, 0.0]], id="g1+g2=0"),
    pytest.param([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]], id="2g1+g2+g3=0-exact"),
    # not exact in float32: Newton ran to max_iters ("not converged, raise max_iters", which cannot help)
    pytest.param([[0.3, 0.1], [-0.7, 0.9], [0.1, -1.1]], id="2g1+g2+g3=0"),
    # three gradients in a plane around 0 (the auditor's draw): the float32 Gramian is slightly definite and
    # Newton "converged" to weights (0.08, 1.93, 0.99) whose update vanishes, counted nowhere, no warning
    pytest.param([[0.7930533289909363, -0.6315716505050659], [-0.0061949086375534534, -0.10106761008501053],
                  [-0.05230814963579178, 0.2492176592350006]], id="plane-around-0"),
]


@pytest.mark.parametrize("rows", VANISHING)
def test_nash_mtl_reports_a_vanishing_combination_and_uses_equal_weights(rows, caplog):
    J = torch.tensor(rows)
    names = [f"t{i}" for i in range(len(rows))]
    assert float(min_norm_qp(J).norm()) <= 1e-6 * float(J.norm(dim=1).max())  # 0 is in the hull
    theta = torch.nn.Parameter(torch.zeros(J.shape[1]))
    b = create_balancer("nash_mtl", names)
    with caplog.at_level("WARNING"):
        b.backward(StepContext({t: theta @ J[i] for i, t in enumerate(names)}, [theta], {t: [] for t in names}, None))
    assert (b.solver_failures, b.not_converged) == (1, 0)
    assert "no bargaining point" in caplog.text and "did not converge" not in caplog.text
    assert b.weights() == {t: 1.0 for t in names}
    assert torch.allclose(theta.grad, J.sum(0), atol=1e-6)  # the equal-weights update Σ g_t
    assert nash_weights(J.double() @ J.double().T, eps=torch.finfo(torch.float32).eps) is None


def test_nash_mtl_finds_the_point_of_a_hull_just_clear_of_0():
    # the hull of (1, 0) and (−1, 0.01) passes 0.005 from 0: a point exists, and is not taken for a vanishing one
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.01]])
    G = J.double() @ J.double().T
    alpha = nash_weights(G, eps=torch.finfo(torch.float32).eps)
    assert alpha is not None and float((alpha * (G @ alpha) - 1).abs().max()) <= 1e-9
    theta = torch.nn.Parameter(torch.zeros(2))
    b = create_balancer("nash_mtl", ["a", "b"])
    b.backward(StepContext({"a": theta @ J[0], "b": theta @ J[1]}, [theta], {"a": [], "b": []}, None))
    w = torch.tensor([b.weights()["a"], b.weights()["b"]], dtype=torch.float64)
    prod = w * (G @ w)
    assert (b.solver_failures, b.not_converged) == (0, 0) and float((prod.max() - prod.min()) / prod.mean()) <= 1e-3


def test_nash_mtl_tells_not_converged_from_no_bargaining_point(caplog):
    # a point exists: α1 = √2·α2 with α2²(2 − √2) = 1, i.e. (1.8478, 1.3066); 5 Newton steps reach it to √tol
    # (the solver returned None there: "no bargaining point", equal weights)
    G = torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    a2 = (1 / (2 - 2 ** 0.5)) ** 0.5
    assert nash_weights(G, 1e-10, 5).tolist() == pytest.approx([2 ** 0.5 * a2, a2], rel=1e-5)
    # nearly opposite gradients (cos ≈ −0.9999995): rounding keeps the residual ~1e-9 > tol, yet the point is reached
    torch.manual_seed(0)
    g = torch.randn(10, dtype=torch.float64)
    J = torch.stack([g, -g + 1e-3 * torch.randn(10, dtype=torch.float64)])
    alpha = nash_weights(J @ J.T)
    assert alpha is not None and float((alpha * (J @ J.T @ alpha) - 1).abs().max()) <= 1e-5
    # too few steps: not converged, said as such and counted apart from solver_failures
    with pytest.raises(NashNotConverged, match=r"max_iters=1 \(residual"):
        nash_weights(G, 1e-10, 1)
    theta = torch.nn.Parameter(torch.zeros(2))
    Jf = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    b = create_balancer("nash_mtl", ["a", "b"], max_iters=1)
    with caplog.at_level("WARNING"):
        b.backward(StepContext({"a": theta @ Jf[0], "b": theta @ Jf[1]}, [theta], {"a": [], "b": []}, None))
    assert (b.not_converged, b.solver_failures) == (1, 0)
    assert "did not converge within max_iters=1" in caplog.text and "no bargaining point" not in caplog.text
    assert b.diagnostics() == {"solver_failures": 0, "not_converged": 1}


DISPARATE = [  # gradients of very unequal norms: a bargaining point exists (no combination vanishes)
    pytest.param(torch.tensor([[1.0, 0.0], [0.0, 1e-4]]), id="orthogonal-1e-4"),
    *[pytest.param(torch.randn(len(r), 1000, generator=torch.Generator().manual_seed(s))
                   * torch.tensor(r)[:, None], id=f"random-{len(r)}x1000-seed{s}")
      for s, r in enumerate([(1.0, 1e-3, 1e-5), (1.0, 1e-2, 1e-4, 1e-5), (1e-3, 1.0, 1e-5, 3e-2)])],
]


@pytest.mark.parametrize("J", DISPARATE)
def test_nash_mtl_finds_the_point_of_gradients_of_disparate_scales(J):
    # a task whose gradient was under √(T·ε)·max‖g‖ (float32: ~5e-4) made every step "no bargaining point":
    # the vanishing test scaled with the largest gradient, while the min-norm point is never longer than the smallest
    names = [f"t{i}" for i in range(J.shape[0])]
    G = J.double() @ J.double().T
    alpha = nash_weights(G, eps=torch.finfo(torch.float32).eps)
    assert alpha is not None and float((alpha * (G @ alpha) - 1).abs().max()) <= 1e-9
    theta = torch.nn.Parameter(torch.zeros(J.shape[1]))
    b = create_balancer("nash_mtl", names)
    b.backward(StepContext({t: theta @ J[i] for i, t in enumerate(names)}, [theta], {t: [] for t in names}, None))
    w = torch.tensor([b.weights()[t] for t in names], dtype=torch.float64)
    prod = w * (G @ w)  # α_t (Gα)_t equal across tasks: the weights are the solution up to scale
    assert (b.solver_failures, b.not_converged) == (0, 0) and float((prod.max() - prod.min()) / prod.mean()) <= 1e-3


def _no_point_by_min_norm(G: torch.Tensor, eps: float) -> bool:
    """The direct test for 0 in the hull (what nash_weights used to run before every solve), on G at unit scale."""
    from mtl.balancers.solvers import _hull_nearly_vanishes, min_norm_weights
    G = G / float(G.diagonal().mean())
    norms, floor = G.diagonal().sqrt(), eps * G.shape[0]
    a = min_norm_weights(G)
    return float(a @ G @ a) <= floor * float(a @ norms) ** 2 or _hull_nearly_vanishes(G, norms, floor)


def test_nash_weights_runs_the_min_norm_solves_only_where_its_point_cannot_rule_out_0(monkeypatch):
    # every solve ran two min-norm solves (and an eigvalsh, a duality gap) before Newton: 3–7× the solve's cost
    import mtl.balancers.solvers as solvers
    calls = []
    real = solvers.min_norm_weights
    monkeypatch.setattr(solvers, "min_norm_weights", lambda G, *a, **kw: calls.append(1) or real(G, *a, **kw))
    for _, J in battery():
        assert nash_weights(J.double() @ J.double().T, eps=torch.finfo(torch.float32).eps) is not None
    for rows in VANISHING:  # Newton's iterates run off along the vanishing combination: seen without them either
        J = torch.tensor(rows.values[0])
        assert nash_weights((J @ J.T).double(), eps=torch.finfo(torch.float32).eps) is None
    assert calls == []  # Newton's point certified each hull clear of 0, or its iterate vanished
    # Newton stopped at max_iters: the direct test runs, to tell "not converged" from "no bargaining point"
    with pytest.raises(NashNotConverged):
        nash_weights(torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64), 1e-10, 1)
    assert calls


@pytest.mark.parametrize("T", [2, 3, 6])
@pytest.mark.parametrize("k", [0.3, 0.9, 1.1, 3.0, 30.0])
def test_nash_weights_agrees_with_the_direct_test_near_the_rounding_floor(T, k):
    # T unit gradients at pairwise cosine ρ: the hull's min-norm point has ‖d‖² = (1 + (T − 1)ρ)/T, set to k·floor
    eps = torch.finfo(torch.float32).eps
    rho = (k * T * eps * T - 1) / (T - 1)
    G = torch.full((T, T), rho, dtype=torch.float64).fill_diagonal_(1.0)
    assert (nash_weights(G, eps=eps) is None) == _no_point_by_min_norm(G, eps) == (k < 1)


@pytest.mark.parametrize("seed", range(12))
def test_nash_weights_agrees_with_the_direct_test_on_random_hulls(seed):
    # 6 gradients in R^3 of mixed scales: 0 is in their hull about half the time (Wendel)
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(6, 3, generator=gen) * torch.logspace(0, -3, 6)[torch.randperm(6, generator=gen)][:, None]
    G = (J @ J.T).double()  # formed in float32
    eps = torch.finfo(torch.float32).eps
    assert (nash_weights(G, eps=eps) is None) == _no_point_by_min_norm(G, eps)


def _nash_step(J: torch.Tensor):
    """nash_mtl's step on losses ⟨θ, g_t⟩ with θ (and so the Jacobian) in J's dtype: (balancer, weights, θ.grad)."""
    names = [f"t{i}" for i in range(J.shape[0])]
    theta = torch.nn.Parameter(torch.zeros(J.shape[1], dtype=J.dtype))
    b = create_balancer("nash_mtl", names)
    b.backward(StepContext({t: theta @ J[i] for i, t in enumerate(names)}, [theta], {t: [] for t in names}, None))
    return b, torch.tensor([b.weights()[t] for t in names], dtype=torch.float64), theta.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nash_mtl_on_a_half_precision_jacobian_finds_the_point_of_a_mild_conflict(dtype):
    # 10 unit gradients at pairwise cosine −0.05: the hull's min-norm point is √((1 − 9·0.05)/10) = 0.235 from 0.
    # The Gramian was formed in bf16 and judged at T·eps_bf16 = 0.078 (‖d‖ < 0.28): "no bargaining point", equal weights
    T, P = 10, 4096
    C = torch.full((T, T), -0.05, dtype=torch.float64).fill_diagonal_(1.0)
    Q, _ = torch.linalg.qr(torch.randn(P, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    J = (torch.linalg.cholesky(C) @ Q.T).to(dtype)
    b, w, grad = _nash_step(J)
    G = J.double() @ J.double().T  # the Gramian of the gradients as they are, in bf16/fp16
    prod = w * (G @ w)  # α_t (Gα)_t equal across tasks: the weights are the solution up to scale
    assert (b.solver_failures, b.not_converged) == (0, 0) and float((prod.max() - prod.min()) / prod.mean()) <= 1e-3
    assert grad.dtype == dtype


def test_nash_mtl_on_a_bf16_jacobian_still_sees_0_in_the_hull():
    g = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    b, w, _ = _nash_step(torch.stack([g, -g]))
    assert (b.solver_failures, b.not_converged) == (1, 0) and w.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dim", [3, 10, 1000])
@pytest.mark.parametrize("ratio", [1e-2, 1e-3, 1e-4])
@pytest.mark.parametrize("seed", [11, 0, 5])
def test_nash_weights_sees_0_in_a_hull_of_gradients_of_disparate_scales(seed, ratio, dim):
    # 0 = ¼g1 + ¼g2 + ½g3 with ‖g2‖ ≪ ‖g1‖: rounding leaves the float32 Gramian slightly indefinite and Wolfe's
    # min-norm solver cycled on the edge (g1, g2) for its 10,000 iterations (~3 s), short of the vanishing
    # point; nash_weights then raised NashNotConverged (or returned weights) instead of "no bargaining point"
    import time
    from mtl.balancers.solvers import min_norm_weights
    gen = torch.Generator().manual_seed(seed)
    g1 = torch.randn(dim, generator=gen)
    g2 = torch.randn(dim, generator=gen) * ratio
    J = torch.stack([g1, g2, -(0.5 * g1 + 0.5 * g2)])
    G = (J @ J.T).double()
    start = time.perf_counter()
    assert nash_weights(G, eps=torch.finfo(torch.float32).eps) is None
    min_norm_weights(G)
    assert time.perf_counter() - start < 0.5
