"""Learned merging (AdaMerging, aTLAS, Concrete) on a tiny hand-sized model: defining properties."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import merging
from merging.learned.layout import make_layout
from merging.learned.loop import Objective, step_gradients
from merging.learned.problem import build_problem
from merging.sources import MergeInputError

T = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/merging/conftest.py


class Toy(nn.Module):
    """Shared body (merged) + one linear head per task (task-specific, never merged)."""

    def __init__(self, T=T, d=6, classes=4, dtype=torch.float32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, d), nn.Tanh(), nn.Linear(d, d)).to(dtype)
        self.heads = nn.ModuleDict({f"t{i}": nn.Linear(d, classes).to(dtype) for i in range(T)})

    def forward(self, x, tasks=None):
        z = torch.tanh(self.body(x))
        return {t: self.heads[t](z) for t in (tasks or list(self.heads))}


def toys(dtype=torch.float32, scale=0.5, seed=0):
    torch.manual_seed(seed)
    model = Toy(dtype=dtype)
    pre = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("body.")}
    g = torch.Generator().manual_seed(seed + 1)
    fts = [{k: v + scale * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in pre.items()} for _ in range(T)]
    data = {f"t{i}": [torch.randn(8, 5, generator=g, dtype=dtype) for _ in range(2)] for i in range(T)}
    return model, pre, fts, data


def kw(model):
    return dict(model=model, tasks=[f"t{i}" for i in range(T)], progress=False)


def test_zero_steps_is_task_arithmetic_at_the_initial_lambda():
    model, pre, fts, data = toys()
    for method in ("adamerging", "atlas", "concrete_adamerging"):
        extra = {"final_steps": 0, "final_mask": "hard"} if method == "concrete_adamerging" else {}
        res = merging.learn(method, pre, fts, unlabeled=data, steps=0, **extra, **kw(model))
        for k in pre:
            if method == "concrete_adamerging":  # logits 0 → σ = 0.5, not > 0.5: the thresholded mask is empty
                expect = pre[k]
            else:
                expect = pre[k] + 0.3 * (fts[0][k] - pre[k]) + 0.3 * (fts[1][k] - pre[k]) + 0.3 * (fts[2][k] - pre[k])
            torch.testing.assert_close(res.state_dict[k], expect, rtol=1e-6, atol=1e-6)
    # merging.merge gives the same state dict
    sd = merging.merge("adamerging", pre, fts, unlabeled=data, steps=0, **kw(model))
    torch.testing.assert_close(sd["body.0.weight"], pre["body.0.weight"] + 0.3 * sum(f["body.0.weight"] - pre["body.0.weight"] for f in fts))


def test_entropy_falls_on_a_toy_problem():
    model, pre, fts, data = toys()
    for granularity in ("task", "layer"):
        res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=40, lr=0.05, granularity=granularity, **kw(model))
        first, last = res.history[0]["objective"], res.history[-1]["objective"]
        assert last < first - 1e-3, (granularity, first, last)


def test_coefficient_shapes():
    model, pre, fts, data = toys()
    n_tensors = len(pre)  # body.0.weight/bias, body.2.weight/bias
    r = merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, granularity="task", **kw(model))
    assert r.coefficients.shape == (T,) and r.groups == ["all"]
    r = merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, granularity="layer", **kw(model))
    assert r.coefficients.shape == (n_tensors, T) and r.groups == list(pre)
    r = merging.learn("atlas", pre, fts, unlabeled=data, steps=1, blocks="module", **kw(model))
    assert r.coefficients.shape == (2, T) and r.groups == ["body.0", "body.2"]
    r = merging.learn("atlas", pre, fts, unlabeled=data, steps=1, **kw(model))
    assert r.coefficients.shape == (n_tensors, T)


def test_atlas_subset_of_blocks_leaves_the_others_at_init():
    model, pre, fts, data = toys()
    r = merging.learn("atlas", pre, fts, unlabeled=data, steps=5, lr=0.05, blocks="module", learn_blocks=["body\\.2"], **kw(model))
    assert torch.all(r.coefficients[0] == 0.3)
    assert not torch.all(r.coefficients[1] == 0.3)


def test_clamp_keeps_coefficients_in_unit_interval():
    model, pre, fts, data = toys()
    r = merging.learn("adamerging", pre, fts, unlabeled=data, steps=20, lr=0.5, clamp=True, **kw(model))
    assert r.coefficients.min() >= 0 and r.coefficients.max() <= 1


@pytest.mark.parametrize("method,hp,bounded", [
    ("adamerging", {"lr": 0.5}, True),  # Yang et al.'s code clamps λ to [0, 1] on every step
    ("concrete_adamerging", {"steps": 2, "final_steps": 20, "coef_lr": 0.5}, True),  # Tang et al.'s code too
    ("atlas", {"lr": 0.5}, False),  # the aTLAS code learns unbounded coefficients
])
def test_coefficients_are_bounded_by_default_as_in_each_methods_code(method, hp, bounded):
    """At an lr that drives λ far outside [0, 1] when unclamped, the defaults keep it inside exactly where the
    authors' code does; the CLI's configs say the same."""
    from omegaconf import OmegaConf

    model, pre, fts, data = toys()
    hp = {"steps": 20, **hp}
    free = merging.learn(method, pre, fts, unlabeled=data, clamp=False, **hp, **kw(model)).coefficients
    assert free.min() < 0 and free.max() > 1  # the bound has something to do
    got = merging.learn(method, pre, fts, unlabeled=data, **hp, **kw(model)).coefficients
    inside = bool(got.min() >= 0 and got.max() <= 1)
    assert inside is bounded
    if not bounded:
        torch.testing.assert_close(got, free, rtol=0, atol=0)
    config = OmegaConf.load(Path(__file__).parents[2] / "configs" / "merge" / f"{method}.yaml")
    assert config.clamp is bounded


def test_init_outside_the_interval_names_the_clamp_default():
    model, pre, fts, data = toys()
    with pytest.raises(ValueError, match=r"^init must be in \[0, 1\] with clamp=true \(the default\), got 1.5; "
                                         r"set clamp=false for an init outside \[0, 1\]$"):
        merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, init=1.5, **kw(model))
    res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=0, init=1.5, clamp=False, **kw(model))
    assert torch.all(res.coefficients == 1.5)


def test_clamp_leaves_entries_not_learned_alone_and_refuses_init_outside_the_interval():
    from merging.learned.adamerging import CoefficientLearner

    model, pre, fts, data = toys()
    with pytest.raises(ValueError, match=r"init must be in \[0, 1\] with clamp=true, got 1.5"):
        merging.learn("atlas", pre, fts, unlabeled=data, steps=1, init=1.5, clamp=True, **kw(model))
    problem = build_problem(pre, fts, model=model, tasks=[f"t{i}" for i in range(T)])
    learner = CoefficientLearner(problem, make_layout(problem.keys, "layer"), init=0.5, clamp=True, learn_rows=[0],
                                 frozen_cols=[2])
    with torch.no_grad():
        learner.coef.fill_(2.0)
    learner.apply_step(1)  # no gradient: only the clamp acts, on learned entries (row 0, columns 0 and 1)
    expect = torch.full_like(learner.coef, 2.0)
    expect[0, :2] = 1.0
    assert torch.equal(learner.coef.detach(), expect)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_learns_in_the_dtype_of_theta0(dtype):
    """float64 θ0: float64 coefficients; half-precision θ0: float32 coefficients, the model run (and the
    result held) in θ0's dtype."""
    model, pre, fts, data = toys(dtype=dtype)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    for method, extra in (("adamerging", {}), ("concrete_ta", {}), ("concrete_adamerging", {"final_steps": 1})):
        r = merging.learn(method, pre, fts, unlabeled=data, steps=2, lr=0.05, **extra, **kw(model))
        assert r.coefficients.dtype == want, method
        assert all(r.state_dict[k].dtype == dtype for k in pre), method
    r = merging.learn("adamerging", pre, fts, unlabeled=data, steps=2, lr=0.05, granularity="task", **kw(model))
    for k in pre:
        expect = pre[k].to(want) + sum(r.coefficients[t] * (fts[t][k].to(want) - pre[k].to(want)) for t in range(T))
        torch.testing.assert_close(r.state_dict[k], expect.to(dtype))


