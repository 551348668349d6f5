"""BalancerMonitor: weights and gradient cosines every N steps, and the PNG."""
import pytest
import torch

from balancer_toys import Toy, toy_batch, toy_ctx
from mtl.balancers import BalancerMonitor, StepContext, create_balancer


def test_cosines_and_weights_every_n_steps(tmp_path):
    torch.manual_seed(0)
    model, balancer, monitor = Toy(tasks=("a", "b", "c")), create_balancer("dwa", ["a", "b", "c"], window=1), BalancerMonitor(every=2)
    x, y = toy_batch(tasks=("a", "b", "c"))
    # step 0's cosines by hand: each task's gradient over the shared parameters, normalised
    ctx0 = toy_ctx(model, x, y)
    shared = list(model.shared.parameters())
    g = {t: torch.cat([d.reshape(-1) for d in torch.autograd.grad(ctx0.losses[t], shared, retain_graph=True)])
         for t in ("a", "b", "c")}
    expected_cos = {f"{p}-{q}": float(g[p] @ g[q] / (g[p].norm() * g[q].norm())) for p, q in (("a", "b"), ("a", "c"), ("b", "c"))}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    logged = []
    for step in range(5):
        opt.zero_grad()
        ctx = toy_ctx(model, x, y, step=step)
        logs = monitor.before_backward(ctx)
        balancer.backward(ctx)  # the graph survived the monitor
        opt.step()
        balancer.after_step(ctx)
        logs |= monitor.after_step(ctx, balancer)
        logged.append(logs)
    assert [bool(l) for l in logged] == [True, False, True, False, True]
    keys = set(logged[0])
    assert {"balancer/weight/a", "balancer/weight/b", "balancer/weight/c"} <= keys
    assert {"balancer/cos/a-b", "balancer/cos/a-c", "balancer/cos/b-c"} <= keys
    for pair, cos in expected_cos.items():
        assert logged[0][f"balancer/cos/{pair}"] == pytest.approx(cos, abs=1e-5), pair
    assert logged[4]["balancer/weight/a"] == pytest.approx(balancer.weights()["a"])
    assert [h["step"] for h in monitor.history] == [0, 2, 4]
    png = monitor.save_plot(tmp_path / "run" / "balancer_weights.png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cosine_values_match_known_gradients():
    theta = torch.nn.Parameter(torch.zeros(2))
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([2.0, 0.0])
    losses = {"a": theta @ a, "b": theta @ b, "c": theta @ c}
    ctx = StepContext(losses, [theta], {t: [] for t in losses}, None, step=0)
    logs = BalancerMonitor(every=1).before_backward(ctx)
    assert logs["balancer/cos/a-b"] == pytest.approx(-1 / 2 ** 0.5, abs=1e-6)
    assert logs["balancer/cos/a-c"] == pytest.approx(1.0, abs=1e-6)


def test_features_level_cosines_and_empty_plot(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    x, y = toy_batch(same_targets=True)
    model.heads["b"].load_state_dict(model.heads["a"].state_dict())
    logs = BalancerMonitor(every=1, level="features").before_backward(toy_ctx(model, x, y))
    assert logs["balancer/cos/a-b"] == pytest.approx(1.0, abs=1e-5)
    assert BalancerMonitor().save_plot(tmp_path / "x.png") is None


def test_constant_weights_with_cosines_still_get_the_cosine_plot(tmp_path):
    """ew (and pcgrad, whose weights stay 1) measured the cosines but wrote no balancer_weights.png."""
    from matplotlib.image import imread

    flat = BalancerMonitor(every=1)
    flat.history = [{"step": s, "weights": {"a": 1.0, "b": 1.0}, "cos": {"a-b": c}} for s, c in enumerate([0.5, -0.2])]
    png = flat.save_plot(tmp_path / "ew.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flat.history[1]["weights"]["a"] = 2.0  # varying weights add their own panel above the cosines
    both = flat.save_plot(tmp_path / "both.png")
    assert imread(both).shape[0] > imread(png).shape[0]
    one_task = BalancerMonitor(every=1)
    one_task.history = [{"step": 0, "weights": {"a": 1.0}, "cos": {}}]
    assert one_task.save_plot(tmp_path / "one.png") is None and not (tmp_path / "one.png").exists()



def _cosines(rank=None):
    """The monitor's cosines at one step: of the whole batch (rank None), or of rank's half (every other sample)."""
    torch.manual_seed(0)
    x, y = toy_batch(n=16)
    part = slice(None) if rank is None else slice(rank, None, 2)
    return BalancerMonitor(every=1).before_backward(toy_ctx(Toy(), x[part], {t: v[part] for t, v in y.items()}))


def test_ddp_cosines_are_the_global_batchs_on_every_rank(tmp_path):
    """2 gloo ranks, each with half of one batch: the logged cosines are the whole batch's, as one process
    computes them (each rank's own half-batch cosine differed, even in sign, and only rank 0's was logged)."""
    from balancer_toys import on_two_gloo_ranks

    ranks = on_two_gloo_ranks(_cosines, tmp_path)
    one = _cosines()
    for got in ranks:
        assert got.keys() == one.keys() and got["balancer/cos/a-b"] == pytest.approx(one["balancer/cos/a-b"], abs=1e-6)
