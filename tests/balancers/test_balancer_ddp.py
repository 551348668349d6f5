"""Under Lightning DDP (2 CPU processes, gloo) balancers keep the replicas identical."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_worker import METHODS

HERE = Path(__file__).resolve().parent


def test_ddp_replicas_stay_identical(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert int(r0["steps"]) == 6
    assert not torch.equal(r0["first_losses"], r1["first_losses"])  # the ranks saw different batches
    for key in METHODS:
        assert torch.equal(r0[key], r1[key]), f"{key}: replicas diverged"
        assert not torch.allclose(r0[key], r0[f"init/{key}"]), f"{key}: did not train"
    state_keys = [k for k in r0 if "/" in k and not k.startswith("init/")]
    assert any(k.startswith("famo/") for k in state_keys) and any(k.startswith("dwa/history") for k in state_keys)
    for k in state_keys:
        assert torch.equal(r0[k], r1[k]), f"{k}: balancer state diverged"
    assert not torch.isnan(r0["dwa/history"]).any()  # two windows closed and were averaged over ranks


@pytest.mark.slow
@pytest.mark.parametrize("name", ["graddrop", "famo", "flat", "gradnorm"])
def test_ddp_through_the_real_cli(name, tmp_path):
    # `mtl-train ... trainer=ddp`: 2 gloo processes, the real MultiTaskModule and DDP wrapper
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               MTL_OUTPUT_DIR=str(tmp_path / "outputs"), OMP_NUM_THREADS="1")
    args = ["experiment=scenes_hps", "debug=smoke", "trainer=ddp", "trainer.max_epochs=1", f"balancer={name}",
            "viz.num_samples=0", "+callbacks.digest._target_=ddp_worker.ParamDigest",
            f"+callbacks.digest.out={tmp_path / 'digest'}"]
    proc = subprocess.run([sys.executable, "-m", "mtl.cli.train", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "digest" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert int(r0["steps"]) > 0
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"{name}: {key} diverged across replicas"
