"""mergekit's and FusionBench's rules against hand-computed results (the slow test runs mergekit itself)."""
import os
import subprocess
import sys

import pytest
import torch

import merging

# θ0 = 0; two task vectors over eight entries, distinct magnitudes per task.
T1 = [4.0, -3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]
T2 = [-4.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0]


def _models(*taus, base=0.0):
    pre = {"w": torch.full((len(taus[0]),), base)}
    return pre, [{"w": pre["w"] + torch.tensor(t)} for t in taus]


def test_mergekit_ties_keep_count_zero_sign_and_normalisation():
    pre, fts = _models(T1, T2)
    # density 0.3 of 8 entries keeps ⌊2.4⌋ = 2 per task: τ̂1 = [4, −3, 0…], τ̂2 = [−4, 0, 0, 3, 0…];
    # Σ = [0, −3, 0, 3]: a zero sum elects +, so entry 0 keeps τ1's 4; entry 2 (no kept value) stays 0
    got = merging.merge("ties", pre, fts, convention="mergekit", density=0.3)["w"]
    assert got.tolist() == [4, -3, 0, 3, 0, 0, 0, 0]
    # weights scale δ before the election and normalise by the kept weights: w = [1, 3] gives
    # w·τ̂ = [4, −3 | −12, 0, 0, 9]; Σ = [−8, −3, 0, 9] → [−12/3, −3/1, 0, 9/3]; λ = 0.5 halves it
    got = merging.merge("ties", pre, fts, convention="mergekit", density=0.3, weight=[1, 3], lam=0.5)["w"]
    assert got.tolist() == [-2, -1.5, 0, 1.5, 0, 0, 0, 0]
    # the paper's rules on the same input: ⌈2.4⌉ = 3 kept per task, a zero sum stays 0
    paper = merging.merge("ties", pre, fts, k=30, lam=1.0)["w"]
    assert paper.tolist() == [0, -3, 2, 3, 0, 0, 0, 0]
    # FusionBench: γ = 0 takes the model-wide majority sign (here +: Σγ = 0 − 1 + 1 + 1)
    fb = merging.merge("ties", pre, fts, k=30, lam=1.0, tie_rule="fusionbench")["w"]
    assert fb.tolist() == [4, -3, 2, 3, 0, 0, 0, 0]


def test_mergekit_density_is_per_tensor():
    pre = {"a": torch.zeros(4), "b": torch.zeros(10)}
    fts = [{"a": torch.tensor([1.0, 2, 3, 4]), "b": torch.arange(1.0, 11)}]
    got = merging.merge("ties", pre, fts, convention="mergekit", density=0.5)
    assert got["a"].tolist() == [0, 0, 3, 4]  # ⌊2⌋ of 4
    assert got["b"].tolist() == [0] * 5 + [6, 7, 8, 9, 10]  # ⌊5⌋ of 10
    tiny = merging.merge("ties", pre, fts, convention="mergekit", density=0.1)
    assert tiny["a"].tolist() == [0, 0, 0, 4]  # max(1, ⌊0.4⌋): at least one entry survives


def test_mergekit_task_arithmetic_and_linear():
    pre, fts = _models(T1, T2, base=1.0)
    ta = merging.merge("task_arithmetic", pre, fts, convention="mergekit", weight=[0.5, 2.0])["w"]
    want = [1 + 0.5 * a + 2 * b for a, b in zip(T1, T2)]
    assert ta.tolist() == want
    norm = merging.merge("task_arithmetic", pre, fts, convention="mergekit", weight=[1.0, 3.0], normalize=True)["w"]
    assert norm.tolist() == [1 + (a + 3 * b) / 4 for a, b in zip(T1, T2)]
    lin = merging.merge("linear", pre, fts, convention="mergekit", weight=[1.0, 3.0])["w"]
    assert lin.tolist() == [((1 + a) + 3 * (1 + b)) / 4 for a, b in zip(T1, T2)]
    # weights summing to 0: mergekit divides by zero (inf/NaN tensors); refused here, before any output
    with pytest.raises(ValueError, match=r"linear: the weights \[1.0, -1.0\] sum to 0"):
        merging.merge("linear", pre, fts, convention="mergekit", weight=[1.0, -1.0])
    assert merging.merge("linear", pre, fts, convention="mergekit", weight=[1.0, -1.0], normalize=False)["w"].tolist() \
        == [a - b for a, b in zip(T1, T2)]


