"""bn="recompute": BatchNorm statistics of a merged model re-estimated on unlabeled data (merging.bn)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import merging
from merging.bn import bn_statistics, pooled_batches, recompute_bn

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvBN(nn.Module):
    """conv → BN → ReLU → conv → BN (shared), and per task a head with its own BN (task-specific)."""

    def __init__(self, tasks=("t0", "t1")):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5))
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(5),
                                                     nn.Linear(5, 3)) for t in tasks})
        with torch.no_grad():  # non-trivial affine parameters and θ0-like statistics
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
        self.eval()

    def forward(self, x, tasks=None):
        z = self.body(x)
        return {t: self.heads[t](z) for t in (tasks or list(self.heads))}


def _batches(sizes=(6, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [2 + 3 * torch.randn(n, 3, 5, 5, generator=g) for n in sizes]


def test_statistics_are_the_pooled_mean_and_unbiased_variance_of_the_layer_inputs():
    torch.manual_seed(0)
    model = ConvBN()
    batches = _batches()
    stats = bn_statistics(model, batches, task="t0")

    conv1, bn1, conv2 = model.body[0], model.body[1], model.body[3]
    with torch.no_grad():
        h1 = [conv1(x) for x in batches]

        def bn_train(h):  # train mode: each batch normalised with its own biased statistics
            m = h.mean((0, 2, 3), keepdim=True)
            v = h.var((0, 2, 3), unbiased=False, keepdim=True)
            return bn1.weight[:, None, None] * (h - m) / torch.sqrt(v + bn1.eps) + bn1.bias[:, None, None]

        h2 = [conv2(F.relu(bn_train(h))) for h in h1]
    for name, inputs in (("body.1", h1), ("body.4", h2)):
        x = torch.cat(inputs)  # all 15 images × 3 × 3 positions of every batch
        torch.testing.assert_close(stats[f"{name}.running_mean"], x.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[f"{name}.running_var"], x.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)
        assert int(stats[f"{name}.num_batches_tracked"]) == 3
        # torch's own convention: a BN layer in train mode stores the unbiased variance of what it saw
        ref = nn.BatchNorm2d(x.shape[1], momentum=1.0).train()
        ref(x)
        torch.testing.assert_close(stats[f"{name}.running_var"], ref.running_var, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(stats[f"{name}.running_var"], x.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
    assert not any(k.startswith("heads.") for k in stats)  # task-specific BN keeps its fine-tune's statistics


def test_recompute_changes_only_the_shared_statistics():
    torch.manual_seed(1)
    model = ConvBN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = bn_statistics(model, _batches(), task="t1")
    for k, v in model.state_dict().items():  # estimating touched nothing
        assert torch.equal(v, before[k]), k
    assert recompute_bn(model, _batches(), task="t1") is model
    assert not model.training and not any(m.training for m in model.modules())  # modes restored
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"body.{i}.{b}" for i in (1, 4) for b in ("running_mean", "running_var", "num_batches_tracked")}
    for k, v in stats.items():
        assert torch.equal(after[k], v), k
    for n, p in model.named_parameters():
        assert not p.requires_grad or p.grad is None, n


@pytest.mark.parametrize("modes", ["train", "mixed"])
def test_a_model_in_train_mode_keeps_its_state_and_modes_and_gets_eval_mode_statistics(modes):
    """Only the shared BN layers run in train mode: the heads' BN (buffers of the module itself) and
    dropout act as in eval mode, and every module's own mode comes back."""
    torch.manual_seed(3)
    model = ConvBN()
    model.body[2] = nn.Sequential(nn.ReLU(), nn.Dropout(0.5))  # no weights: the keys stay
    expected = bn_statistics(model, _batches())  # the model in eval mode throughout
    model.train()
    if modes == "mixed":
        model.heads["t0"].eval()
        model.body[2].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    stats = bn_statistics(model, _batches())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert stats.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(stats[k], v, rtol=0, atol=0, msg=k)
    recompute_bn(model, _batches())
    after = model.state_dict()
    assert {k for k in after if not torch.equal(after[k], before[k])} <= set(expected)
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_statistics_with_params_leave_module_and_params_untouched():
    torch.manual_seed(2)
    model = ConvBN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v + 0.1 for k, v in model.named_parameters() if k.startswith("body.")}
    frozen = {k: v.clone() for k, v in params.items()}
    with_params = bn_statistics(model, _batches(), params=params, task="t0")
    own = bn_statistics(model, _batches(), task="t0")
    assert not torch.allclose(with_params["body.1.running_mean"], own["body.1.running_mean"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in params.items():
        assert torch.equal(v, frozen[k]), k


def test_pooled_batches_mix_every_task_in_one_batch():
    a = [torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]
    b = [torch.full((3, 3), 5.0)]
    out = list(pooled_batches({"a": a, "b": [{"image": b[0], "label": None}]}))
    assert [x.shape[0] for x in out] == [5, 2]
    assert torch.equal(out[0], torch.cat([a[0], b[0]])) and torch.equal(out[1], a[1])
    # inputs of different shapes go through separately; max_batches caps each task
    c = [torch.zeros(1, 4)] * 3
    assert [tuple(x.shape) for x in pooled_batches({"a": a, "c": c}, max_batches=1)] == [(2, 3), (1, 4)]
    with pytest.raises(ValueError, match="unlabeled\\['b'\\] yields no batches"):
        list(pooled_batches({"a": a, "b": []}))


def _pre_fts(model, T=2, scale=0.2):
    pre = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("body.")}
    g = torch.Generator().manual_seed(3)
    fts = [{k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() and "running" not in k else v.clone()
            for k, v in pre.items()} for _ in range(T)]
    return pre, fts


def test_bad_bn_value_is_named():
    model = ConvBN()
    pre, fts = _pre_fts(model)
    with pytest.raises(ValueError, match="bn must be one of 'pretrained', 'average', 'merge', 'recompute', got 'reset'"):
        merging.merge("task_arithmetic", pre, fts, bn="reset")
    with pytest.raises(ValueError, match="bn='recompute'.*merging.recompute_bn"):  # a state dict has no data
        merging.merge("task_arithmetic", pre, fts, bn="recompute")
    data = {"t0": _batches(), "t1": _batches(seed=1)}
    with pytest.raises(ValueError, match="bn must be one of .*got 'reset'"):
        merging.learn("adamerging", pre, fts, unlabeled=data, model=model, tasks=["t0", "t1"], bn="reset", progress=False)


def test_one_tensor_for_the_batches_is_refused_naming_the_argument():
    model, x = ConvBN(), _batches()[0]
    for fn in (recompute_bn, bn_statistics):  # iterating x would feed its samples as 3-D batches
        with pytest.raises(TypeError, match=r"^batches is one tensor; pass an iterable of batches, e\.g\. \[x\]"):
            fn(model, x, task="t0")
    with pytest.raises(TypeError, match=r"^unlabeled\['t1'\] is one tensor; pass an iterable of batches"):
        next(pooled_batches({"t0": [x], "t1": x}))


def test_task_keys_as_a_list_or_callable_select_the_same_layers():
    from merging.bn import bn_layers

    model = ConvBN()
    shared = {"body.1", "body.4"}
    for task_keys in (r"(.*\.)?heads\.", [r"(.*\.)?heads\."], lambda k: k.startswith("heads.")):
        assert set(bn_layers(model, task_keys)) == shared
    pre, fts = _pre_fts(model)
    data = {"t0": _batches(seed=5), "t1": _batches(seed=6)}
    res = merging.learn("adamerging", pre, fts, unlabeled=data, model=model, tasks=["t0", "t1"], steps=1,
                        bn="recompute", task_keys=[r"(.*\.)?heads\."], progress=False)
    assert not torch.equal(res.state_dict["body.1.running_var"], pre["body.1.running_var"])


def test_learned_gradient_flows_through_the_pooled_batch_statistics():
    from merging.learned.adamerging import CoefficientLearner
    from merging.learned.layout import make_layout
    from merging.learned.loop import Objective, step_gradients
    from merging.learned.problem import build_problem

    torch.manual_seed(4)
    model = ConvBN().double()
    pre, fts = _pre_fts(model)
    data = {"t0": [_batches((6,), seed=5)[0].double()], "t1": [_batches((4,), seed=6)[0].double()]}
    problem = build_problem(pre, fts, model=model, tasks=["t0", "t1"])
    objective = Objective(problem, ["t0", "t1"], data, None, False, recompute_bn=True)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the coefficients, for a float64 finite-difference check
    try:
        learner = CoefficientLearner(problem, make_layout(problem.keys, "task"), init=0.3)
    finally:
        torch.set_default_dtype(old)
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in problem.theta0}
    losses = step_gradients(problem, learner.merged(), objective, frozen)
    grad = learner.coef.grad[0]

    def written_out(c):  # body on both tasks' images at once, BN normalising with that batch's statistics
        w = {k: pre[k] + c[0] * (fts[0][k] - pre[k]) + c[1] * (fts[1][k] - pre[k]) for k in pre}
        x = torch.cat([data["t0"][0], data["t1"][0]])
        h = F.conv2d(x, w["body.0.weight"], w["body.0.bias"])
        h = F.batch_norm(h, None, None, w["body.1.weight"], w["body.1.bias"], training=True)
        h = F.conv2d(F.relu(h), w["body.3.weight"], w["body.3.bias"])
        h = F.batch_norm(h, None, None, w["body.4.weight"], w["body.4.bias"], training=True)
        total = 0.0
        for t, rows in (("t0", slice(0, 6)), ("t1", slice(6, 10))):
            p = model.heads[t](h[rows]).softmax(1)  # each head (eval mode: its own statistics) on its task's rows
            total = total + -(p * p.log()).sum(1).mean()
        return total

    c0 = torch.tensor([0.3, 0.3], dtype=torch.float64)
    with torch.no_grad():
        assert abs(float(written_out(c0)) - sum(losses.values())) < 1e-6  # the entropy is taken in float32
        eps = 1e-6
        fd = torch.stack([(written_out(c0 + eps * e) - written_out(c0 - eps * e)) / (2 * eps) for e in torch.eye(2, dtype=c0.dtype)])
    torch.testing.assert_close(grad, fd, rtol=1e-4, atol=1e-6)
    assert not model.training  # the caller's model is back in eval mode


