"""Defining properties of the TorchJD-backed methods and of `flat`, and the wiring around them."""
import pytest
import torch
import torch.nn.functional as F

from balancer_toys import Toy, grads_of, toy_batch, toy_ctx
from mtl.balancers import JACOBIAN_METHODS, StepContext, create_balancer


def linear_problem(a, b):
    """Shared θ (features z = θ·1) and scalar heads: L_t = h_t ⟨z, v_t⟩, so g_t = v_t exactly."""
    theta = torch.nn.Parameter(torch.zeros(len(a)))
    heads = {t: torch.nn.Parameter(torch.ones(())) for t in ("a", "b")}
    z = theta * 1.0
    losses = {"a": heads["a"] * (z @ a), "b": heads["b"] * (z @ b)}
    ctx = StepContext(losses, [theta], {t: [h] for t, h in heads.items()}, z)
    return theta, heads, ctx


def conflicting_pairs():
    pairs = [(torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 0.5]))]
    g = torch.Generator().manual_seed(0)
    while len(pairs) < 6:
        a, b = torch.randn(5, generator=g), torch.randn(5, generator=g) * 2
        if a @ b < -0.1:
            pairs.append((a, b))
    return pairs


@pytest.mark.parametrize("name", ["pcgrad", "upgrad", "dualproj", "mgda"])
@pytest.mark.parametrize("pair", conflicting_pairs(), ids=lambda p: f"dot{float(p[0] @ p[1]):.2f}")
def test_no_negative_inner_product_with_any_task_gradient(name, pair):
    a, b = pair
    assert (a + b) @ a < 0 or (a + b) @ b < 0 or a @ b < 0  # the case is a real conflict
    theta, _, ctx = linear_problem(a, b)
    torch.manual_seed(0)
    create_balancer(name, ["a", "b"]).backward(ctx)
    d = theta.grad
    assert d.norm() > 0
    # DualProj's QP is regularised (TorchJD reg_eps=1e-4): non-conflicting up to ~1e-3 in cosine
    tol = 1e-2 if name == "dualproj" else 1e-5
    assert d @ a >= -tol * a.norm() * d.norm(), (name, d @ a)
    assert d @ b >= -tol * b.norm() * d.norm(), (name, d @ b)


def test_ew_does_conflict_in_the_first_case():
    a, b = conflicting_pairs()[0]
    theta, _, ctx = linear_problem(a, b)
    create_balancer("ew", ["a", "b"]).backward(ctx)
    assert theta.grad @ b < 0


def test_pcgrad_is_the_sum_of_projected_gradients():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 0.5])
    theta, _, ctx = linear_problem(a, b)
    create_balancer("pcgrad", ["a", "b"]).backward(ctx)
    pa = a - (a @ b) / (b @ b) * b
    pb = b - (a @ b) / (a @ a) * a
    assert torch.allclose(theta.grad, pa + pb, atol=1e-5)


def test_mgda_is_the_min_norm_point_of_the_hull_times_T():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 0.5])
    theta, _, ctx = linear_problem(a, b)
    create_balancer("mgda", ["a", "b"]).backward(ctx)
    gamma = torch.clamp(((b - a) @ b) / (a - b).pow(2).sum(), 0, 1)
    min_norm = gamma * a + (1 - gamma) * b
    assert torch.allclose(theta.grad, 2 * min_norm, atol=1e-3)


def test_heads_get_their_own_task_gradient():
    torch.manual_seed(0)
    model = Toy(bn=True)
    x, y = toy_batch()
    for name in JACOBIAN_METHODS:
        for level in ("params", "features"):
            model.zero_grad(set_to_none=True)
            ctx = toy_ctx(model, x, y)
            expected = {t: torch.autograd.grad(ctx.losses[t], list(model.heads[t].parameters()), retain_graph=True)
                        for t in ("a", "b")}
            create_balancer(name, ["a", "b"], level=level).backward(ctx)
            for t in ("a", "b"):
                for p, g in zip(model.heads[t].parameters(), expected[t]):
                    assert torch.allclose(p.grad, g, atol=1e-6), (name, level, t)


@pytest.mark.parametrize("name", ["upgrad", "mgda", "imtl_g", "aligned_mtl", "nash_mtl", "pcgrad"])
def test_features_level_is_the_weighted_sum_of_parameter_gradients(name):
    # aggregating w.r.t. the representation = combining parameter gradients with the weights it found
    torch.manual_seed(1)
    model = Toy()
    x, y = toy_batch(seed=3)
    ctx = toy_ctx(model, x, y)
    shared = list(model.shared.parameters())
    per_task = {t: torch.cat([g.reshape(-1) for g in torch.autograd.grad(ctx.losses[t], shared, retain_graph=True)])
                for t in ("a", "b")}
    balancer = create_balancer(name, ["a", "b"], level="features")
    balancer.backward(ctx)
    w = balancer.weights()
    expected = w["a"] * per_task["a"] + w["b"] * per_task["b"]
    assert torch.allclose(grads_of(shared), expected, atol=1e-5)


