"""The scripts under examples/ run as documented, from a fresh folder."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs_and_runs_again(tmp_path):
    """A second run in the same folder once failed: its fixed run_dir held the first run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("MTL_OUTPUT_DIR", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the second run, from another folder, finds the first one's through MTL_OUTPUT_DIR (as the CLIs would)
    for cwd, extra in ((tmp_path, {}), (elsewhere, {"MTL_OUTPUT_DIR": str(tmp_path / "outputs")})):
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=cwd, env={**env, **extra},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert list(elsewhere.iterdir()) == []
    assert "depth only: (2, 1, 32, 32)" in proc.stdout
    assert "TIES merged" in proc.stdout and "TALL mask overlap" in proc.stdout
    assert (tmp_path / "outputs" / "examples" / "train" / "model" / "model.safetensors").is_file()
