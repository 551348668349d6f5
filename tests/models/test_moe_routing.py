"""MoE primitives against their definitions: top-k routing, cv² balance loss, sparse dispatch, MI."""
import math

import pytest
import torch
import torch.nn.functional as F

from mtl.models.moe import StackedExperts, TopKRouter, cv_squared, task_expert_mutual_information


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_picks_exactly_k_experts_with_softmax_weights(renormalize):
    torch.manual_seed(0)
    router = TopKRouter(8, num_experts=6, top_k=2, renormalize=renormalize, noisy=False).eval()
    x = torch.randn(50, 8)
    r = router(x)
    assert r.index.shape == (50, 2) and r.weight.shape == (50, 2)
    assert all(len(set(row)) == 2 for row in r.index.tolist())  # k distinct experts per token
    # definition: p = softmax(x W^T); chosen = the k largest p; weight = p (renormalised: / sum over chosen)
    p = torch.softmax(x @ router.gate.weight.T, dim=-1)
    expected_idx = p.argsort(dim=-1, descending=True)[:, :2]
    assert torch.equal(r.index.sort(-1).values, expected_idx.sort(-1).values)
    chosen = p.gather(1, r.index)
    expected_w = chosen / chosen.sum(-1, keepdim=True) if renormalize else chosen
    assert torch.allclose(r.weight, expected_w, atol=1e-6)


def test_default_top1_weight_is_the_raw_probability_so_the_router_gets_a_task_gradient():
    # Switch Transformer (k = 1): y = p_i(x) E_i(x), i = argmax p; renormalised, p_i / p_i = 1 carries no gradient
    torch.manual_seed(0)
    router = TopKRouter(8, num_experts=6, top_k=1, noisy=False).eval()
    x = torch.randn(20, 8)
    r = router(x)
    p = torch.softmax(x @ router.gate.weight.T, dim=-1)
    assert torch.equal(r.index[:, 0], p.argmax(-1))
    assert torch.allclose(r.weight[:, 0], p.max(-1).values, atol=1e-7)
    r.weight.sum().backward()
    # d p_i / d logit_j = p_i (δ_ij − p_j); logit = x Wᵀ, so dL/dW = Σ_tokens (dL/dlogit)ᵀ x
    pi = p.max(-1).values.detach()
    onehot = F.one_hot(p.argmax(-1), 6).float()
    expected = ((pi[:, None] * (onehot - p.detach())).T @ x)
    assert torch.allclose(router.gate.weight.grad, expected, atol=1e-6) and expected.norm() > 1e-3
    assert TopKRouter(8, num_experts=6, top_k=2, noisy=False).renormalize  # k > 1: renormalised by default


def test_router_under_bf16_autocast_routes_like_float32():
    # bf16 gate logits tie at the k-th place for many tokens (7 % chose another top-4 set here): the router
    # must compute in float32 under mixed precision, as the loaded / exported float32 model does
    torch.manual_seed(0)
    router = TopKRouter(32, num_experts=16, top_k=4, noisy=False).eval()
    x = torch.randn(1000, 32)
    ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x)
    assert r.probs.dtype == torch.float32
    assert torch.equal(r.index, ref.index) and torch.equal(r.weight, ref.weight)


def test_router_restricted_to_selectable_keeps_parent_probabilities():
    torch.manual_seed(0)
    router = TopKRouter(4, num_experts=5, top_k=2, renormalize=False, noisy=False).eval()
    x = torch.randn(20, 4)
    keep = torch.tensor([0, 2, 4])
    r = router(x, keep)
    p = torch.softmax(x @ router.gate.weight.T, dim=-1)
    assert torch.allclose(r.weight, p[:, keep].gather(1, r.index), atol=1e-6)  # softmax over all 5
    assert int(r.index.max()) < 3


@pytest.mark.parametrize("k,e", [(0, 4), (5, 4), (-1, 4)])
def test_bad_top_k_is_a_clear_error_naming_the_value(k, e):
    with pytest.raises(ValueError, match=f"top_k={k}"):
        TopKRouter(4, num_experts=e, top_k=k)


def test_cv_squared_formula_and_balance_minimal_for_uniform_routing():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean, var = 3.0, ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3  # unbiased variance
    assert cv_squared(x).item() == pytest.approx(var / mean**2, rel=1e-6)
    uniform = cv_squared(torch.full((8,), 5.0)) * 2           # importance and load both uniform
    collapsed = cv_squared(torch.tensor([40.0] + [0.0] * 7)) * 2
    assert uniform.item() == 0.0 and collapsed.item() > 1.0
    # collapse onto one of E experts: cv² = E (unbiased) for each of importance and load
    assert collapsed.item() == pytest.approx(2 * 8, rel=1e-6)


def test_router_balance_loss_uniform_vs_collapsed():
    router = TopKRouter(2, num_experts=4, top_k=1, noisy=False).eval()
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4, 2) * 10)  # expert 0 for x=(1,0), expert 1 for x=(0,1)
        router.gate.weight[2:] = torch.tensor([[-10.0, 0.0], [0.0, -10.0]])
    x_uniform = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]).repeat(4, 1)
    x_collapsed = torch.tensor([[1.0, 0.0]]).repeat(16, 1)
    bal_u, bal_c = router(x_uniform).balance.item(), router(x_collapsed).balance.item()
    assert bal_u < 1e-3 and bal_c > 1.0


def test_sparse_dispatch_equals_dense_reference():
    torch.manual_seed(0)
    experts = StackedExperts(5, 6, 7)
    x = torch.randn(30, 6, requires_grad=True)
    index = torch.stack([torch.randperm(5)[:3] for _ in range(30)])
    weight = torch.rand(30, 3)
    y = experts.sparse(x, index, weight)
    # dense reference: every expert on every token with the formula written out, then pick
    ref = torch.zeros(30, 6)
    for i in range(30):
        for j in range(3):
            e = int(index[i, j])
            h = F.gelu(x[i] @ experts.w1[e] + experts.b1[e])
            ref[i] += weight[i, j] * (h @ experts.w2[e] + experts.b2[e])
    assert torch.allclose(y, ref, atol=1e-5)
    g_sparse = torch.autograd.grad(y.square().sum(), [x, experts.w1])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, experts.w1])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_sparse, g_ref))
    assert torch.allclose(experts.dense(x)[2], experts.expert(2, x), atol=1e-5)


def test_sparse_dispatch_skips_unrouted_experts():
    experts = StackedExperts(4, 3, 5)
    calls = []
    orig = experts.expert
    experts.expert = lambda e, x, *w: calls.append(e) or orig(e, x, *w)
    experts.sparse(torch.randn(6, 3), torch.tensor([[1], [3]] * 3), torch.ones(6, 1))
    assert sorted(calls) == [1, 3]


def test_mutual_information_extremes():
    # every task its own expert: MI = log T; all tasks the same distribution: MI = 0
    assert task_expert_mutual_information(torch.eye(3)).item() == pytest.approx(math.log(3), rel=1e-4)
    assert task_expert_mutual_information(torch.full((3, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-6)
