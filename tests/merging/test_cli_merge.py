"""mtl-merge end to end: a tiny real pool (scenes, timm test backbone), every method, the TALL store."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtl
from merging.job import build_smoke_pool, run


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return build_smoke_pool(tmp_path_factory.mktemp("pool"))


def _args(pool, *extra):
    models = ",".join(str(p) for p in pool.member_paths)
    return [f"pretrained={pool.pretrained}", f"models=[{models}]", "eval.max_batches=2", *extra]


@pytest.mark.parametrize("method", ["pretrained", "average", "task_arithmetic", "ties", "dare", "consensus"])
def test_every_method_writes_a_merged_model(pool, tmp_path, method):
    fixed = [] if method in ("pretrained", "average") else ["merge.lam=0.3"]
    report = run(_args(pool, f"merge={method}", *fixed), run_dir=tmp_path / method)
    assert set(report["tasks"]) == {"regression", "semseg"}
    for t in report["tasks"].values():
        assert t["normalized"] > 0
    model = mtl.load_model(tmp_path / method / "model")
    assert set(model.tasks) == {"regression", "semseg"}
    assert (tmp_path / method / "task_accuracy.png").is_file()
    assert json.loads((tmp_path / method / "metrics.json").read_text())["method"] == method


def test_merged_model_holds_each_tasks_own_head(pool, tmp_path):
    run(_args(pool, "merge=task_arithmetic", "merge.lam=0.5"), run_dir=tmp_path / "ta")
    merged = mtl.load_model(tmp_path / "ta" / "model").state_dict()
    for i, task in enumerate(pool.task_names):
        own = mtl.load_model(pool.member_paths[i]).state_dict()
        for k, v in own.items():
            if k.startswith(f"decoder.heads.{task}."):
                assert torch.equal(merged[k], v), k


def test_lambda_grid_is_chosen_on_validation(pool, tmp_path):
    report = run(_args(pool, "merge=task_arithmetic", "merge.lam=[0.0,0.5,1.0]"), run_dir=tmp_path / "grid")
    assert [g["hparams"]["lam"] for g in report["grid"]] == [0.0, 0.5, 1.0]
    best = max(report["grid"], key=lambda g: g["val_normalized"])
    assert report["selected"]["lam"] == best["hparams"]["lam"]


def test_tall_masks_store_reconstructs_tasks(pool, tmp_path):
    report = run(_args(pool, "merge=tall_masks", "merge.lam=[0.2,0.5]", "store=true"), run_dir=tmp_path / "tall")
    store = report["store"]
    assert store["tasks"] == 2 and store["bytes_stored"] > 0 and store["bytes_full_models"] > 0
    assert set(report["selected"]["lam"]) == {"regression", "semseg"}
    assert (tmp_path / "tall" / "mask_overlap.png").is_file()
    assert (tmp_path / "tall" / "tall_store").is_dir()


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
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: ")
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
