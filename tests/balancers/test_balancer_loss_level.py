"""Defining properties of the loss-level methods, checked against hand computations."""
import math

import pytest
import torch

import mtl

from balancer_toys import Toy, toy_batch, toy_ctx
from mtl.balancers import StepContext, create_balancer


def fixed_losses(values, step=0, epoch=0, recompute=None):
    """Losses with given values, each depending on its own coefficient (so backward works)."""
    p = torch.nn.Parameter(torch.ones(len(values)))
    losses = {t: p[i] * v for i, (t, v) in enumerate(values.items())}
    return p, StepContext(losses, [p], {t: [] for t in values}, None, recompute=recompute, step=step, epoch=epoch)


# --- UW --------------------------------------------------------------------------------------


def test_uw_loss_form():
    uw = create_balancer("uw", ["a", "b"])
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.5, -0.3]))
    L = {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}
    expected = math.exp(-0.5) * 2.0 + 0.5 + math.exp(0.3) * 3.0 - 0.3
    assert uw.combine(L).item() == pytest.approx(expected, rel=1e-6)
    assert uw.weights() == pytest.approx({"a": math.exp(-0.5), "b": math.exp(0.3)})


def test_uw_is_twice_the_papers_form_which_adam_does_not_see():
    # docs/balancers.md: Σ exp(-s)L + s = 2 × the paper's (and LibMTL's) Σ ½exp(-s)L + ½s; Adam
    # normalises each parameter's gradient, so both forms take the same steps
    uw = create_balancer("uw", ["a", "b"])
    half = torch.nn.Parameter(torch.zeros(2))
    opts = [torch.optim.Adam(uw.parameters(), lr=0.05), torch.optim.Adam([half], lr=0.05)]
    for step in range(50):
        for o in opts:
            o.zero_grad()
        _, ctx = fixed_losses({"a": 4.0, "b": 0.25}, step=step)
        uw.backward(ctx)
        L = torch.tensor([4.0, 0.25])
        (0.5 * torch.exp(-half) * L + 0.5 * half).sum().backward()
        assert torch.allclose(uw.log_vars.grad, 2 * half.grad)
        for o in opts:
            o.step()
    assert torch.allclose(uw.log_vars, half, atol=1e-5)


def test_uw_log_variances_learn_toward_log_loss():
    # for fixed L_t the optimum of exp(-s) L + s is s = log L: big losses get small weights
    uw = create_balancer("uw", ["a", "b"])
    opt = torch.optim.SGD(uw.parameters(), lr=0.1)
    for step in range(300):
        opt.zero_grad()
        _, ctx = fixed_losses({"a": 4.0, "b": 0.25}, step=step)
        uw.backward(ctx)
        opt.step()
        if step == 0:
            assert uw.log_vars[0] > 0 > uw.log_vars[1]
    assert torch.allclose(uw.log_vars.detach(), torch.tensor([math.log(4.0), math.log(0.25)]), atol=0.05)
    w = uw.weights()
    assert w["a"] < 1 < w["b"]


def test_uw_is_trained_by_the_module_optimiser_on_a_real_model():
    torch.manual_seed(0)
    model, uw = Toy(), create_balancer("uw", ["a", "b"])
    x, y = toy_batch()
    opt = torch.optim.Adam(list(model.parameters()) + list(uw.parameters()), lr=0.01)
    for step in range(5):
        opt.zero_grad()
        uw.backward(toy_ctx(model, x, y, step=step, scales={"a": 10.0}))
        opt.step()
    assert uw.log_vars[0] > uw.log_vars[1]  # the 10x task is down-weighted


# --- DWA -------------------------------------------------------------------------------------


def run_dwa(dwa, schedule):
    """schedule: list of (step, epoch, {task: loss}); returns the weights used at each step."""
    used = []
    for step, epoch, values in schedule:
        _, ctx = fixed_losses(values, step=step, epoch=epoch)
        dwa.backward(ctx)
        used.append(dwa.weights())
    return used


