"""mtl-merge end to end: a tiny real pool (scenes, timm test backbone), every method, the TALL store."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merging
import mtl
from merging.job import run


@pytest.fixture(scope="module")
def pool(smoke_pool):
    return smoke_pool


def _args(pool, *extra, batches=2):
    models = ",".join(str(p) for p in pool.member_paths)
    return [f"pretrained={pool.pretrained}", f"models=[{models}]", f"eval.max_batches={batches}", *extra]


def _check_report(report, run_dir, method):
    """The report's normalized scores are merged / individual of its own metrics, and it is what
    metrics.json holds; the merged model folder reloads with every task."""
    for t in report["tasks"].values():
        p = t["primary"]
        ratio = t["merged"][p] / t["individual"][p]
        assert t["normalized"] in (pytest.approx(ratio), pytest.approx(1 / ratio))
    assert report["mean"]["normalized"] == pytest.approx(
        sum(t["normalized"] for t in report["tasks"].values()) / len(report["tasks"]))
    # the in-process report is metrics.json plus where the run is
    assert {**json.loads((run_dir / "metrics.json").read_text()), "run_dir": str(Path(run_dir).resolve())} \
        == json.loads(json.dumps(report))
    assert (run_dir / "task_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = mtl.load_model(run_dir / "model")
    assert set(model.tasks) == set(report["tasks"])
    assert model.meta["merge"]["method"] == method
    return model.state_dict()


def _shared(state):
    return {k: v for k, v in state.items() if not k.startswith("decoder.heads.")}


@pytest.mark.parametrize("method", ["pretrained", "average", "task_arithmetic", "ties", "dare", "consensus"])
def test_every_method_writes_the_merge_it_reports(pool, tmp_path, method):
    fixed = {"pretrained": [], "average": [], "task_arithmetic": ["merge.lam=0.3"], "ties": ["merge.lam=0.8"],
             "dare": ["merge.lam=0.8"], "consensus": ["merge.lam=0.3"]}[method]
    report = run(_args(pool, f"merge={method}", *fixed), run_dir=tmp_path / method)
    assert set(report["tasks"]) == {"regression", "semseg"}
    state = _check_report(report, tmp_path / method, method)
    # the written weights are the API's merge with the selected hyperparameters
    api_method, hp = ("task_arithmetic", {"lam": 0.0}) if method == "pretrained" else (method, report["selected"])
    want = merging.merge(api_method, pool.pretrained, pool.member_paths, **hp)
    for k, v in want.items():
        assert torch.equal(state[k], v), k
    assert len(report["grid"]) == 1
    if method == "ties":  # every rule the merge used, defaults included, as eval=none records it
        assert report["selected"] == {"convention": "paper", "lam": 0.8, "k": 20, "merge_func": "mean",
                                      "trim": "global", "tie_rule": "paper"}


def test_merged_model_holds_each_tasks_own_head(pool, tmp_path):
    run(_args(pool, "merge=task_arithmetic", "merge.lam=0.5"), run_dir=tmp_path / "ta")
    merged_model = mtl.load_model(tmp_path / "ta" / "model")
    # the members were trained on one data config: the merged folder keeps it (mtl-export traces at its size)
    assert merged_model.meta["data"] == mtl.load_model(pool.member_paths[0]).meta["data"]
    assert merged_model.meta["data"]["size"] == 32
    # its inputs and run are recorded (a card, or a user, can trace the merge back)
    assert merged_model.meta["run_dir"] == str((tmp_path / "ta").resolve())
    assert merged_model.meta["merged_from"] == {"pretrained": str(Path(pool.pretrained).resolve()),
                                                "models": [str(Path(m).resolve()) for m in pool.member_paths]}
    merged = merged_model.state_dict()
    for i, task in enumerate(pool.task_names):
        own = mtl.load_model(pool.member_paths[i]).state_dict()
        for k, v in own.items():
            if k.startswith(f"decoder.heads.{task}."):
                assert torch.equal(merged[k], v), k


def test_lambda_grid_is_chosen_on_validation(pool, tmp_path):
    report = run(_args(pool, "merge=task_arithmetic", "merge.lam_grid=[0.0,0.5,1.0]"), run_dir=tmp_path / "grid")
    assert [g["hparams"]["lam"] for g in report["grid"]] == [0.0, 0.5, 1.0]
    assert report["run_dir"] == str((tmp_path / "grid").resolve())
    assert all(Path(p).is_absolute() for p in [report["pretrained"], *report["models"]])  # readable from anywhere
    best = max(report["grid"], key=lambda g: g["val_normalized"])
    assert report["selected"]["lam"] == best["hparams"]["lam"]


def test_per_task_lambda_from_the_cli(pool, tmp_path):
    report = run(_args(pool, "merge=task_arithmetic", "merge.lam=[0.2,0.7]", batches=1), run_dir=tmp_path / "pt")
    assert report["selected"]["lam"] == [0.2, 0.7] and len(report["grid"]) == 1
    state = mtl.load_model(tmp_path / "pt" / "model").state_dict()
    pre = mtl.load_model(pool.pretrained).state_dict()
    fts = [mtl.load_model(p).state_dict() for p in pool.member_paths]
    k = next(k for k in _shared(pre) if k.endswith("weight") and pre[k].dim() > 1)
    torch.testing.assert_close(state[k], pre[k] + 0.2 * (fts[0][k] - pre[k]) + 0.7 * (fts[1][k] - pre[k]))


@pytest.mark.parametrize("source, extra, said", [
    ("models", ["merge=task_arithmetic", "merge.lam=[0.2,0.4,0.3]"], "lam has 3 values but there are 2 fine-tuned models"),
    ("pool", ["merge=task_arithmetic", "merge.lam=[0.2,0.4,0.3]"], "lam has 3 values but there are 2 fine-tuned models"),
    ("models", ["merge=mergekit_ties", "merge.lam=1.0", "merge.weight=[1.0,0.5,0.5]"],
     "weight has 3 values but there are 2 fine-tuned models")])
def test_a_per_model_list_of_the_wrong_length_leaves_no_run_folder(pool, tmp_path, source, extra, said):
    """The model count is known from the command line or the manifest: the list was checked only once the pool was
    loaded, after the run folder was made (a FAILED folder)."""
    if source == "pool":
        manifest = tmp_path / "manifest.json"
        manifest.write_text(json.dumps({"pretrained": str(pool.pretrained), "models": [str(p) for p in pool.member_paths]}))
        args = [f"pool={manifest}", *extra]
    else:
        args = _args(pool, *extra)
    with pytest.raises(ValueError, match=re.escape(said)):
        run(args, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_only_the_best_grid_model_stays_in_memory(pool, tmp_path, monkeypatch):
    import gc
    import weakref

    from merging.job import MergeJob

    made, alive_at_eval = [], []
    model, val = MergeJob.model, MergeJob.val_score

    def tracked_model(self, shared):
        m = model(self, shared)
        made.append(weakref.ref(m))
        return m

    def tracked_val(self, m):
        gc.collect()
        alive_at_eval.append(sum(r() is not None for r in made))
        return val(self, m)

    monkeypatch.setattr(MergeJob, "model", tracked_model)
    monkeypatch.setattr(MergeJob, "val_score", tracked_val)
    run(_args(pool, "merge=task_arithmetic", "merge.lam_grid=[0.0,0.5,1.0]", batches=1), run_dir=tmp_path / "g")
    assert len(alive_at_eval) == 3 and max(alive_at_eval) <= 2  # the best so far + the candidate


def test_hyperparameters_are_not_mutated(pool, tmp_path):
    from omegaconf import OmegaConf

    from merging.evaluation import Evaluator
    from merging.job import CLI_METHODS, MergeJob

    job = MergeJob(OmegaConf.create({"store": False, "overwrite": False}), pool, Evaluator(pool, 1), tmp_path)
    for name, hp in [("tall_masks", {"lam": None, "lam_grid": [0.3], "mtv": "sum"}),
                     ("task_arithmetic", {"lam": None, "lam_grid": [0.1, 0.4]})]:
        before = json.loads(json.dumps(hp))
        CLI_METHODS.get(name)(job, hp)
        assert hp == before, name


def test_consensus_overlap_counts_the_tensors_the_run_merged(pool, tmp_path):
    from omegaconf import OmegaConf

    from merging.evaluation import Evaluator
    from merging.job import CLI_METHODS, MergeJob

    job = MergeJob(OmegaConf.create({"store": False, "overwrite": False}), pool, Evaluator(pool, 1), tmp_path)
    plain = CLI_METHODS.get("consensus")(job, {"lam": 0.5}).extra["mask_overlap"]
    with_bn = CLI_METHODS.get("consensus")(job, {"lam": 0.5, "bn": "merge"}).extra["mask_overlap"]
    stats = sum(v.numel() for k, v in merging.load_state_dict(pool.pretrained).items()
                if k.endswith(("running_mean", "running_var")) and ".heads." not in f".{k}")
    assert stats > 0 and with_bn["params"] == plain["params"] + stats  # bn=merge masks the statistics too


def test_tall_masks_store_gives_the_in_memory_metrics(pool, tmp_path):
    args = _args(pool, "merge=tall_masks", "merge.lam_grid=[0.2,0.5]", batches=1)
    stored = run([*args, "store=true"], run_dir=tmp_path / "tall")
    plain = run(args, run_dir=tmp_path / "plain")
    assert stored["tasks"] == plain["tasks"] and stored["selected"] == plain["selected"]
    assert (tmp_path / "plain" / "tall_store" / "tall.safetensors").is_file()  # written with or without store=true
    store = stored["store"]
    assert store["tasks"] == 2 and store["bytes_stored"] == (tmp_path / "tall" / "tall_store" / "tall.safetensors").stat().st_size
    assert store["ratio"] == pytest.approx(store["bytes_stored"] / store["bytes_full_models"])
    assert set(stored["selected"]["lam"]) == {"regression", "semseg"}
    assert set(stored["selected"]["lam"].values()) <= {0.2, 0.5}
    assert (tmp_path / "tall" / "mask_overlap.png").read_bytes()[:4] == b"\x89PNG"
    assert sum(stored["mask_overlap"]["counts"]) == stored["mask_overlap"]["params"] > 0
    with pytest.raises(ValueError, match="store=true writes a TALL-mask store .*merge=ties has none"):
        run(_args(pool, "merge=ties", batches=1) + ["store=true"], run_dir=tmp_path / "ties")


def test_tall_masks_selected_lam_can_be_given_back_as_it_is(pool, tmp_path):
    searched = run(_args(pool, "merge=tall_masks", "merge.lam_grid=[0.2,0.5]", batches=1), run_dir=tmp_path / "s")
    lam = searched["selected"]["lam"]
    given = run(_args(pool, "merge=tall_masks", "merge.lam={" + ",".join(f"{t}:{v}" for t, v in lam.items()) + "}",
                      batches=1), run_dir=tmp_path / "g")
    assert given["selected"]["lam"] == lam and given["tasks"] == searched["tasks"]
    with pytest.raises(ValueError, match=r"merge.lam: no λ for \['regression'\]; the fine-tuned models' tasks are "
                                         r"\['regression', 'semseg'\]"):
        run(_args(pool, "merge=tall_masks", "merge.lam={semseg:0.3}", batches=1), run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad" / "tall_store").exists()


def test_tall_masks_model_folder_describes_itself_and_the_tested_models_rebuild(pool, tmp_path):
    """The folder holds θ0 + τ_MTL, so it carries no test scores of its own; metrics.json says its scores
    are the per-task TALL models', which the run's store rebuilds to the same scores."""
    from merging.evaluation import Evaluator

    report = run(_args(pool, "merge=tall_masks", "merge.lam=0.3", batches=1), run_dir=tmp_path / "t")
    store = tmp_path / "t" / "tall_store" / "tall.safetensors"
    assert report["store"]["path"] == str(store) and "TALL model" in report["tested"] and str(store) in report["tested"]
    model = mtl.load_model(tmp_path / "t" / "model")
    assert "test" not in model.meta and model.meta["tested"] == report["tested"]
    merged = merging.tall_masks(pool.pretrained, pool.member_paths, lam=0.3).merged
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in merged.items())
    ev = Evaluator(pool, 1, progress=False)
    for t in pool.task_names:
        rebuilt = pool.merged_model(merging.load_task_model(store, t, include_task_keys=False))
        assert ev.run(rebuilt, t, "test") == report["tasks"][t]["merged"]


def test_dare_with_the_task_arithmetic_base(pool, tmp_path):
    """dare.yaml carries TIES's k and merge_func (its default base): dropped for base=task_arithmetic."""
    models = ",".join(str(p) for p in pool.member_paths)
    args = ["eval=none", "merge=dare", "merge.base=task_arithmetic", "merge.lam=0.5",
            f"pretrained={pool.pretrained}", f"models=[{models}]"]
    report = run(args, run_dir=tmp_path / "d")
    assert report["selected"]["base"] == "task_arithmetic" and "k" not in report["selected"]
    want = merging.merge("dare", pool.pretrained, pool.member_paths, base="task_arithmetic", lam=0.5)
    got = load_file(str(tmp_path / "d" / "model" / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in want.items())
    with pytest.raises(ValueError, match=r"merge=dare: merge.k=30 is a TIES hyperparameter, unused with "
                                         r"merge.base=task_arithmetic"):
        run([*args, "merge.k=30"], run_dir=tmp_path / "k")


@pytest.mark.parametrize("extra, warned", [(["merge=ties", "merge.lam_grid=[0.5,0.9]"], True),
                                           (["merge=ties"], False), (["merge=dare"], False)])
def test_eval_none_says_on_the_console_that_a_given_grid_is_not_searched(pool, tmp_path, caplog, extra, warned):
    # without evaluation the method's default λ is used: a grid the user gave is a WARNING, the config's own INFO
    models = ",".join(str(p) for p in pool.member_paths)
    with caplog.at_level("INFO", logger="merging.job"):
        run(["eval=none", *extra, f"pretrained={pool.pretrained}", f"models=[{models}]"], run_dir=tmp_path / "g")
    said = [r for r in caplog.records if "no λ search without evaluation" in r.getMessage()]
    assert len(said) == 1 and (said[0].levelname == "WARNING") is warned
    assert ("merge.lam_grid=[0.5, 0.9] is not searched" in said[0].getMessage()) is warned


def test_dare_searches_its_bases_lambda_grid(tmp_path):
    """dare.yaml once searched TIES's 0.4-1.2 with base=task_arithmetic too (λ·T up to 9.6 on 8 tasks)."""
    from mtl.cli.in_process import compose_in_process
    from merging.job import _method

    def grid(*overrides):
        cfg, _ = compose_in_process("mtl.configs.merge_app", "merge", list(overrides), run_dir=tmp_path)
        return _method(cfg)[2].get("lam_grid")

    assert grid("merge=dare") == grid("merge=ties") == [0.4, 0.6, 0.8, 1.0, 1.2]
    assert grid("merge=dare", "merge.base=task_arithmetic") == grid("merge=task_arithmetic")
    assert grid("merge=dare", "merge.base=task_arithmetic", "merge.lam_grid=[0.2]") == [0.2]
    assert grid("merge=dare", "merge.base=null") == grid("merge=task_arithmetic")  # the API's default base
    assert grid("merge=consensus") == grid("merge=task_arithmetic")
    assert grid("merge=consensus", "merge.base=ties") == grid("merge=ties")
    with pytest.raises(ValueError, match=r"base must be one of \['task_arithmetic', 'ties'\], got 'foo'"):
        run(["merge=dare", "merge.base=foo", "pretrained=/nope", "models=[/nope]"], run_dir=tmp_path / "foo")


def test_a_hand_written_manifest_with_relative_paths_is_read_from_its_own_folder(pool, tmp_path, monkeypatch):
    """docs/merging.md, Pool manifests: relative paths are the manifest's folder's, not the working directory's;
    keys other than pretrained/models are not read."""
    from merging.pool import ModelPool

    manifest = tmp_path / "manifests" / "pool.json"
    manifest.parent.mkdir()
    rel = lambda p: os.path.relpath(p, manifest.parent)  # noqa: E731
    manifest.write_text(json.dumps({"pretrained": rel(pool.pretrained), "models": [rel(p) for p in pool.member_paths],
                                    "note": "my pool"}))
    elsewhere = tmp_path / "a" / "working" / "dir"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # the paths do not exist from here
    assert not Path(rel(pool.pretrained)).exists()
    read = ModelPool.from_manifest(manifest)
    assert read.pretrained.resolve() == Path(pool.pretrained).resolve() and read.task_names == pool.task_names
    report = run(["merge=average", f"pool={manifest}", "eval.max_batches=1"], run_dir=tmp_path / "m")
    assert [t for t in report["tasks"]] == pool.task_names
    assert mtl.load_model(tmp_path / "m" / "model").meta["merged_from"] == {
        "pretrained": str(Path(pool.pretrained).resolve()), "models": [str(Path(p).resolve()) for p in pool.member_paths]}


@pytest.mark.parametrize("evaluated", [True, False])
def test_models_given_as_one_string_is_refused(tmp_path, evaluated):
    args = ["merge=ties", "pretrained=/nope", "models=/nope/ft"] + ([] if evaluated else ["eval=none"])
    with pytest.raises(ValueError, match=r"models must be a list of model folders, got the single path "
                                         r"'/nope/ft' \(on the command line: models=\[a,b\]\)"):
        run(args, run_dir=tmp_path / "r")
    manifest = tmp_path / "pool.json"
    manifest.write_text(json.dumps({"pretrained": "/nope", "models": "/nope/ft"}))
    with pytest.raises(ValueError, match=rf'{manifest}: "models" must be a list of model folders'):
        run(["merge=ties", f"pool={manifest}"] + ([] if evaluated else ["eval=none"]), run_dir=tmp_path / "m")
    for spec, match in (({"pretrained": "/nope", "models": {"a": "/nope/ft"}}, r'"models" must be a list of model '
                         r"folder paths, got a dict"),
                        ({"pretrained": "/nope", "models": ["/nope/ft", None]}, r'"models" must be a list of model '
                         r"folder paths; None is not one"),
                        ({"pretrained": 5, "models": ["/nope/ft"]}, r"key 'pretrained' must be a folder path \(a "
                         r"string\), got 5"),
                        ({"pretrained": "/nope", "models": []}, r'"models" is empty; list at least one fine-tuned model'),
                        ([1, 2], r"a pool manifest is a JSON object with keys 'pretrained' and 'models', got a list")):
        manifest.write_text(json.dumps(spec))
        with pytest.raises(ValueError, match=rf"{manifest}: .*{match}"):
            run(["merge=ties", f"pool={manifest}"] + ([] if evaluated else ["eval=none"]), run_dir=tmp_path / "m")


@pytest.fixture
def no_pool(monkeypatch):
    """Loading the pool fails the test: what it checks must be refused before any model is read."""
    import merging.job as job

    def refuse(*a, **k):
        raise AssertionError("the pool was loaded before the hyperparameters were checked")

    monkeypatch.setattr(job, "resolve_pool", refuse)


@pytest.mark.parametrize("override, match", [
    ("merge.mtv=foo", r"merge=tall_masks: mtv must be 'sum' or 'ties', got 'foo'"),
    ("merge.lam_grid=[0.3,-1]", r"merge=tall_masks, lam_grid value -1: lam must be ≥ 0"),
    ("merge.lam=nan", r"merge=tall_masks: lam must be a finite number"),
    ("+merge.lam_gird=[0.1]", r"merge=tall_masks: unknown hyperparameter\(s\) lam_gird \(did you mean lam_grid\?\); accepted: .*lam_grid"),
    ("+merge.k=150", r"merge=tall_masks: k is a percentage in \[0, 100\], got 150"),
    ("+merge.k=30", r"merge=tall_masks: k configures the TIES multi-task vector and applies only with mtv='ties'"),
])
def test_bad_tall_hyperparameters_are_refused_before_the_pool_is_loaded(tmp_path, no_pool, override, match):
    extra = ["merge.mtv=ties"] if override == "+merge.k=150" else []
    with pytest.raises(ValueError, match=match):
        run(["merge=tall_masks", "pretrained=/nope", "models=[/nope]", *extra, override], run_dir=tmp_path / "bad")


class FakeJob:
    """A grid search's job whose candidates score `vals` on validation, in grid order."""
    evaluator = type("Ev", (), {"progress": False, "require_references": lambda self, split, search: None})()

    def __init__(self, vals):
        self.vals = iter(vals)

    def merge(self, method, **kw):
        return kw

    def model(self, shared):
        return shared

    def val_score(self, model):
        return next(self.vals), None


def test_a_nan_validation_score_never_wins_the_grid():
    from merging import grid_job as J
    from merging.tall_job import _best_lam

    hp = {"lam": None, "lam_grid": [0.1, 0.5, 0.9]}
    for vals, want in [([float("nan"), 0.5, 0.4], 0.5), ([0.2, float("nan"), 0.1], 0.1), ([0.2, 0.3, float("nan")], 0.5)]:
        assert J.grid_search(FakeJob(vals), "task_arithmetic", hp).hparams["lam"] == want, vals
    with pytest.raises(ValueError, match=r"merge=ties: every λ candidate scored NaN on validation \[0.1, 0.5, 0.9\]"):
        J.grid_search(FakeJob([float("nan")] * 3), "ties", hp)
    assert J.grid_search(FakeJob([float("nan")]), "ties", {"lam": 0.3}).hparams["lam"] == 0.3  # nothing to choose
    nan = float("nan")
    assert _best_lam("a", [(nan, 0.2), (0.4, 0.3), (0.4, 0.5), (0.1, 0.6)]) == 0.3
    with pytest.raises(ValueError, match=r"task a's TALL model scored NaN on validation for every λ tried \[0.2, 0.3\]"):
        _best_lam("a", [(nan, 0.2), (nan, 0.3)])


def test_equal_validation_scores_keep_the_earlier_lambda_in_every_search():
    """One rule for the grid methods and tall_masks' per-task λ: among equal scores the earlier value of the
    grid stays (tall_masks kept the larger λ, the grid the first)."""
    from merging import grid_job as J
    from merging.tall_job import _best_lam

    for grid in ([0.2, 0.4, 0.6], [0.6, 0.4, 0.2]):
        grid_pick = J.grid_search(FakeJob([0.9] * 3), "task_arithmetic", {"lam": None, "lam_grid": grid}).hparams["lam"]
        tall_pick = _best_lam("a", [(0.9, lam) for lam in grid])
        assert grid_pick == tall_pick == grid[0], grid
    assert _best_lam("a", [(0.8, 0.2), (0.9, 0.4), (0.9, 0.6)]) == 0.4  # a strictly better score still wins


def test_normalized_score_is_the_direction_aware_ratio_or_undefined():
    from merging.pool import normalized, normalized_undefined
    from mtl.tasks import create_task

    miou, mae = create_task("semseg"), create_task("regression")  # higher / lower is better
    assert normalized(miou, 0.3, 0.6) == pytest.approx(0.5) and normalized(mae, 0.4, 0.2) == pytest.approx(0.5)
    for task, merged, individual, why in (
            (miou, 0.3, 0.0, "the fine-tuned model's miou is 0 (normalized = merged / fine-tuned)"),
            (mae, 0.0, 0.2, "the merged model's mae is 0 (normalized = fine-tuned / merged)"),
            (miou, float("nan"), 0.5, "the merged model's miou is nan")):
        assert math.isnan(normalized(task, merged, individual)) and normalized_undefined(task, merged, individual) == why
    assert normalized_undefined(mae, None, 0.0) is None  # 0 / merged is 0: defined, whatever the merged model scores
    assert normalized_undefined(miou, None, 0.0) == "the fine-tuned model's miou is 0 (normalized = merged / fine-tuned)"


@pytest.fixture
def zero_reference(monkeypatch):
    """The semseg fine-tune's own score on the given splits set to 0, as a 2-image split's miou can be."""
    from merging.evaluation import Evaluator

    def arm(*splits):
        init = Evaluator.__init__

        def patched(self, *a, **k):
            init(self, *a, **k)
            for split in splits:
                self.individual["semseg"][split]["miou"] = 0.0

        monkeypatch.setattr(Evaluator, "__init__", patched)
    return arm


@pytest.mark.parametrize("method", ["task_arithmetic", "tall_masks"])
def test_a_fine_tune_scoring_0_is_named_before_the_lambda_search(pool, tmp_path, monkeypatch, zero_reference, method):
    """Every λ scored NaN and the search said only 'every λ candidate scored NaN'; now it stops before merging any."""
    import merging.job as job

    zero_reference("val")
    monkeypatch.setattr(job.MergeJob, "model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a λ was tried")))
    with pytest.raises(ValueError, match=rf"^merge={method}: the λ search over \[0.2, 0.4\] cannot rank its candidates: "
                                         r"task semseg: the fine-tuned model's miou is 0 \(normalized = merged / "
                                         r"fine-tuned\) on val, so its normalized score is undefined for every "
                                         r"candidate; .*set merge.lam to merge without a search$"):
        run(_args(pool, f"merge={method}", "merge.lam_grid=[0.2,0.4]", batches=1), run_dir=tmp_path / "r")


