"""Training runs: checks before fitting, nothing lost after it, run folders that never collide."""
import json
import sys

import pytest

import mtl
from mtl.cli.common import FAILED, compose_in_process, marks_failure
from mtl.train import run

FAST = ["experiment=scenes_hps", "debug=smoke", "logger=none", "viz.num_samples=0", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false"]


def test_baselines_lacking_a_task_fail_before_training(tmp_path):
    baselines = tmp_path / "b.json"
    baselines.write_text(json.dumps({"depth": {"rmse": 1.0}}))
    with pytest.raises(ValueError, match=r"task 'semseg'.*missing in baselines file .*b\.json"):
        run(FAST + ["task=[depth,semseg]", f"baselines.path={baselines}"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training step


def test_model_and_metrics_survive_a_failure_after_testing(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")  # save_to below needs it to be a folder: the baselines update fails
    run_dir = tmp_path / "run"
    with pytest.raises(OSError):
        with marks_failure(run_dir):
            run(FAST + ["task=[depth,classification]", f"baselines.save_to={blocker / 'b.json'}"], run_dir=run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) == {"depth", "classification"}
    assert metrics["balancer"] == {"name": "ew"}
    assert set(mtl.load_model(run_dir / "model").tasks) == {"depth", "classification"}
    assert "NotADirectoryError" in (run_dir / FAILED).read_text() or "FileExistsError" in (run_dir / FAILED).read_text()
    # a finished run's folder is never trained into again: its model and checkpoints would be mixed
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"holds a finished run \(metrics.json, model\)"):
        run(FAST + ["task=[depth]"], run_dir=run_dir)
    assert (run_dir / "metrics.json").read_bytes() == before


def test_in_process_run_folders_honour_MTL_OUTPUT_DIR_and_never_collide(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    dirs = [compose_in_process("mtl.configs", "train", ["debug=smoke"])[1] for _ in range(5)]
    assert len(set(dirs)) == 5  # five in well under a second
    for d in dirs:
        assert d.is_dir() and d.parent == tmp_path / "out" / "train" / "runs"
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_plot_only_where_weights_vary(tmp_path):
    ew = run(FAST + ["task=[depth,classification]", "log_weights_every=1"], run_dir=tmp_path / "ew")
    assert not (ew / "balancer_weights.png").exists()
    rlw = run(FAST + ["task=[depth,classification]", "balancer=rlw", "log_weights_every=1"], run_dir=tmp_path / "rlw")
    assert (rlw / "balancer_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_pyplot_backend_change(tmp_path):
    import subprocess

    code = ("import matplotlib; matplotlib.use('svg'); import torch; from mtl.models import create_model; "
            "from mtl.viz import save_predictions; "
            "m = create_model(['depth'], backbone={'name': 'test_resnet', 'out_indices': [1, 2]}, "
            "decoder={'name': 'hps', 'channels': 8}); m.train(); m.backbone.eval(); "
            "b = {'image': torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), 'depth': torch.rand(2, 1, 32, 32)}; "
            f"save_predictions(m, b, r'{tmp_path / 'p.png'}', 2); "
            "print(matplotlib.get_backend(), m.training, m.backbone.training, m.decoder.training)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["svg", "True", "False", "True"]
    assert (tmp_path / "p.png").is_file()