def test_gradient_matches_finite_differences():
    """d(Σ_t H_t)/dλ from the two-stage backward equals central differences of the written objective."""
    model, pre, fts, data = toys(dtype=torch.float64)
    problem = build_problem(pre, fts, **{k: v for k, v in kw(model).items() if k != "progress"})
    layout = make_layout(problem.keys, "layer")
    obj = Objective(problem, problem.tasks, {t: [b[0]] for t, b in data.items()}, None, False)
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in problem.theta0}
    coef = torch.rand(layout.rows, T, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    step_gradients(problem, problem.merged(coef, layout.group_of), obj, frozen)

    def objective(c):  # Σ_t mean entropy of softmax(head_t(tanh(body(x; θ0 + Σ c τ)))), written out
        total = 0.0
        for i in range(T):
            theta = {k: pre[k] + sum(c[layout.group_of[k], j] * (fts[j][k] - pre[k]) for j in range(T)) for k in pre}
            x = data[f"t{i}"][0]
            h = torch.tanh(x @ theta["body.0.weight"].T + theta["body.0.bias"])
            z = torch.tanh(h @ theta["body.2.weight"].T + theta["body.2.bias"])
            p = torch.softmax(model.heads[f"t{i}"](z), dim=1)
            total += float(-(p * p.log()).sum(1).mean())
        return total

    eps = 1e-6
    fd = torch.zeros_like(coef)
    with torch.no_grad():
        for r in range(layout.rows):
            for t in range(T):
                c = coef.detach().clone()
                c[r, t] += eps
                up = objective(c)
                c[r, t] -= 2 * eps
                fd[r, t] = (up - objective(c)) / (2 * eps)
    torch.testing.assert_close(coef.grad, fd, rtol=1e-5, atol=1e-8)


def test_concrete_masks_relaxed_in_unit_interval_then_binary():
    from merging.learned.concrete import ConcreteMask

    model, pre, fts, data = toys()
    problem = build_problem(pre, fts, model=model, tasks=[f"t{i}" for i in range(T)])
    cm = ConcreteMask(problem, temperature=0.5, initial_logits=0.0, seed=0)
    for _ in range(3):
        m = cm.sample()
        for v in m.values():
            assert v.min() >= 0 and v.max() <= 1 and v.requires_grad
            assert 0 < float(v.mean()) < 1
    r = merging.learn("concrete_ta", pre, fts, unlabeled=data, steps=10, lr=0.1, lam=0.4, final_mask="hard",
                      rescale=False, **kw(model))  # the thresholded, unscaled mask (not the default)
    assert set(r.mask) == set(pre)
    for k, m in r.mask.items():
        assert m.dtype == torch.bool
        assert torch.equal(m, r.mask_probability[k] > 0.5)
        expect = pre[k] + 0.4 * sum(m * (f[k] - pre[k]) for f in fts)
        torch.testing.assert_close(r.state_dict[k], expect, rtol=1e-6, atol=1e-6)
    assert r.history[-1]["objective"] < r.history[0]["objective"] + 1.0  # recorded per step
    assert len(r.history) == 10


def test_concrete_adamerging_learns_mask_then_coefficients():
    model, pre, fts, data = toys()
    r = merging.learn("concrete_adamerging", pre, fts, unlabeled=data, steps=4, final_steps=3, lr=0.1, coef_lr=0.05,
                      **kw(model))
    assert [h.get("phase") for h in r.history] == ["mask"] * 4 + ["coefficients"] * 3
    assert r.coefficients.shape == (len(pre), T) and r.mask is not None
    for k, m in r.mask.items():
        expect = pre[k] + sum(r.coefficients[r.groups.index(k), t] * m * (fts[t][k] - pre[k]) for t in range(T))
        torch.testing.assert_close(r.state_dict[k], expect, rtol=1e-5, atol=1e-6)


def test_deterministic_under_a_seed():
    model, pre, fts, data = toys()
    a = merging.learn("concrete_adamerging", pre, fts, unlabeled=data, steps=3, final_steps=2, lr=0.1, seed=5, **kw(model))
    b = merging.learn("concrete_adamerging", pre, fts, unlabeled=data, steps=3, final_steps=2, lr=0.1, seed=5, **kw(model))
    assert torch.equal(a.coefficients, b.coefficients)
    assert all(torch.equal(a.mask_probability[k], b.mask_probability[k]) for k in a.mask)
    # the seed is the run's: the caller's global generator continues as if nothing had drawn from it
    torch.manual_seed(123)
    merging.learn("adamerging", pre, fts, unlabeled=data, steps=2, lr=0.1, seed=5, **kw(model))
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_inputs_are_not_modified():
    model, pre, fts, data = toys()
    before = ({k: v.clone() for k, v in pre.items()}, [{k: v.clone() for k, v in f.items()} for f in fts],
              {k: v.clone() for k, v in model.state_dict().items()})
    model.train()
    merging.learn("adamerging", pre, fts, unlabeled=data, steps=3, lr=0.1, **kw(model))
    assert model.training  # its mode is restored (it runs in eval mode while learning)
    assert all(torch.equal(pre[k], before[0][k]) for k in pre)
    assert all(torch.equal(f[k], b[k]) for f, b in zip(fts, before[1]) for k in f)
    assert all(torch.equal(v, before[2][k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_supervised_atlas_uses_labels():
    model, pre, fts, data = toys()
    g = torch.Generator().manual_seed(0)
    labeled = {t: [(b[0], torch.randint(0, 4, (8,), generator=g))] for t, b in data.items()}
    r = merging.learn("atlas", pre, fts, labeled=labeled, objective="supervised", steps=20, lr=0.05, **kw(model))
    assert r.history[-1]["objective"] < r.history[0]["objective"]


def test_supervised_labels_outside_the_heads_classes_are_named_and_the_ignore_index_is_not():
    """The toy heads have 4 classes: a label is a class id in [0, 4) or cross-entropy's ignore_index -100."""
    model, pre, fts, data = toys()
    for bad in (7, 4, -1):
        labeled = {t: [(b[0], torch.full((8,), bad))] for t, b in data.items()}
        match = (rf"^labeled\['t0'\] holds target label\(s\) \[{bad}\], but task 't0''s head has 4 classes "
                 r"\(labels lie in \[0, 4\) or equal the loss's ignore_index=-100\)$")
        with pytest.raises(ValueError, match=match):
            merging.learn("atlas", pre, fts, labeled=labeled, objective="supervised", steps=2, **kw(model))
    y = torch.tensor([0, 1, 2, 3, -100, -100, 1, 2])  # the ignored rows add nothing to the loss
    labeled = {t: [(b[0], y)] for t, b in data.items()}
    r = merging.learn("atlas", pre, fts, labeled=labeled, objective="supervised", steps=1, **kw(model))
    theta = {k: pre[k] + 0.3 * sum(f[k] - pre[k] for f in fts) for k in pre}  # the step's start: init 0.3
    with torch.no_grad():
        out = torch.func.functional_call(model, theta, (data["t0"][0],), {"tasks": ["t0"]})["t0"]
    keep = y != -100
    torch.testing.assert_close(r.history[0]["per_task"]["t0"], float(F.cross_entropy(out[keep], y[keep])),
                               rtol=1e-5, atol=1e-6)


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, err, match", [
    ({"callback_every": -1}, ValueError, r"callback_every must be an int ≥ 0.*got -1"),
    ({"callback_every": 2.5}, ValueError, r"callback_every must be an int ≥ 0.*got 2.5"),
    ({"callback": "print", "callback_every": 1}, TypeError, "callback must be callable.*got str"),
])
def test_bad_callback_settings_are_named(kwargs, err, match):
    model, pre, fts, data = toys()
    with pytest.raises(err, match=match):
        merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, **kwargs, **kw(model))


@pytest.mark.parametrize("batch, err, match", [
    (torch.zeros(2, 5), TypeError, r"labeled\['t0'\]: batches must be \(inputs, targets\) pairs.*got Tensor"),
    ({"image": torch.zeros(2, 5)}, ValueError, r"labeled\['t0'\]: a batch dict needs 'image' and 't0'.*\['image'\]"),
])
def test_supervised_batches_without_targets_are_named(batch, err, match):
    """A bare tensor of two inputs once unpacked into an input and a 'target'."""
    model, pre, fts, data = toys()
    with pytest.raises(err, match=match):
        merging.learn("atlas", pre, fts, labeled={t: [batch] for t in data}, objective="supervised", steps=1, **kw(model))



def test_no_unlabeled_data_is_named():
    model, pre, fts, data = toys()
    with pytest.raises(ValueError, match="unlabeled"):
        merging.merge("adamerging", pre, fts, model=model, tasks=["t0", "t1", "t2"])
    with pytest.raises(ValueError, match="unlabeled"):
        merging.learn("atlas", pre, fts, **kw(model))
    with pytest.raises(ValueError, match="'t1'"):
        merging.learn("adamerging", pre, fts, unlabeled={"t0": data["t0"], "t2": data["t2"]}, **kw(model))
    with pytest.raises(ValueError, match="'t1'.*no batches"):
        merging.learn("adamerging", pre, fts, unlabeled={**data, "t1": []}, steps=1, **kw(model))
    with pytest.raises(ValueError, match="'nope'"):
        merging.learn("adamerging", pre, fts, unlabeled={**data, "nope": data["t0"]}, **kw(model))


def test_a_one_shot_iterator_is_named_when_it_runs_out():
    model, pre, fts, data = toys()
    once = {**data, "t1": (b for b in data["t1"])}  # two batches, one pass
    with pytest.raises(ValueError, match=r"unlabeled\['t1'\] was exhausted after one pass.*re-iterable"):
        merging.learn("adamerging", pre, fts, unlabeled=once, steps=3, **kw(model))


@pytest.mark.parametrize("method", ["adamerging", "concrete_ta"])
def test_a_callback_returning_no_mapping_or_a_reserved_field_is_named(method):
    """Its metrics once replaced the history's own objective/step; a float failed as 'not iterable'."""
    model, pre, fts, data = toys()
    for callback, err, match in [(lambda s, st: 0.5, TypeError, r"callback returned float at step 1; it returns a mapping"),
                                 (lambda s, st: {"objective": 99.0}, ValueError,
                                  r"callback metrics \['objective'\] would replace the history's own fields")]:
        with pytest.raises(err, match=match):
            merging.learn(method, pre, fts, unlabeled=data, steps=1, callback=callback, callback_every=1, **kw(model))
    res = merging.learn(method, pre, fts, unlabeled=data, steps=1, callback=lambda s, st: {"acc": 1.0},
                        callback_every=1, **kw(model))
    assert res.history[-1]["acc"] == 1.0 and res.history[-1]["step"] == 1


def test_the_input_learning_does_not_read_is_refused_and_recompute_needs_reiterable_batches():
    model, pre, fts, data = toys()
    with pytest.raises(ValueError, match=r"labeled= is not read by adamerging with objective='entropy' \(it reads unlabeled=\)"):
        merging.learn("adamerging", pre, fts, unlabeled=data, labeled=data, steps=1, **kw(model))
    labeled = {t: [(b[0], torch.zeros(8, dtype=torch.long))] for t, b in data.items()}
    with pytest.raises(ValueError, match=r"unlabeled= is not read by atlas with objective='supervised'"):
        merging.learn("atlas", pre, fts, labeled=labeled, unlabeled=data, objective="supervised", steps=1, **kw(model))
    once = {**data, "t1": (b for b in data["t1"])}
    with pytest.raises(ValueError, match=r"bn='recompute' reads every task's batches again after learning; "
                                         r"unlabeled\['t1'\] is a one-shot iterator"):
        merging.learn("adamerging", pre, fts, unlabeled=once, steps=1, bn="recompute", **kw(model))


def test_the_one_shot_check_does_not_start_the_tasks_iterators():
    """It once called iter() on every task's batches: a DataLoader started its workers and drew a seed."""
    model, pre, fts, data = toys()

    class Counted(list):
        starts = 0

        def __iter__(self):
            Counted.starts += 1
            return super().__iter__()

    batches = {t: Counted(b) for t, b in data.items()}
    merging.learn("adamerging", pre, fts, unlabeled=batches, steps=0, **kw(model))
    assert Counted.starts == 0  # steps=0 reads no batch


@pytest.mark.parametrize("method, bad, match", [
    ("concrete_ta", {"threshold": math.nan}, r"threshold must be in \[0, 1\), got nan"),
    ("concrete_ta", {"threshold": 1.0}, r"threshold must be in \[0, 1\), got 1.0"),
    ("concrete_ta", {"threshold": -0.1}, r"threshold must be in \[0, 1\), got -0.1"),
    ("concrete_ta", {"initial_logits": math.inf}, "initial_logits must be finite, got inf"),
    ("concrete_ta", {"temperature": math.inf}, "temperature must be positive and finite, got inf"),
    ("concrete_adamerging", {"inner_steps": -1}, "inner_steps must be an int ≥ 0, got -1"),
    ("concrete_adamerging", {"final_steps": 2.5}, "final_steps must be an int ≥ 0, got 2.5"),
    ("adamerging", {"steps": -1}, "steps must be an int ≥ 0, got -1"),
    ("adamerging", {"clamp": "false"}, "clamp must be true or false, got 'false'"),  # a truthy string
    ("atlas", {"clamp": 1}, "clamp must be true or false, got 1"),
])
def test_bad_concrete_and_step_hyperparameters_are_named(method, bad, match):
    model, pre, fts, data = toys()
    with pytest.raises(ValueError, match=match):
        merging.learn(method, pre, fts, unlabeled=data, **bad, **kw(model))


@pytest.mark.parametrize("method, given, match", [
    ("adamerging", {"k": 50}, "adamerging: k=50 is read only with vectors='ties' \\(here vectors='plain'\\)"),
    ("adamerging", {"k": 20}, "k=20 is read only with vectors='ties'"),  # given, even at its default
    ("concrete_ta", {"threshold": 0.7}, "threshold=0.7 is read only with final_mask='hard'"),
    ("concrete_adamerging", {"inner": "continue", "inner_lr": 0.5}, "inner_lr=0.5 is read only with inner='reset'"),
    ("concrete_adamerging", {"inner_steps": 0, "inner_lr": 0.5}, "inner_lr=0.5 is read only with inner='reset' and "
     r"inner_steps > 0 and steps > 0 \(here inner='reset', inner_steps=0, steps=300\)"),
    ("concrete_adamerging", {"steps": 0, "inner_lr": 0.5}, r"inner_lr=0.5 is read only with .* \(here inner='reset', "
                                                           r"inner_steps=1, steps=0\)"),
    ("concrete_adamerging", {"steps": 0, "inner_steps": 2}, r"inner_steps=2 is read only with steps > 0 \(here steps=0\)"),
    ("concrete_adamerging", {"steps": 0, "inner": "continue"}, r"inner='continue' is read only with inner_steps > 0 "
                                                               r"and steps > 0 \(here inner_steps=1, steps=0\)"),
    ("concrete_adamerging", {"inner_steps": 0, "inner": "reset"}, r"inner='reset' is read only with inner_steps > 0"),
    ("concrete_adamerging", {"steps": 0, "final_steps": 0, "coef_lr": 0.05},
     "coef_lr=0.05 is read only with final_steps > 0, or inner='continue' and inner_steps > 0 and steps > 0"),
    ("concrete_adamerging", {"final_steps": 0, "coef_lr": 0.05}, "coef_lr=0.05 is read only with final_steps > 0, or "
     r"inner='continue' and inner_steps > 0 and steps > 0 \(here final_steps=0, inner='reset', inner_steps=1, "
     r"steps=300\)"),
    ("adamerging", {"steps": 0, "lr": 0.01}, r"adamerging: lr=0.01 is read only with steps > 0 \(here steps=0\)"),
    ("concrete_ta", {"steps": 0, "lr": 0.01}, r"lr=0.01 is read only with steps > 0"),
    ("concrete_adamerging", {"final_steps": 0, "inner_steps": 0, "coef_lr": 0.05},
     "coef_lr=0.05 is read only with final_steps > 0"),
])
def test_settings_that_would_not_be_read_are_refused(method, given, match):
    with pytest.raises(ValueError, match=match):
        merging.learned.check_hparams(method, given)


def test_settings_that_leave_a_key_unread_at_its_default_are_accepted_and_not_recorded():
    model, pre, fts, data = toys()
    res = merging.learn("concrete_adamerging", pre, fts, unlabeled=data, steps=1, inner_steps=0, final_steps=0,
                        **kw(model))
    assert "inner_lr" not in res.hparams and "coef_lr" not in res.hparams and res.hparams["inner_steps"] == 0
    kept = merging.learned.check_hparams("concrete_adamerging", {"final_steps": 0, "inner": "continue", "coef_lr": 0.05})
    assert kept[0]["coef_lr"] == 0.05  # read by the inner steps that carry λ on


@pytest.mark.parametrize("settings, key, read", [
    ({"inner_steps": 0}, "inner_lr", False),
    ({"inner": "continue"}, "inner_lr", False),
    ({}, "inner_lr", True),
    ({"steps": 0}, "inner_lr", False),
    ({"steps": 0, "final_steps": 0, "inner": "continue"}, "coef_lr", False),
    ({"steps": 0}, "inner_steps", False),
    ({}, "inner_steps", True),
    ({"steps": 0}, "inner", False),
    ({"inner_steps": 0}, "inner", False),
    ({}, "inner", True),
    ({"final_steps": 0}, "coef_lr", False),
    ({"final_steps": 0, "inner": "continue", "inner_steps": 0}, "coef_lr", False),
    ({"final_steps": 0, "inner": "continue"}, "coef_lr", True),
    ({"inner_steps": 0}, "coef_lr", True),
    ({"steps": 0}, "lr", False),
    ({}, "lr", True),
])
def test_a_key_called_unread_changes_nothing_and_one_called_read_does(monkeypatch, settings, key, read):
    """The defining property behind READ_ONLY_WITH: two values of an unread key give the same merge (the
    table switched off to run them), two values of a read one do not."""
    from merging.learned import api

    hp = {**merging.learned.method_defaults("concrete_adamerging"), "steps": 2, "final_steps": 2, **settings}
    assert (key in api.unread(hp)) is not read
    monkeypatch.setattr(api, "READ_ONLY_WITH", {})
    model, pre, fts, data = toys()
    values = {"inner_steps": (1, 3), "inner": ("reset", "continue")}.get(key, (1e-3, 0.5))
    runs = [merging.learn("concrete_adamerging", pre, fts, unlabeled=data, **{**hp, key: v}, **kw(model))
            for v in values]
    same = all(torch.equal(runs[0].state_dict[k], runs[1].state_dict[k]) for k in pre)
    assert same is not read


def test_unread_defaults_are_not_recorded():
    model, pre, fts, data = toys()
    plain = merging.learn("adamerging", pre, fts, unlabeled=data, steps=0, **kw(model)).hparams
    ties = merging.learn("adamerging", pre, fts, unlabeled=data, steps=0, vectors="ties", k=30, **kw(model)).hparams
    assert "k" not in plain and ties["k"] == 30
    concrete = merging.learn("concrete_adamerging", pre, fts, unlabeled=data, steps=0, final_steps=0,
                             **kw(model)).hparams
    assert "threshold" not in concrete and "inner_lr" not in concrete and "inner" not in concrete
    assert concrete["final_mask"] == "sample"


def test_a_mask_logit_turning_infinite_names_the_tensor_and_entry():
    from merging.learned.concrete import ConcreteMask

    model, pre, fts, data = toys()
    cm = ConcreteMask(build_problem(pre, fts, model=model, tasks=[f"t{i}" for i in range(T)]))
    with torch.no_grad():
        cm.logits["body.0.weight"][1, 0] = math.inf  # not the tensor's first entry
    with pytest.raises(FloatingPointError, match=r"mask logit of tensor 'body.0.weight' at \(1, 0\) became inf at step 5"):
        cm.apply_step(5)


def test_architecture_mismatch_names_the_tensor():
    model, pre, fts, data = toys()
    bad = [dict(f) for f in fts]
    bad[1]["body.2.weight"] = torch.zeros(6, 7)
    with pytest.raises(MergeInputError, match="body.2.weight"):
        merging.learn("adamerging", pre, bad, unlabeled=data, **kw(model))
    wrong = {k: v for k, v in pre.items()}
    wrong["extra.weight"] = torch.zeros(2)
    with pytest.raises(MergeInputError, match="extra.weight"):
        merging.learn("adamerging", wrong, [dict(f, **{"extra.weight": torch.ones(2)}) for f in fts],
                      unlabeled=data, **kw(model))


def test_nan_coefficients_are_named():
    model, pre, fts, data = toys()
    with pytest.raises(ValueError, match="init must be a finite number, got nan"):
        merging.learn("adamerging", pre, fts, unlabeled=data, init=math.nan, **kw(model))
    nan_fts = [dict(f) for f in fts]
    nan_fts[0]["body.0.bias"] = torch.full((6,), math.nan)
    with pytest.raises(MergeInputError, match="body.0.bias"):
        merging.learn("adamerging", pre, nan_fts, unlabeled=data, **kw(model))

def test_an_objective_turning_nan_names_the_task(monkeypatch):
    from merging.learned import loop

    model, pre, fts, data = toys()
    real, calls = loop.entropy, {"t1": 0}

    def entropy(pred, kind, task):  # t1's objective turns NaN at its second step
        calls[task] = calls.get(task, 0) + 1
        return real(pred, kind, task) * (math.nan if task == "t1" and calls[task] == 2 else 1)

    monkeypatch.setattr(loop, "entropy", entropy)
    with pytest.raises(FloatingPointError, match="objective of task 't1' is nan at step 2; the merged model diverged"):
        merging.learn("adamerging", pre, fts, unlabeled=data, steps=3, **kw(model))


def test_a_callback_writing_into_its_state_changes_nothing():
    model, pre, fts, data = toys()

    def vandal(step, state):
        for v in state.values():
            v.add_(100.0)

    clean = merging.learn("adamerging", pre, fts, unlabeled=data, steps=4, **kw(model))
    other = merging.learn("adamerging", pre, fts, unlabeled=data, steps=4, callback=vandal, callback_every=1, **kw(model))
    torch.testing.assert_close(other.coefficients, clean.coefficients, rtol=0, atol=0)


def test_summary_mean_lies_between_min_and_max():
    model, pre, fts, data = toys()
    res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=0, init=0.3, **kw(model))
    for row in res.summary()["per_task"].values():  # all entries 0.3 in float32: the mean must not fall below
        assert row["min"] <= row["mean"] <= row["max"]