def test_an_undefined_normalized_score_is_null_with_its_reason(pool, tmp_path, zero_reference):
    """With λ fixed nothing is searched; the scores that divide by the 0 are recorded as undefined, not NaN."""
    zero_reference("val", "test")
    report = run(_args(pool, "merge=task_arithmetic", "merge.lam=0.3", batches=1), run_dir=tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    why = "the fine-tuned model's miou is 0 (normalized = merged / fine-tuned)"
    for rep in (report, saved):
        assert rep["tasks"]["semseg"]["normalized"] is None and rep["tasks"]["semseg"]["why"] == f"undefined on test: {why}"
        assert rep["mean"]["normalized"] is None and rep["mean"]["why"] == f"undefined on test: semseg: {why}"
        assert rep["tasks"]["regression"]["normalized"] > 0 and "why" not in rep["tasks"]["regression"]
    assert saved["grid"][0]["val_normalized"] is None and saved["grid"][0]["why"] == f"undefined on val: semseg: {why}"


def test_a_learned_merges_validation_curve_is_skipped_when_a_fine_tune_scores_0(pool, tmp_path, zero_reference, caplog):
    """merge.eval_every evaluated the merged model on validation at every point of a curve that could only be NaN."""
    import logging

    zero_reference("val")
    with caplog.at_level(logging.WARNING, logger="merging.learned"):
        report = run(_args(pool, "merge=adamerging", "merge.eval_every=1", "learn_max_steps=2", batches=1),
                     run_dir=tmp_path / "r")
    assert any("merge.eval_every=1 is not run: the mean normalized validation score is undefined for any merged "
               "model (semseg: the fine-tuned model's miou is 0" in r.getMessage() for r in caplog.records)
    history = json.loads((tmp_path / "r" / "coefficients" / "coefficients.json").read_text())["history"]
    assert history and all("val_normalized" not in h for h in history)
    assert report["method"] == "adamerging"


def test_merge_app_offers_no_training_experiments(tmp_path):
    with pytest.raises(ValueError, match=r"^Could not override 'experiment'. No match in the defaults list") as e:
        run(["experiment=scenes_hps"], run_dir=tmp_path / "r")
    assert "\n" not in str(e.value)  # one line, as the CLI says it


@pytest.mark.parametrize("override, match", [
    ("merge.k=150", r"merge=ties: k is a percentage in \[0, 100\], got 150"),
    ("merge.lam_grid=[nan,0.5]", r"merge=ties, lam_grid value nan: lam must be a finite number"),
])
def test_bad_hyperparameters_are_refused_before_the_pool_is_loaded(tmp_path, no_pool, override, match):
    with pytest.raises(ValueError, match=match):
        run(["merge=ties", "pretrained=/nope", "models=[/nope]", override], run_dir=tmp_path / "bad")


@pytest.mark.parametrize("method, counterpart", [("ties", r"k \(the percent kept"), ("dare", r"p \(the drop probability")])
def test_density_without_the_mergekit_convention_names_it(tmp_path, no_pool, method, counterpart):
    """ties.yaml and dare.yaml list density for convention=mergekit; set without it, the error said only 'unknown'."""
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) density; .*density applies only with "
                                        r"convention='mergekit' \(mtl-merge: merge.convention=mergekit\); the paper "
                                        rf"convention's counterpart: {counterpart}"):
        run([f"merge={method}", "merge.density=0.5", "pretrained=/nope", "models=[/nope]"], run_dir=tmp_path / "bad")


