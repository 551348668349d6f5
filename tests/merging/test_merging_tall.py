"""TALL masks and Consensus merging against the formula (not against another tool)."""
import pytest
import torch

import merging
from merging_toys import make_models


def _expected_masks(pre, fts, lams):
    taus = [merging.task_vector(pre, ft) for ft in fts]
    mtv = {k: sum(t[k] for t in taus) for k in taus[0]}
    return [{k: tau[k].abs() > lam * (mtv[k] - tau[k]).abs() for k in tau} for tau, lam in zip(taus, lams)], mtv


def test_masks_follow_the_formula_with_per_task_lambda():
    pre, fts = make_models(T=3)
    tall = merging.tall_masks(pre, fts, lam=[0.2, 0.4, 0.6])
    expect, mtv = _expected_masks(pre, fts, [0.2, 0.4, 0.6])
    assert tall.lam == [0.2, 0.4, 0.6]
    for t in range(3):
        assert set(tall.masks[t]) == set(expect[t])
        for k in expect[t]:
            assert tall.masks[t][k].dtype == torch.bool
            assert torch.equal(tall.masks[t][k], expect[t][k]), (t, k)
    # the masks are informative (the |θ0 − τ_t| pitfall gives ~all ones)
    frac = sum(int(m.sum()) for m in tall.masks[0].values()) / sum(m.numel() for m in tall.masks[0].values())
    assert 0.05 < frac < 0.95
    for k in mtv:
        torch.testing.assert_close(tall.tau[k], mtv[k], rtol=0, atol=1e-6)


def test_masks_are_separate_tensors():
    pre, fts = make_models(T=3)
    tall = merging.tall_masks(pre, fts)
    k = "backbone.blocks.0.weight"
    ptrs = {tall.masks[t][k].data_ptr() for t in range(3)}
    assert len(ptrs) == 3
    before = tall.masks[1][k].clone()
    tall.masks[0][k].fill_(False)
    assert torch.equal(tall.masks[1][k], before)


def test_lambda_zero_keeps_what_each_task_changed_and_exact_reconstruction():
    pre, fts = make_models(T=4)
    tall = merging.tall_masks(pre, fts, lam=0.0)
    assert all(bool(m.all()) for masks in tall.masks for m in masks.values())  # every τ_t entry ≠ 0 here
    for t in range(4):
        rec = tall.reconstruct(t, include_task_keys=False)  # the shared weights alone (the head: its own test)
        assert set(rec) == set(tall.merged)
        for k in rec:
            assert torch.equal(rec[k], tall.merged[k]), k
    # merged is θ0 + τ_MTL; non-merged keys (int buffers, BN stats) are θ0's
    w = "backbone.conv.weight"
    torch.testing.assert_close(tall.merged[w], pre[w] + sum(ft[w] - pre[w] for ft in fts), rtol=0, atol=1e-6)
    assert torch.equal(tall.merged["backbone.bn.num_batches_tracked"], pre["backbone.bn.num_batches_tracked"])
    assert torch.equal(tall.merged["backbone.bn.running_var"], pre["backbone.bn.running_var"])


def test_single_task_reconstruction_is_exact():
    # Dyadic values: θ0 + (θ1 − θ0) is exactly θ1, so reconstruction must return θ1 bit for bit.
    g = torch.Generator().manual_seed(0)
    pre = {"a": torch.randint(-64, 64, (6, 5), generator=g) / 8.0, "b": torch.randint(-64, 64, (7,), generator=g) / 16.0}
    ft = {k: v + torch.randint(-8, 8, v.shape, generator=g) / 32.0 for k, v in pre.items()}
    for lam in (0.2, 0.6):
        tall = merging.tall_masks(pre, [ft], lam=lam)
        rec = tall.reconstruct(0)
        for k in ft:
            assert torch.equal(rec[k], ft[k])
    # general float data: equal to θ0 + τ computed directly
    pre, fts = make_models(T=1, heads=False)
    tall = merging.tall_masks(pre, fts)
    tau = merging.task_vector(pre, fts[0])
    rec = tall.reconstruct(0)
    for k, v in tau.items():
        assert torch.equal(rec[k], pre[k] + v)


def test_tall_with_ties_vector():
    pre, fts = make_models(T=3)
    tall = merging.tall_masks(pre, fts, lam=0.4, mtv="ties", k=30)
    ties = merging.merge("ties", pre, fts, k=30, lam=1.0)
    for k in tall.tau:
        assert torch.equal(tall.merged[k], ties[k]), k
    taus = [merging.task_vector(pre, ft) for ft in fts]
    for t in range(3):
        for k in tall.tau:
            assert torch.equal(tall.masks[t][k], taus[t][k].abs() > 0.4 * (tall.tau[k] - taus[t][k]).abs())


