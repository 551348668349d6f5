"""scripts/build_zoo.py --smoke on 2 tasks, in-process: manifest, resume, and mtl-merge over it."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from merging.job import run
from mtl.io import read_model_config

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TASKS = ["mnist", "faces"]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    return out, _script("build_zoo").build_zoo("cnn", out, tasks=TASKS, smoke=True)


def test_manifest_lists_pretrained_models_and_accuracies(zoo):
    out, manifest = zoo
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"] == TASKS and manifest["zoo"] == "cnn" and manifest["smoke"] is True
    assert not Path(manifest["pretrained"]).is_absolute()  # relative: the zoo folder can move
    pre = read_model_config(out / manifest["pretrained"])
    assert [t["name"] for t in pre["model"]["tasks"]] == ["pretrain"]
    for task, rel in zip(TASKS, manifest["models"]):
        cfg = read_model_config(out / rel)
        assert [t["name"] for t in cfg["model"]["tasks"]] == [task]
        assert cfg["model"]["backbone"] == pre["model"]["backbone"]
        assert cfg["meta"]["data"]["dataset"] == task  # mtl-merge evaluates each task on its own data
        assert manifest["individual"][task] == cfg["meta"]["test"][task]["accuracy"]
        assert 0.0 <= manifest["individual"][task] <= 1.0


def test_finetunes_keep_the_pretrained_batchnorm_statistics(zoo):
    from safetensors.torch import load_file

    out, manifest = zoo  # FreezeBatchNormStats: merged weights then meet the statistics they were trained with
    pre = load_file(out / manifest["pretrained"] / "model.safetensors")
    stats = [k for k in pre if k.endswith(("running_mean", "running_var"))]
    assert stats
    for rel in manifest["models"]:
        ft = load_file(out / rel / "model.safetensors")
        assert all(torch.equal(ft[k], pre[k]) for k in stats)


def test_finetunes_keep_a_fine_tuning_epoch_so_their_task_vectors_are_not_zero(zoo):
    """Smoke fine-tunes are one probe epoch (shared weights frozen: still θ0) and one fine-tuning epoch;
    the probe epoch must never be the kept checkpoint, or merging has nothing to merge."""
    from safetensors.torch import load_file

    out, manifest = zoo
    pre = load_file(out / manifest["pretrained"] / "model.safetensors")
    for rel in manifest["models"]:
        ft = load_file(out / rel / "model.safetensors")
        assert any(not torch.equal(ft[k], pre[k]) for k in pre if k.startswith("backbone.")), rel
        best = read_model_config(out / rel)["meta"]["run_dir"]
        assert "epoch000" not in json.loads((Path(best) / "metrics.json").read_text())["best_checkpoint"]


def test_finished_runs_are_reused(zoo):
    out, manifest = zoo
    again = _script("build_zoo").build_zoo("cnn", out, tasks=TASKS, smoke=True)
    assert again["reused"] == ["pretrain", *TASKS]
    assert again["individual"] == manifest["individual"]
    # each model's time is its run's training time (metrics.json fit_seconds), a reused run's too, not 0
    fit = {name: round(json.loads((out / d / "metrics.json").read_text())["fit_seconds"], 1)
           for name, d in [("pretrain", "pretrain"), *((t, f"finetune/{t}") for t in TASKS)]}
    assert all(v > 0 for v in fit.values())
    assert {k: again["seconds"][k] for k in fit} == {k: manifest["seconds"][k] for k in fit} == fit


def test_a_finished_run_of_another_recipe_is_refused_not_reused(zoo):
    """The manifest would otherwise record the new recipe over models trained with the old one."""
    out, _ = zoo
    with pytest.raises(SystemExit, match=r"holds a finished run of other overrides .*'optim.lr=0.5'"):
        _script("build_zoo").build_zoo("cnn", out, tasks=TASKS, smoke=True, finetune_overrides=["optim.lr=0.5"])


def test_merge_over_manifest_and_quality_tables(zoo, tmp_path):
    out, manifest = zoo
    report = run(["merge=ties", "merge.lam=1.0", f"pool={out / 'manifest.json'}", "eval.max_batches=2"],
                 run_dir=tmp_path / "ties")
    assert set(report["tasks"]) == set(TASKS)
    for t in TASKS:  # smoke test splits are 2 batches: the same numbers as at training time
        assert report["tasks"][t]["individual"]["accuracy"] == pytest.approx(manifest["individual"][t])
    assert (tmp_path / "ties" / "model" / "model.safetensors").is_file()

    bench = _script("bench_merge_quality")
    md = bench.tables({"manifest": str(out / "manifest.json"), "methods": {"ties": {**report, "bench_seconds": 1.0}},
                       "errors": {"average": "ValueError: x"}})
    assert "| TIES | lam=1.0" in md and "| average" not in md and "failed: ValueError" in md
    assert "| individual |" in md


def test_fine_tunes_of_another_pretrained_model_are_refused_not_reused(zoo):
    """Rebuilding the pretraining keeps the fine-tunes' init_from path: the recipe records θ0's weights too."""
    import mtl

    out, _ = zoo
    weights = out / "pretrain" / "model" / "model.safetensors"
    original = weights.read_bytes()
    try:
        model = mtl.load_model(out / "pretrain" / "model")
        with torch.no_grad():
            next(model.parameters()).add_(0.5)
        mtl.save_model(model, out / "pretrain" / "model")
        with pytest.raises(SystemExit, match=r"holds a finished run of other overrides .*init_from weights sha256="):
            _script("build_zoo").build_zoo("cnn", out, tasks=TASKS, smoke=True)
    finally:
        weights.write_bytes(original)


def test_fine_tunes_record_their_start_and_a_pool_of_another_start_is_refused(zoo, tmp_path):
    """mtl-train records θ0's weights digest in meta, so a pool with another pretrained model is refused."""
    import mtl
    from mtl.io import recorded_weights_digest

    out, manifest = zoo
    digest = recorded_weights_digest(out / "pretrain" / "model")
    for rel in manifest["models"]:
        assert read_model_config(out / rel)["meta"]["init_from_weights_digest"] == digest
    model = mtl.load_model(out / "pretrain" / "model")
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    other = mtl.save_model(model, tmp_path / "other_theta0")
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({"pretrained": str(other), "models": [str(out / m) for m in manifest["models"]]}))
    with pytest.raises(ValueError, match=r"fine-tuned from another θ0 .* than the pool's pretrained .*other_theta0"):
        run(["merge=task_arithmetic", "merge.lam=0.3", f"pool={pool}", "eval.max_batches=1"], run_dir=tmp_path / "m")


