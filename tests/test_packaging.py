"""A non-editable install ships the configs, so the CLIs work from any directory."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_cli_composes_from_anywhere(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheel_dir), str(ROOT)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("mtlkit-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    assert (target / "mtl" / "configs" / "train.yaml").is_file()
    assert (target / "mtl" / "configs" / "merge_app" / "merge.yaml").is_file()
    assert (target / "merging" / "csrc" / "chunk_kernels.c").is_file()  # compiled by merging.native at first use
    env = dict(os.environ, PYTHONPATH=str(target))
    for module, args in (("mtl.cli.train", ["experiment=scenes_hps", "debug=smoke"]), ("merging.cli", ["merge=ties"])):
        proc = subprocess.run([sys.executable, "-m", module, *args, "--cfg", "job"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        code = subprocess.run([sys.executable, "-c", f"import {module.split('.')[0]} as m; print(m.__file__)"],
                              cwd=tmp_path, env=env, capture_output=True, text=True).stdout
        assert str(target) in code  # the installed copy, not the source tree, answered
    assert "test_resnet" in subprocess.run([sys.executable, "-m", "mtl.cli.train", "experiment=scenes_hps", "debug=smoke",
                                            "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True).stdout
