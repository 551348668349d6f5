"""Learned merging that diverges: the error says what can fix it (lower lr; clamp only bounds an infinite
coefficient, it cannot fix a NaN)."""
import math

import pytest
import torch

import merging

from test_learned import Toy, kw, toys

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/merging/conftest.py


class NanGradient(Toy):
    """Finite predictions whose gradient is NaN: 0 · sqrt(z − z) adds 0, but its derivative is 0 · ∞."""

    def forward(self, x, tasks=None):
        out = super().forward(x, tasks)
        return {t: p + 0 * torch.sqrt(p - p) for t, p in out.items()}


@pytest.mark.parametrize("clamp", [False, True])
def test_a_nan_coefficient_is_not_told_to_clamp(clamp):
    model, pre, fts, data = toys()
    nan = NanGradient()
    nan.load_state_dict(model.state_dict())
    with pytest.raises(FloatingPointError, match=r"became nan at step 1; lower lr$"):
        merging.learn("adamerging", pre, fts, unlabeled=data, steps=2, clamp=clamp, **kw(nan))


def poison_adam_step(monkeypatch, index, value) -> None:
    """Adam's step, then the coefficient at ``index`` set to ``value``: a divergence no finite lr gives in float32."""
    from merging.learned import adamerging

    step = torch.optim.Adam.step

    def poisoned(self, *a, **k):
        out = step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0][index] = value
        return out

    monkeypatch.setattr(adamerging.torch.optim.Adam, "step", poisoned)


def test_an_infinite_coefficient_is_told_to_clamp(monkeypatch):
    """Only an unclamped run can reach it (the default clamp bounds it to 1)."""
    model, pre, fts, data = toys()
    poison_adam_step(monkeypatch, (0, 0), math.inf)
    with pytest.raises(FloatingPointError, match=r"became inf at step 1; lower lr or pass clamp=true$"):
        merging.learn("adamerging", pre, fts, unlabeled=data, steps=2, clamp=False, **kw(model))


def test_coefficient_turning_nan_names_task_and_tensor(monkeypatch):
    model, pre, fts, data = toys()
    poison_adam_step(monkeypatch, (1, 2), math.nan)
    with pytest.raises(FloatingPointError, match=r"task 't2', tensor/block 'body.0.bias' became nan at step 1"):
        merging.learn("adamerging", pre, fts, unlabeled=data, steps=2, **kw(model))


@pytest.mark.parametrize("method,hp,name", [
    ("adamerging", {}, "lr"), ("atlas", {}, "lr"), ("concrete_ta", {}, "lr"),
    ("concrete_adamerging", {"final_steps": 1}, "inner_lr"),
    ("concrete_adamerging", {"final_steps": 1, "inner": "continue"}, "coef_lr"),
    ("concrete_adamerging", {"steps": 0, "final_steps": 1}, "coef_lr"),  # the final AdaMerging's own Adam
])
def test_a_learning_rate_that_overflows_the_update_is_named(method, hp, name):
    """1e38 is positive and finite, but Adam's first step, lr / (1 − β1) = 1e39, does not fit in float32."""
    model, pre, fts, data = toys()
    hp = {"steps": 2, **hp, name: 1e38}
    with pytest.raises(ValueError, match=rf"^{name}=1e\+38 overflows the optimiser's update .*; lower {name}$"):
        merging.learn(method, pre, fts, unlabeled=data, **hp, **kw(model))
