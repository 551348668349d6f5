"""The scale convention: with aligned task gradients every method returns the EW update."""
import pytest
import torch

from balancer_toys import Toy, grads_of, toy_batch, toy_ctx
from mtl.balancers import JACOBIAN_METHODS, LOSS_LEVEL_METHODS, create_balancer

ALL = LOSS_LEVEL_METHODS + JACOBIAN_METHODS + ("flat",)
# cvxpy-based solvers stop at their tolerance; mgda and nash_mtl are solved exactly (solvers.py)
TOL = {"cagrad": 2e-2, "flat": 5e-2}


def shared_update(name, scales=None, **kw):
    torch.manual_seed(0)
    model = Toy(same_heads=True)
    x, y = toy_batch(same_targets=True)
    balancer = create_balancer(name, ["a", "b"], **kw)
    balancer.backward(toy_ctx(model, x, y, scales=scales))
    return grads_of(model.shared.parameters())


@pytest.mark.parametrize("name", ALL)
def test_identical_task_gradients_give_the_ew_update(name):
    # same head, same target -> g_a == g_b; EW gives 2 g
    kw = {"rho": 1e-4} if name == "flat" else {}
    ew = shared_update("ew")
    got = shared_update(name, **kw)
    if name == "rlw":  # random weights summing to T: same direction, norm in (0, 2 g]
        assert torch.nn.functional.cosine_similarity(got, ew, dim=0) > 0.999
        return
    assert torch.allclose(got, ew, rtol=TOL.get(name, 1e-4), atol=1e-6), (name, (got - ew).norm() / ew.norm())


@pytest.mark.parametrize("name", ALL)
def test_parallel_task_gradients_keep_direction_and_comparable_norm(name):
    # g_b = 3 g_a: EW gives 4 g_a; every method must point the same way with a norm within 4x
    kw = {"rho": 1e-4} if name == "flat" else {}
    ew = shared_update("ew", scales={"b": 3.0})
    got = shared_update(name, scales={"b": 3.0}, **kw)
    cos = torch.nn.functional.cosine_similarity(got, ew, dim=0)
    ratio = got.norm() / ew.norm()
    assert cos > 0.99, (name, cos)
    assert 0.25 <= ratio <= 4.0, (name, ratio)


@pytest.mark.parametrize("name", JACOBIAN_METHODS)
def test_features_level_also_follows_the_convention(name):
    ew = shared_update("ew")
    got = shared_update(name, level="features")
    assert torch.allclose(got, ew, rtol=TOL.get(name, 1e-4), atol=1e-6), (name, (got - ew).norm() / ew.norm())


def test_weights_are_reported_on_the_ew_scale():
    for name in JACOBIAN_METHODS:
        torch.manual_seed(0)
        model = Toy(same_heads=True)
        x, y = toy_batch(same_targets=True)
        b = create_balancer(name, ["a", "b"])
        b.backward(toy_ctx(model, x, y))
        w = b.weights()  # identical rows: any split gives the same update, every method reports the even one
        assert w["a"] == pytest.approx(1.0, abs=0.025) and w["b"] == pytest.approx(1.0, abs=0.025), (name, w)