def test_a_capped_evaluation_is_recorded_in_metrics_and_the_merged_models_meta(zoo, tmp_path):
    out, _ = zoo
    capped = run(["merge=task_arithmetic", "merge.lam=0.3", f"pool={out / 'manifest.json'}", "eval.max_batches=1"],
                 run_dir=tmp_path / "capped")
    full = run(["merge=task_arithmetic", "merge.lam=0.3", f"pool={out / 'manifest.json'}"], run_dir=tmp_path / "full")
    assert capped["eval"]["max_batches"] == 1 and full["eval"]["max_batches"] is None
    assert capped["eval"]["split"] == "test" and set(capped["eval"]["scored_samples"]["test"]) == set(TASKS)
    for t in TASKS:  # smoke test splits are 2 batches: the cap scores fewer samples
        assert 0 < capped["eval"]["scored_samples"]["test"][t] < full["eval"]["scored_samples"]["test"][t]
    assert json.loads((tmp_path / "capped" / "metrics.json").read_text())["eval"] == capped["eval"]
    assert read_model_config(tmp_path / "capped" / "model")["meta"]["eval"] == capped["eval"]


def test_a_moved_zoo_resumes(zoo, tmp_path):
    """θ0 is compared by its weights' digest, not its absolute path; recipes of the older form are upgraded."""
    import shutil

    out, manifest = zoo
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    recipe = moved / "finetune" / TASKS[0] / "bench_recipe.json"
    old_form = [f"init_from={out / 'pretrain' / 'model'}" if o.startswith("init_from=") else o
                for o in json.loads(recipe.read_text())]
    recipe.write_text(json.dumps(old_form))
    again = _script("build_zoo").build_zoo("cnn", moved, tasks=TASKS, smoke=True)
    assert again["reused"] == ["pretrain", *TASKS] and again["individual"] == manifest["individual"]
    assert "init_from=<pretrained>" in json.loads(recipe.read_text())


def test_an_interrupted_build_leaves_no_manifest(tmp_path, monkeypatch):
    # the old manifest.json stayed and listed fine-tunes of the θ0 being replaced
    build = _script("build_zoo")
    (tmp_path / "manifest.json").write_text(json.dumps({"pretrained": "pretrain/model", "models": []}))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "pretrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build_zoo("cnn", tmp_path, tasks=["mnist"], smoke=True, fresh=True)
    assert not (tmp_path / "manifest.json").exists()