def test_without_features_the_jacobian_is_taken_over_the_parameters():
    torch.manual_seed(0)
    model = Toy()
    x, y = toy_batch()
    results = []
    for features in (True, False):
        model.zero_grad(set_to_none=True)
        create_balancer("upgrad", ["a", "b"]).backward(toy_ctx(model, x, y, features=features))
        results.append(grads_of(model.parameters()))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_nash_weights_sum_to_T_under_conflict():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 0.5])
    _, _, ctx = linear_problem(a, b)
    bal = create_balancer("nash_mtl", ["a", "b"])
    bal.backward(ctx)
    w = bal.weights()
    assert sum(w.values()) == pytest.approx(2.0, abs=1e-5)
    assert w["b"] > w["a"]  # the smaller gradient gets the larger weight


def test_cagrad_reduces_to_ew_when_c_is_zero():
    torch.manual_seed(0)
    model = Toy()
    x, y = toy_batch()
    out = {}
    for name, kw in (("ew", {}), ("cagrad", {"c": 0.0})):
        model.zero_grad(set_to_none=True)
        create_balancer(name, ["a", "b"], **kw).backward(toy_ctx(model, x, y))
        out[name] = grads_of(model.parameters())
    assert torch.allclose(out["ew"], out["cagrad"], atol=1e-5)


# --- flat ------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregator", ["upgrad", "mgda", "pcgrad", "nash_mtl"])
def test_flat_with_rho_zero_equals_its_base_aggregator_exactly(aggregator):
    x, y = toy_batch()
    out = {}
    for name, kw in ((aggregator, {}), ("flat", {"aggregator": aggregator, "rho": 0.0})):
        torch.manual_seed(0)
        model = Toy(bn=True)
        ctx = toy_ctx(model, x, y)
        torch.manual_seed(1)  # PCGrad draws a random order
        create_balancer(name, ["a", "b"], **kw).backward(ctx)
        out[name] = grads_of(model.parameters())
    assert torch.equal(out[aggregator], out["flat"])


def test_flat_adds_the_aggregated_sharpness_gradients():
    import copy

    x, y = toy_batch()
    torch.manual_seed(0)
    model = Toy()
    ref = copy.deepcopy(model)  # hand computation on a copy, so the balancer's graph stays valid
    rho = 0.3
    shared = list(ref.shared.parameters())
    plain, sam, head_sam = {}, {}, {}
    for t in ("a", "b"):
        head = list(ref.heads[t].parameters())
        _, preds = ref(x, [t])
        grads = torch.autograd.grad(F.mse_loss(preds[t], y[t]), shared + head)
        plain[t], h = grads[:len(shared)], grads[len(shared):]
        gn = torch.sqrt(sum((g ** 2).sum() for g in plain[t]))
        hn = torch.sqrt(sum((g ** 2).sum() for g in h))
        saved = [p.detach().clone() for p in shared + head]
        with torch.no_grad():
            for p, g in zip(shared, plain[t]):
                p.add_(g * rho / gn)
            for p, g in zip(head, h):
                p.add_(g * rho / hn)
        _, preds = ref(x, [t])
        grads = torch.autograd.grad(F.mse_loss(preds[t], y[t]), shared + head)
        sam[t], head_sam[t] = grads[:len(shared)], grads[len(shared):]
        with torch.no_grad():
            for p, s in zip(shared + head, saved):
                p.copy_(s)
    flat_rows = torch.stack([torch.cat([(s - g).reshape(-1) for s, g in zip(sam[t], plain[t])]) for t in ("a", "b")])
    plain_rows = torch.stack([torch.cat([g.reshape(-1) for g in plain[t]]) for t in ("a", "b")])
    from torchjd.aggregation import UPGrad

    expected = 2 * UPGrad()(plain_rows) + 2 * UPGrad()(flat_rows)  # both on the EW-sum scale (x T)
    create_balancer("flat", ["a", "b"], aggregator="upgrad", rho=rho).backward(toy_ctx(model, x, y))
    assert torch.allclose(grads_of(model.shared.parameters()), expected, atol=1e-5)
    assert not torch.allclose(flat_rows, torch.zeros_like(flat_rows))
    for t in ("a", "b"):  # heads take their own SAM gradient
        for p, g in zip(model.heads[t].parameters(), head_sam[t]):
            assert torch.allclose(p.grad, g, atol=1e-6)


