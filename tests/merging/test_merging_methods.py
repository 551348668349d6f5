"""Each merge method against hand-computed cases and its defining properties (docs/merging.md)."""
import numpy as np
import pytest
import torch

import merging
from merging_toys import make_models

# 3 tasks × 4 entries, dyadic values so every operation is exact. k=75% keeps 3 of 4 per task.
PRE = torch.tensor([0.5, -1.0, 2.0, 0.0])
TAUS = [
    torch.tensor([4.0, -1.0, 3.0, -2.0]),  # trimmed: [4, 0, 3, -2]
    torch.tensor([-2.0, 5.0, -3.0, 0.5]),  # trimmed: [-2, 5, -3, 0]
    torch.tensor([1.0, -6.0, 0.25, 3.0]),  # trimmed: [1, -6, 0, 3]
]
# Σ trimmed = [3, -1, 0, 1] → γ = [+, -, 0, +]
#   entry 0: agreeing 4, 1    → mean 2.5, sum 5
#   entry 1: agreeing -6      → mean -6,  sum -6
#   entry 2: 3 and -3 cancel  → γ = 0, no agreeing task → 0
#   entry 3: agreeing 3       → mean 3,   sum 3
TIES_MEAN = torch.tensor([2.5, -6.0, 0.0, 3.0])
TIES_SUM = torch.tensor([5.0, -6.0, 0.0, 3.0])


def _hand():
    return {"w": PRE.clone()}, [{"w": PRE + tau} for tau in TAUS]


@pytest.mark.parametrize("select", ["kthvalue", "radix"])
def test_ties_hand_example_mean(select):
    pre, fts = _hand()
    out = merging.merge("ties", pre, fts, lam=1.0, k=75, merge_func="mean", select=select)
    assert torch.equal(out["w"], PRE + TIES_MEAN)


def test_ties_hand_example_sum_and_lambda():
    pre, fts = _hand()
    out = merging.merge("ties", pre, fts, lam=0.5, k=75, merge_func="sum")
    assert torch.equal(out["w"], PRE + 0.5 * TIES_SUM)


def test_ties_defaults_keep_top_20_percent_over_whole_vector():
    # One task, 10 entries: k=20 keeps ⌈10·0.2⌉ = 2 entries, the two largest magnitudes.
    tau = torch.tensor([0.1, -9.0, 0.3, 0.2, 7.0, -0.4, 0.5, 0.6, -0.7, 0.8])
    out = merging.merge("ties", {"w": torch.zeros(10)}, [{"w": tau}])
    expect = torch.zeros(10)
    expect[1], expect[4] = -9.0, 7.0
    assert torch.equal(out["w"], expect)


def test_linearised_expansion_point_is_copied_and_not_counted_in_ties_top_k():
    # A linearised model stores θ0 as `theta0.` buffers, equal in every model (τ = 0). Counted as merged
    # weights they would double P, so k=20 would keep 4 of the 10 real entries instead of ⌈10·0.2⌉ = 2.
    tau = torch.tensor([0.1, -9.0, 0.3, 0.2, 7.0, -0.4, 0.5, 0.6, -0.7, 0.8])
    point = torch.arange(10.0)
    pre = {"w": torch.zeros(10), "theta0.w": point.clone()}
    out = merging.merge("ties", pre, [{"w": tau, "theta0.w": point.clone()}])
    expect = torch.zeros(10)
    expect[1], expect[4] = -9.0, 7.0
    assert torch.equal(out["w"], expect) and torch.equal(out["theta0.w"], point)
    plan = merging.keys.plan_keys(merging.sources.open_source(pre), [merging.sources.open_source(pre)])
    assert plan.kind["theta0.w"] == "copy" and plan.num_merged_params == 10


def test_ties_boundary_keeps_ties_at_threshold():
    # n = 2 but three entries share the 2nd-largest magnitude: "≥ threshold" keeps all of them.
    tau = torch.tensor([5.0, 2.0, -2.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.0, 0.0])
    out = merging.merge("ties", {"w": torch.zeros(10)}, [{"w": tau}], k=20)
    assert torch.equal(out["w"], torch.tensor([5.0, 2.0, -2.0, 2.0, 0, 0, 0, 0, 0, 0]))


def test_ties_global_versus_per_tensor_trimming():
    # Tensor a has large changes, b small ones. Global top-50% keeps all of a and none of b;
    # per-tensor trimming (what LLM tools call density) keeps the top half of each tensor.
    pre = {"a": torch.zeros(4), "b": torch.zeros(4)}
    ft = {"a": torch.tensor([10.0, -20.0, 30.0, -40.0]), "b": torch.tensor([0.1, -0.2, 0.3, -0.4])}
    g = merging.merge("ties", pre, [ft], k=50)
    assert torch.equal(g["a"], ft["a"]) and torch.equal(g["b"], torch.zeros(4))
    for select in ("kthvalue", "radix"):
        p = merging.merge("ties", pre, [ft], k=50, trim="per_tensor", select=select)
        assert torch.equal(p["a"], torch.tensor([0.0, 0.0, 30.0, -40.0]))
        assert torch.equal(p["b"], torch.tensor([0.0, 0.0, 0.3, -0.4]))


