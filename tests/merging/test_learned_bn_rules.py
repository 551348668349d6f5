"""Learned merges under each BN rule, and with a caller's model: learning sees the model it returns."""
import pytest
import torch
from torch import nn

import merging

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/merging/conftest.py

TASKS = ["t0", "t1"]


class LinBN(nn.Module):
    """Linear → BN → tanh → Linear (shared), one linear head per task."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 6))
        self.heads = nn.ModuleDict({t: nn.Linear(6, 4) for t in TASKS})

    def forward(self, x, tasks=None):
        z = torch.tanh(self.body(x))
        return {t: self.heads[t](z) for t in (tasks or list(self.heads))}


def _setup(seed=0):
    """θ0 = the model's body; fine-tunes that moved its weights AND its BN running statistics."""
    torch.manual_seed(seed)
    model = LinBN().eval()
    with torch.no_grad():
        model.body[1].running_mean.uniform_(-1, 1)
        model.body[1].running_var.uniform_(0.5, 2)
    pre = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("body.")}
    g = torch.Generator().manual_seed(seed + 1)
    fts = [{k: v + 0.5 * torch.rand(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in pre.items()}
           for _ in TASKS]
    data = {t: [torch.randn(8, 5, generator=g)] for t in TASKS}
    return model, pre, fts, data


def _entropy_of(model, state, data):
    """Σ_t mean entropy of task t's predictions of `model` run with `state` (the objective, written out)."""
    total = 0.0
    with torch.no_grad():
        for t in TASKS:
            p = torch.func.functional_call(model, state, (data[t][0],), {"tasks": [t]}, strict=False)[t].softmax(1)
            total += float(-(p * p.log()).sum(1).mean())
    return total


def _predict(model, state, x):
    with torch.no_grad():
        return torch.func.functional_call(model, state, (x,), {"tasks": TASKS}, strict=False)


@pytest.mark.parametrize("bn", ["pretrained", "average", "merge"])
@pytest.mark.parametrize("caller_differs", [False, True])
def test_the_objective_learned_is_the_objective_of_the_returned_model(bn, caller_differs):
    """History's objective at step 1 (the initial λ) is the returned model's at zero steps; the state a
    callback sees predicts as the returned one. `caller_differs`: the caller's model holds other weights
    and statistics than θ0 in the tensors that are not learned (no fine-tune changed body.0)."""
    model, pre, fts, data = _setup()
    if caller_differs:
        for f in fts:
            f["body.0.weight"], f["body.0.bias"] = pre["body.0.weight"].clone(), pre["body.0.bias"].clone()
        with torch.no_grad():
            model.body[0].weight.add_(0.5)
            model.body[1].running_mean.add_(1.0)
    opts = dict(unlabeled=data, model=model, tasks=TASKS, bn=bn, progress=False)
    at_init = merging.learn("adamerging", pre, fts, steps=0, **opts)
    seen = {}
    res = merging.learn("adamerging", pre, fts, steps=2, lr=0.05, callback_every=1,
                        callback=lambda step, st: seen.update(state={k: v.clone() for k, v in st.items()}), **opts)
    assert abs(res.history[0]["objective"] - _entropy_of(model, at_init.state_dict, data)) < 1e-5
    x = torch.cat([data[t][0] for t in TASKS])
    learned, returned = _predict(model, seen["state"], x), _predict(model, res.state_dict, x)
    for t in TASKS:
        torch.testing.assert_close(learned[t], returned[t], rtol=0, atol=1e-6)


def test_bn_merge_statistics_follow_the_learned_coefficients():
    """bn="merge": the running statistics are θ0 + Σ_t λ_t τ_t at the learned λ, as a training-free merge
    at those λ gives them; they are merged, not differentiated through, so their own rows (layer-wise)
    keep their initial value."""
    model, pre, fts, data = _setup()
    res = merging.learn("adamerging", pre, fts, unlabeled=data, model=model, tasks=TASKS, bn="merge", granularity="task",
                        steps=3, lr=0.05, progress=False)
    lam = res.coefficients
    assert not torch.allclose(lam, torch.full_like(lam, 0.3))
    for k in ("body.1.running_mean", "body.1.running_var", "body.0.weight"):
        expect = pre[k] + sum(lam[t] * (fts[t][k] - pre[k]) for t in range(len(TASKS)))
        torch.testing.assert_close(res.state_dict[k], expect, rtol=1e-6, atol=1e-6)
    layer = merging.learn("adamerging", pre, fts, unlabeled=data, model=model, tasks=TASKS, bn="merge", steps=3,
                          lr=0.05, progress=False)
    for k in ("body.1.running_mean", "body.1.running_var"):
        assert torch.equal(layer.coefficients[layer.groups.index(k)], torch.full((len(TASKS),), 0.3))
    assert not torch.allclose(layer.coefficients[layer.groups.index("body.0.weight")], torch.full((2,), 0.3))


def test_key_options_are_recorded(tmp_path):
    import json

    model, pre, fts, data = _setup()
    res = merging.learn("adamerging", pre, fts, unlabeled=data, model=model, tasks=TASKS, bn="average", steps=0,
                        exclude=["body\\.3\\.bias"], task_keys=lambda k: k.startswith("heads."), progress=False)
    hp = json.loads((res.save(tmp_path) / "coefficients.json").read_text())["hparams"]
    assert hp["bn"] == "average" and hp["include"] is None and hp["exclude"] == ["body\\.3\\.bias"]
    assert hp["task_keys"].startswith("<function")


@pytest.mark.parametrize("method", ["concrete_ta", "concrete_adamerging"])
def test_concrete_under_bn_merge_leaves_the_statistics_out_of_the_mask(method):
    """BN statistics take no gradient, so a mask over them could not learn (σ(0) = 0.5 is not above the
    0.5 threshold: they would fall back to θ0's): they are merged unmasked, θ0 + Σ_t λ_t τ_t."""
    model, pre, fts, data = _setup()
    res = merging.learn(method, pre, fts, unlabeled=data, model=model, tasks=TASKS, bn="merge", steps=2,
                        lr=0.05, progress=False, **({"granularity": "task"} if method != "concrete_ta" else {}))
    assert "body.1.running_mean" not in res.mask and "body.0.weight" in res.mask
    lam = res.coefficients
    for k in ("body.1.running_mean", "body.1.running_var"):
        expect = pre[k] + sum(lam[t] * (fts[t][k] - pre[k]) for t in range(len(TASKS)))
        torch.testing.assert_close(res.state_dict[k], expect, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(res.state_dict[k], pre[k])


def test_bn_merge_refuses_a_learned_negative_variance():
    """At λ = 1 for both tasks the merged variance is θ0 + Σ τ = v0 + 2·(0.1·v0 − v0) < 0: refused as the
    training-free merge refuses it, not returned as a model whose BatchNorm outputs NaN."""
    model, pre, fts, data = _setup()
    v = "body.1.running_var"
    for f in fts:
        f[v] = 0.1 * pre[v]
    with pytest.raises(merging.MergeInputError, match="body.1.running_var' negative"):
        merging.learn("adamerging", pre, fts, unlabeled=data, model=model, tasks=TASKS, bn="merge", init=1.0,
                      steps=0, progress=False)