@pytest.mark.parametrize("method, override, match", [
    ("consensus", "merge.k=5", r"merge=consensus: consensus needs at least 5 fine-tuned models, got 2"),
    ("task_arithmetic", "merge.lam=[0.3,0.3,0.3]", r"merge=task_arithmetic: lam has 3 values but there are 2"),
])
def test_settings_the_pool_size_rules_out_are_refused_before_evaluation(pool, tmp_path, monkeypatch, method, override, match):
    import merging.job as job

    def refuse(*a, **k):
        raise AssertionError("the pool was evaluated before its size was checked")

    monkeypatch.setattr(job, "Evaluator", refuse)
    with pytest.raises(ValueError, match=match):
        run(_args(pool, f"merge={method}", override), run_dir=tmp_path / "r")


def test_existing_output_is_refused_unless_overwrite(pool, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run(_args(pool, "merge=average", f"output={out}"), run_dir=tmp_path / "r1")
    run(_args(pool, "merge=average", f"output={out}", "overwrite=true"), run_dir=tmp_path / "r2")
    assert (out / "model.safetensors").is_file()


def test_architecture_mismatch_is_named(pool, tmp_path):
    other = mtl.create_model(["depth"], backbone={"name": "test_vit", "img_size": 32, "patch_size": 4})
    folder = mtl.save_model(other, tmp_path / "vit")
    with pytest.raises(ValueError, match="backbone"):
        run([f"pretrained={pool.pretrained}", f"models=[{folder},{pool.member_paths[0]}]"], run_dir=tmp_path / "r")


def test_unknown_method_lists_valid(pool, tmp_path):
    with pytest.raises(ValueError, match="ties"):
        run(_args(pool, "merge=average", "merge.method=nope"), run_dir=tmp_path / "r")


def test_cli_smoke_prints_run_dir(tmp_path):
    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "outputs"))
    proc = subprocess.run([sys.executable, "-m", "merging.cli", "debug=smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    last = lines[-1]
    assert last.startswith("run_dir: ")
    # stdout is a pipe (no TTY): progress still shows as lines, for every loop of the job
    assert _has(lines, "[smoke pool] training 1/3: the pretrained base") and _has(lines, "[smoke pool] training 3/3")
    assert _has(lines, "[eval] fine-tuned models 1/2 (50%)", "models/s", " val ") and _has(lines, "[eval] fine-tuned models 2/2")
    assert _has(lines, "[task_arithmetic] λ grid 1/10 (10%)", "candidates/s", "eta", "λ=0.1 val normalized")
    assert _has(lines, "[task_arithmetic] λ grid 10/10 (100%)", "λ=1.0")
    assert sum(ln.startswith("[eval] val 2/2 (100%)") for ln in lines) == 10  # one evaluation per λ
    assert _has(lines, "[eval] test 1/2", "regression mae") and _has(lines, "[eval] test 2/2", "semseg")
    run_dir = Path(last.removeprefix("run_dir: "))
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert (run_dir / "metrics.json").is_file()


def test_eval_device_resolution():
    import torch

    from merging.pool import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="eval.device=cuda"):
            resolve_device("cuda")
    # an index past the GPUs torch sees: torch.device took it, and the move failed after the run folder
    from unittest import mock

    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.device_count", return_value=1), mock.patch("torch.cuda.current_device", return_value=0):
        assert resolve_device("cuda:0") == resolve_device("cuda") == torch.device("cuda", 0)
        with pytest.raises(ValueError, match=r"^eval.device=cuda:1 but torch sees 1 CUDA device\(s\) here"):
            resolve_device("cuda:1")


@pytest.mark.parametrize("device, said", [
    ("cudaa", "eval.device='cudaa' is not a device (cpu, cuda, cuda:1, auto): "),
    ("cuda", "eval.device=cuda but CUDA is not available here; use cpu or auto"),
    # a device torch names but this machine lacks: torch.device took it, the move to it failed after the run folder
    ("mps", "eval.device=mps but MPS is not available here; use cpu or auto"),
])
def test_a_bad_eval_device_is_refused_before_the_run_folder(pool, console, capfd, device, said):
    """The device was resolved when the evaluator was built, after the run folder (left FAILED, a run_dir: line)."""
    if device == "cuda" and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"{device} is available here")
    code, out = console("merging.cli", *_args(pool), f"eval.device={device}")
    stdout, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {said}"), err
    assert "run_dir:" not in stdout and not any(out.rglob("config.yaml")), sorted(out.rglob("*"))