def test_consensus_k1_keeps_union_and_k2_drops_selfish():
    pre, fts = make_models(T=4)
    tall = merging.tall_masks(pre, fts, lam=0.4)
    usage = tall.usage()
    c1 = merging.merge("consensus", pre, fts, k=1, tall_lam=0.4, base="task_arithmetic", lam=0.3)
    c2 = merging.merge("consensus", pre, fts, k=2, tall_lam=0.4, base="task_arithmetic", lam=0.3)
    union = {k: torch.stack([m[k] for m in tall.masks]).any(0) for k in tall.tau}
    for k in tall.tau:
        assert torch.equal(usage[k] >= 1, union[k])
        assert torch.equal(c1[k], (tall.tau[k] * union[k]) * 0.3 + pre[k]), k
        keep2 = usage[k] >= 2
        assert torch.equal(c2[k], (tall.tau[k] * keep2) * 0.3 + pre[k]), k
        selfish = usage[k] == 1
        assert torch.equal(c2[k][selfish], pre[k][selfish])
        assert torch.equal(tall.consensus(2)[k], keep2)
    assert any(bool((usage[k] == 1).any()) for k in usage)  # the test exercises selfish weights


def test_consensus_on_ties_and_too_few_models():
    pre, fts = make_models(T=3)
    tall = merging.tall_masks(pre, fts, lam=0.5, mtv="ties", k=40)
    cons = merging.merge("consensus", pre, fts, k=2, tall_lam=0.5, base="ties", ties_k=40)
    for k in tall.tau:  # λ defaults to TIES's 1.0 with the ties base
        assert torch.equal(cons[k], (tall.tau[k] * tall.consensus(2)[k]) * 1.0 + pre[k]), k
    with pytest.raises(merging.MergeInputError, match="at least 2"):
        merging.merge("consensus", pre, fts[:1], k=2)


def test_overlap_fractions():
    masks = [{"w": torch.tensor([True, True, False, False, True])}, {"w": torch.tensor([True, False, False, True, False])}]
    ov = merging.mask_overlap(masks)
    assert ov["counts"] == [1, 3, 1]  # entry 2 unused; 1, 3, 4 used once; 0 used twice
    assert ov["catastrophic"] == pytest.approx(0.2) and ov["selfish"] == pytest.approx(0.6)
    assert ov["universal"] == pytest.approx(0.2) and ov["params"] == 5


def test_consensus_on_a_hand_example():
    # θ0 = 1, three task vectors over five entries, tall_lam = 0.5, λ = 0.5:
    #   τ_MTL = Σ τ_t                 = [2, 3, 0, -1, 1.5]
    #   m_t = |τ_t| > 0.5·|τ_MTL − τ_t|:  m1 = [1,0,1,1,0], m2 = [1,0,1,0,0], m3 = [0,1,0,0,0]
    #     (entry 2 of task 3: |0| > 0.5·|0 − 0| is false: task 3 did not change it; entry 4 is on the
    #     boundary for every task, 0.5 > 0.5·|1.5 − 0.5| is false: the strict rule drops it)
    #   tasks using each entry        = [2, 1, 2, 1, 0]
    #   k=2 keeps entries 0, 2        → θ = 1 + 0.5·[2, 0, 0, 0, 0] = [2, 1, 1, 1, 1]
    pre = {"w": torch.ones(5)}
    taus = [torch.tensor([1.0, 0, 2, -1, 0.5]), torch.tensor([1.0, 0, -2, 0, 0.5]), torch.tensor([0.0, 3, 0, 0, 0.5])]
    fts = [{"w": pre["w"] + tau} for tau in taus]
    masks = merging.tall_masks(pre, fts, lam=0.5).masks
    assert [m["w"].int().tolist() for m in masks] == [[1, 0, 1, 1, 0], [1, 0, 1, 0, 0], [0, 1, 0, 0, 0]]
    want = {1: [2.0, 2.5, 1, 0.5, 1], 2: [2.0, 1, 1, 1, 1], 3: [1.0, 1, 1, 1, 1]}
    for k, w in want.items():
        got = merging.merge("consensus", pre, fts, k=k, tall_lam=0.5, base="task_arithmetic", lam=0.5)["w"]
        assert got.tolist() == w, k
    assert merging.mask_overlap(masks)["counts"] == [1, 2, 2, 0]