def test_dwa_weights_from_loss_ratios_per_step_window():
    dwa = create_balancer("dwa", ["a", "b"], temperature=2.0, window=2)
    schedule = [(0, 0, {"a": 2.0, "b": 1.0}), (1, 0, {"a": 2.0, "b": 1.0}),   # window 0: means 2, 1
                (2, 0, {"a": 1.5, "b": 0.8}), (3, 0, {"a": 0.5, "b": 1.0}),   # window 1: means 1, 0.9
                (4, 0, {"a": 1.0, "b": 1.0})]
    used = run_dwa(dwa, schedule)
    for w in used[:4]:  # fewer than two finished windows -> EW
        assert w == {"a": 1.0, "b": 1.0}
    ra, rb = 1.0 / 2.0, 0.9 / 1.0
    ea, eb = math.exp(ra / 2), math.exp(rb / 2)
    assert used[4]["a"] == pytest.approx(2 * ea / (ea + eb), rel=1e-5)
    assert used[4]["b"] == pytest.approx(2 * eb / (ea + eb), rel=1e-5)
    assert sum(used[4].values()) == pytest.approx(2.0)
    assert used[4]["b"] > used[4]["a"]  # the task whose loss fell less gets more weight


def test_dwa_a_window_whose_mean_loss_was_zero_takes_ratio_one():
    """L̄(k−2) = 0 (every batch of a window without a valid pixel) has no descent rate: r = 1 for that
    task, the others keep theirs (a clamped divisor made r ~ 1e12 and gave that task all the weight)."""
    dwa = create_balancer("dwa", ["a", "b"], temperature=2.0, window=1)
    used = run_dwa(dwa, [(0, 0, {"a": 1.0, "b": 0.0}), (1, 0, {"a": 0.5, "b": 0.5}), (2, 0, {"a": 1.0, "b": 1.0})])
    ea, eb = math.exp(0.5 / 2), math.exp(1.0 / 2)  # r_a = 0.5 / 1, r_b = 1 (no ratio)
    assert used[2]["a"] == pytest.approx(2 * ea / (ea + eb), rel=1e-5)
    assert used[2]["b"] == pytest.approx(2 * eb / (ea + eb), rel=1e-5)


def test_dwa_epoch_window_and_three_tasks_sum_to_T():
    dwa = create_balancer("dwa", ["a", "b", "c"], temperature=2.0)
    schedule = [(0, 0, {"a": 3.0, "b": 2.0, "c": 1.0}), (1, 0, {"a": 1.0, "b": 2.0, "c": 1.0}),  # means 2, 2, 1
                (2, 1, {"a": 1.0, "b": 1.0, "c": 1.0}), (3, 1, {"a": 1.0, "b": 3.0, "c": 2.0}),  # means 1, 2, 1.5
                (4, 2, {"a": 1.0, "b": 1.0, "c": 1.0})]
    used = run_dwa(dwa, schedule)
    r = torch.tensor([1 / 2, 2 / 2, 1.5 / 1])
    expected = 3 * torch.softmax(r / 2, 0)
    assert torch.allclose(torch.tensor([used[4][t] for t in "abc"]), expected, atol=1e-6)
    assert sum(used[4].values()) == pytest.approx(3.0)


def test_dwa_gradient_uses_its_weights():
    dwa = create_balancer("dwa", ["a", "b"], window=1)
    run_dwa(dwa, [(0, 0, {"a": 1.0, "b": 1.0}), (1, 0, {"a": 0.5, "b": 1.0})])
    p, ctx = fixed_losses({"a": 1.0, "b": 1.0}, step=2)
    dwa.backward(ctx)
    w = dwa.weights()
    assert torch.allclose(p.grad, torch.tensor([w["a"], w["b"]]))


def test_dwa_open_window_survives_a_state_dict_round_trip():
    schedule = [(0, 0, {"a": 2.0, "b": 1.0}), (1, 0, {"a": 2.0, "b": 1.0}), (2, 0, {"a": 1.0, "b": 0.5})]
    dwa = create_balancer("dwa", ["a", "b"], window=2)
    run_dwa(dwa, schedule)  # window 1 is open, holding one step
    other = create_balancer("dwa", ["a", "b"], window=2)
    other.load_state_dict(dwa.state_dict())
    rest = [(3, 0, {"a": 1.0, "b": 0.9}), (4, 0, {"a": 1.0, "b": 1.0})]
    assert run_dwa(other, rest) == run_dwa(dwa, rest)
    assert dwa.weights()["a"] != 1.0


# --- RLW -------------------------------------------------------------------------------------


