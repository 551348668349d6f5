"""The pooled step of learned merging: every task's batch in one pass (BN in eval mode) gives the
per-task step's gradients, within `pool_limit`; models that answer one task at a time still work; a
caller's `model=` goes task by task unless `pool_limit` is set, models built from folders pool."""
import pytest
import torch

import merging
from merging.learned.loop import POOL_LIMIT

from test_learned import T, Toy, kw, toys

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/merging/conftest.py


def passes(model_calls) -> list[int]:
    """How many tasks each model pass asked for."""
    return [len(tasks) for _, tasks in model_calls]


@pytest.mark.parametrize("method,extra", [("adamerging", {}), ("atlas", {}), ("concrete_adamerging", {"final_steps": 2})])
def test_pooled_equals_task_by_task(method, extra, model_calls):
    model, pre, fts, data = toys()
    pooled = merging.learn(method, pre, fts, unlabeled=data, steps=4, lr=0.05, pool_limit=POOL_LIMIT, **extra,
                           **kw(model))
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
    a = merging.learn("adamerging", pre, fts, unlabeled=data, steps=3, lr=0.05, pool_limit=POOL_LIMIT, **kw(one))
    b = merging.learn("adamerging", pre, fts, unlabeled=data, steps=3, lr=0.05, pool_limit=0, **kw(one))
    assert torch.equal(a.coefficients, b.coefficients)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "big"])
def test_bad_pool_limit_is_named(bad):
    model, pre, fts, data = toys()
    with pytest.raises(ValueError, match="pool_limit"):
        merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, pool_limit=bad, **kw(model))


def test_a_numpy_integer_pool_limit_is_an_int(model_calls):
    """numbers.Integral is accepted once and stored as an int: np.int64(0) goes task by task, as 0 does."""
    np = pytest.importorskip("numpy")
    model, pre, fts, data = toys()
    res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, pool_limit=np.int64(0), **kw(model))
    assert type(res.hparams["pool_limit"]) is int and res.hparams["pool_limit"] == 0
    assert model_calls and T not in passes(model_calls)


class TaskConditioned(Toy):
    """Each task's prediction depends on its place in the list of tasks asked for: `forward(x, tasks=[t])`
    (the contract) and one pass of every task differ."""

    def forward(self, x, tasks=None):
        out = super().forward(x, tasks)
        return {t: p * (1 + i) for i, (t, p) in enumerate(out.items())}


def test_a_callers_model_goes_task_by_task_unless_pool_limit_is_set(model_calls):
    model, pre, fts, data = toys()
    cond = TaskConditioned()
    cond.load_state_dict(model.state_dict())
    default = merging.learn("adamerging", pre, fts, unlabeled=data, steps=3, lr=0.05, **kw(cond))
    assert model_calls and set(passes(model_calls)) == {1} and default.hparams["pool_limit"] == 0
    single = merging.learn("adamerging", pre, fts, unlabeled=data, steps=3, lr=0.05, pool_limit=0, **kw(cond))
    assert torch.equal(default.coefficients, single.coefficients)
    model_calls.clear()
    pooled = merging.learn("adamerging", pre, fts, unlabeled=data, steps=3, lr=0.05, pool_limit=POOL_LIMIT, **kw(cond))
    assert T in passes(model_calls) and pooled.hparams["pool_limit"] == POOL_LIMIT  # asked for: pooled
    assert not torch.allclose(pooled.coefficients, single.coefficients)  # which this model's objective feels


def test_models_built_from_folders_pool_by_default(tmp_path, model_calls):
    import mtl
    from mtl.models import create_model

    def saved(task, shift):  # same shared weights (seed) moved by `shift`, one head each
        torch.manual_seed(0)
        m = create_model([{"kind": "classification", "name": task, "num_classes": 3}],
                         backbone={"name": "test_resnet", "out_indices": [1, 2, 3]}, decoder={"name": "hps", "channels": 8})
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.add_(shift * torch.randn_like(p))
        return mtl.save_model(m, tmp_path / f"{task}{shift}")

    pre, fts = saved("a", 0.0), [saved("a", 0.01), saved("b", 0.01)]
    data = {t: [torch.randn(2, 3, 32, 32)] for t in ("a", "b")}
    res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, granularity="task", progress=False)
    assert 2 in passes(model_calls) and res.hparams["pool_limit"] == POOL_LIMIT
