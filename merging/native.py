"""A small C kernel for the element-wise chunk steps (task arithmetic, plain average, TIES's merge and
its radix-select histograms), compiled at first use with the system C compiler and loaded with ctypes.

The chunked torch path runs ~14 single-threaded eager operations per chunk (conversions, subtractions,
additions, the finite check), so it is bound by the number of operations. The C code reads the chunk
from the input files itself (`pread_merge`, block by block so that each block is merged while in
cache) and makes one pass over it with the same float32 roundings in the same order
(`csrc/chunk_kernels.c`), so the results are bit-identical (tested on random data and on whole merges).

It is an automatic fast path: with `MTLKIT_NATIVE=0`, without a C compiler (`$CC`, `cc`, `gcc`,
`clang`) or when the compilation fails, `library()` returns None and the torch path runs (the reason is
logged at debug level; a cache folder that cannot be written is a warning). The shared object is cached in
`$MTLKIT_KERNEL_CACHE`, else `$MTL_DATA_CACHE/kernels`, falling back to `$XDG_CACHE_HOME/mtlkit/kernels` (default
`~/.cache/mtlkit/kernels`) where that cannot be written (`cache_dirs`), named by a hash of the source,
the compiler, its flags and the CPU, and written atomically (flushed to disk before the rename) with a
``.sha256`` record of its size and digest: a cached object that does not match its record (truncated,
overwritten) is never loaded but rebuilt (a truncated one would kill the process with SIGBUS). ctypes
releases the GIL during a call, so the chunk worker threads run the kernel in parallel.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from mtl.atomic import home_folder, make_parents, user_path

__all__ = ["BLOCK", "DTYPES", "average", "enabled", "library", "pread_merge", "pread_ties", "task_arithmetic", "ties",
           "ties_hist"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "chunk_kernels.c"
#: input/output dtypes the kernel handles (computing in float32), by the C code's dtype code
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
#: entries per block of `pread_merge`: the inputs of one block (T + 1 of them) stay in the L2 cache
BLOCK = 1 << 16
# no -ffast-math: IEEE semantics; no contraction: a*b+c stays two roundings unless written as fmaf
_FLAGS = ["-O3", "-fno-fast-math", "-ffp-contract=off", "-fPIC", "-shared", "-std=c99"]
# tried in order: GCC's unroll-and-jam interleaves the passes over the inputs and made the average
# ~5× slower from T = 4 on (no effect on the results); a compiler without these flags gets fewer
_VARIANTS = [["-march=native", "-fno-loop-unroll-and-jam"], ["-march=native"], []]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    """False when the environment switches the native kernel off (`MTLKIT_NATIVE=0`)."""
    return os.environ.get("MTLKIT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dirs() -> list[Path]:
    """Where the kernel is cached, first choice first: ``$MTLKIT_KERNEL_CACHE`` alone where set; else
    ``$MTL_DATA_CACHE/kernels`` (the variable that moves mtlkit's data cache moves this one too), then
    ``$XDG_CACHE_HOME/mtlkit/kernels`` (default ``~/.cache/mtlkit/kernels``) where that one cannot be read or
    written (a read-only data cache keeps the fast path). Set but empty counts as unset; a leading ``~`` is expanded
    (`user_path`), as in every mtlkit path (it made a literal ``./~``). Without an absolute home folder
    (`mtl.atomic.home_folder`) the default is left out: it would be a folder under the working directory."""
    if os.environ.get("MTLKIT_KERNEL_CACHE"):
        return [user_path(os.environ["MTLKIT_KERNEL_CACHE"])]
    data = os.environ.get("MTL_DATA_CACHE")
    folders = [user_path(data) / "kernels"] if data else []
    if os.environ.get("XDG_CACHE_HOME"):
        return [*folders, user_path(os.environ["XDG_CACHE_HOME"]) / "mtlkit" / "kernels"]
    try:
        return [*folders, Path(home_folder()) / ".cache" / "mtlkit" / "kernels"]
    except ValueError:
        return folders


def cache_dir() -> Path | None:
    """The first choice of `cache_dirs` (None: there is none)."""
    return next(iter(cache_dirs()), None)


class _CacheUnwritable(OSError):
    """The kernel cache folder cannot be made or written: no flag variant can be built there."""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """The CPU's identity for the cache key (-march=native code must not run on another CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record(target: Path) -> Path:
    """The sidecar of a cached shared object: ``<size> <sha256>`` of the file `_compile` wrote."""
    return target.with_name(target.name + ".sha256")


def _verified(target: Path) -> bool | None:
    """True when `target` is whole (its size and sha256 match its record); False when it is damaged (truncated,
    overwritten); None when it or its record is missing (not built yet, or built by a version without records) or
    this user may not read it (another user's 0600 file): rebuilt either way.
    A damaged shared object must never be loaded: a truncated one dies with SIGBUS when mapped."""
    try:
        size, digest = _record(target).read_text().split()
        return target.stat().st_size == int(size) and _digest(target) == digest
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as e:  # another user's file, not damage: rebuilt in place (or the next folder's used)
        log.debug("native kernel: cannot read %s (%s); rebuilding it", e.filename or target, e.strerror)
        return None
    except (OSError, ValueError):
        return False


def _replace_synced(tmp: str, target: Path) -> None:
    """Flush `tmp` to disk, then rename it onto `target` and flush the folder (a crash leaves the old file or
    the whole new one, never a truncated one under `target`'s name)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot flush a folder
        pass
    finally:
        os.close(fd)


def _compile(cc: str, flags: list[str], target: Path) -> bool:
    tmps = []
    try:
        try:
            make_parents(target.parent)
            fd, tmp = tempfile.mkstemp(prefix=".chunk_kernels-", suffix=".so", dir=target.parent)
        except OSError as e:
            raise _CacheUnwritable(e.errno, f"cannot write the kernel cache {target.parent} ({e.strerror})") from e
        os.fchmod(fd, 0o755)  # as a linker's output: mkstemp makes 0600, which no other user of the cache can read
        os.close(fd)
        tmps.append(tmp)
        r = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log.debug("native kernel: %s failed: %s", cc, r.stderr.strip()[-500:])
            return False
        fd, rec = tempfile.mkstemp(prefix=".chunk_kernels-", suffix=".sha256", dir=target.parent)
        tmps.append(rec)
        os.fchmod(fd, 0o644)  # readable like the object itself (mkstemp makes 0600): a shared cache is checked by all
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.path.getsize(tmp)} {_digest(Path(tmp))}\n")
        # the object first, then its record: a kill in between leaves an object without a matching record,
        # which the next process rebuilds
        for src, dst in ((tmp, target), (rec, _record(target))):
            try:
                _replace_synced(src, dst)
            except PermissionError as e:  # another user's file in a sticky folder (/tmp-like)
                raise _CacheUnwritable(e.errno, f"cannot replace {dst} in the kernel cache ({e.strerror})") from e
        return True
    except _CacheUnwritable:
        raise
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("native kernel: compiling with %s failed: %s", cc, e)
        return False
    finally:
        for t in tmps:
            if os.path.exists(t):
                os.unlink(t)


def _build() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        log.debug("native kernel: no C compiler found; using the torch chunk path")
        return None
    real = os.path.realpath(cc)
    st = os.stat(real)
    version = f"{real}:{st.st_size}:{st.st_mtime_ns}"  # the compiler's identity, without running it
    folders = cache_dirs()
    if not folders:  # no variable names one, and ~/.cache would be relative: the reason is home_folder's
        try:
            home_folder()
        except ValueError as e:
            log.warning("native kernel: no kernel cache folder: %s; using the slower torch chunk path (or set "
                        "MTLKIT_KERNEL_CACHE to a writable folder)", e)
        return None
    for i, folder in enumerate(folders):
        try:
            return _build_in(folder, cc, version)
        except _CacheUnwritable as e:  # the next folder; after the last a warning: the merge runs, but slower
            if i + 1 < len(folders):
                log.debug("native kernel: %s; trying %s", e.strerror, folders[i + 1])
                continue
            log.warning("native kernel: %s; using the slower torch chunk path (set MTLKIT_KERNEL_CACHE to a "
                        "writable folder)", e.strerror)
    return None


def _build_in(folder: Path, cc: str, version: str) -> ctypes.CDLL | None:
    """The kernel from (or compiled into) ``folder``, trying each flag variant; raises `_CacheUnwritable` where the
    folder cannot be read or written."""
    source = SOURCE.read_bytes()
    for flags in (_FLAGS + v for v in _VARIANTS):
        key = hashlib.sha256(b"\0".join([source, cc.encode(), version.encode(), " ".join(flags).encode(),
                                         _cpu_id().encode()])).hexdigest()[:24]
        target = folder / f"chunk_kernels-{key}.so"
        try:
            whole = _verified(target)
            if whole is False:
                log.warning("native kernel: %s does not match its size and sha256 record %s (truncated or "
                            "overwritten); rebuilding it", target, _record(target).name)
            if not whole and not _compile(cc, flags, target):
                continue
            lib = ctypes.CDLL(str(target))
        except _CacheUnwritable:
            raise
        except OSError as e:
            log.debug("native kernel: loading %s failed: %s", target, e)
            continue
        _declare(lib)
        return lib
    log.debug("native kernel: compilation failed; using the torch chunk path")
    return None


def _declare(lib: ctypes.CDLL) -> None:
    ptrs = ctypes.POINTER(ctypes.c_void_p)
    lib.mtl_task_arithmetic.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ptrs,
                                        ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_void_p]
    lib.mtl_task_arithmetic.restype = ctypes.c_int
    lib.mtl_average.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ptrs, ctypes.c_void_p]
    lib.mtl_average.restype = ctypes.c_int
    lib.mtl_pread_merge.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                                    ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int64),
                                    ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_void_p]
    lib.mtl_pread_merge.restype = ctypes.c_int
    i32, i64, f32 = (ctypes.POINTER(c) for c in (ctypes.c_int32, ctypes.c_int64, ctypes.c_float))
    lib.mtl_ties.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ptrs, f32, ctypes.c_float, ctypes.c_int,
                             ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
    lib.mtl_ties.restype = ctypes.c_int
    lib.mtl_ties_hist.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ptrs, i32, ctypes.c_void_p]
    lib.mtl_ties_hist.restype = ctypes.c_int
    lib.mtl_pread_ties.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_int), i64, f32,
                                   ctypes.c_float, ctypes.c_int, ctypes.c_float, i32, ctypes.c_void_p, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.mtl_pread_ties.restype = ctypes.c_int
    for name in ("mtl_f32_to_bf16", "mtl_bf16_to_f32"):
        getattr(lib, name).argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        getattr(lib, name).restype = None


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (switched off, no compiler, compilation failed). Built once
    per process."""
    global _lib, _tried
    if not enabled():
        return None
    with _lock:
        if not _tried:
            _tried = True
            _lib = _build()
        return _lib


def _pointers(xs: list[torch.Tensor]):
    return (ctypes.c_void_p * len(xs))(*(x.data_ptr() for x in xs))


def _check(xs: list[torch.Tensor], out: torch.Tensor) -> int:
    code = DTYPES[out.dtype]
    n = out.numel()
    for x in xs:
        if x.dtype != out.dtype or x.numel() != n or not x.is_contiguous() or x.device.type != "cpu":
            raise ValueError("native kernel: inputs must be contiguous CPU tensors of the output's dtype and size")
    if not out.is_contiguous():
        raise ValueError("native kernel: the output must be contiguous")
    return code


def float32_lams(lams) -> list[float] | None:
    """λs as the float32 values torch's scalar operations use, or None when one is not finite there."""
    vals = [float(ctypes.c_float(float(v)).value) for v in lams]
    return vals if all(abs(v) < float("inf") for v in vals) else None


def task_arithmetic(lib: ctypes.CDLL, xs: list[torch.Tensor], lams, scalar: bool, out: torch.Tensor) -> bool:
    """θ0 + Σ λ_t (θ_t − θ0) into `out` (xs = [θ0, θ_1, ..., θ_T], same dtype as `out`, float32 or
    bfloat16); `scalar`: one λ (`lams[0]`) applied to the sum. False when a result is not finite."""
    code = _check(xs, out)
    c_lams = (ctypes.c_float * len(lams))(*lams)
    return lib.mtl_task_arithmetic(code, out.numel(), len(xs) - 1, _pointers(xs), c_lams, int(scalar),
                                   out.data_ptr()) == 0


def average(lib: ctypes.CDLL, xs: list[torch.Tensor], out: torch.Tensor) -> bool:
    """(θ_1 + ... + θ_T) / T into `out` (xs = [θ_1, ..., θ_T]). False when a result is not finite."""
    code = _check(xs, out)
    return lib.mtl_average(code, out.numel(), len(xs), _pointers(xs), out.data_ptr()) == 0


KINDS = {"task_arithmetic": 0, "average": 1}


def _file_args(spans: list[tuple[int, int]], start: int, size: int, scratch: torch.Tensor):
    """The C arrays of file descriptors and byte positions of entry `start` (entries of `size` bytes),
    once the scratch is checked to hold len(spans) blocks."""
    if scratch.numel() * scratch.element_size() < len(spans) * BLOCK * size:
        raise ValueError("native kernel: a scratch of len(spans) · BLOCK entries needed")
    fds = (ctypes.c_int * len(spans))(*(fd for fd, _ in spans))
    pos = (ctypes.c_int64 * len(spans))(*(off + start * size for _, off in spans))
    return fds, pos


def pread_merge(lib: ctypes.CDLL, kind: str, spans: list[tuple[int, int]], start: int, out: torch.Tensor,
                scratch: torch.Tensor, lams=(1.0,), scalar: bool = True) -> int:
    """`task_arithmetic` / `average` of entries [start, start + out.numel()) read straight from files:
    source i's entry 0 is at byte spans[i][1] of file descriptor spans[i][0], in `out`'s dtype (task
    arithmetic: sources θ0, θ_1..θ_T; average: θ_1..θ_T). Reads and merges `BLOCK` entries at a time;
    `scratch` holds at least len(spans) · BLOCK entries of `out`'s dtype. Returns 0, 1 when a result is
    not finite, or -2 - i when source i could not be read."""
    if not out.is_contiguous():
        raise ValueError("native kernel: the output must be contiguous")
    fds, pos = _file_args(spans, start, out.element_size(), scratch)
    c_lams = (ctypes.c_float * len(lams))(*lams)
    return lib.mtl_pread_merge(KINDS[kind], DTYPES[out.dtype], out.numel(), len(spans), fds, pos, c_lams,
                               int(scalar), BLOCK, scratch.data_ptr(), out.data_ptr())


#: float32 entries per task of TIES's work buffer (the C code's inner block)
TIES_WORK = 512
#: counters per task of the radix histograms (16 bits at a time); the kernel fills SUBHISTS interleaved
#: copies per task, summed by the caller
BUCKETS = 1 << 16
SUBHISTS = 4


def _ties_args(T: int, thr, zero_sign: float, mean: bool, lam: float, work: torch.Tensor):
    """The merge's scalar arguments (its work buffer checked)."""
    if work.dtype != torch.float32 or work.numel() < T * TIES_WORK:
        raise ValueError(f"native kernel: work must hold {T} × {TIES_WORK} float32")
    return (ctypes.c_float * T)(*thr), ctypes.c_float(zero_sign), int(mean), ctypes.c_float(lam)


def _hist_args(T: int, prefix, hist: torch.Tensor):
    if hist.dtype != torch.int64 or not hist.is_contiguous() or hist.numel() != T * SUBHISTS * BUCKETS:
        raise ValueError(f"native kernel: hist must be a contiguous int64 tensor of {T} × {SUBHISTS} × {BUCKETS} "
                         "counters")
    return (ctypes.c_int32 * T)(*prefix), hist.data_ptr()


def ties(lib: ctypes.CDLL, xs: list[torch.Tensor], thr, zero_sign: float, mean: bool, lam: float,
         out: torch.Tensor, work: torch.Tensor) -> bool:
    """TIES's chunk step (`merging.kernels._ties`) into `out`: xs = [θ0, θ_1, ..., θ_T] in `out`'s dtype,
    thr = the T float32 thresholds, zero_sign = FusionBench's sign for γ = 0 (0: none), `work` at least
    T · TIES_WORK float32. False when a τ or a result is not finite."""
    code, T = _check(xs, out), len(xs) - 1
    return lib.mtl_ties(code, out.numel(), T, _pointers(xs), *_ties_args(T, thr, zero_sign, mean, lam, work),
                        work.data_ptr(), out.data_ptr()) == 0


def ties_hist(lib: ctypes.CDLL, xs: list[torch.Tensor], prefix, hist: torch.Tensor) -> bool:
    """Add this chunk's radix histograms of |τ_t| to `hist` (T × SUBHISTS × BUCKETS int64; the task's
    histogram is the sum over the SUBHISTS axis): prefix[t] = -1 counts
    the top 16 bits of the float32 |τ_t|, prefix[t] ≥ 0 the low 16 bits of those whose top bits equal
    it, -2 skips task t. False when a τ is not finite."""
    code = _check(xs[1:], xs[0])
    T = len(xs) - 1
    return lib.mtl_ties_hist(code, xs[0].numel(), T, _pointers(xs), *_hist_args(T, prefix, hist)) == 0


def pread_ties(lib: ctypes.CDLL, spans: list[tuple[int, int]], start: int, n: int, dtype: torch.dtype,
               scratch: torch.Tensor, *, thr=None, zero_sign: float = 0.0, mean: bool = True, lam: float = 1.0,
               work: torch.Tensor | None = None, out: torch.Tensor | None = None, prefix=None,
               hist: torch.Tensor | None = None) -> int:
    """`ties` (with `out`, `work`) or `ties_hist` (with `prefix`, `hist`) of entries [start, start + n)
    read straight from the files (spans as in `pread_merge`: θ0 first). Returns 0, 1 when a τ or a
    result is not finite, or -2 - i when source i could not be read."""
    code, T = DTYPES[dtype], len(spans) - 1
    fds, pos = _file_args(spans, start, dtype.itemsize, scratch)
    if hist is not None:
        c_prefix, c_hist = _hist_args(T, prefix, hist)
        return lib.mtl_pread_ties(code, n, len(spans), fds, pos, None, 0.0, 0, 1.0, c_prefix, c_hist, BLOCK,
                                  scratch.data_ptr(), None, None)
    if out is None or work is None or out.dtype != dtype or not out.is_contiguous() or out.numel() != n:
        raise ValueError("native kernel: the TIES merge needs a contiguous `out` of n entries and a `work` buffer")
    return lib.mtl_pread_ties(code, n, len(spans), fds, pos, *_ties_args(T, thr, zero_sign, mean, lam, work),
                              None, None, BLOCK, scratch.data_ptr(), work.data_ptr(), out.data_ptr())