def test_flat_recompute_leaves_batchnorm_statistics_and_weights_untouched():
    torch.manual_seed(0)
    model = Toy(bn=True)
    x, y = toy_batch()
    bn = model.shared[1]
    ctx = toy_ctx(model, x, y)  # the training forward updates the statistics once
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    weights = [p.detach().clone() for p in model.parameters()]
    create_balancer("flat", ["a", "b"], rho=0.5).backward(ctx)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p.detach(), w)


def test_flat_at_the_feature_level_is_refused_saying_why():
    for kw in ({"level": "features"}, {"aggregator_kwargs": {"level": "features"}}):
        with pytest.raises(ValueError, match=r"flat: balancer\.(aggregator_kwargs\.)?level must be 'params', got 'features': SAM perturbs the parameters"):
            create_balancer("flat", ["a", "b"], **kw)
    create_balancer("flat", ["a", "b"], level="params")  # the config's explicit default is accepted


# GradDrop's Algorithm 1 (Chen et al. 2020) by hand on A (batch 2 x 3 units), sign(A) = [[1, -1, 1], [-1, 1, 1]]
GD_A = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 2.0]])
GD_G1 = torch.tensor([[2.0, 1.0, -1.0], [1.0, 3.0, 4.0]])  # Σ_b sign(A)∘g1 = [1, 2, 3]


def test_graddrop_follows_algorithm_1_for_a_given_draw():
    from mtl.balancers.graddrop import sign_dropout

    g2 = torch.tensor([[-1.0, 1.0, 2.0], [3.0, -2.0, -6.0]])  # Σ_b sign(A)∘g2 = [-4, -3, -4]
    # P = ½(1 + [-3/5, -1/5, -1/7]) = [0.2, 0.4, 0.4286]; U = [0.1, 0.5, 0.9]: unit 0 keeps the positive G_t
    # (task 1), units 1 and 2 the negative ones (task 2); the masks are tiled over the batch
    got = sign_dropout(GD_A, [GD_G1, g2], torch.tensor([0.1, 0.5, 0.9]))
    assert torch.equal(got, torch.tensor([[2.0, 1.0, 2.0], [1.0, -2.0, -6.0]]))


def test_graddrop_features_level_takes_signs_after_sign_a_and_the_batch_sum():
    # z = x W with x = I and W = A; L_t = h_t Σ z∘g_t (h_t = 1), so ∂L_t/∂z = g_t and W.grad = the combined ∂z.
    # Here every G_t is positive on every unit (P = 1): Algorithm 1 keeps everything whatever U, while the
    # per-element signs (-1 vs +1 at [0, 1], 3 vs -3 at [1, 0]) would drop one gradient at random
    g2 = torch.tensor([[1.0, -1.0, 2.0], [-3.0, 2.0, 1.0]])  # Σ_b sign(A)∘g2 = [4, 3, 3]
    for seed in range(5):
        W = torch.nn.Parameter(GD_A.clone())
        heads = {t: torch.nn.Parameter(torch.ones(())) for t in ("a", "b")}
        z = torch.eye(2) @ W
        losses = {"a": heads["a"] * (z * GD_G1).sum(), "b": heads["b"] * (z * g2).sum()}
        ctx = StepContext(losses, [W], {t: [h] for t, h in heads.items()}, z)
        torch.manual_seed(seed)
        b = create_balancer("graddrop", ["a", "b"], level="features")
        b.backward(ctx)
        assert torch.equal(W.grad, GD_G1 + g2), (seed, W.grad)
        assert b.weights() == {"a": 1.0, "b": 1.0}


@pytest.mark.parametrize("name", ["mgda", "imtl_g"])
@pytest.mark.parametrize("level", ["params", "features"])
def test_identical_task_gradients_share_the_weight_equally(name, level):
    # any split of Σw = 2 gives the update 2a; the solvers used to report {2, 0}
    a = torch.tensor([3.0, -1.0, 0.5])
    theta, _, ctx = linear_problem(a, a.clone())
    balancer = create_balancer(name, ["a", "b"], level=level)
    balancer.backward(ctx)
    assert balancer.weights() == {"a": 1.0, "b": 1.0}
    assert torch.allclose(theta.grad, 2 * a, atol=1e-6)


def test_mgda_splits_only_inside_a_group_of_identical_gradients():
    from mtl.balancers.solvers import min_norm_weights

    J = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    alpha = min_norm_weights(J @ J.T)
    # min-norm point of the hull of (1, 0) and (0, 1): (½, ½); the (1, 0) pair shares its ½
    assert torch.allclose(alpha, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    assert torch.allclose(alpha @ J, torch.tensor([0.5, 0.5], dtype=torch.float64))