def test_evaluate_leaves_the_callers_model_as_it_was(pool):
    from merging.pool import evaluate, member_datamodule

    model = pool.member_model(0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm = member_datamodule(pool.members[0])
    task = pool.members[0].tasks[0]
    first = evaluate(model, task, dm, "val", max_batches=1, device="cpu")
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if torch.cuda.is_available():  # evaluated on the GPU as a copy: the caller's model stays on the CPU
        on_gpu = evaluate(model, task, dm, "val", max_batches=1, device="cuda")
        assert next(model.parameters()).device.type == "cpu" and model.training
        assert on_gpu.keys() == first.keys()



def _has(lines, start, *parts):
    return any(ln.startswith(start) and all(p in ln for p in parts) for ln in lines)


def test_learned_merge_steps_reach_a_non_tty_log(pool, tmp_path, capsys):
    """pytest's captured stdout is no TTY, as under nohup/SLURM/CI: the optimisation steps still print lines."""
    capsys.readouterr()
    run(_args(pool, "merge=adamerging", "learn_max_steps=3", batches=1), run_dir=tmp_path / "ada")
    lines = capsys.readouterr().out.splitlines()
    assert _has(lines, "[adamerging] step 1/3 (33%)", "steps/s", "objective ")
    assert _has(lines, "[adamerging] step 3/3 (100%)", "objective ")


@pytest.mark.parametrize("evaluated", [True, False])
def test_output_over_a_pool_manifest_model_folder_is_refused(tmp_path, evaluated):
    """The manifest's folders (relative ones: the manifest's folder's) get start_run's output check."""
    member = tmp_path / "zoo" / "ft" / "a"
    member.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, member / "model.safetensors")  # readable: the output clash is what is judged
    keep = (member / "model.safetensors").read_bytes()
    manifest = tmp_path / "zoo" / "pool.json"
    manifest.write_text(json.dumps({"pretrained": "base", "models": ["ft/a"]}))
    args = ["merge=ties", f"pool={manifest}", f"output={member}", "overwrite=true"] + ([] if evaluated else ["eval=none"])
    with pytest.raises(ValueError, match=r"output=.*/ft/a is the input model folder .*ft/a"):
        run(args, run_dir=tmp_path / "r")
    assert (member / "model.safetensors").read_bytes() == keep and sorted(member.iterdir()) == [member / "model.safetensors"]
    assert not (tmp_path / "r").exists()