def test_a_frozen_layer_is_used_by_no_task():
    """No task changed "frozen" (τ_t = 0 for all t, so τ_MTL = 0 there): |0| > λ·|0 − 0| is false for every
    task, so its 3 entries are catastrophic (0 tasks), not used by all. By hand, for "w" (λ = 0.5):
    τ = [1, 0], [1, 2]; τ_MTL = [2, 2]; m1 = [1 > 0.5, 0 > 1] = [1, 0]; m2 = [1 > 0.5, 2 > 0] = [1, 1]."""
    pre = {"w": torch.zeros(2), "frozen": torch.ones(3)}
    fts = [{"w": torch.tensor([1.0, 0.0]), "frozen": torch.ones(3)}, {"w": torch.tensor([1.0, 2.0]), "frozen": torch.ones(3)}]
    tall = merging.tall_masks(pre, fts, lam=0.5)
    assert [m["frozen"].tolist() for m in tall.masks] == [[False] * 3, [False] * 3]
    assert [m["w"].tolist() for m in tall.masks] == [[True, False], [True, True]]
    ov = merging.mask_overlap(tall)
    assert ov["counts"] == [3, 1, 1] and ov["params"] == 5  # frozen ×3 → 0 tasks; w[1] → 1; w[0] → 2
    assert ov["catastrophic"] == pytest.approx(3 / 5) and ov["universal"] == pytest.approx(1 / 5)
    for t in range(2):  # reconstruction of the frozen layer: θ0, as with either rule
        assert torch.equal(tall.reconstruct(t)["frozen"], pre["frozen"])
    cons = merging.merge("consensus", pre, fts, k=1, tall_lam=0.5, lam=1.0)
    assert torch.equal(cons["frozen"], pre["frozen"]) and cons["w"].tolist() == [2.0, 2.0]


def test_per_task_lambda_as_a_task_mapping(tmp_path):
    """{task: λ} (a tall_masks run's selected.lam) is the per-task list in the models' task order, in
    tall_masks, write_tall_store and Consensus alike; names are checked, not matched by position."""
    from merging_toys import save_models

    pre, fts = make_models(T=3, heads=False)
    pre_dir, ft_dirs = save_models(tmp_path, pre, fts)  # folders ft0, ft1, ft2 (no config.json: named by folder)
    by_name = {"ft2": 0.6, "ft0": 0.2, "ft1": 0.4}
    want, _ = _expected_masks(pre, fts, [0.2, 0.4, 0.6])
    tall = merging.tall_masks(pre_dir, ft_dirs, lam=by_name)
    assert tall.tasks == ["ft0", "ft1", "ft2"] and tall.lam == [0.2, 0.4, 0.6]
    assert all(torch.equal(tall.masks[t][k], want[t][k]) for t in range(3) for k in want[t])
    listed = merging.merge("consensus", pre, fts, k=2, tall_lam=[0.2, 0.4, 0.6])
    named = merging.merge("consensus", pre_dir, ft_dirs, k=2, tall_lam=by_name)
    assert all(torch.equal(named[k], v) for k, v in listed.items())
    store = merging.write_tall_store(pre, fts, tmp_path / "s", lam={"c": 0.6, "a": 0.2, "b": 0.4}, tasks=["a", "b", "c"])
    assert merging.open_store(store).manifest["lam"] == [0.2, 0.4, 0.6]
    in_memory = merging.merge("consensus", pre, fts, k=2, tall_lam={"task0": 0.2, "task1": 0.4, "task2": 0.6})
    assert all(torch.equal(in_memory[k], v) for k, v in listed.items())
    for bad, why in [({"ft0": 0.2, "ft1": 0.4}, r"no λ for \['ft2'\]"),
                     ({"ft0": 0.2, "ft1": 0.4, "ft9": 0.1}, r"unknown task\(s\) \['ft9'\]; no λ for \['ft2'\]")]:
        with pytest.raises(ValueError, match=rf"^lam: {why}; the fine-tuned models' tasks are \['ft0', 'ft1', 'ft2'\]"):
            merging.tall_masks(pre_dir, ft_dirs, lam=bad)
        with pytest.raises(ValueError, match=rf"tall_lam: {why}|tall_lam names 2 tasks but there are 3"):
            merging.merge("consensus", pre_dir, ft_dirs, tall_lam=bad)
    with pytest.raises(ValueError, match=r"tall_lam must be ≥ 0"):
        merging.merge("consensus", pre, fts, tall_lam={"task0": -0.1, "task1": 0.4, "task2": 0.6})


