"""`mtl-merge +merge.bn=recompute`: every evaluated model re-estimates its BN statistics on unlabeled images."""
import pytest
import torch

import merging
import mtl
from merging import job as job_module
from merging.job import run
from mtl.data import memory as dm_module


@pytest.fixture(scope="module")
def pool(smoke_pool):
    return smoke_pool


def _args(pool, *extra):
    models = ",".join(str(p) for p in pool.member_paths)
    return [f"pretrained={pool.pretrained}", f"models=[{models}]", "eval.max_batches=2", "learn_max_steps=2", *extra]


@pytest.fixture
def label_guard(guard_labels):
    """While statistics are estimated or coefficients learned, every column but 'image' raises."""
    return guard_labels("estimating BN statistics", (job_module.MergeJob, "bn_batches"), (merging, "recompute_bn"),
                        (merging, "learn"))


def test_training_free_merge_recomputes_without_reading_labels(pool, tmp_path, label_guard):
    rd = tmp_path / "ta"
    run(_args(pool, "merge=task_arithmetic", "merge.lam=0.5", "+merge.bn=recompute", "bn_stats.batch_size=4"), run_dir=rd)
    assert label_guard["calls"] >= 2
    pre = mtl.load_model(pool.pretrained).state_dict()
    out = mtl.load_model(rd / "model").state_dict()
    stats = [k for k in out if k.endswith("running_var") and ".heads." not in f".{k}"]
    assert stats and all(not torch.equal(out[k], pre[k]) for k in stats)  # θ0's statistics were replaced
    assert mtl.load_model(rd / "model").meta["merge"]["bn"] == "recompute"
    with pytest.raises(AssertionError, match="read while estimating"):  # the guard does bite
        label_guard["on"] = True
        try:
            dm_module.TensorDictDataset({"image": torch.zeros(2), "semseg": torch.zeros(2)}).__getitems__([0])
        finally:
            label_guard["on"] = False


def test_learned_merge_recomputes_without_reading_labels(pool, tmp_path, label_guard):
    report = run(_args(pool, "merge=adamerging", "merge.granularity=task", "merge.batch_size=4", "+merge.bn=recompute"),
                 run_dir=tmp_path / "ada")
    assert report["selected"]["bn"] == "recompute" and label_guard["calls"] == 1


def test_bad_bn_values_are_named(pool, tmp_path):
    with pytest.raises(ValueError, match="bn must be one of .*'recompute', got 'reset'"):
        run(_args(pool, "merge=task_arithmetic", "merge.lam=0.5", "+merge.bn=reset"), run_dir=tmp_path / "bad")
    with pytest.raises(ValueError, match="bn_stats.split must be 'val' or 'test'.*'train'"):
        run(_args(pool, "merge=task_arithmetic", "merge.lam=0.5", "+merge.bn=recompute", "bn_stats.split=train"),
            run_dir=tmp_path / "bad2")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()  # refused before any run folder
