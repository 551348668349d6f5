"""A merge killed with SIGKILL while writing leaves nothing behind once the next merge runs."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import merging
from merging_toys import make_models, save_models

# The child merges into <root>/out; a source that blocks on one tensor holds it inside the write,
# after its temporary folder exists.
CHILD = textwrap.dedent("""
    import sys, time
    import merging
    from merging.sources import open_source

    class Blocking(type(open_source(sys.argv[1]))):
        def get(self, key):
            if key == sys.argv[4]:
                print("writing", flush=True)
                time.sleep(600)
            return super().get(key)

        def read_into(self, key, start, out):  # the chunked kernels read this way
            if key == sys.argv[4]:
                self.get(key)
            return super().read_into(key, start, out)

    pre = Blocking(sys.argv[1] + "/model.safetensors")
    merging.merge_to_file("task_arithmetic", pre, sys.argv[2].split(","), sys.argv[3], lam=0.3)
""")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_killed_merge_leaves_no_temporaries(tmp_path):
    pre, fts = make_models(T=2, seed=3)
    (tmp_path / "in").mkdir()
    pre_dir, ft_dirs = save_models(tmp_path / "in", pre, fts)
    root = tmp_path / "root"
    root.mkdir()
    out = root / "out"
    last_key = list(pre)[-1]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(pre_dir), ",".join(map(str, ft_dirs)), str(out), last_key],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        hidden = [p.name for p in root.iterdir()]
        assert hidden and all(n.startswith(".out.") for n in hidden), hidden  # the temporary folder exists
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    # the next merge to the same place succeeds and removes the dead writer's temporary folder
    path = merging.merge_to_file("task_arithmetic", pre_dir, ft_dirs, out, lam=0.3)
    assert sorted(p.name for p in root.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    want = merging.merge("task_arithmetic", pre, fts, lam=0.3)
    got = merging.load_state_dict(path)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    from mtl.io import atomic_path

    live = tmp_path / f".x.tmp-{os.getpid()}-abc"
    live.mkdir()
    with atomic_path(tmp_path / "x") as tmp:
        tmp.write_text("1")
    assert live.is_dir() and (tmp_path / "x").read_text() == "1"
