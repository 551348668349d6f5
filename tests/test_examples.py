"""The scripts under examples/ run as documented, from a fresh folder."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs_and_runs_again(tmp_path):
    """A second run in the same folder once failed: its fixed run_dir held the first run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "depth only: (2, 1, 32, 32)" in proc.stdout
    assert "TIES merged" in proc.stdout and "TALL mask overlap" in proc.stdout
    assert (tmp_path / "outputs" / "examples" / "train" / "model" / "model.safetensors").is_file()
