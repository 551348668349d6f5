"""Replacing a folder output (overwrite=true): the old folder is never absent from its name."""
import errno
import sys

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