def test_a_custom_cli_method_with_its_config_outside_the_package(pool, tmp_path):
    """docs/merging.md: register a function in CLI_METHODS, put merge/<name>.yaml in a folder of your own
    and add it to hydra.searchpath (after pkg://mtl.configs, which the app's own search path holds)."""
    from merging.job import CLI_METHODS, Selection

    (tmp_path / "conf" / "merge").mkdir(parents=True)
    (tmp_path / "conf" / "merge" / "my_merge.yaml").write_text("method: my_merge\nscale: 0.5\n")
    seen = {}

    def my_merge(job, hp):
        seen.update(hp)
        return Selection(job.model(job.merge("task_arithmetic", lam=hp["scale"])), {"lam": hp["scale"]})

    CLI_METHODS.register("my_merge")(my_merge)
    try:
        report = run(_args(pool, "merge=my_merge", f"hydra.searchpath=[pkg://mtl.configs,file://{tmp_path / 'conf'}]"),
                     run_dir=tmp_path / "r")
    finally:
        CLI_METHODS._items.pop("my_merge", None)
    assert seen == {"scale": 0.5} and report["selected"]["lam"] == 0.5


def test_a_config_value_of_the_wrong_type_is_named_by_file_and_key(pool, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pool.member_paths[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["decoder"] = "x"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{bad / 'config.json'}: key 'model.decoder' differs from the config"):
        run(["merge=task_arithmetic", "merge.lam=0.3", "eval.max_batches=1", f"pretrained={pool.pretrained}",
             f"models=[{bad},{pool.member_paths[1]}]"], run_dir=tmp_path / "r")
    digestless = bad / "model.safetensors"  # an older file without the config digest: still named, by key
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(digestless), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, str(digestless))
    with pytest.raises(ValueError, match=rf"{bad / 'config.json'}: key 'model.decoder' must be a mapping, got str 'x'"):
        run(["merge=task_arithmetic", "merge.lam=0.3", "eval.max_batches=1", f"pretrained={pool.pretrained}",
             f"models=[{bad},{pool.member_paths[1]}]"], run_dir=tmp_path / "r2")


def test_members_of_other_data_at_one_size_give_the_merge_that_size(pool, tmp_path):
    """A zoo's fine-tunes differ by dataset: no common data config, but one image size, which the merged
    folder records (meta.image_size) so mtl-export needs no format.input_size."""
    import shutil

    from mtl.exporters.api import Source
    from mtl.exporters.onnx_export import input_size_of

    other = tmp_path / "other"
    shutil.copytree(pool.member_paths[1], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["meta"]["data"] = {**cfg["meta"]["data"], "n_val": int(cfg["meta"]["data"].get("n_val") or 8) + 1}
    (other / "config.json").write_text(json.dumps(cfg))
    run([f"pretrained={pool.pretrained}", f"models=[{pool.member_paths[0]},{other}]", "eval.max_batches=1",
         "merge=task_arithmetic", "merge.lam=0.3"], run_dir=tmp_path / "r")
    merged = mtl.load_model(tmp_path / "r" / "model")
    assert "data" not in merged.meta and merged.meta["image_size"] == 32
    assert input_size_of(Source(merged, tmp_path / "r" / "model", {"backbone": {}}, merged.meta), None) == (32, 32)


@pytest.mark.parametrize("extra, err, match", [
    (["eval.max_batches=0"], ValueError, r"eval.max_batches must be an int >= 1 or null"),  # scored NaN everywhere
    (["merge=tall_masks", "merge.lam_grid=[]"], ValueError, r"merge.lam_grid is empty"),  # was the default grid
    (["merge=tall_masks", "merge.lam=[0.2]"], ValueError, r"merge=tall_masks: lam has 1 values but there are 2"),
    (["merge=consensus", "merge.tall_lam=[0.3]"], ValueError, r"merge=consensus: tall_lam has 1 values but there are 2"),
    (["merge=consensus", "merge.tall_lam=-0.1"], ValueError, r"^merge=consensus: tall_lam must be ≥ 0"),  # not "lam_grid value"
    (["merge=consensus", "merge.tall_lam={semseg: 0.3, mnist: 0.2}"], ValueError,
     r"merge=consensus: tall_lam: unknown task\(s\) \['mnist'\]; no λ for \['regression'\]"),
    (["merge=tall_masks", "+merge.bn=recompute"], ValueError, r"TALL store keeps θ0's BatchNorm statistics"),
    (["+merge.exclude=[decoder\\.neck\\.]"], ValueError, r"merge.exclude: a key filter leaves keys out of the merged "
                                                       r"weights, and an evaluated merge builds a whole model"),
    (["shard_size=1KB"], ValueError, r"shard_size shards the output of an eval=none merge .*drop shard_size or add "
                                     r"eval=none"),  # was ignored: one model.safetensors
])
def test_bad_settings_are_refused_before_the_pool_is_evaluated(pool, tmp_path, monkeypatch, extra, err, match):
    import merging.job as job

    def never(*a, **k):
        raise AssertionError("the pool was evaluated before the settings were checked")

    monkeypatch.setattr(job, "Evaluator", never)
    args = [a for a in _args(pool) if not a.startswith("eval.max_batches")] if "eval.max_batches=0" in extra else _args(pool)
    with pytest.raises(err, match=match):
        run(args + extra, run_dir=tmp_path / "r")


def test_a_refused_rerun_leaves_the_finished_run_as_it_was(pool, tmp_path):
    run(_args(pool, "merge=task_arithmetic", "merge.lam=0.3"), run_dir=tmp_path / "r")
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match="exists; pass overwrite=true"):
        run(_args(pool, "merge=ties", "merge.lam=0.9"), run_dir=tmp_path / "r")
    after = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    assert after == before  # config.yaml still the finished run's; no FAILED marker
    # a new attempt in a failed run's folder replaces its verdict
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "FAILED").write_text("an earlier attempt")
    run(_args(pool, "merge=task_arithmetic", "merge.lam=0.3"), run_dir=tmp_path / "f")
    assert not (tmp_path / "f" / "FAILED").exists()


