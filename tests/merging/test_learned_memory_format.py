"""Learned merging's input memory format (`channels_last`), the merged weights' one-GEMM formula and
the per-step clock of the history."""
import pytest
import torch
from torch import nn

import merging
from merging.learned.layout import make_layout
from merging.learned.problem import build_problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/merging/conftest.py

TASKS = ["a", "b"]


class ConvToy(nn.Module):
    """conv → BN → ReLU → max-pool → conv, one linear head per task: the ops whose CPU kernels care
    about the memory format."""

    def __init__(self, flatten_with_view: bool = False):
        super().__init__()
        self.flatten_with_view = flatten_with_view
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1))
        self.heads = nn.ModuleDict({t: nn.Linear(8, 4) for t in TASKS})

    def forward(self, x, tasks=None):
        if self.flatten_with_view:  # a model that reshapes its raw input: only valid for contiguous tensors
            x = x.view(x.shape[0], -1).view(x.shape)
        z = self.body(x).flatten(1)
        return {t: self.heads[t](z) for t in (tasks or TASKS)}


def conv_toys(flatten_with_view=False):
    torch.manual_seed(0)
    model = ConvToy(flatten_with_view).eval()
    with torch.no_grad():  # non-trivial running statistics, so BN in eval mode is not the identity
        model.body[1].running_mean.uniform_(-0.5, 0.5)
        model.body[1].running_var.uniform_(0.5, 2.0)
    # BN's statistics are inputs too: a model's weights that no input holds are refused (they would run as the model's)
    pre = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("body.")}
    g = torch.Generator().manual_seed(1)
    fts = [{k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() and "running" not in k else v.clone()
            for k, v in pre.items()} for _ in TASKS]
    data = {t: [torch.randn(6, 3, 8, 8, generator=g) for _ in range(2)] for t in TASKS}
    return model, pre, fts, data


def learn(model, pre, fts, data, **kw):
    return merging.learn("adamerging", pre, fts, unlabeled=data, model=model, tasks=TASKS, progress=False,
                         steps=4, lr=0.05, **kw)


def channels_last_passes(model_calls) -> list[bool]:
    """Per model pass: were its inputs a 4-D channels-last (and not also contiguous) tensor?"""
    return [x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            for x, _ in model_calls]


@pytest.mark.parametrize("pool_limit", [0, 1 << 20])  # task by task, and pooled
def test_channels_last_gives_the_same_coefficients(pool_limit, model_calls):
    model, pre, fts, data = conv_toys()
    fast = learn(model, pre, fts, data, channels_last=True, pool_limit=pool_limit)
    seen = channels_last_passes(model_calls)
    assert seen and all(seen)  # the model really saw channels-last batches
    model_calls.clear()
    plain = learn(model, pre, fts, data, channels_last=False, pool_limit=pool_limit)
    seen = channels_last_passes(model_calls)
    assert seen and not any(seen)
    assert not torch.equal(fast.coefficients, torch.full_like(fast.coefficients, 0.3))  # it learned something
    torch.testing.assert_close(fast.coefficients, plain.coefficients, rtol=1e-5, atol=1e-6)
    assert fast.hparams["channels_last"] is True and plain.hparams["channels_last"] is False


def test_default_is_off_for_a_callers_model():
    """A `model=` may reshape its input with .view(), which channels-last strides break."""
    model, pre, fts, data = conv_toys(flatten_with_view=True)
    res = learn(model, pre, fts, data)
    assert res.hparams["channels_last"] is False
    with pytest.raises(RuntimeError, match="view"):
        learn(model, pre, fts, data, channels_last=True)


def test_default_is_on_for_models_built_from_folders(smoke_pool, model_calls):
    fts = [m.path for m in smoke_pool.members]
    data = {t: [torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)] for m in smoke_pool.members for t in m.tasks}
    res = merging.learn("adamerging", smoke_pool.pretrained, fts, unlabeled=data, steps=1, progress=False)
    seen = channels_last_passes(model_calls)
    assert res.hparams["channels_last"] is True and seen and all(seen)


@pytest.mark.parametrize("bad", [1, "yes", 0.5])
def test_bad_channels_last_is_named(bad):
    model, pre, fts, data = conv_toys()
    with pytest.raises(ValueError, match="channels_last"):
        learn(model, pre, fts, data, channels_last=bad)


def test_merged_weights_follow_the_formula():
    """θ_k = θ0_k + Σ_t c[g(k), t] τ_t,k, with and without a mask, against a hand-written sum."""
    model, pre, fts, _ = conv_toys()
    problem = build_problem(pre, fts, model=model, tasks=TASKS)
    layout = make_layout(problem.keys, "layer")
    coef = torch.randn(layout.rows, len(TASKS), requires_grad=True)
    mask = {k: (torch.rand(pre[k].shape) > 0.5).float() for k in problem.keys}
    for m in (None, mask):
        out = problem.merged(coef, layout.group_of, m)
        for k in problem.keys:
            r = layout.group_of[k]
            delta = sum(coef[r, t] * (fts[t][k] - pre[k]) for t in range(len(TASKS)))
            expect = pre[k] + (delta if m is None else delta * m[k])
            torch.testing.assert_close(out[k], expect, rtol=1e-5, atol=1e-6)
    # and its gradient to the coefficients is Σ over the tensor of ∂L/∂θ · τ_t
    g = {k: torch.randn(pre[k].shape) for k in problem.keys}
    out = problem.merged(coef, layout.group_of)
    (grad,) = torch.autograd.grad(sum((out[k] * g[k]).sum() for k in problem.keys), coef)
    for k in problem.keys:
        for t in range(len(TASKS)):
            want = float((g[k] * (fts[t][k] - pre[k])).sum())
            assert abs(float(grad[layout.group_of[k], t]) - want) <= 1e-4 * max(1.0, abs(want))


def test_history_records_seconds_per_step():
    model, pre, fts, data = conv_toys()
    res = learn(model, pre, fts, data)
    secs = [row["seconds"] for row in res.history]
    assert len(secs) == 4 and secs[0] > 0 and all(b >= a for a, b in zip(secs, secs[1:]))