def test_the_docs_store_snippet_runs_on_in_memory_models(tmp_path, monkeypatch):
    """docs/merging.md's opening TALL lines, copied with in-memory dicts as the README builds them: the store
    once named them task0.. and `load_task_model(store, "digits")` failed; "digits" is the second model."""
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "merging.md").read_text()
    block = doc.split("```python\n", 1)[1].split("```", 1)[0]
    tall_lines = block[block.index("tall = "):]
    pre, fts = make_models(T=3)
    monkeypatch.chdir(tmp_path)
    scope = {"merging": merging, "pre": pre, "fts": fts}
    exec(compile(tall_lines, "docs/merging.md", "exec"), scope)
    digits = merging.load_task_model("out/store", "digits")
    expect = merging.tall_masks(pre, fts, lam=0.4).reconstruct(1)
    assert sorted(digits) == sorted(expect) and all(torch.equal(digits[k], expect[k]) for k in expect)  # TALL model 1
    own = set(digits) - set(pre)  # the second fine-tune's own head, in both
    assert own and all(torch.equal(digits[k], fts[1][k]) for k in own)


def _bn_models(task_vars):
    """θ0 with BN variance 1 and one fine-tune per entry of `task_vars` (its variance, a constant)."""
    pre = {"bn.running_var": torch.ones(4), "w": torch.ones(4)}
    fts = [{"bn.running_var": torch.full((4,), v), "w": torch.full((4,), 2.0)} for v in task_vars]
    return pre, fts


def test_bn_merge_refuses_a_negative_variance_in_a_tall_task_model(tmp_path):
    # τ_MTL = 2·(0.1 − 1) = −1.8; task0 keeps it (0.9 > 0.5·0.9): θ0 + m_0∘τ_MTL = −0.8 → NaN in BatchNorm.
    # task2 (τ = 0) is in no mask: its model keeps 1, so only the task models that take τ_MTL are at fault.
    pre, fts = _bn_models([0.1, 0.1, 1.0])
    neg = r"variance 'bn.running_var' of the TALL model of task 'task0' negative entries \(down to -0.8\)"
    with pytest.raises(merging.MergeInputError, match=neg):
        merging.tall_masks(pre, fts, lam=0.5, bn="merge")
    out = tmp_path / "store"
    with pytest.raises(merging.MergeInputError, match=neg):
        merging.write_tall_store(pre, fts, out, lam=0.5, bn="merge")
    assert not out.exists()  # no half-written store
    assert torch.equal(pre["bn.running_var"], torch.ones(4))  # inputs untouched
    ok = merging.tall_masks(pre, fts, lam=0.5)  # bn="pretrained": θ0's statistics
    assert torch.equal(ok.reconstruct(0)["bn.running_var"], torch.ones(4))


def test_bn_merge_refuses_a_negative_variance_in_the_tall_multi_task_model():
    # τ_t = −0.6 each: at λ = 1 no mask keeps it (0.6 > 1·0.6 is false), so every task model keeps 1,
    # but θ0 + τ_MTL (the model mtl-merge writes) is 1 − 1.2 = −0.2
    pre, fts = _bn_models([0.4, 0.4])
    with pytest.raises(merging.MergeInputError, match=r"of the multi-task model θ0 \+ τ_MTL negative.*-0.2"):
        merging.tall_masks(pre, fts, lam=1.0, bn="merge")
    tall = merging.tall_masks(pre, _bn_models([0.7, 0.7])[1], lam=0.5, bn="merge")  # 1 − 0.6 = 0.4: fine
    torch.testing.assert_close(tall.reconstruct(0)["bn.running_var"], torch.full((4,), 0.4))


def test_a_store_written_without_the_variance_check_is_refused_when_read(tmp_path, monkeypatch):
    import merging.tall as tall_mod

    pre, fts = _bn_models([0.1, 0.1, 1.0])
    monkeypatch.setattr(tall_mod, "check_tall_variance", lambda *a, **k: None)  # as older mtlkit wrote it
    store = merging.write_tall_store(pre, fts, tmp_path / "store", lam=0.5, bn="merge")
    monkeypatch.undo()
    with merging.open_store(store) as st:
        with pytest.raises(merging.MergeInputError, match=r"of the TALL model of task 'task0' in .*down to -0.8"):
            st.task_model(0)
        assert torch.equal(st.task_model(2)["bn.running_var"], torch.ones(4))  # in no mask: θ0's
        with pytest.raises(merging.MergeInputError, match=r"multi-task model .*down to -0.8"):
            st.merged()