def test_bad_batches_are_named_before_they_look_like_divergence():
    model, pre, fts, data = toys()
    cases = [({**data, "t1": [torch.full((8, 5), math.nan)]}, ValueError, r"unlabeled\['t1'\] gave a batch with NaN"),
             ({**data, "t2": [torch.zeros(0, 5)]}, ValueError, r"unlabeled\['t2'\] gave an empty batch"),
             ({**data, "t0": torch.zeros(8, 5)}, TypeError, r"unlabeled\['t0'\] is one tensor"),
             ([data["t0"], data["t1"]], TypeError, "unlabeled must map each task to an iterable of batches")]
    for unlabeled, error, match in cases:
        with pytest.raises(error, match=match):
            merging.learn("adamerging", pre, fts, unlabeled=unlabeled, steps=1, **kw(model))
    with pytest.raises(ValueError, match=r"learn_blocks: '\[bad' is not a regular expression"):
        merging.learn("atlas", pre, fts, unlabeled=data, steps=1, learn_blocks=["[bad"], **kw(model))


@pytest.mark.parametrize("pooled", [False, True])
def test_a_batch_the_model_cannot_run_names_its_task_shape_and_the_channels_expected(pooled):
    """Torch's own error ("expected input[6, 1, 8, 8] to have 3 channels") names neither the task nor its data."""
    from test_learned_memory_format import TASKS, conv_toys

    model, pre, fts, data = conv_toys()
    gray = [torch.randn(6, 1, 8, 8)]
    bad, names, whose = (({t: gray for t in TASKS}, r"unlabeled\['a'\], unlabeled\['b'\]", r"their pooled batch of shape \(12,")
                         if pooled else ({**data, "b": gray}, r"unlabeled\['b'\]", r"its batch of shape \(6,"))
    with pytest.raises(RuntimeError, match=rf"^{names}: the model's forward failed on {whose} 1, 8, 8\) \(Given groups=1, "
                                           r"[^)]*\); the model's first convolution takes 3 channels: expected shape "
                                           r"\(B, 3, H, W\)$"):
        merging.learn("adamerging", pre, fts, unlabeled=bad, model=model, tasks=TASKS, progress=False, steps=1,
                      pool_limit=1 << 20 if pooled else 0)


