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
    learned = any(e.removeprefix("merge=") in merging.LEARNED_METHODS for e in extra)  # the cap is theirs alone
    return [f"pretrained={pool.pretrained}", f"models=[{models}]", "eval.max_batches=2",
            *(["learn_max_steps=2"] if learned else []), *extra]


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


def test_learned_merge_statistics_honour_bn_stats_max_batches_and_its_learning_images(pool, tmp_path, monkeypatch):
    """The written model and each merge.eval_every validation model: statistics on merge.split's images at
    merge.batch_size (the batches learning normalised with), one pass per task with bn_stats.max_batches=1."""
    passes = []
    recompute = merging.recompute_bn

    def counted(model, batches, **kw):
        batches = list(batches)
        passes.append([len(x) for x in batches])
        return recompute(model, batches, **kw)

    monkeypatch.setattr(merging, "recompute_bn", counted)
    monkeypatch.setattr(job_module.MergeJob, "bn_batches", lambda self: pytest.fail("bn_stats.split's images read"))
    rd = tmp_path / "capped"
    run(_args(pool, "merge=adamerging", "merge.granularity=task", "merge.batch_size=3", "merge.eval_every=1",
              "+merge.bn=recompute", "bn_stats.max_batches=1"), run_dir=rd)
    tasks = len(pool.member_paths)
    assert passes == [[3 * tasks]] * 2  # learn_max_steps=2: one pooled batch of 3 images per task per model
    out = mtl.load_model(rd / "model")
    stats = [k for k in out.state_dict() if k.endswith("num_batches_tracked") and ".heads." not in f".{k}"]
    assert stats and all(int(out.state_dict()[k]) == 1 for k in stats)  # the written model: one batch too
    assert out.meta["merge"]["bn_max_batches"] == 1


def test_bad_bn_values_are_named(pool, tmp_path):
    with pytest.raises(ValueError, match="bn must be one of .*'recompute', got 'reset'"):
        run(_args(pool, "merge=task_arithmetic", "merge.lam=0.5", "+merge.bn=reset"), run_dir=tmp_path / "bad")
    with pytest.raises(ValueError, match="bn_stats.split must be 'val' or 'test'.*'train'"):
        run(_args(pool, "merge=task_arithmetic", "merge.lam=0.5", "+merge.bn=recompute", "bn_stats.split=train"),
            run_dir=tmp_path / "bad2")
    with pytest.raises(ValueError, match="bn_stats.max_batches must be an int >= 1 or null"):
        run(_args(pool, "merge=task_arithmetic", "merge.lam=0.5", "+merge.bn=recompute", "bn_stats.max_batches=0"),
            run_dir=tmp_path / "bad3")
    for key in ("split=val", "batch_size=8"):  # a learned merge re-estimates on the images it learned on
        with pytest.raises(ValueError, match=f"merge=adamerging: bn_stats.{key.replace('=', '=.?')}.? is not read: "
                                             "a learned merge re-estimates its BN statistics on the images it learned"):
            run(_args(pool, "merge=adamerging", "+merge.bn=recompute", f"bn_stats.{key}"), run_dir=tmp_path / "bad4")
    assert not any((tmp_path / f"bad{i}").exists() for i in ("", 2, 3, 4))  # refused before any run folder
