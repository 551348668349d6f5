"""Learned merging with a caller's `model=`: the model runs with what the merge covers (θ0's and the learned
weights, θ0's for keys the merge leaves out) plus its task-specific heads, never with shared weights of its own."""
import pytest
import torch
from torch import nn

import merging
from merging.sources import MergeInputError

from test_learned import T, Toy, kw, toys

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/merging/conftest.py


class ExtraLayer(Toy):
    """Toy with one more shared layer, `extra`, between the body and the heads."""

    def __init__(self, extra: nn.Module):
        super().__init__()
        self.extra = extra

    def forward(self, x, tasks=None):
        z = self.extra(torch.tanh(self.body(x)))
        return {t: self.heads[t](z) for t in (tasks or list(self.heads))}


@pytest.mark.parametrize("extra,first", [(nn.Linear(6, 6), "'extra.weight', 'extra.bias'"),
                                         (nn.BatchNorm1d(6), "'extra.weight', 'extra.bias', 'extra.running_mean'")])
def test_a_shared_layer_no_input_holds_is_refused(extra, first):
    _, pre, fts, data = toys()  # θ0 and the fine-tunes hold body.* only
    with pytest.raises(MergeInputError, match=rf"^model= \(ExtraLayer\) has {first}.* that θ0 \(the pretrained input\) does not hold"):
        merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, **kw(ExtraLayer(extra)))


def test_the_same_layer_held_by_the_inputs_is_learned():
    model = ExtraLayer(nn.Linear(6, 6))
    _, _, _, data = toys()
    pre = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("heads.")}
    fts = [{k: v + 0.1 * torch.randn_like(v) for k, v in pre.items()} for _ in range(T)]
    res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, **kw(model))
    assert "extra.weight" in res.groups and "extra.weight" in res.state_dict


@pytest.mark.parametrize("left_out", [dict(exclude=r"body\.2\.bias"), dict(include=r"body\.(0\.|2\.weight)")])
def test_a_key_left_out_of_the_merge_runs_at_theta0s_value_not_the_models(left_out):
    """A key include/exclude leaves out is not learned and not in the result: the model runs with θ0's value, as a
    model built from folders does, not with the caller's module's own (here θ0's + 100). The first step's objective,
    by hand: Σ_t mean entropy at θ = θ0 + 0.3 Σ_t τ_t on the merged keys and θ0 on the left-out bias."""
    model, pre, fts, data = toys()
    with torch.no_grad():
        model.body[2].bias.add_(100.0)
    res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, **left_out, **kw(model))
    assert sorted(res.state_dict) == ["body.0.bias", "body.0.weight", "body.2.weight"]
    theta = {k: pre[k] + 0.3 * sum(f[k] - pre[k] for f in fts) for k in pre}
    theta["body.2.bias"] = pre["body.2.bias"]
    total = 0.0
    for i in range(T):
        x = data[f"t{i}"][0]
        z = torch.tanh(torch.tanh(x @ theta["body.0.weight"].T + theta["body.0.bias"]) @ theta["body.2.weight"].T
                       + theta["body.2.bias"])
        p = torch.softmax(model.heads[f"t{i}"](z), dim=1)
        total += float(-(p * p.log()).sum(1).mean())
    assert res.history[0]["objective"] == pytest.approx(total, rel=1e-5)
    assert float(model.body[2].bias.detach().sub(pre["body.2.bias"]).min()) == pytest.approx(100.0)  # not modified


class Decoders(Toy):
    """Task-specific heads under a name the default task_keys does not match."""

    def __init__(self):
        super().__init__()
        self.decoders = self.heads
        del self.heads

    def forward(self, x, tasks=None):
        z = torch.tanh(self.body(x))
        return {t: self.decoders[t](z) for t in (tasks or list(self.decoders))}


def test_task_specific_heads_are_those_task_keys_marks():
    _, pre, fts, data = toys()
    with pytest.raises(MergeInputError, match=r"'decoders\.t0\.weight'.*widen task_keys"):
        merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, **kw(Decoders()))
    res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, task_keys=r"decoders\.", **kw(Decoders()))
    assert sorted(res.state_dict) == sorted(pre)


def test_a_tied_alias_of_a_held_weight_is_covered():
    """`proj` is the body's first layer under a second name: the merge covers it through `body.0`."""
    model, pre, fts, data = toys()
    model.proj = model.body[0]
    assert "proj.weight" in model.state_dict() and "proj.weight" not in pre
    merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, **kw(model))