def test_an_mtl_model_refusing_a_gray_batch_still_names_the_task():
    """mtl models refuse a batch not shaped (B, 3, H, W) with a ValueError of their own, which names the family
    and shape but not the task: the learned merge names it as it names torch's errors."""
    import mtl

    model = mtl.create_model(["semseg", "depth"], backbone="test_resnet").eval()
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fts = [{k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in pre.items()} for _ in range(2)]
    rgb, gray = torch.rand(2, 3, 32, 32), torch.rand(2, 1, 32, 32)
    with pytest.raises(RuntimeError, match=r"^unlabeled\['semseg'\]: the model's forward failed on its batch of shape "
                                           r"\(2, 1, 32, 32\) \(multitask: input must be \(B, 3, H, W\)"):
        merging.learn("adamerging", pre, fts, unlabeled={"semseg": [gray], "depth": [rgb]}, model=model,
                      tasks=["semseg", "depth"], progress=False, steps=1)


def test_a_batch_of_the_wrong_width_names_its_task_labeled_or_not():
    model, pre, fts, data = toys()
    narrow = [torch.randn(8, 4)]  # the toy body takes 5 features
    with pytest.raises(RuntimeError, match=r"^unlabeled\['t1'\]: the model's forward failed on its batch of shape "
                                           r"\(8, 4\) \(mat1 and mat2 shapes cannot be multiplied \(8x4 and 5x6\)\)$"):
        merging.learn("adamerging", pre, fts, unlabeled={**data, "t1": narrow}, steps=1, **kw(model))
    labeled = {t: [(b[0], torch.zeros(8, dtype=torch.long))] for t, b in data.items()}
    labeled["t2"] = [(narrow[0], torch.zeros(8, dtype=torch.long))]
    with pytest.raises(RuntimeError, match=r"^labeled\['t2'\]: the model's forward failed on its batch of shape \(8, 4\)"):
        merging.learn("atlas", pre, fts, labeled=labeled, objective="supervised", steps=1, **kw(model))