def test_rlw_weights_are_random_positive_and_sum_to_T():
    rlw = create_balancer("rlw", ["a", "b", "c"])
    seen = []
    for step in range(5):
        p, ctx = fixed_losses({"a": 1.0, "b": 2.0, "c": 3.0}, step=step)
        rlw.backward(ctx)
        w = rlw.weights()
        assert sum(w.values()) == pytest.approx(3.0, rel=1e-5) and min(w.values()) > 0
        assert torch.allclose(p.grad, torch.tensor([w["a"], 2 * w["b"], 3 * w["c"]]), rtol=1e-5)
        seen.append(w["a"])
    assert len(set(seen)) == 5


# --- GradNorm --------------------------------------------------------------------------------


def gradnorm_ctx(values, directions, step=0):
    """Shared W (zero) with L_t = ⟨W, V_t⟩ + value_t: known loss values and anchor gradients V_t."""
    W = torch.nn.Parameter(torch.zeros(2, 3))
    losses = {t: (W * directions[t]).sum() + v for t, v in values.items()}
    return W, StepContext(losses, [W], {t: [] for t in values}, None, step=step)


def test_gradnorm_raises_the_weight_of_the_slower_task_and_keeps_sum_T():
    V = {"a": torch.full((2, 3), 1 / math.sqrt(6)), "b": -torch.full((2, 3), 1 / math.sqrt(6))}  # equal norms
    gn = create_balancer("gradnorm", ["a", "b"], alpha=1.5, lr=0.1, optimizer="sgd")
    _, ctx = gradnorm_ctx({"a": 1.0, "b": 1.0}, V)  # sets L(0)
    gn.backward(ctx)
    assert gn.weights() == {"a": 1.0, "b": 1.0}
    history = []
    for step in range(1, 6):  # task a does not improve, task b halves: a trains slower
        _, ctx = gradnorm_ctx({"a": 1.0, "b": 0.5}, V, step=step)
        gn.backward(ctx)
        w = gn.task_weights.tolist()
        assert sum(w) == pytest.approx(2.0, rel=1e-5)
        history.append(w[0])
    assert history[0] > 1.0 and all(b > a for a, b in zip(history, history[1:]))


def test_gradnorm_takes_a_negative_losss_training_rate_as_zero():
    """A negative loss (an aux term) has no rate L/L(0): r = 0, target norm 0, so with equal gradient norms
    that task's weight falls and the other's rises (r^α of a negative r was NaN, the update silently 0)."""
    V = {"a": torch.full((2, 3), 1 / math.sqrt(6)), "b": -torch.full((2, 3), 1 / math.sqrt(6))}  # equal norms
    gn = create_balancer("gradnorm", ["a", "b"], alpha=1.5, lr=0.1, optimizer="sgd")
    _, ctx = gradnorm_ctx({"a": 1.0, "b": 1.0}, V)  # sets L(0)
    gn.backward(ctx)
    _, ctx = gradnorm_ctx({"a": 1.0, "b": -0.5}, V, step=1)
    gn.backward(ctx)
    # rates (1, 0) -> r = (2, 0); G = (1, 1), target = (2^1.5, 0): sign(G - target) = (-1, +1), each times its norm 1
    # SGD lr 0.1: (1.1, 0.9), renormalised to sum 2
    assert gn.task_weights.tolist() == pytest.approx([1.1, 0.9], rel=1e-5)


def test_gradnorm_takes_each_tasks_initial_loss_at_its_first_positive_loss():
    """A first batch without a valid pixel gives a loss of exactly 0: as L(0) it made that task's rate
    L/L(0) look 10¹² x too fast for the whole run, and its weight grew while the tasks stayed equal."""
    V = {"a": torch.full((2, 3), 1 / math.sqrt(6)), "b": -torch.full((2, 3), 1 / math.sqrt(6))}
    gn = create_balancer("gradnorm", ["a", "b"], alpha=1.5, lr=0.1, optimizer="sgd")
    _, ctx = gradnorm_ctx({"a": 0.0, "b": 2.0}, V)
    gn.backward(ctx)
    assert math.isnan(gn.initial_losses[0]) and gn.initial_losses[1] == 2.0
    _, ctx = gradnorm_ctx({"a": 3.0, "b": 2.0}, V, step=1)
    gn.backward(ctx)
    assert gn.initial_losses.tolist() == [3.0, 2.0]
    for step in range(2, 8):  # both at their L(0), equal gradient norms: r = 1, nothing to rebalance
        _, ctx = gradnorm_ctx({"a": 3.0, "b": 2.0}, V, step=step)
        gn.backward(ctx)
    assert gn.task_weights.tolist() == [1.0, 1.0]