def test_fine_tuned_heads_model_does_not_hold_are_named_once(caplog):
    """With model=, the model's heads predict; a fine-tune's own head that differs is said to be unused."""
    model, pre, fts, data = toys()
    heads = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("heads.")}
    same = [{**f, **{k: v for k, v in heads.items() if k.startswith(f"heads.t{i}.")}} for i, f in enumerate(fts)]
    other = [dict(f) for f in same]
    other[1]["heads.t1.bias"] = other[1]["heads.t1.bias"] + 1.0  # retrained head
    other[2]["heads.zz.weight"] = torch.zeros(4, 6)  # a head the model does not have
    runs = {}
    for name, given in (("same", same), ("other", other)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="merging.learned"):
            runs[name] = merging.learn("adamerging", pre, given, unlabeled=data, steps=2, lr=0.05, **kw(model))
        runs[name + " warnings"] = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert runs["same warnings"] == []
    (warning,) = runs["other warnings"]
    assert "['t1', 't2']" in warning
    assert "'heads.t1.bias' (the model holds different values), 'heads.zz.weight' (not in the model)" in warning
    torch.testing.assert_close(runs["same"].coefficients, runs["other"].coefficients, rtol=0, atol=0)


class ConvBN(nn.Module):
    """Conv + BatchNorm shared, one linear head per task (the auditor's model)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 2) for t in ("a", "b")})

    def forward(self, x, tasks=None):
        z = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return {t: self.heads[t](z) for t in (tasks or list(self.heads))}


def conv_bn_inputs():
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.num_batches_tracked.fill_(7)
    pre = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("heads.")}
    fts = {t: {k: v + 0.2 * torch.randn_like(v) if k.endswith(("weight", "bias")) else v.clone() for k, v in pre.items()}
           for t in ("a", "b")}
    data = {t: [torch.randn(4, 3, 6, 6) for _ in range(2)] for t in ("a", "b")}
    return model, pre, fts, data


def test_integer_bookkeeping_buffers_left_out_of_the_inputs_are_not_uncovered_weights():
    """num_batches_tracked does not enter an eval-mode forward: inputs that keep floating tensors only learn the
    same merge as inputs that hold it; a floating buffer left out (running_var) is still refused."""
    model, pre, fts, data = conv_bn_inputs()
    floats = lambda sd: {k: v for k, v in sd.items() if v.is_floating_point()}  # noqa: E731
    run = lambda p, f: merging.learn("adamerging", p, f, unlabeled=data, model=model, tasks=["a", "b"],  # noqa: E731
                                     steps=2, lr=0.05, progress=False)
    full, dropped = run(pre, list(fts.values())), run(floats(pre), [floats(f) for f in fts.values()])
    assert "bn.num_batches_tracked" not in dropped.state_dict
    torch.testing.assert_close(dropped.coefficients, full.coefficients, rtol=0, atol=0)
    no_var = lambda sd: {k: v for k, v in sd.items() if k != "bn.running_var"}  # noqa: E731
    with pytest.raises(MergeInputError, match=r"^model= \(ConvBN\) has 'bn.running_var' that θ0 \(the pretrained input\) does not hold"):
        run(no_var(pre), [no_var(f) for f in fts.values()])


def test_only_each_fine_tunes_own_head_is_compared_with_the_model(caplog):
    """Each fine-tune carries every head: its own (fine-tuned, the value the model holds) and the others as θ0
    left them (which differ from the model's fine-tuned heads). Only its own head is compared: no warning; a
    fine-tune whose own head differs from the model's is named, and only it."""
    model, pre, fts, data = toys()
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("heads.")}
    untouched = {k: v + 1.0 for k, v in tuned.items()}  # the heads before fine-tuning
    every = [{**f, **untouched, **{k: v for k, v in tuned.items() if k.startswith(f"heads.t{i}.")}}
             for i, f in enumerate(fts)]
    retrained = [dict(f) for f in every]
    retrained[1]["heads.t1.weight"] = retrained[1]["heads.t1.weight"] * 2
    warned = {}
    for name, given in (("own heads equal", every), ("t1 retrained", retrained)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="merging.learned"):
            merging.learn("adamerging", pre, given, unlabeled=data, steps=1, **kw(model))
        warned[name] = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert warned["own heads equal"] == []
    (warning,) = warned["t1 retrained"]
    assert "task(s) ['t1']" in warning and "'heads.t1.weight' (the model holds different values)" in warning


def test_every_modules_own_mode_comes_back_after_a_run_and_after_a_refusal():
    """learn() runs the caller's model in eval mode; a mixed model (body in eval under a model in
    train mode) gets each module's flag back, also when the inputs are refused."""
    model, pre, fts, data = toys()
    model.train()
    model.body.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, **kw(model))
    assert {n: m.training for n, m in model.named_modules()} == flags
    with pytest.raises(MergeInputError, match="nothing to learn"):
        merging.learn("adamerging", pre, [pre] * T, unlabeled=data, steps=1, **kw(model))
    assert {n: m.training for n, m in model.named_modules()} == flags