def test_ties_k100_single_model_returns_it():
    pre, fts = make_models(T=1, heads=False)
    out = merging.merge("ties", pre, fts, k=100, lam=1.0)
    for k in out:
        if out[k].is_floating_point() and "running" not in k:
            torch.testing.assert_close(out[k], fts[0][k], rtol=0, atol=1e-6)


def test_task_arithmetic_definition_and_average_equivalence():
    pre, fts = make_models(T=4, heads=False)
    ta = merging.merge("task_arithmetic", pre, fts, lam=0.3)
    w = "backbone.blocks.0.weight"
    expect = pre[w] + 0.3 * sum(ft[w] - pre[w] for ft in fts)
    torch.testing.assert_close(ta[w], expect, rtol=0, atol=1e-6)
    # λ = 1/T is the plain average of the fine-tuned weights.
    ta = merging.merge("task_arithmetic", pre, fts, lam=1 / 4, bn="merge")
    avg = merging.merge("average", pre, fts, bn="merge")
    for k in avg:
        if avg[k].is_floating_point():
            torch.testing.assert_close(ta[k], avg[k], rtol=0, atol=1e-6)
            torch.testing.assert_close(avg[k], sum(ft[k] for ft in fts) / 4, rtol=0, atol=1e-6)


def test_task_arithmetic_per_task_lambda():
    pre, fts = make_models(T=3, heads=False)
    out = merging.merge("task_arithmetic", pre, fts, lam=[0.1, 0.2, 0.7])
    w = "decoder.proj.weight"
    expect = pre[w] + sum(l * (ft[w] - pre[w]) for l, ft in zip([0.1, 0.2, 0.7], fts))
    torch.testing.assert_close(out[w], expect, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="3 fine-tuned"):
        merging.merge("task_arithmetic", pre, fts, lam=[0.1, 0.2])


def test_dare_fixed_seed_drops_or_rescales_exactly():
    pre, fts = make_models(T=1, heads=False)
    p = 0.3
    tau = merging.task_vector(pre, fts[0])
    dropped = merging.dare(tau, p=p, seed=7)
    n_kept = n_all = 0
    for k, v in tau.items():
        mask = merging.dare_mask(v.shape, p, seed=7, task=0, key=k)
        assert torch.equal(dropped[k], torch.where(mask, v / (1 - p), torch.zeros_like(v)))
        n_kept += int(mask.sum())
        n_all += mask.numel()
    assert abs(n_kept / n_all - (1 - p)) < 0.1
    # Through merge (task arithmetic base, λ=1): θ0 + DARE(τ), and deterministic for the seed.
    out = merging.merge("dare", pre, fts, p=p, seed=7, base="task_arithmetic", lam=1.0)
    again = merging.merge("dare", pre, fts, p=p, seed=7, base="task_arithmetic", lam=1.0)
    other = merging.merge("dare", pre, fts, p=p, seed=8, base="task_arithmetic", lam=1.0)
    for k, v in dropped.items():
        assert torch.equal(out[k], pre[k] + v)
        assert torch.equal(out[k], again[k])
    assert not all(torch.equal(out[k], other[k]) for k in dropped)


def test_dare_preserves_expectation():
    pre, fts = make_models(T=1, heads=False, seed=3)
    tau = merging.task_vector(pre, fts[0])
    n, p = 400, 0.5
    acc = {k: torch.zeros_like(v) for k, v in tau.items()}
    for seed in range(n):
        for k, v in merging.dare(tau, p=p, seed=seed).items():
            acc[k] += v
    for k, v in tau.items():
        mean = acc[k] / n
        # per entry: std of the mean = |τ|·sqrt(p/(1−p)/n) = |τ|/20; allow 5σ
        assert torch.all((mean - v).abs() <= 5 * v.abs() / 20 + 1e-7), k


def test_dare_on_ties_uses_ties_hyperparameters():
    pre, fts = _hand()
    # p=0 drops nothing: DARE+TIES is TIES.
    out = merging.merge("dare", pre, fts, p=0.0, base="ties", k=75, lam=1.0)
    assert torch.equal(out["w"], PRE + TIES_MEAN)
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        merging.merge("dare", pre, fts, base="task_arithmetic", k=20)


def test_hyperparameter_validation():
    pre, fts = _hand()
    with pytest.raises(KeyError, match="valid names"):
        merging.merge("nope", pre, fts)
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        merging.merge("ties", pre, fts, lamda=1.0)
    with pytest.raises(ValueError, match="percentage"):
        merging.merge("ties", pre, fts, k=150)
    with pytest.raises(ValueError, match="merge_func"):
        merging.merge("ties", pre, fts, merge_func="max")
    with pytest.raises(ValueError, match="drop probability"):
        merging.merge("dare", pre, fts, p=1.0)
    with pytest.raises(ValueError, match="base"):
        merging.merge("consensus", pre, fts, base="average")
    assert set(merging.method_names()) == {"average", "task_arithmetic", "ties", "dare", "consensus"}
    with pytest.raises(ValueError, match=r"lam must be one finite number \(one λ per model: task_arithmetic, or dare "
                                         r"with base=task_arithmetic\), got \[0.3, 0.3\]"):
        merging.merge("ties", pre, fts, lam=[0.3, 0.3])