def test_unknown_granularity_block_and_hyperparameter():
    model, pre, fts, data = toys()
    with pytest.raises(ValueError, match="unknown granularity 'neuron'"):
        merging.learn("adamerging", pre, fts, unlabeled=data, granularity="neuron", **kw(model))
    with pytest.raises(ValueError, match="'decoder' matches no block"):
        merging.learn("atlas", pre, fts, unlabeled=data, blocks="module", learn_blocks=["decoder"], **kw(model))
    for empty in ([], ()):  # selects no block: every step would run and learn nothing
        with pytest.raises(ValueError, match=r"^learn_blocks=\[\] selects no block; use null \(None\) to learn every"):
            merging.learn("atlas", pre, fts, unlabeled=data, steps=2, learn_blocks=empty, **kw(model))
    with pytest.raises(ValueError, match="unknown blocks 'layers'"):
        merging.learn("atlas", pre, fts, unlabeled=data, blocks="layers", **kw(model))
    with pytest.raises(TypeError, match="unknown hyperparameter.*lamda"):
        merging.learn("adamerging", pre, fts, unlabeled=data, lamda=0.3, **kw(model))
    with pytest.raises(ValueError, match="unknown learned merge method 'adamerge'"):
        merging.learn("adamerge", pre, fts, unlabeled=data, **kw(model))