class BN1d(nn.Module):
    """Linear → BatchNorm1d → heads: one classification head `a` and one regression head `r`."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.enc, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(3)
        self.heads = nn.ModuleDict({"a": nn.Linear(3, 5), "r": nn.Linear(3, 1)})
        self.tasks = {"a": SimpleNamespace(kind="classification"), "r": SimpleNamespace(kind="regression")}

    def forward(self, x, tasks):
        h = torch.relu(self.bn(self.enc(x)))
        return {t: self.heads[t](h) for t in tasks}


def test_learned_bn_pass_pools_the_batches_of_tasks_left_out_of_the_objective():
    # r (regression) has no entropy: it is left out of the loss, but the final statistics pool its images,
    # so each step's BN must normalise with the pooled a+r batch too (the model learning sees is the one returned)
    torch.manual_seed(0)
    model = BN1d()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    fts = []
    for _ in range(2):
        sd = {k: v.clone() for k, v in pre.items()}
        sd["enc.weight"] += torch.randn(3, 4) * 0.5
        fts.append(sd)
    xa, xr = torch.randn(6, 4), torch.randn(6, 4) + 5.0  # r's images from another distribution
    res = merging.learn("adamerging", pre, fts, unlabeled={"a": [xa], "r": [xr]}, model=model, tasks=["a", "r"],
                        granularity="task", steps=1, lr=0.05, bn="recompute", progress=False)

    w = pre["enc.weight"] + sum(0.3 * (ft["enc.weight"] - pre["enc.weight"]) for ft in fts)
    z = F.linear(torch.cat([xa, xr]), w, pre["enc.bias"])
    h = F.batch_norm(z, None, None, pre["bn.weight"], pre["bn.bias"], training=True)[:6]  # a's rows
    p = F.linear(torch.relu(h), pre["heads.a.weight"], pre["heads.a.bias"]).softmax(1)
    assert res.history[0]["objective"] == pytest.approx(float(-(p * p.log()).sum(1).mean()), abs=1e-6)
    w = pre["enc.weight"] + sum(float(c) * (ft["enc.weight"] - pre["enc.weight"]) for c, ft in zip(res.coefficients, fts))
    z = F.linear(torch.cat([xa, xr]), w, pre["enc.bias"])  # the returned statistics: the same a+r mixture
    torch.testing.assert_close(res.state_dict["bn.running_mean"], z.mean(0))


def test_learned_bn_max_batches_caps_the_final_statistics_pass():
    torch.manual_seed(1)
    model = BN1d()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    fts = [{**pre, "enc.weight": pre["enc.weight"] + torch.randn(3, 4) * 0.5} for _ in range(2)]
    data = {"a": [torch.randn(6, 4), torch.randn(6, 4) - 3.0], "r": [torch.randn(5, 4) + 5.0, torch.randn(5, 4)]}
    res = merging.learn("adamerging", pre, fts, unlabeled=data, model=model, tasks=["a", "r"], granularity="task",
                        steps=1, bn="recompute", bn_max_batches=1, progress=False)
    w = pre["enc.weight"] + sum(float(c) * (ft["enc.weight"] - pre["enc.weight"]) for c, ft in zip(res.coefficients, fts))
    z = F.linear(torch.cat([data["a"][0], data["r"][0]]), w, pre["enc.bias"])  # each task's first batch only
    torch.testing.assert_close(res.state_dict["bn.running_mean"], z.mean(0))
    torch.testing.assert_close(res.state_dict["bn.running_var"], z.var(0))  # unbiased, as BN stores it
    assert int(res.state_dict["bn.num_batches_tracked"]) == 1 and res.hparams["bn_max_batches"] == 1
    for bad, match in ((0, r"bn_max_batches must be an int ≥ 1 or None \(every batch\), got 0"),
                       (True, "bn_max_batches must be an int ≥ 1"),
                       (2, "bn_max_batches=2 is read only with bn='recompute' \\(here bn='pretrained'\\)")):
        with pytest.raises(ValueError, match=match):
            merging.learn("adamerging", pre, fts, unlabeled=data, model=model, tasks=["a", "r"], steps=0,
                          bn_max_batches=bad, **({} if bad == 2 else {"bn": "recompute"}), progress=False)


def test_learned_merge_recomputes_at_the_end_and_leaves_the_model_alone():
    torch.manual_seed(4)
    model = ConvBN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pre, fts = _pre_fts(model)
    data = {"t0": _batches(seed=5), "t1": _batches(seed=6)}
    res = merging.learn("adamerging", pre, fts, unlabeled=data, model=model, tasks=["t0", "t1"], steps=2,
                        bn="recompute", progress=False)
    assert res.hparams["bn"] == "recompute"
    for k, v in model.state_dict().items():  # the caller's model is neither trained nor re-estimated
        assert torch.equal(v, before[k]), k
    # the result's statistics: one pass over all the data with the learned weights
    merged = {k: v for k, v in res.state_dict.items() if k in dict(model.named_parameters())}
    expect = bn_statistics(model, pooled_batches(data), params=merged, task="t0")
    for k, v in expect.items():
        torch.testing.assert_close(res.state_dict[k], v)
    assert not torch.allclose(res.state_dict["body.1.running_var"], pre["body.1.running_var"])


def test_learned_inputs_of_different_shapes_use_statistics_estimated_per_step():
    torch.manual_seed(4)
    model = ConvBN()
    pre, fts = _pre_fts(model)
    data = {"t0": _batches((6, 4), seed=5), "t1": [2 * torch.randn(5, 3, 7, 7)]}  # 5×5 vs 7×7 images
    seen = []
    orig = merging.learned.loop.bn_statistics

    def spy(m, batches, **kw):
        batches = list(batches)
        seen.append([tuple(x.shape) for x in batches])
        return orig(m, batches, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(merging.learned.loop, "bn_statistics", spy)
    try:
        merging.learn("adamerging", pre, fts, unlabeled=data, model=model, tasks=["t0", "t1"], steps=2,
                      bn="recompute", progress=False)
    finally:
        mp.undo()
    assert seen == [[(6, 3, 5, 5), (5, 3, 7, 7)], [(4, 3, 5, 5), (5, 3, 7, 7)]]  # each step: its batches of every task


def _slim(tasks=("depth",), seed=0):
    from mtl.models import create_model

    torch.manual_seed(seed)
    return create_model(list(tasks), backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16], "depths": [1, 1],
                                               "out_indices": [1, 2]}, decoder={"name": "slimmable", "channels": 8},
                        family="slimmable").eval()


SLIM_REFUSED = "bn='recompute' is not available for the slimmable family"


def test_recompute_refuses_per_width_statistics_rather_than_leaving_them_as_they_were():
    """SwitchableBatchNorm2d keeps a row of statistics per width: bn='recompute' once found no BN layer in a slimmable
    model and changed nothing, without a word (merged metrics identical with and without it)."""
    model = _slim(("depth", "semseg"))
    x = [torch.randn(4, 3, 32, 32)]
    with pytest.raises(ValueError, match=SLIM_REFUSED):
        recompute_bn(model, x)
    with pytest.raises(ValueError, match=SLIM_REFUSED):
        bn_statistics(model, x)
    pre = {k: v.clone() for k, v in model.state_dict().items() if ".heads." not in k}
    fts = [{k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in pre.items()} for _ in range(2)]
    with pytest.raises(ValueError, match=SLIM_REFUSED):  # the learned merges, before any step
        merging.learn("adamerging", pre, fts, unlabeled={"depth": x, "semseg": x}, model=model,
                      tasks=["depth", "semseg"], steps=1, bn="recompute", progress=False)


def test_mtl_merge_refuses_recompute_for_a_slimmable_pool_before_its_run_folder(tmp_path):
    import mtl
    from merging.job import run

    pre = mtl.save_model(_slim(("depth",)), tmp_path / "pre")
    fts = [mtl.save_model(_slim(({"kind": "depth", "name": f"d{i}"},), seed=i), tmp_path / f"ft{i}") for i in (1, 2)]
    with pytest.raises(ValueError, match=SLIM_REFUSED):
        run(["merge=task_arithmetic", f"pretrained={pre}", f"models=[{fts[0]},{fts[1]}]", "+merge.bn=recompute"],
            run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()