def test_mergekit_linear_divides_by_a_tiny_weight_sum_and_refuses_only_a_zero_or_overflowing_one():
    # mergekit's divisor is the weights' sum in its arithmetic dtype (float32; float64 for float64 models):
    # a tiny non-zero sum divides as any other; only 0 (x/0) and inf (inf/inf) give inf/NaN tensors
    pre, fts = _models(T1, T2, base=1.0)
    w = torch.tensor([1e-9, 3e-9])
    want = (w[0] * fts[0]["w"] + w[1] * fts[1]["w"]) / w.sum()
    got = merging.merge("linear", pre, fts, convention="mergekit", weight=w.tolist())["w"]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # the bytes: test_merging_mergekit.py (slow)
    for weight, total in (([1e-50, 1e-50], "0"), ([3e38, 3e38], "inf")):  # 0 and inf as float32 sums
        with pytest.raises(ValueError, match=rf"sum to {total} in float32, so normalize=true would divide by {total}"):
            merging.merge("linear", pre, fts, convention="mergekit", weight=weight)
    # before any input is read (mtl-merge's precheck binds the method): only a sum bad in both dtypes
    merging.create_method("linear", convention="mergekit", weight=[1e-50, 1e-50]).bind(2)
    with pytest.raises(ValueError, match=r"sum to 0 in float32"):
        merging.create_method("linear", convention="mergekit", weight=[1.0, -1.0]).bind(2)
    pre64, fts64 = ({"w": pre["w"].double()}, [{"w": f["w"].double()} for f in fts])
    got = merging.merge("linear", pre64, fts64, convention="mergekit", weight=[1e-50, 1e-50])["w"]  # float64: 2e-50
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, (fts64[0]["w"] + fts64[1]["w"]) / 2, rtol=1e-12, atol=0)


def test_mergekit_dare_draws_bernoulli_and_rescales_the_l1_norm():
    pre, fts = _models(T1, T2, base=0.5)
    taus = [torch.tensor(T1), torch.tensor(T2)]
    torch.manual_seed(7)
    masks = [torch.bernoulli(torch.full_like(t, 0.5)) for t in taus]
    kept = [t * m * (t.abs().sum() / (t * m).abs().sum()) for t, m in zip(taus, masks)]
    torch.manual_seed(7)
    lin = merging.merge("dare", pre, fts, convention="mergekit", base="task_arithmetic", density=0.5)["w"]
    assert torch.equal(lin, pre["w"] + (kept[0] + kept[1]))
    torch.manual_seed(7)
    ties = merging.merge("dare_ties", pre, fts, convention="mergekit", density=0.5)["w"]
    total = kept[0] + kept[1]
    agree = [torch.sign(k) == torch.where(total >= 0, 1.0, -1.0) for k in kept]
    assert torch.equal(ties, pre["w"] + kept[0] * agree[0] + kept[1] * agree[1])