def test_a_blocks_mapping_names_unmatched_tensors_and_empty_blocks_in_one_error():
    from merging.learned.layout import make_layout

    keys = ["body.0.weight", "body.0.bias", "body.2.weight", "head.weight"]
    with pytest.raises(ValueError, match=r"^blocks: tensor 'body\.2\.weight' \(and 1 more\) matches no block pattern; "
                                         r"block\(s\) 'nope', 'none' match no merged tensor$"):
        make_layout(keys, "block", {"first": r"body\.0", "nope": "zzz", "none": "yyy"})
    with pytest.raises(ValueError, match=r"^blocks: block\(s\) 'nope' match no merged tensor$"):
        make_layout(keys, "block", {"all": ".", "nope": "zzz"})
    with pytest.raises(ValueError, match=r"^blocks: tensor 'head\.weight' matches no block pattern$"):
        make_layout(keys, "block", {"body": "body"})


def test_adamerging_plus_task_vectors_by_hand():
    """AdaMerging++: TIES trim (top-k % per task over all tensors) + elected sign, per task."""
    from merging.learned.problem import ties_task_vectors

    taus = {"a": torch.tensor([[4.0, -1.0, 0.5, 2.0], [-1.0, 5.0, 0.2, -2.5]]),
            "b": torch.tensor([[-3.0, 0.1], [0.9, 0.0]])}
    out = ties_task_vectors({k: v.clone() for k, v in taus.items()}, k=50)  # keep 3 of 6 entries per task
    # trimmed: τ1 a [4,0,0,2] b [-3,0]; τ2 a [-1,5,0,-2.5] b [0,0]; γ: a [+,+,0,-], b [-,0]
    torch.testing.assert_close(out["a"], torch.tensor([[4.0, 0, 0, 0], [0, 5.0, 0, -2.5]]))
    torch.testing.assert_close(out["b"], torch.tensor([[-3.0, 0], [0, 0]]))


