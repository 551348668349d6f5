"""The pooled step of learned merging: every task's batch in one pass (BN in eval mode) gives the
per-task step's gradients, within `pool_limit`; models that answer one task at a time still work."""
import pytest
import torch

import merging

from test_learned import T, Toy, kw, toys

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/merging/conftest.py


def passes(model_calls) -> list[int]:
    """How many tasks each model pass asked for."""
    return [len(tasks) for _, tasks in model_calls]


@pytest.mark.parametrize("method,extra", [("adamerging", {}), ("atlas", {}), ("concrete_adamerging", {"final_steps": 2})])
def test_pooled_equals_task_by_task(method, extra, model_calls):
    model, pre, fts, data = toys()
    pooled = merging.learn(method, pre, fts, unlabeled=data, steps=4, lr=0.05, **extra, **kw(model))
    assert T in passes(model_calls)  # one pass with every task
    model_calls.clear()
    single = merging.learn(method, pre, fts, unlabeled=data, steps=4, lr=0.05, pool_limit=0, **extra, **kw(model))
    assert model_calls and T not in passes(model_calls)  # task by task
    torch.testing.assert_close(pooled.coefficients, single.coefficients, rtol=1e-5, atol=1e-6)
    for k in pre:
        torch.testing.assert_close(pooled.state_dict[k], single.state_dict[k], rtol=1e-5, atol=1e-6)


def test_pool_limit_counts_input_values(model_calls):
    model, pre, fts, data = toys()  # T tasks × 8 samples × 5 values = 120 per step
    merging.learn("adamerging", pre, fts, unlabeled=data, steps=2, pool_limit=120, **kw(model))
    assert T in passes(model_calls)
    model_calls.clear()
    merging.learn("adamerging", pre, fts, unlabeled=data, steps=2, pool_limit=119, **kw(model))
    assert T not in passes(model_calls)


class OneAtATime(Toy):
    """A `model=` that answers only the first task asked for, as a plain tensor."""

    def forward(self, x, tasks=None):
        return super().forward(x, tasks=tasks[:1])[tasks[0]]


def test_models_answering_one_task_fall_back_to_task_by_task():
    torch.manual_seed(0)
    model, pre, fts, data = toys()
    one = OneAtATime()
    one.load_state_dict(model.state_dict())
    a = merging.learn("adamerging", pre, fts, unlabeled=data, steps=3, lr=0.05, **kw(one))
    b = merging.learn("adamerging", pre, fts, unlabeled=data, steps=3, lr=0.05, pool_limit=0, **kw(one))
    assert torch.equal(a.coefficients, b.coefficients)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "big"])
def test_bad_pool_limit_is_named(bad):
    model, pre, fts, data = toys()
    with pytest.raises(ValueError, match="pool_limit"):
        merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, pool_limit=bad, **kw(model))
