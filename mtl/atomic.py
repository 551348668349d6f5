"""Atomic writing: an output appears whole under its name, or not at all.

Kept free of torch, so that a run interrupted while torch is still importing can still be marked
(`mtl.cli.failures`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from mtl.registry import check_bool

__all__ = ["atomic_path", "user_path", "home_folder", "make_parents", "remove_empty", "alive", "cannot_replace"]

log = logging.getLogger(__name__)
#: no room or no writing at all: what the output's writer meets, whichever file it names
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
#: no permission: an input's error as much as an output's, so it counts only when it names the output
PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM)


def user_path(path: str | os.PathLike) -> Path:
    """`path` with a leading ``~`` (``~user``) expanded: how every mtlkit reader and writer takes a path, so that a
    folder written to ``~/m`` is read back as ``~/m`` (not written to a literal ``./~/m``)."""
    return Path(os.path.expanduser(os.fspath(path)))


def home_folder() -> str:
    """The folder a leading ``~`` means ($HOME, else the password database's), which must be absolute: else a
    ValueError asking for one (mtlkit's caches under it would go to the working folder: a literal ``./~``, or a
    relative $HOME)."""
    home = os.path.expanduser("~")
    if not os.path.isabs(home):
        why = (f"$HOME={home!r} is not an absolute path" if "HOME" in os.environ else
               "$HOME is unset and the password database has none for this user")
        raise ValueError(f"no home folder ({why}): set HOME, or MTL_DATA_CACHE for mtlkit's caches")
    return home


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path`, on error it is removed.

    Works for files and folders, so no reader ever sees a half-written output. Missing parent folders
    are created; on error the ones created here are removed again (each only while empty). A symbolic link
    at `path` (dangling or not) is the output's name: the link itself is replaced, its target never written.
    `path` is made absolute first (a leading ``~`` expanded), so that "." or "sub/.." name a folder like any other.
    """
    check_bool("overwrite", overwrite)
    path = Path(os.path.abspath(user_path(path)))
    _remove_stale_temps(path)  # first: a killed writer's only copy of `path` is put back before anything looks
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (overwrite=true on the command line) to replace it")
    created: list[Path] = []
    done = replacing = False
    try:
        _check_parent(path)
        created = make_parents(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_writer()}-", dir=path.parent)) / path.name
        try:
            yield tmp
            replacing = True
            if path.is_symlink() and (overwrite or not path.exists()):  # the link, not its target, is replaced
                _replace_folder(tmp, path) if tmp.is_dir() else os.replace(tmp, path)
            elif not overwrite:  # another writer may have made `path` meanwhile: never replace its output
                try:
                    _rename_no_replace(tmp, path)
                except FileExistsError:
                    raise FileExistsError(f"{path} appeared while this output was written (another writer?); "
                                          "it was left as it is and this one discarded") from None
            elif path.is_dir() and not path.is_symlink():
                if not tmp.is_dir():  # a folder is replaced by a folder only: it may hold anyone's files
                    raise IsADirectoryError(f"{path} is a folder; refusing to replace it with a file")
                _replace_folder(tmp, path)
            else:
                os.replace(tmp, path)
            done = True
        finally:
            shutil.rmtree(tmp.parent, ignore_errors=True)
    except Exception as e:  # a full disk or read-only place: name the output, not a hidden temporary
        if replacing and isinstance(e, OSError) and e.errno == errno.EBUSY:
            raise cannot_replace(path) from e
        code = storage_errno(e, path)
        if code is None or str(e).startswith(f"[Errno {code}] {path}: "):
            raise
        raise OSError(code, f"{path}: cannot write this output ({os.strerror(code)})") from e
    finally:
        if not done:
            remove_empty(created)


class OutputExists(FileExistsError):
    """An existing output that overwrite would replace, advised in the Python API's spelling: a CLI checking its output
    first (`start_run`) leaves this to its own check, which spells it as typed (overwrite=true)."""

    def __init__(self, path: Path):
        super().__init__(f"{path} exists; pass overwrite=True to replace it")


def cannot_replace(path: Path) -> OSError:
    """The error for an output that cannot be renamed over (EBUSY: a mount point, a folder in use), in the form of
    the storage errors: `atomic_path`'s at its last step, a job's before its run folder (`start_run`)."""
    return OSError(errno.EBUSY, f"{path}: cannot write this output (it is a mount point or in use, so it cannot be "
                                "replaced; write to a folder inside it)")


def storage_errno(error: BaseException, path: Path) -> int | None:
    """The errno of a storage failure writing ``path`` in ``error`` or what it wraps (an exporter's own error
    around the OSError); None for anything else, which is left as it is. A full disk, quota or read-only place
    counts when the OSError names no file or one under ``path``'s folder. No permission counts only when it
    names ``path``, its temporary or a parent folder of it: an input beside the output that cannot be read
    (``model/model.safetensors``) is the input's error, not the output's."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS + PERMISSION_ERRNOS:
            if error.filename is None or _names_the_output(Path(os.path.abspath(os.fsdecode(error.filename))),
                                                           Path(os.path.abspath(path)), error.errno):
                return error.errno
        error = error.__cause__ or error.__context__
    return None


def _names_the_output(name: Path, path: Path, code: int) -> bool:
    if path.parent.is_relative_to(name):  # the output's folder or a parent that could not be made
        return True
    if code not in PERMISSION_ERRNOS:
        return name.is_relative_to(path.parent)
    temporary = name.relative_to(path.parent).parts[0] if name.is_relative_to(path.parent) else ""
    return name.is_relative_to(path) or temporary.startswith(f".{path.name}.tmp-")


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
#: what renameat2 answers where the kernel or the file system lacks a flag: the portable path is taken instead
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _renameat2(src: Path, dst: Path, flags: int) -> int | None:
    """Linux ``renameat2(src, dst, flags)``: 0 on success, else the errno; None where libc has no renameat2."""
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
    if renameat2 is None:
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    return 0 if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0 else ctypes.get_errno()


def _replace_folder(new: Path, path: Path) -> None:
    """Put folder ``new`` in the place of folder ``path``; the old folder ends under ``new``'s name (the caller
    removes it). Linux swaps the two in one step (RENAME_EXCHANGE), so ``path`` is never absent, not even
    after a kill; elsewhere the old folder is moved aside first, and a kill between the two renames leaves
    it under ``.<name>.old-<pid>@<host tag>-``."""
    err = _renameat2(new, path, _RENAME_EXCHANGE)
    if err == 0:
        return
    if err is not None and err not in _UNSUPPORTED:
        raise OSError(err, os.strerror(err), str(path))
    old = path.with_name(f".{path.name}.old-{_writer()}-")
    os.replace(path, old)
    os.replace(new, path)
    old.unlink() if old.is_symlink() else shutil.rmtree(old, ignore_errors=True)


def _rename_no_replace(src: Path, dst: Path) -> None:
    """``os.rename`` that raises FileExistsError when ``dst`` exists, atomically (Linux renameat2 with
    RENAME_NOREPLACE; elsewhere a hard link for a file, a ``mkdir`` claim for a folder)."""
    err = _renameat2(src, dst, _RENAME_NOREPLACE)
    if err == 0:
        return
    if err == errno.EEXIST:
        raise FileExistsError(errno.EEXIST, os.strerror(err), str(dst))
    if err is not None and err not in _UNSUPPORTED:  # a file system without the flag: below
        raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir():
        os.mkdir(dst)  # the claim: FileExistsError when taken; the rename then replaces our own empty folder
        os.replace(src, dst)
    else:
        os.link(src, dst)
        os.unlink(src)


def _check_parent(path: Path) -> None:
    """Refuse an output under a file (``run.log/out``) naming the output, not the temporary beside it."""
    folder = path.parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{path}: cannot write this output ({folder} is a file, not a folder)")


def missing_parents(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing


def make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns the ones created here, deepest first."""
    created = []
    for d in reversed(missing_parents(folder)):
        try:
            d.mkdir()
        except FileExistsError:  # a concurrent writer made it: it is not ours to remove
            continue
        except BaseException:
            remove_empty(created[::-1])
            raise
        created.append(d)
    return created[::-1]