def test_adamerging_plus_at_zero_steps_and_bad_options():
    from merging.learned.problem import ties_task_vectors

    model, pre, fts, data = toys()
    res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=0, vectors="ties", k=30, **kw(model))
    taus = ties_task_vectors({k: torch.stack([f[k] - pre[k] for f in fts]) for k in pre}, 30)
    for k in pre:
        torch.testing.assert_close(res.state_dict[k], pre[k] + 0.3 * taus[k].sum(0), rtol=1e-6, atol=1e-6)
    kept = sum(int((v != 0).sum()) for v in taus.values()) / sum(v.numel() for v in taus.values())
    assert 0 < kept < 0.3  # trimmed to 30 %, then sign conflicts dropped
    moved = merging.learn("adamerging", pre, fts, unlabeled=data, steps=5, lr=0.05, vectors="ties", **kw(model))
    assert moved.hparams["vectors"] == "ties" and not torch.all(moved.coefficients == 0.3)
    with pytest.raises(ValueError, match="vectors must be one of"):
        merging.learn("adamerging", pre, fts, unlabeled=data, vectors="dare", **kw(model))
    with pytest.raises(ValueError, match=r"k \(the % of each task vector"):
        merging.learn("adamerging", pre, fts, unlabeled=data, vectors="ties", k=0, **kw(model))