def test_an_earlier_tall_store_is_refused_before_the_lambda_search(pool, tmp_path, monkeypatch):
    import merging.job as job

    monkeypatch.setattr(job, "Evaluator", lambda *a, **k: (_ for _ in ()).throw(AssertionError("evaluated first")))
    (tmp_path / "r" / "tall_store").mkdir(parents=True)
    (tmp_path / "r" / "tall_store" / "tall.safetensors").write_bytes(b"")
    (tmp_path / "r" / "FAILED").write_text("an earlier attempt")  # a folder of no run's is refused before any of this
    with pytest.raises(FileExistsError, match=r"tall_store holds a TALL store of an earlier run; pass overwrite=true"):
        run(_args(pool, "merge=tall_masks", f"output={tmp_path / 'elsewhere'}"), run_dir=tmp_path / "r")


@pytest.mark.parametrize("method", ["task_arithmetic", "tall_masks", "consensus"])
def test_a_given_lam_grid_that_lam_overrides_is_said_once(tmp_path, caplog, method):
    """merge.lam takes precedence over merge.lam_grid (documented); a grid the user gave is then not searched,
    which is logged once. The config's own grid, always present, is not worth a warning."""
    from mtl.cli.in_process import compose_in_process
    from merging.job import _method

    for extra, warned in ((["merge.lam=0.3", "merge.lam_grid=[0.1,0.2]"], True), (["merge.lam=0.3"], False),
                          (["merge.lam_grid=[0.1,0.2]"], False)):
        cfg, _ = compose_in_process("mtl.configs.merge_app", "merge", [f"merge={method}", *extra], tmp_path / "r")
        caplog.clear()
        with caplog.at_level("WARNING", logger="merging.job"):
            _method(cfg)
        said = [r.getMessage() for r in caplog.records if "is not searched" in r.getMessage()]
        assert said == (["merge.lam_grid=[0.1, 0.2] is not searched: merge.lam=0.3 is set and takes precedence "
                         "(drop merge.lam, i.e. merge.lam=null, to search the grid)"] if warned else []), extra