def remove_empty(folders: list[Path]) -> None:
    """Remove each folder (deepest first) while it is empty; one that is not empty stays, with its parents."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def _remove_stale_temps(path: Path) -> None:
    """Clear up after a killed writer of `path` (SIGKILL runs no cleanup).

    Temporaries are named ``.<name>.tmp-<pid>@<host tag>-*`` (and ``.<name>.old-<pid>@<host tag>-``); one of
    this host's (`host_tag`) whose process no longer exists is stale. A live process's (including a reused pid's)
    is left alone, and so is every other host's: on a folder shared between nodes (multi-node DDP, where each node
    prepares the data; a sweep on a shared cache) its pid says nothing here. Names without a tag (written by
    older versions) are judged by their pid alone, as before. A stale ``.old-`` folder while `path` is missing is
    the old output of a writer killed between `_replace_folder`'s two renames, its only copy: it is renamed back
    to `path`, not removed.
    """
    if os.name != "posix" or not path.parent.is_dir():
        return
    here = host_tag()
    for kind in ("old", "tmp"):
        head = f".{path.name}.{kind}-"
        stale = []
        for entry in path.parent.iterdir():
            writer = entry.name[len(head):].split("-", 1)[0] if entry.name.startswith(head) else ""
            pid, _, tag = writer.partition("@")
            if pid.isdigit() and tag in ("", here) and not alive(int(pid)):
                stale.append(entry)
        for entry in stale:
            if kind == "old" and not os.path.lexists(path) and _restored(entry, path):
                continue
            shutil.rmtree(entry, ignore_errors=True)


def _restored(old: Path, path: Path) -> bool:
    try:
        _rename_no_replace(old, path)
    except OSError:  # another writer restored or wrote `path` meanwhile: `old` is stale after all
        return False
    log.warning("%s: restored from %s, which a writer killed while replacing it left behind", path, old.name)
    return True


def _writer() -> str:
    """This process in its temporaries' names: ``<pid>@<host tag>``."""
    return f"{os.getpid()}@{host_tag()}"


def host_tag() -> str:
    """8 hex digits naming the pid space this process lives in: its host name and (Linux) pid namespace, so that
    two containers on one host sharing a folder do not judge each other's pids either. Not the boot id: a reboot
    ends every writer, and this host's temporaries from before it are still cleared up (their pids are dead or
    reused, as for any other)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