def test_excluded_keys_are_left_out_as_in_a_training_free_merge():
    """`exclude=` means the same for learned and training-free merges: the keys are not in the result
    (like the heads); `compose` takes them from the task's own model, `pool.merged_model` names them."""
    model, pre, fts, data = toys()
    res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, exclude=r"body\.0\.", **kw(model))
    plain = merging.merge("task_arithmetic", pre, fts, exclude=r"body\.0\.")
    assert sorted(res.state_dict) == sorted(plain) == ["body.2.bias", "body.2.weight"]
    full = merging.compose(res.state_dict, fts[1])
    torch.testing.assert_close(full["body.0.weight"], fts[1]["body.0.weight"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_device_that_is_absent_or_not_a_device_is_named():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, tasks):
            return {t: self.lin(x) for t in tasks}

    a, b, c = Net(), Net(), Net()
    kw = dict(unlabeled={"t": [torch.randn(2, 4)]}, model=c, tasks=["t"], steps=1)
    with pytest.raises(ValueError, match=r"device=cuda but CUDA is not available here; use device='cpu'"):
        merging.merge("adamerging", a.state_dict(), [b.state_dict()], device="cuda", **kw)
    with pytest.raises(ValueError, match=r"device='gpu' is not a torch device"):
        merging.merge("adamerging", a.state_dict(), [b.state_dict()], device="gpu", **kw)


def test_a_task_the_model_does_not_predict_is_named():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleDict({"t": nn.Linear(4, 3)})

        def forward(self, x, tasks):
            return {t: self.body[t](x) for t in tasks}

    a, b, c = Net(), Net(), Net()
    with pytest.raises(KeyError, match=r"raised KeyError .*'zz'.* on forward\(x, tasks=\['zz'\]\); does it predict task 'zz'"):
        merging.merge("adamerging", a.state_dict(), [b.state_dict()], unlabeled={"zz": [torch.randn(2, 4)]},
                      model=c, tasks=["zz"], steps=1, progress=False)


def test_entropy_keeps_float64_logits_in_float64_and_matches_the_formula():
    from merging.learned.objective import entropy

    logits = torch.tensor([[0.0, 1e-4], [2.0, -1.0]], dtype=torch.float64)
    p = logits.softmax(1)
    want = -(p * p.log()).sum(1).mean()
    got = entropy(logits, "classification")
    assert got.dtype == torch.float64 and abs(float(got - want)) < 1e-15
    # log 2 − (1e-4)²/8 to first order: float32 cannot tell it from log 2, float64 can
    assert abs(float(entropy(logits[:1], "classification")) - (math.log(2) - 1e-8 / 8)) < 1e-14
    assert entropy(logits.to(torch.bfloat16), "classification").dtype == torch.float32


def test_a_task_the_model_has_no_head_for_is_named_on_the_pooled_path_too():
    model, pre, fts, data = toys()
    with pytest.raises(KeyError, match=r"forward\(x, tasks=\['c'\]\); does it predict task 'c'\?"):
        merging.learn("adamerging", pre, fts, unlabeled={"t0": data["t0"], "t1": data["t1"], "c": data["t2"]},
                      model=model, tasks=["t0", "t1", "c"], steps=1, pool_limit=1 << 20, progress=False)


def test_tied_weights_are_named_not_reported_as_a_foreign_architecture():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
            self.out.weight = self.emb.weight
            self.heads = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})

        def forward(self, x, tasks=None):
            z = self.out(torch.tanh(self.emb(x)))
            return {t: self.heads[t](z) for t in tasks}

    m = Tied()
    pre = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("heads")}
    fts = [{k: v + 0.1 for k, v in pre.items()} for _ in range(2)]
    with pytest.raises(merging.MergeInputError, match=r"merged tensor 'out.weight' is tied to 'emb.weight' in the model"):
        merging.learn("adamerging", pre, fts, unlabeled={"a": [torch.randn(2, 4)], "b": [torch.randn(2, 4)]}, model=m,
                      tasks=["a", "b"], steps=1, progress=False)


def test_run_folders_for_model_folders_point_to_their_model_folders(tmp_path):
    """mtl-merge debug=smoke leaves run folders (smoke_pool/<task>/model): the hint is load_model's, not 'pass a model'."""
    for name in ("pretrained", "semseg", "regression"):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "config.json").write_text("{}")
    folders = [tmp_path / "semseg", tmp_path / "regression"]
    u = {"semseg": [torch.rand(2, 3, 8, 8)], "regression": [torch.rand(2, 3, 8, 8)]}
    with pytest.raises(MergeInputError, match=f"^{tmp_path / 'pretrained'} is a run folder, not a model folder; "
                                              f"did you mean {tmp_path / 'pretrained' / 'model'}\\?$"):
        merging.learn("adamerging", tmp_path / "pretrained", folders, unlabeled=u, steps=2)
    with pytest.raises(MergeInputError, match=f"^{folders[1]} is a run folder.*did you mean {folders[1] / 'model'}"):
        merging.learn("adamerging", tmp_path / "pretrained" / "model", [folders[0] / "model", folders[1]],
                      unlabeled=u, steps=2)


def test_tasks_without_model_is_refused_for_model_folders_not_dropped(tmp_path):
    """tasks= names the task of each fine-tune for a caller's model=; folders bring their own tasks, and the
    columns follow the folders' order, so a tasks= beside them would go unread: refused, whatever it says."""
    import mtl
    from mtl.models import create_model

    def saved(name, task, shift):
        torch.manual_seed(0)
        m = create_model([{"kind": "classification", "name": task, "num_classes": 3}],
                         backbone={"name": "test_resnet", "out_indices": [1, 2, 3]}, decoder={"name": "hps", "channels": 8})
        with torch.no_grad():
            for p in m.parameters():
                p.add_(shift)
        return mtl.save_model(m, tmp_path / name)

    pre, fts = saved("pre", "a", 0.0), [saved("a", "a", 0.01), saved("b", "b", -0.01)]
    data = {t: [torch.randn(2, 3, 32, 32)] for t in ("a", "b")}
    for tasks in (["foo", "bar", "baz"], ["b", "a"], ["a", "b"]):  # unknown, reversed, even the folders' own
        with pytest.raises(ValueError, match=rf"^tasks={tasks!r} is read only with model= .*: leave tasks out$".replace("[", r"\[")):
            merging.learn("adamerging", pre, fts, unlabeled=data, tasks=tasks, steps=1, progress=False)
    assert merging.learn("adamerging", pre, fts, unlabeled=data, steps=1, progress=False).tasks == ["a", "b"]