@pytest.mark.parametrize("evaluated", [True, False])
@pytest.mark.parametrize("override, unknown", [("+merge.lam=0.5", "lam"), ("+merge.foo=1", "foo"),
                                               ("+merge.include=[a]", "include")])
def test_pretrained_refuses_hyperparameters_it_does_not_take(tmp_path, no_pool, evaluated, override, unknown):
    """merge=pretrained dropped every hyperparameter in silence (λ = 0.0 recorded), where every other method refuses
    an unknown one; the BN rule and the other key options that shape θ0 with the heads are all it takes."""
    with pytest.raises(TypeError, match=rf"^pretrained: unknown hyperparameter\(s\) {unknown}; accepted: bn, "
                                        r"check_finite, task_keys, unshared$"):
        run(["merge=pretrained", "pretrained=/nope", "models=[/nope]", override, *([] if evaluated else ["eval=none"])],
            run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_pretrained_applies_the_bn_rule_it_is_given(pool, tmp_path):
    """+merge.bn=average: θ0's weights with the fine-tuned models' averaged BatchNorm statistics (it was dropped)."""
    models = ",".join(str(p) for p in pool.member_paths)
    report = run(["eval=none", "merge=pretrained", "+merge.bn=average", f"pretrained={pool.pretrained}",
                  f"models=[{models}]", f"output={tmp_path / 'o'}"], run_dir=tmp_path / "r")
    assert report["selected"]["bn"] == "average" and report["selected"]["lam"] == 0.0
    pre = merging.load_state_dict(pool.pretrained)
    fts = [merging.load_state_dict(p) for p in pool.member_paths]
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    stats = [k for k in pre if k.endswith("running_mean") and ".heads." not in f".{k}"]
    weights = [k for k in pre if k.endswith(".weight") and ".heads." not in f".{k}"]
    assert stats and weights
    for k in stats:
        torch.testing.assert_close(got[k], sum(f[k] for f in fts) / len(fts))
        assert not torch.equal(got[k], pre[k])
    for k in weights:
        torch.testing.assert_close(got[k], pre[k], rtol=0, atol=0)


def test_an_overwrite_rerun_removes_the_earlier_runs_per_method_outputs(pool, tmp_path):
    """A TIES rerun (overwrite=true) in a TALL run's folder kept its store and mask plot beside the new metrics.json:
    load_task_model rebuilt the old run's models and the plot showed masks the TIES merge never used."""
    rd = tmp_path / "r"
    run(_args(pool, "merge=tall_masks", "merge.lam=0.3", batches=1), run_dir=rd)
    assert (rd / "tall_store" / "tall.safetensors").is_file() and (rd / "mask_overlap.png").is_file()
    (rd / "coefficients.png").write_bytes(b"an earlier learned run's plot")
    report = run(_args(pool, "merge=ties", "merge.lam=0.8", "overwrite=true", batches=1), run_dir=rd)
    assert report["method"] == "ties" and "store" not in report
    assert sorted(p.name for p in rd.iterdir() if p.name != ".hydra") == [
        "config.yaml", "metrics.json", "model", "task_accuracy.png"]


def test_an_eval_none_rerun_keeps_no_earlier_plot(pool, tmp_path):
    """eval=none writes no task_accuracy.png: the evaluated run's plot it replaces would stand for its merge."""
    rd = tmp_path / "r"
    run(_args(pool, "merge=task_arithmetic", "merge.lam=0.3", batches=1), run_dir=rd)
    models = ",".join(str(p) for p in pool.member_paths)
    run(["eval=none", "merge=ties", "overwrite=true", f"pretrained={pool.pretrained}", f"models=[{models}]"],
        run_dir=rd)
    assert not (rd / "task_accuracy.png").exists() and (rd / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("evaluated", [False, True])
@pytest.mark.parametrize("twice", ["same", "symlink", "pretrained"])
def test_a_model_given_twice_or_theta0_among_the_models_is_refused_before_the_run_folder(pool, tmp_path, evaluated,
                                                                                         twice):
    """models=[a,a] merged θ0 + 2λ·τ_a (rc=0; evaluated: a FAILED run folder saying 'rename the tasks'), and
    models=[θ0,a] merged a zero task vector as a model (average: θ0 + τ_a/2)."""
    a = Path(pool.member_paths[0])
    link = tmp_path / "link"
    link.symlink_to(a.resolve(), target_is_directory=True)
    first, again = {"same": (a, a), "symlink": (a, link), "pretrained": (pool.pretrained, a)}[twice]
    args = [f"pretrained={pool.pretrained}", f"models=[{first},{again}]", "merge=task_arithmetic", "merge.lam=0.3",
            "output=" + str(tmp_path / "o")]
    with pytest.raises(merging.MergeInputError) as e:
        run([*args, *([] if evaluated else ["eval=none"])], run_dir=tmp_path / "r")
    want = (f"models[1] ({str(again)!r}) is models[0] ({str(first)!r}) again" if twice != "pretrained" else
            f"models[0] ({str(first)!r}) is pretrained ({str(pool.pretrained)!r}): its task vector is zero")
    assert str(e.value).startswith(want) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


def test_an_evaluated_average_takes_theta0_among_the_models(pool, tmp_path):
    """A soup with the base: θ0 contributes its weights and its own task's head (was refused as 'its task vector
    is zero' whenever evaluated, though average reads no task vectors)."""
    a = pool.member_paths[0]
    report = run([f"pretrained={pool.pretrained}", f"models=[{pool.pretrained},{a}]", "merge=average",
                  "eval.max_batches=1"], run_dir=tmp_path / "r")
    pre_task = mtl.load_model(pool.pretrained).tasks
    assert set(report["tasks"]) == {*pre_task, *mtl.load_model(a).tasks}
    merged = load_file(tmp_path / "r" / "model" / "model.safetensors")
    want = merging.merge("average", pool.pretrained, [pool.pretrained, a])
    for k, v in want.items():
        assert torch.equal(merged[k], v), k
    # a θ0 that is itself a fine-tune descends from other weights, not from itself: still the pool's θ0
    run([f"pretrained={a}", f"models=[{a}]", "merge=average", "eval.max_batches=1"], run_dir=tmp_path / "ft")


def test_a_pool_manifest_listing_a_model_twice_is_refused_naming_the_manifest(pool, tmp_path):
    manifest = tmp_path / "pool.json"
    a = str(pool.member_paths[0])
    manifest.write_text(json.dumps({"pretrained": str(pool.pretrained), "models": [a, a]}))
    # average merges the models, not task vectors: the message says so (it said 'its task vector would count twice')
    with pytest.raises(merging.MergeInputError, match=rf"^{manifest}: models\[1\] \('{a}'\) is models\[0\] \('{a}'\) "
                                                      r"again: it would count twice; list each model once$"):
        run([f"pool={manifest}", "merge=average", "eval=none", f"output={tmp_path / 'o'}"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_the_python_apis_refuse_a_folder_twice_and_theta0_as_a_model(pool, tmp_path):
    a = Path(pool.member_paths[0])
    with pytest.raises(merging.MergeInputError, match=r"^finetuned\[1\] .* is finetuned\[0\] .* again"):
        merging.merge("task_arithmetic", pool.pretrained, [a, a / "model.safetensors"], lam=0.3)
    with pytest.raises(merging.MergeInputError, match=r"^finetuned\[0\] .* is pretrained "):
        merging.merge("task_arithmetic", pool.pretrained, [pool.pretrained, a], lam=0.3)
    with pytest.raises(merging.MergeInputError, match=r"^finetuned\[1\] .* again: it would count twice; list each"):
        merging.merge("average", pool.pretrained, [a, a])
    # a model.safetensors that is itself a link (a Hugging Face cache's blob) is the file it links to
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").symlink_to((a / "model.safetensors").resolve())
    with pytest.raises(merging.MergeInputError, match=r"^finetuned\[1\] .* is finetuned\[0\] .* again"):
        merging.merge("task_arithmetic", pool.pretrained, [hf, a / "model.safetensors"], lam=0.3)
    with pytest.raises(merging.MergeInputError, match=r"^models\[1\] .* is models\[0\] .* again"):
        from merging.pool import ModelPool

        ModelPool.from_folders(pool.pretrained, [a, a])


def test_a_manifest_with_theta0_among_the_models_reads_with_from_manifest_base_among(pool, tmp_path):
    """mtl-merge pool=<it> merge=average takes such a manifest; from_manifest had no base_among to read it."""
    from merging.pool import ModelPool

    a = str(pool.member_paths[0])
    manifest = tmp_path / "pool.json"
    manifest.write_text(json.dumps({"pretrained": str(pool.pretrained), "models": [str(pool.pretrained), a]}))
    with pytest.raises(merging.MergeInputError, match=r"models\[0\] .* is pretrained .*: its task vector is zero"):
        ModelPool.from_manifest(manifest)
    read = ModelPool.from_manifest(manifest, base_among=True)
    assert read.member_paths == [Path(pool.pretrained), Path(a)]


def test_theta0_may_be_one_of_the_models_of_a_method_that_merges_the_models_themselves(pool, tmp_path):
    """average (a soup with the base; mergekit's linear without base_model lists its first model as both) merges
    the models, not task vectors: θ0 among them is (θ0 + θ_a)/2, not refused (8b6802e refused every such merge)."""
    from safetensors.torch import load_file

    a = Path(pool.member_paths[0])
    pre, ft = load_file(Path(pool.pretrained) / "model.safetensors"), load_file(a / "model.safetensors")
    merged = merging.merge("average", pool.pretrained, [pool.pretrained, a])
    key = next(k for k, v in pre.items() if v.is_floating_point() and not torch.equal(v, ft[k]))
    torch.testing.assert_close(merged[key], (pre[key] + ft[key]) / 2)
    run([f"pretrained={pool.pretrained}", f"models=[{pool.pretrained},{a}]", "merge=average", "eval=none",
         f"output={tmp_path / 'o'}"], run_dir=tmp_path / "r")
    torch.testing.assert_close(load_file(tmp_path / "o" / "model.safetensors")[key], (pre[key] + ft[key]) / 2)


def test_fine_tunes_sharing_a_task_name_are_refused_before_the_run_folder(tmp_path):
    """The pool's task-name check reads config.json alone: it ran once the pool was loaded, after the run folder was
    made (a FAILED folder)."""
    def model(task, seed):
        torch.manual_seed(seed)
        return mtl.create_model([task], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                                decoder={"name": "hps", "channels": 8})

    pre = mtl.save_model(model({"kind": "classification", "name": "a", "num_classes": 3}, 0), tmp_path / "pre")
    fts = [mtl.save_model(model({"kind": "depth", "name": "s"}, seed), tmp_path / f"ft{seed}") for seed in (1, 2)]
    with pytest.raises(ValueError, match=re.escape("task name(s) ['s'] appear in more than one fine-tuned model")):
        run(["merge=task_arithmetic", f"pretrained={pre}", f"models=[{fts[0]},{fts[1]}]"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_the_report_names_the_widths_a_slimmable_merged_model_was_scored_at():
    """A slimmable merged model is scored at its stored widths only (not per width): metrics.json did not say at
    which; it now records the configuration of the model that was scored, and nothing for other families."""
    from types import SimpleNamespace

    from merging.job import Selection
    from merging.report import build_report
    from mtl.models import create_model

    ev = SimpleNamespace(pool=SimpleNamespace(pretrained="pre", member_paths=[]), names=[], tasks={}, individual={},
                         undefined_mean=lambda *a: None, normalized_mean=lambda *a: None, record=lambda: {})
    slim = create_model(["depth", "semseg"], backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16],
                                                       "depths": [1, 1], "out_indices": [1, 2]},
                        decoder={"name": "slimmable", "channels": 8}, family="slimmable")
    assert build_report("average", ev, Selection(slim, {}), {})["widths"] == {
        "encoder": 1.0, "decoders": {"depth": 1.0, "semseg": 1.0}}
    narrow = min(slim.width_set)
    slim.set_widths(encoder=narrow, decoders={"semseg": narrow})
    assert build_report("average", ev, Selection(slim, {}), {})["widths"] == {
        "encoder": narrow, "decoders": {"depth": 1.0, "semseg": narrow}}
    plain = create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    assert "widths" not in build_report("average", ev, Selection(plain, {}), {})


def test_a_pool_whose_val_split_is_its_test_split_says_so(tmp_path, caplog):
    """Cityscapes/NYUv2 at val_fraction=0 (their default) serve the test set as val: the λ search chose on test while
    metrics.json said selection_split: val, silently. Now it records test and warns; a carved val split is val."""
    import logging

    from tests.data.test_benchmarks import write_npy_layout

    root = write_npy_layout(tmp_path / "cs", n_train=4, n_val=3, classes=7, normals=False, hw=(32, 32))
    data = {"name": "cityscapes", "root": str(root), "num_classes": 7, "size": None, "val_fraction": 0.0,
            "batch_size": 4}
    tasks = [{"kind": "semseg", "name": "semseg", "num_classes": 7}, {"kind": "depth", "name": "depth"}]
    folders = []
    for i, own in enumerate([tasks, tasks[:1], tasks[1:]]):
        torch.manual_seed(i)
        m = mtl.create_model(own, backbone="test_resnet", decoder={"name": "hps", "channels": 8})
        folders.append(mtl.save_model(m, tmp_path / f"m{i}", meta={"data": data}))
    args = ["merge=task_arithmetic", "merge.lam_grid=[0.2,0.5]", f"pretrained={folders[0]}",
            f"models=[{folders[1]},{folders[2]}]"]
    with caplog.at_level(logging.WARNING, logger="merging.evaluation"):
        on_test = run(args, run_dir=tmp_path / "a")
    warned = [r.getMessage() for r in caplog.records if "chosen on the TEST split" in r.getMessage()]
    assert on_test["eval"]["selection_split"] == "test" and len(warned) == 1, on_test["eval"]
    assert "semseg, depth" in warned[0] and "eval.data={val_fraction: 0.1}" in warned[0]
    assert mtl.load_model(tmp_path / "a" / "model").meta["eval"]["selection_split"] == "test"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="merging.evaluation"):
        carved = run([*args, "eval.data={val_fraction: 0.5}"], run_dir=tmp_path / "b")
    assert carved["eval"]["selection_split"] == "val" and carved["eval"]["scored_samples"]["val"] == {"semseg": 2, "depth": 2}
    assert not [r for r in caplog.records if "TEST split" in r.getMessage()]
