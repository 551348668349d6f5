"""Replacing a folder output (overwrite=true): the old folder is never absent from its name."""
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mtl import atomic
from mtl.atomic import atomic_path


def _spy(monkeypatch, calls):
    real_rmtree, real_replace, real_renameat2 = atomic.shutil.rmtree, atomic.os.replace, atomic._renameat2

    def rmtree(p, *a, **kw):
        calls.append(("rmtree", sorted(str(f.relative_to(p)) for f in p.rglob("*"))))
        real_rmtree(p, *a, **kw)

    def replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    def renameat2(src, dst, flags):
        calls.append(("renameat2", flags))
        return real_renameat2(src, dst, flags)

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(atomic, "_renameat2", renameat2)


def _old_folder(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "old.txt").write_text("old")
    return path


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_a_folder_is_swapped_into_place_in_one_step_on_linux(tmp_path, monkeypatch):
    probe = [tmp_path / "probe_a", tmp_path / "probe_b"]
    for p in probe:
        p.mkdir()
    err = atomic._renameat2(*probe, 2)  # RENAME_EXCHANGE
    for p in probe:
        p.rmdir()
    if err is None or err in atomic._UNSUPPORTED:  # an old glibc, or a file system without the flag
        pytest.skip(f"renameat2(RENAME_EXCHANGE) is unsupported here ({errno.errorcode.get(err, 'no renameat2')})")
    path, calls = _old_folder(tmp_path), []
    _spy(monkeypatch, calls)
    with atomic_path(path, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert ("renameat2", 2) in calls  # RENAME_EXCHANGE
    assert not [c for c in calls if c[0] == "replace"]  # the old folder was never moved away from its name
    # the temporary removed afterwards held the old folder, swapped out under the temporary's name
    assert ("rmtree", ["model", "model/old.txt"]) in calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in path.iterdir()] == ["new.txt"]


def test_without_the_exchange_the_folder_is_replaced_by_two_renames(tmp_path, monkeypatch):
    path, calls = _old_folder(tmp_path), []
    _spy(monkeypatch, calls)
    monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: errno.EINVAL)  # a file system without it
    with atomic_path(path, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert [c[0] for c in calls if c[0] == "replace"] == ["replace", "replace"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in path.iterdir()] == ["new.txt"]


@pytest.mark.parametrize("exchange", [errno.EBUSY, errno.EINVAL])  # refused by the swap, or by the fallback's rename
def test_an_output_that_cannot_be_renamed_over_is_named_with_the_reason(tmp_path, monkeypatch, exchange):
    """A mount point as the output (the temporary is made beside it): renaming over it fails with EBUSY, which was
    given bare ('[Errno 16] Device or resource busy: <out>'), naming neither the reason nor what to do."""
    path, real_replace = _old_folder(tmp_path), os.replace

    def replace(src, dst):
        if Path(src) == path:  # the fallback moves the old folder aside first
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        real_replace(src, dst)

    monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: exchange)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match=rf"^\[Errno {errno.EBUSY}\] {path}: cannot write this output \(it is a mount "
                                      r"point or in use, so it cannot be replaced; write to a folder inside it\)$"):
        with atomic_path(path, overwrite=True) as tmp:
            tmp.mkdir()
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left
    assert [p.name for p in path.iterdir()] == ["old.txt"]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_old_folder_of_a_writer_killed_between_the_two_renames_is_restored(tmp_path):
    """Its .old- folder is the output's only copy: the next writer deleted it as a stale temporary."""
    path = tmp_path / "model"
    old = tmp_path / f".model.old-{_dead_pid()}-"
    old.mkdir()
    (old / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="the new writer fails"), atomic_path(path, overwrite=True) as tmp:
        tmp.mkdir()
        raise RuntimeError("the new writer fails")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (path / "old.txt").read_text() == "old"
    with pytest.raises(FileExistsError, match="exists; pass overwrite"):  # it is there again for everyone
        with atomic_path(path, overwrite=False):
            pass


def test_only_this_hosts_temporaries_are_judged_by_their_pid(tmp_path, monkeypatch):
    """On a folder shared between nodes, a pid that is dead here may be a live writer elsewhere: its temporary was
    deleted (and its .old- folder taken over) under it. Another host's entries are left alone; this host's and
    untagged (older) ones with a dead pid are cleared up."""
    monkeypatch.setattr(atomic, "host_tag", lambda: "0123abcd", raising=False)
    path, dead = tmp_path / "model", _dead_pid()
    theirs = [tmp_path / f".model.tmp-{dead}@9876fedc-abc", tmp_path / f".model.old-{dead}@9876fedc-"]
    stale = [tmp_path / f".model.tmp-{dead}@0123abcd-abc", tmp_path / f".model.tmp-{dead}-def"]
    for p in theirs + stale:
        p.mkdir()
        (p / "x.txt").write_text("x")
    with atomic_path(path) as tmp:
        tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", *(p.name for p in theirs)])
    assert (theirs[1] / "x.txt").read_text() == "x"  # not restored in place of `path` either


def test_temporaries_carry_this_writers_pid_and_host(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: errno.EINVAL)  # the .old- folder is made too
    real = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (seen.append(Path(dst).name), real(src, dst)))
    path = _old_folder(tmp_path)
    with atomic_path(path) as tmp:
        seen.append(tmp.parent.name)
        tmp.mkdir()
    writer = f"{os.getpid()}@{atomic.host_tag()}-"
    assert seen[0].startswith(f".model.tmp-{writer}") and f".model.old-{writer}" in seen


_KILLED_BETWEEN_THE_RENAMES = """
import errno, os, signal, sys
from mtl import atomic
atomic._renameat2 = lambda src, dst, flags: errno.EINVAL  # macOS, NFS, an old glibc
real, calls = os.replace, []
def replace(src, dst):
    calls.append(src)
    if len(calls) == 2:  # the old folder is aside, the new one not yet in its place
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
atomic.os.replace = replace
with atomic.atomic_path(sys.argv[1], overwrite=True) as tmp:
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_kill_in_the_fallback_replace_loses_no_folder(tmp_path):
    path = _old_folder(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_THE_RENAMES, str(path)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not path.exists() and [p.name for p in tmp_path.glob(".model.old-*")]  # the state the kill leaves
    with atomic_path(path, overwrite=True) as tmp:
        assert (path / "old.txt").read_text() == "old"  # back before the new one is written
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in path.iterdir()] == ["new.txt"]


def test_no_permission_to_read_an_input_beside_the_output_is_the_inputs_error(tmp_path):
    """EACCES on model/model.safetensors while export.onnx is written: an input that cannot be read,
    left as it is; a full disk naming the same file is still the output's storage error."""
    out, source = tmp_path / "export.onnx", str(tmp_path / "model" / "model.safetensors")
    with pytest.raises(PermissionError) as e:
        with atomic_path(out):
            raise PermissionError(errno.EACCES, "Permission denied", source)
    assert e.value.filename == source and str(out) not in str(e.value)
    with pytest.raises(OSError, match=rf"^\[Errno {errno.ENOSPC}\] {out}: cannot write this output"):
        with atomic_path(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), source)


@pytest.mark.parametrize("named", ["temporary", "output", "missing parent"])
def test_no_permission_to_write_the_output_names_the_output(tmp_path, named):
    out = tmp_path / "new" / "export.onnx"
    with pytest.raises(PermissionError, match=rf"^\[Errno {errno.EACCES}\] {out}: cannot write this output "
                                              r"\(Permission denied\)$"):
        with atomic_path(out) as tmp:
            name = {"temporary": tmp, "output": out, "missing parent": tmp_path / "new"}[named]
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
