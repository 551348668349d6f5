"""The issue's benchmark entry point for the slimmable family, run as outside code runs it."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_architectures_family_slimmable_runs_the_slimmable_speed_part(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "scripts/bench_architectures.py", "--family", "slimmable", "--part", "speed",
           "--rounds", "1", "--iters", "1", "--size", "32", "--batch", "1", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    speed = json.loads(out.read_text())["speed"]
    assert 0.2 < speed["flops_ratio_half_vs_full"] < 0.3  # half the channels: about a quarter of the FLOPs
    assert speed["params"]["half"] < speed["params"]["full"]
    assert "latency extracted 0.5 / full" in res.stdout


def test_bench_architectures_rejects_an_unknown_family():
    res = subprocess.run([sys.executable, "scripts/bench_architectures.py", "--family", "nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "nope" in res.stderr
