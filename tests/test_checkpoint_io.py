"""Checkpoints appear whole under their name or not at all (a full disk once left a truncated last.ckpt)."""
import errno

import pytest
import torch

from mtl.checkpoint_io import AtomicCheckpointIO


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 100)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1


def test_a_full_disk_under_torchs_zip_writer_is_named_as_such(tmp_path, monkeypatch):
    """torch's zip writer reports a failed write as "RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos ..."; the checkpoint writer names the file and the cause instead, and closes the file."""
    import builtins

    import mtl.checkpoint_io as checkpoint_io

    opened = []

    class FullAfter:
        def __init__(self, f, limit):
            self.f, self.left = f, limit

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def tiny_disk(path, mode="r", *a, **kw):
        f = FullAfter(builtins.open(path, mode, *a, **kw), 2000)
        opened.append(f)
        return f

    monkeypatch.setattr(checkpoint_io, "open", tiny_disk, raising=False)
    path = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(OSError, match=r"last\.ckpt: cannot write this output \(No space left on device\)"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.randn(100_000)}, path)
    assert opened and all(f.f.closed for f in opened)  # its space is given back now, not at garbage collection
    assert not path.parent.exists() or list(path.parent.iterdir()) == []


def test_training_runs_write_checkpoints_through_it(tmp_path):
    from mtl.train import run

    seen = []
    original = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        seen.append(str(path))
        return original(self, checkpoint, path, storage_options)

    AtomicCheckpointIO.save_checkpoint = spy
    try:
        run(["experiment=scenes_hps", "debug=smoke", "logger=none", "viz.num_samples=0", "task=[depth]"],
            run_dir=tmp_path / "r")
    finally:
        AtomicCheckpointIO.save_checkpoint = original
    assert any(p.endswith("last.ckpt") for p in seen)