@pytest.mark.parametrize("method, hp", [("dare", {"base": "ties"}), ("consensus", {}), ("consensus", {"base": "ties"}),
                                        ("ties", {})])
def test_a_lambda_list_is_pointed_to_the_methods_that_take_one(method, hp):
    """dare's list hint once said "task_arithmetic or dare" to a dare (base=ties) that refuses lists; a hint is
    right only if the method it names takes the list."""
    pre, fts = make_models(T=3, heads=False)
    lams = [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match=r"one λ per model: task_arithmetic, or dare with base=task_arithmetic\)"):
        merging.merge(method, pre, fts, lam=lams, **hp)
    for named, kw in (("task_arithmetic", {}), ("dare", {"base": "task_arithmetic"})):  # the hint's own advice works
        merging.merge(named, pre, fts, lam=lams, **kw)
    with pytest.raises(ValueError, match=r"mergekit's lambda scales the mixed task vector; one factor per model is "
                                         r"weight=\[...\]"):
        merging.merge("task_arithmetic", pre, fts, lam=lams, convention="mergekit")


def test_numpy_scalars_are_the_numbers_they_hold(caplog):
    """np.int64(20) was refused as 'k is a percentage in [0, 100]'; np.float32(0.3) as no finite number."""
    import numpy as np

    pre, fts = _hand()
    want = merging.merge("ties", pre, fts, k=20, lam=0.5)
    got = merging.merge("ties", pre, fts, k=np.int64(20), lam=np.float64(0.5))
    assert all(torch.equal(got[k], v) for k, v in want.items())
    m = merging.create_method("task_arithmetic", lam=[np.float32(0.25), 0.5])
    assert m.hp["lam"] == [0.25, 0.5] and type(m.hp["lam"][0]) is float
    with caplog.at_level("WARNING", logger="merging.methods"):  # FusionBench's/mergekit's fraction, taken as %
        for _ in range(3):  # a λ grid builds the method once per candidate: said once
            merging.create_method("ties", k=0.37)
    assert caplog.text.count("ties: k=0.37 keeps 0.37% of the entries (k is a percentage; for a fifth, k=20)") == 1


def test_recorded_hyperparameters_are_the_ones_the_merge_used():
    from merging.job import resolved_hparams

    hp = resolved_hparams("consensus", {"k": 2, "lam": None})
    assert hp["lam"] == 0.3 and not {"ties_k", "merge_func", "trim"} & set(hp) and hp["base"] == "task_arithmetic"
    hp = resolved_hparams("consensus", {"base": "ties", "lam": None})
    assert hp["lam"] == 1.0 and hp["ties_k"] == 20 and hp["merge_func"] == "mean"
    assert resolved_hparams("ties", {"lam": 0.5})["k"] == 20  # methods without a rule of their own: every default


@pytest.mark.parametrize("given", [lambda l: np.array(l), lambda l: torch.tensor(l, dtype=torch.float64),
                                   lambda l: np.linspace(l[0], l[-1], len(l))])
def test_a_per_task_lambda_array_is_one_lambda_per_task(given):
    """A 1-d array or tensor of T λ (np.linspace, a sweep) was refused as 'not a finite number or one per task'."""
    pre, fts = make_models(T=3, heads=False)
    lams = given([0.1, 0.4, 0.7])
    out = merging.merge("task_arithmetic", pre, fts, lam=lams)
    w = "decoder.proj.weight"
    expect = pre[w] + sum(float(l) * (ft[w] - pre[w]) for l, ft in zip(lams, fts))
    torch.testing.assert_close(out[w], expect, rtol=0, atol=1e-6)
    tall = merging.tall_masks(pre, fts, lam=lams)
    taus = [merging.task_vector(pre, ft) for ft in fts]
    mtv = sum(t[w] for t in taus)
    assert tall.lam == pytest.approx([0.1, 0.4, 0.7])
    for t in range(3):  # m_t = |τ_t| > λ_t·|τ_MTL − τ_t|
        assert torch.equal(tall.masks[t][w], taus[t][w].abs() > float(lams[t]) * (mtv - taus[t][w]).abs())
    with pytest.raises(ValueError, match=r"lam must be a finite number or one per task \(a list, tuple, or 1-d array "
                                         r"or tensor of finite numbers\), got array\(\[\[0.1, 0.4, 0.7\]\]\)"):
        merging.merge("task_arithmetic", pre, fts, lam=np.array([[0.1, 0.4, 0.7]]))
    with pytest.raises(ValueError, match="lam has 2 values but there are 3 fine-tuned models"):
        merging.merge("task_arithmetic", pre, fts, lam=np.array([0.1, 0.4]))