def test_mergekit_dare_with_a_seed_repeats_whatever_the_global_generator(caplog):
    pre, fts = _models(T1, T2, base=0.5)
    runs = []
    for global_seed, seed in ((1, 5), (2, 5), (1, 6)):
        torch.manual_seed(global_seed)
        runs.append(merging.merge("dare_ties", pre, fts, convention="mergekit", density=0.5, seed=seed)["w"])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with pytest.raises(ValueError, match="seed must be an int or None"):
        merging.merge("dare_ties", pre, fts, convention="mergekit", density=0.5, seed="5")
    with caplog.at_level("WARNING", logger="merging.mergekit"):
        merging.merge("dare_ties", pre, fts, convention="mergekit")
    assert "density 1.0 (mergekit's default) keeps every entry: nothing is dropped" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="merging.mergekit"):
        plain = merging.merge("task_arithmetic", pre, fts, convention="mergekit", density=0.3)["w"]
    assert "does not sparsify: density and rescale are ignored, as in mergekit" in caplog.text
    assert torch.equal(plain, merging.merge("task_arithmetic", pre, fts, convention="mergekit")["w"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_half_inputs_are_computed_in_float32_and_written_back(dtype):
    pre, fts = _models(T1, T2, base=1.0)
    pre = {"w": (pre["w"] / 3).to(dtype)}
    fts = [{"w": (f["w"] / 3).to(dtype)} for f in fts]
    got = merging.merge("task_arithmetic", pre, fts, lam=0.3)["w"]
    p32 = pre["w"].float()
    want = (p32 + 0.3 * ((fts[0]["w"].float() - p32) + (fts[1]["w"].float() - p32))).to(dtype)
    assert got.dtype == dtype and torch.equal(got.float(), want.float())  # float8 has no eq on CPU
    bad = {"w": fts[0]["w"].float().index_fill(0, torch.tensor([0]), float("nan")).to(dtype)}
    with pytest.raises(ValueError, match=r"tensor 'w' in finetuned\[1\] has non-finite values \(1 NaN"):
        merging.merge("task_arithmetic", pre, [fts[0], bad], lam=0.3)


@pytest.mark.parametrize("bad", [{"density": 0}, {"density": 1.5}, {"density": [0.5, -1]}])
def test_bad_density_is_refused(bad):
    pre, fts = _models(T1, T2)
    with pytest.raises(ValueError, match="density must be in \\(0, 1\\]"):
        merging.merge("ties", pre, fts, convention="mergekit", **bad)


def test_unknown_convention_and_tie_rule_are_named():
    pre, fts = _models(T1, T2)
    with pytest.raises(ValueError, match="unknown convention 'mergekitt'; valid: paper, mergekit"):
        merging.merge("ties", pre, fts, convention="mergekitt")
    with pytest.raises(ValueError, match="tie_rule must be one of"):
        merging.merge("ties", pre, fts, tie_rule="coin")


@pytest.mark.parametrize("method, hp, counterpart", [
    ("ties", {"density": 0.3}, r"the paper convention's counterpart: k \(the percent kept: k = 100·density\)"),
    ("dare", {"density": 0.5}, r"the paper convention's counterpart: p \(the drop probability: p = 1 − density\)"),
    ("task_arithmetic", {"weight": [1, 2]}, r"the paper convention's counterpart: one λ per model \(lam=\[...\]\)"),
    ("average", {"weight": [1, 2]}, r"the paper convention's counterpart: none for average"),
])
def test_a_mergekit_key_under_the_paper_convention_says_where_it_applies(method, hp, counterpart):
    """mtl-merge's ties.yaml lists density (for convention=mergekit); set under the paper rules it was only
    'unknown hyperparameter(s) density', as if misspelt. Under mergekit's rules it merges."""
    pre, fts = _models(T1, T2)
    key = next(iter(hp))
    with pytest.raises(TypeError, match=rf"^{method}.*: unknown hyperparameter\(s\) {key}; accepted: .*; {key} applies "
                                        rf"only with convention='mergekit' \(mtl-merge: merge.convention=mergekit\); "
                                        rf"{counterpart}$"):
        merging.merge(method, pre, fts, **hp)
    merging.merge(method, pre, fts, convention="mergekit", **hp)


@pytest.mark.parametrize("method, hp, counterpart", [
    ("ties", {"k": 30}, r"density \(the kept fraction per tensor: density = k/100\)"),
    ("dare", {"p": 0.3}, r"density \(the keep probability: density = 1 − p\)"),
    ("dare", {"k": 30}, r"none \(mergekit's DARE does not trim by magnitude\)"),
    ("ties", {"tie_rule": "fusionbench"}, r"none \(mergekit elects \+ where the sum is zero\)"),
])
def test_a_paper_key_under_the_mergekit_convention_says_where_it_applies(method, hp, counterpart):
    pre, fts = _models(T1, T2)
    key = next(iter(hp))
    with pytest.raises(TypeError, match=rf": unknown hyperparameter\(s\) {key}; accepted: .*; {key} applies only with "
                                        rf"convention='paper'; mergekit's counterpart: {counterpart}$"):
        merging.merge(method, pre, fts, convention="mergekit", **hp)
    merging.merge(method, pre, fts, **hp, **({"base": "ties"} if key == "k" and method == "dare" else {}))


@pytest.mark.parametrize("name", ["linear", "dare_ties", "dare_linear"])
def test_mergekit_only_names_point_to_the_convention(name, tmp_path):
    pre, fts = _models(T1, T2)
    with pytest.raises(KeyError, match=f"merge method '{name}' is mergekit's: pass convention=\"mergekit\"") as e:
        merging.merge(name, pre, fts)
    assert "learned at test time" not in str(e.value)
    with pytest.raises(KeyError, match="is mergekit's"):
        merging.merge_to_file(name, pre, fts, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


_PEAK_SCRIPT = """
import torch, merging
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
n = 1 << 21
g = torch.Generator().manual_seed(0)
pre = {"w": torch.randn(n, generator=g)}
fts = [{"w": pre["w"] + 0.01 * torch.randn(n, generator=g)} for _ in range(3)]
merging.merge("ties", {"w": torch.zeros(8)}, [{"w": torch.ones(8)}] * 3, convention="mergekit", density=0.2)
before = hwm()
merging.merge("ties", pre, fts, convention="mergekit", density=0.2)
print((hwm() - before) / (n * 4))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and glibc's MALLOC_MMAP_THRESHOLD_ are Linux's")
def test_mergekit_ties_peak_memory_per_tensor():
    """mergekit's TIES sorts every tensor whole, so its peak grows with the largest tensor; the temporaries
    around the sort and the sign election must not add to it (T = 3, in memory: 10.9× the tensor before
    the mask was allocated after the sort and the election ran in place, 8.9× after). Every block above
    64 KB is mapped and unmapped on its own, so the high-water mark counts live tensors, not heap reuse."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout.split()[-1]) < 9.5