def test_gradnorm_hand_computed_step_and_network_gradient():
    V = {"a": torch.full((2, 3), 2 / math.sqrt(6)), "b": torch.full((2, 3), 1 / math.sqrt(6))}  # norms 2, 1
    gn = create_balancer("gradnorm", ["a", "b"], alpha=1.5, lr=0.1, optimizer="sgd")
    W, ctx = gradnorm_ctx({"a": 1.0, "b": 1.0}, V)
    gn.backward(ctx)
    # network gradient with the weights in force (1, 1)
    assert torch.allclose(W.grad, V["a"] + V["b"])
    # equal rates (r = 1): target = mean G = 1.5; G = (2, 1) -> grad_w = (sign(0.5)*2, sign(-0.5)*1) = (2, -1)
    w = torch.tensor([1.0, 1.0]) - 0.1 * torch.tensor([2.0, -1.0])
    w = w * 2 / w.sum()
    assert torch.allclose(gn.task_weights, w)
    assert gn.task_weights[0] < gn.task_weights[1]  # the larger gradient norm gets down-weighted


def test_gradnorm_measures_the_norms_at_the_anchor_the_context_names():
    """W is ctx.anchor when given (the model's last shared layer weight), not the last 2-D shared parameter
    (a stacked expert bias b2 there once made GradNorm weigh the tasks by their bias gradients)."""
    V = {"a": torch.full((2, 3), 2 / math.sqrt(6)), "b": torch.full((2, 3), 1 / math.sqrt(6))}  # norms 2, 1 at W
    W, ctx = gradnorm_ctx({"a": 1.0, "b": 1.0}, V)
    bias = torch.nn.Parameter(torch.zeros(2, 3))  # later in the list; the gradient norms are reversed there
    ctx.losses = {t: loss + (bias * V["b" if t == "a" else "a"]).sum() for t, loss in ctx.losses.items()}
    ctx.shared_params, ctx.anchor = [W, bias], W
    gn = create_balancer("gradnorm", ["a", "b"], alpha=1.5, lr=0.1, optimizer="sgd")
    gn.backward(ctx)
    w = torch.tensor([1.0, 1.0]) - 0.1 * torch.tensor([2.0, -1.0])  # G = (2, 1) at W, as by hand above
    assert torch.allclose(gn.task_weights, w * 2 / w.sum())


def test_the_last_shared_layer_weight_is_a_weight_not_a_bias_or_a_router():
    from mtl.models.families import last_shared_weight
    from mtl.models.task_moe_vit import TaskMoEViT
    from mtl.tasks import create_task

    def anchor(model):
        return next(n for n, p in model.named_parameters() if p is last_shared_weight(model))

    tasks = [create_task("depth"), create_task("semseg", num_classes=5)]
    assert anchor(mtl.create_model(tasks, backbone="test_resnet")) == "decoder.neck.refine.0.weight"
    assert anchor(mtl.create_model(tasks, backbone="test_resnet", decoder="moe")) == "decoder.experts.4.w2"
    for gate in ("per_task", "task_embedding"):  # b2 (stacked biases); router.noise.weight (task_embedding)
        assert anchor(TaskMoEViT(tasks, {"img_size": 32}, {"gate": gate})) == "blocks.5.mlp.experts.w2"


def test_gradnorm_runs_at_both_levels_on_a_model():
    for level in ("params", "features"):
        torch.manual_seed(0)
        model, gn = Toy(), create_balancer("gradnorm", ["a", "b"], level=level)
        x, y = toy_batch()
        for step in range(3):
            model.zero_grad()
            gn.backward(toy_ctx(model, x, y, step=step, scales={"a": 5.0}))
        assert sum(gn.weights().values()) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("level", ["params", "features"])
def test_gradnorm_single_pass_through_features_gives_the_weighted_gradient(level):
    """With the representation known, GradNorm builds the network gradient head by head and runs the
    shared part once: it must equal the plain backward of Σ w_t L_t with the weights in force, and
    (params level) the weights must follow the same path as without the representation."""
    from balancer_toys import grads_of

    runs = {}
    for features in (True, False) if level == "params" else (True,):
        torch.manual_seed(0)
        model, gn = Toy(), create_balancer("gradnorm", ["a", "b"], level=level, lr=0.1)
        x, y = toy_batch()
        trajectory = []
        for step in range(3):
            w = gn.task_weights.clone()
            model.zero_grad()
            ref = toy_ctx(model, x, y, step=step, scales={"a": 5.0})
            (w[0] * ref.losses["a"] + w[1] * ref.losses["b"]).backward()
            expected = grads_of(model.parameters()).clone()
            model.zero_grad()
            gn.backward(toy_ctx(model, x, y, step=step, scales={"a": 5.0}, features=features))
            assert torch.allclose(grads_of(model.parameters()), expected, atol=1e-6)
            trajectory.append(gn.task_weights.clone())
        assert not torch.allclose(trajectory[-1], torch.ones(2))  # the weights moved
        runs[features] = torch.stack(trajectory)
    if level == "params":
        assert torch.allclose(runs[True], runs[False], atol=1e-6)


# --- FAMO ------------------------------------------------------------------------------------


def test_famo_weights_and_one_backward_per_step():
    torch.manual_seed(0)
    model = Toy()
    x, y = toy_batch()
    famo = create_balancer("famo", ["a", "b"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    grad_events, backward_calls = [], []
    shared_weight = model.shared[0].weight
    shared_weight.register_hook(lambda g: grad_events.append(1))
    for step in range(3):
        opt.zero_grad()
        ctx = toy_ctx(model, x, y, step=step)
        inner = ctx.backward
        ctx.backward = lambda loss, **kw: (backward_calls.append(1), inner(loss, **kw))
        n_before = len(grad_events)
        famo.backward(ctx)
        opt.step()
        famo.after_step(ctx)
        assert len(grad_events) - n_before == 1  # one gradient computation through the model per step
    assert len(backward_calls) == 3


def test_famo_weights_hand_computed():
    famo = create_balancer("famo", ["a", "b"])
    p, ctx = fixed_losses({"a": 2.0, "b": 1.0})
    famo.backward(ctx)
    # z = (1/2, 1/2); z/L = (1/4, 1/2); w = 2 (z/L) / Σ z/L = (2/3, 4/3)
    assert famo.weights() == pytest.approx({"a": 2 / 3, "b": 4 / 3})
    assert torch.allclose(p.grad, torch.tensor([2 / 3 * 2.0, 4 / 3 * 1.0]))


def test_famo_logits_move_as_defined_sgd():
    lr, wd = 0.5, 0.1
    famo = create_balancer("famo", ["a", "b"], lr=lr, weight_decay=wd, optimizer="sgd")
    before, after = {"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 0.9}
    recompute = lambda tasks=None: {t: torch.tensor(v) for t, v in after.items()}  # noqa: E731
    _, ctx = fixed_losses(before, recompute=recompute)
    famo.backward(ctx)
    famo.after_step(ctx)
    z = torch.tensor([0.5, 0.5])
    delta = torch.tensor([math.log(2.0) - math.log(1.0), math.log(1.0) - math.log(0.9)])
    J = torch.diag(z) - torch.outer(z, z)
    xi = torch.zeros(2) - lr * (J @ delta + wd * torch.zeros(2))
    assert torch.allclose(famo.logits, xi, atol=1e-6)
    assert famo.logits[0] < 0 < famo.logits[1]  # the task that improved more loses weight
    # second step: weight decay acts on the new logits
    _, ctx = fixed_losses(before, step=1, recompute=recompute)
    famo.backward(ctx)
    z2 = torch.softmax(xi, 0)
    assert famo.weights()["a"] == pytest.approx(float(2 * (z2[0] / 2) / (z2[0] / 2 + z2[1] / 1)), rel=1e-5)
    famo.after_step(ctx)
    J2 = torch.diag(z2) - torch.outer(z2, z2)
    xi2 = xi - lr * (J2 @ delta + wd * xi)
    assert torch.allclose(famo.logits, xi2, atol=1e-6)


def test_famo_a_task_with_zero_loss_gets_no_weight_and_keeps_its_logit():
    """A batch without a valid pixel gives a loss of 0: as 1/eps it once took all the weight (the others got
    ~1e-8, so the shared step vanished) and its 'decrease' from log eps skewed the logits."""
    famo = create_balancer("famo", ["a", "b", "c"], lr=1.0, weight_decay=0.0, optimizer="sgd")
    before, after = {"a": 0.0, "b": 1.0, "c": 2.0}, {"a": 0.0, "b": 0.9, "c": 1.0}
    recompute = lambda tasks=None: {t: torch.tensor(v) for t, v in after.items()}  # noqa: E731
    _, ctx = fixed_losses(before, recompute=recompute)
    famo.backward(ctx)
    # z uniform; the live tasks share T = 3 in proportion to z_t / L_t = 1/3, 1/6
    assert famo.weights() == pytest.approx({"a": 0.0, "b": 2.0, "c": 1.0})
    famo.after_step(ctx)
    d_b, d_c = -math.log(0.9), math.log(2.0)
    mean = (d_b + d_c) / 2  # z-weighted mean of the live changes: a's logit stays, b and c move as between two
    want = torch.tensor([0.0, -(d_b - mean) / 3, -(d_c - mean) / 3])
    assert torch.allclose(famo.logits, want, atol=1e-6)


def test_famo_with_adam_keeps_a_zero_loss_tasks_logit_and_moments():
    """Adam's momentum from earlier steps moved a dead task's logit by almost lr per step without a gradient."""
    famo = create_balancer("famo", ["a", "b", "c"])  # adam, the default
    live = {"a": (1.0, 0.8), "b": (1.0, 0.9), "c": (2.0, 1.0)}
    for step in range(3):  # all live: every logit and moment moves
        recompute = lambda tasks=None: {t: torch.tensor(v[1]) for t, v in live.items()}  # noqa: E731
        _, ctx = fixed_losses({t: v[0] for t, v in live.items()}, step=step, recompute=recompute)
        famo.backward(ctx)
        famo.after_step(ctx)
    before = famo.logits.clone()
    moments = [v.clone() for v in famo._opt.state[famo.logits].values() if v.shape == before.shape]
    dead = {**live, "a": (0.0, 0.0)}
    recompute = lambda tasks=None: {t: torch.tensor(v[1]) for t, v in dead.items()}  # noqa: E731
    _, ctx = fixed_losses({t: v[0] for t, v in dead.items()}, step=3, recompute=recompute)
    famo.backward(ctx)
    famo.after_step(ctx)
    assert famo.logits[0] == before[0] and not torch.equal(famo.logits[1:], before[1:])
    after = [v for v in famo._opt.state[famo.logits].values() if v.shape == before.shape]
    assert len(after) == 2 and all(a[0] == m[0] for a, m in zip(after, moments))


def test_famo_a_rank_whose_tasks_all_had_zero_loss_still_updates_nothing():
    famo = create_balancer("famo", ["a", "b"], optimizer="sgd")
    recompute = lambda tasks=None: {"a": torch.tensor(0.0), "b": torch.tensor(0.0)}  # noqa: E731
    _, ctx = fixed_losses({"a": 0.0, "b": 0.0}, recompute=recompute)
    famo.backward(ctx)
    famo.after_step(ctx)
    assert torch.equal(famo.logits, torch.zeros(2)) and famo.weights() == {"a": 1.0, "b": 1.0}


def test_famo_skips_a_logit_update_from_a_non_finite_loss(caplog):
    famo = create_balancer("famo", ["a", "b"], lr=0.5, optimizer="sgd")
    broken = lambda tasks=None: {"a": torch.tensor(float("inf")), "b": torch.tensor(1.0)}  # noqa: E731
    _, ctx = fixed_losses({"a": 2.0, "b": 1.0}, recompute=broken)
    famo.backward(ctx)
    with caplog.at_level("WARNING", logger="mtl.balancers"):
        famo.after_step(ctx)
    assert torch.equal(famo.logits, torch.zeros(2)) and "non-finite loss change for task(s) ['a']" in caplog.text
    good = lambda tasks=None: {"a": torch.tensor(1.0), "b": torch.tensor(0.9)}  # noqa: E731
    _, ctx = fixed_losses({"a": 2.0, "b": 1.0}, step=1, recompute=good)
    famo.backward(ctx)
    famo.after_step(ctx)
    assert torch.isfinite(famo.logits).all() and famo.logits[0] < 0 < famo.logits[1]  # learning goes on


def test_famo_adam_first_step_is_minus_lr_times_sign():
    famo = create_balancer("famo", ["a", "b"], lr=0.025)
    recompute = lambda tasks=None: {"a": torch.tensor(1.0), "b": torch.tensor(0.9)}  # noqa: E731
    _, ctx = fixed_losses({"a": 2.0, "b": 1.0}, recompute=recompute)
    famo.backward(ctx)
    famo.after_step(ctx)
    assert torch.allclose(famo.logits, torch.tensor([-0.025, 0.025]), atol=1e-5)


def test_famo_without_recompute_updates_from_the_next_batch():
    famo = create_balancer("famo", ["a", "b"], lr=0.5, weight_decay=0.0, optimizer="sgd", recompute=False)
    _, ctx = fixed_losses({"a": 2.0, "b": 1.0})
    famo.backward(ctx)
    famo.after_step(ctx)  # no recompute, no update yet
    assert torch.equal(famo.logits, torch.zeros(2))
    _, ctx = fixed_losses({"a": 1.0, "b": 0.9}, step=1)
    famo.backward(ctx)
    assert famo.logits[0] < 0 < famo.logits[1]


def test_famo_state_survives_a_state_dict_round_trip():
    famo = create_balancer("famo", ["a", "b"])
    recompute = lambda tasks=None: {"a": torch.tensor(1.0), "b": torch.tensor(0.9)}  # noqa: E731
    _, ctx = fixed_losses({"a": 2.0, "b": 1.0}, recompute=recompute)
    famo.backward(ctx)
    famo.after_step(ctx)
    state = famo.state_dict()
    other = create_balancer("famo", ["a", "b"])
    other.load_state_dict(state)
    assert torch.equal(other.logits, famo.logits)
    for b in (famo, other):
        _, ctx = fixed_losses({"a": 2.0, "b": 1.0}, step=1, recompute=recompute)
        b.backward(ctx)
        b.after_step(ctx)
    assert torch.allclose(other.logits, famo.logits)  # Adam moments restored too


def test_famo_without_recompute_keeps_its_pending_update_across_a_state_dict_round_trip():
    # recompute=false measures a step's decrease on the next batch: a checkpoint between the two
    # steps must carry the pending log-losses, or the resumed run skips that logit update
    make = lambda: create_balancer("famo", ["a", "b"], recompute=False)  # noqa: E731
    famo = make()
    _, ctx = fixed_losses({"a": 2.0, "b": 1.0})
    famo.backward(ctx)
    famo.after_step(ctx)
    other = make()
    other.load_state_dict(famo.state_dict())
    for b in (famo, other):
        _, ctx = fixed_losses({"a": 1.0, "b": 0.9}, step=1)
        b.backward(ctx)
    assert other.logits[0] < 0 < other.logits[1]
    assert torch.equal(other.logits, famo.logits) and other.weights() == famo.weights()


def test_pending_window_and_famo_state_are_the_ranks_mean_so_rank_0s_checkpoint_resumes_every_rank(monkeypatch):
    """Under DDP only rank 0's checkpoint is written and every rank resumes from it. DWA's open window and
    FAMO's pending log-losses (recompute=false) used to be this rank's own, so after a resume every rank
    averaged rank 0's values: they now hold the mean over ranks as it is accumulated (two ranks simulated:
    the other rank's losses are twice this one's)."""
    import mtl.balancers.loss_level as loss_level

    monkeypatch.setattr(loss_level, "dist_mean", lambda t: (t + 2 * t) / 2)  # mean of this rank's and the other's
    dwa = create_balancer("dwa", ["a", "b"], window=5)
    run_dwa(dwa, [(0, 0, {"a": 2.0, "b": 1.0}), (1, 0, {"a": 4.0, "b": 3.0})])
    state = dwa.get_extra_state()
    assert state["count"] == 2 and torch.allclose(state["sum"], torch.tensor([1.5 * 6.0, 1.5 * 4.0]))
    # FAMO: the other rank had a = 4 and b = 0 (no valid pixel): the pending log-losses are those of the ranks'
    # mean losses (the global batch's), and b stays live (it lived on a rank)
    other = torch.tensor([4.0, 0.0])
    import mtl.balancers.own_optimizer as own_optimizer

    monkeypatch.setattr(own_optimizer, "dist_mean", lambda t: (t + other) / 2)
    famo = create_balancer("famo", ["a", "b"], recompute=False, optimizer="sgd")
    _, ctx = fixed_losses({"a": 2.0, "b": 3.0})
    famo.backward(ctx)
    pending = famo.get_extra_state()
    assert torch.allclose(pending["before"], torch.tensor([math.log(3.0), math.log(1.5)]))
    assert pending["live"].tolist() == [True, True]


# --- negative losses (a model's aux term) ------------------------------------------------------


@pytest.mark.parametrize("name, kw", [("uw", {}), ("dwa", {"window": 1}), ("gradnorm", {}),
                                      ("famo", {"recompute": False})])
def test_methods_that_read_loss_values_warn_once_about_a_negative_loss(name, kw, caplog):
    """decoder.mi_weight > 0 adds −mi_weight·MI/T to each task loss, so a task loss can fall below 0: FAMO
    then gave that task weight 0 in silence (w_t ∝ z_t / L_t counts only L_t > 0)."""
    bal = create_balancer(name, ["a", "b"], **kw)
    with caplog.at_level("WARNING", logger="mtl.balancers"):
        for step, values in enumerate([{"a": 0.9, "b": 0.0}, {"a": 0.9, "b": -0.001}, {"a": 0.8, "b": -0.002}]):
            p, ctx = fixed_losses(values, step=step)
            ctx.anchor = p  # gradnorm's W
            bal.backward(ctx)
            bal.after_step(ctx)
    warned = [r.getMessage() for r in caplog.records if "negative task loss" in r.getMessage()]
    assert len(warned) == 1 and f"balancer '{name}': negative task loss at step 1 (b=-0.001)" in warned[0]
    assert "decoder.mi_weight" in warned[0]


def test_famo_gives_a_negative_loss_weight_zero_which_the_warning_names():
    famo = create_balancer("famo", ["semseg", "depth"])
    w, _ = famo._weights_for(torch.tensor([0.9, -0.001]))
    assert w.tolist() == [2.0, 0.0]  # the documented effect the warning is about


def test_methods_that_do_not_read_loss_values_stay_silent_about_a_negative_loss(caplog):
    with caplog.at_level("WARNING", logger="mtl.balancers"):
        for name in ("ew", "rlw"):
            p, ctx = fixed_losses({"a": 0.9, "b": -0.5})
            create_balancer(name, ["a", "b"]).backward(ctx)
    assert "negative task loss" not in caplog.text



def _famo_training(recompute, rank=None):
    """4 FAMO steps on the whole batch (rank None) or on rank's half, the gradients averaged as DDP does."""
    from mtl.balancers.base import sync_grads

    torch.manual_seed(0)
    x, y = toy_batch(n=16)
    model, famo = Toy(), create_balancer("famo", ["a", "b"], lr=0.5, recompute=recompute)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    part = slice(None) if rank is None else slice(rank, None, 2)
    weights = []
    for step in range(4):
        opt.zero_grad()
        ctx = toy_ctx(model, x[part] * (1 + step), {t: v[part] for t, v in y.items()}, step=step)
        famo.backward(ctx)
        sync_grads(model.parameters())  # what DDP's reducer does
        opt.step()
        famo.after_step(ctx)
        weights.append(famo.weights())
    return weights, famo.logits.clone(), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("recompute", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_famo_under_ddp_is_the_global_batchs_update(recompute, tmp_path):
    """2 gloo ranks, each with half of each batch: the same weights on both ranks, equal to one process's
    on the whole batch, and so the same logits and model (each rank weighed its own losses)."""
    import functools

    from balancer_toys import on_two_gloo_ranks

    ranks = on_two_gloo_ranks(functools.partial(_famo_training, recompute), tmp_path)
    one = _famo_training(recompute)
    for weights, logits, params in ranks:
        for got, want in zip(weights, one[0]):
            assert got == pytest.approx(want, rel=1e-5)
        assert torch.allclose(logits, one[1], atol=1e-5) and not torch.allclose(logits, torch.zeros(2))
        assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(params, one[2]))
