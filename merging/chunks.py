"""Chunked streaming of merged tensors: `Chunks` runs a per-chunk function over a tensor on worker
threads with reusable workspaces and hands results back in order; `Streamed` carries them to the
writer. The per-method chunk functions live in `merging.kernels`.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

from .engine import Context, to_output_dtype
from .sources import TensorInfo

__all__ = ["DEFAULT_CHUNK", "ChunkFn", "Chunks", "Final", "Kernel", "Streamed", "Workspace", "chunked_streams",
           "stream_tensor"]

#: entries per chunk: 1 MB of float32 per buffer; TIES's buffers (T = 4: ~17 MB) stay in the L2/L3 caches
DEFAULT_CHUNK = 1 << 18


class Streamed:
    """A merged tensor produced as flat chunks in its output dtype, in order; can be consumed once.
    Each chunk is a reused buffer: write it out before asking for the next."""

    def __init__(self, info: TensorInfo, pieces: Iterator[torch.Tensor]):
        self.shape, self.dtype, self.numel = info.shape, info.dtype, info.numel
        self._pieces = pieces

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._pieces


class Final:
    """A chunk a kernel already produced in the output dtype and found finite (the native kernel):
    `stream_tensor` passes it on as it is."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class Workspace:
    """One worker's reusable chunk buffers (names are per kernel, each `chunk` entries)."""

    def __init__(self, chunks: "Chunks"):
        self.chunks = chunks
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def buf(self, name: str, dtype: torch.dtype, n: int, rows: int | None = None) -> torch.Tensor:
        """`n` entries, or with `rows` a (rows, n) view (also for one row: a kernel indexes it by row)."""
        b = self._bufs.get((name, dtype))
        if b is None:
            b = self._bufs[(name, dtype)] = torch.empty((rows or 1) * self.chunks.chunk, dtype=dtype)
        return b[:n] if rows is None else b[: rows * n].view(rows, n)

    def scratch(self, nbytes: int, name: str = "scratch") -> torch.Tensor:
        """A reusable byte buffer of `nbytes` (the native kernel's blocks, work space, histograms)."""
        b = self._bufs.get((name, torch.uint8))
        if b is None or b.numel() < nbytes:
            b = self._bufs[(name, torch.uint8)] = torch.empty(nbytes, dtype=torch.uint8)
        return b[:nbytes]

    def read(self, key: str, s: int, e: int, validate: list[bool] | None = None) -> list[torch.Tensor]:
        """[θ0, θ_1, ..., θ_T] entries [s, e) of `key` in compute dtype; sources flagged in `validate`
        are checked for NaN/Inf (a failure is reported for the whole tensor, naming the file)."""
        ctx = self.chunks.ctx
        info, cd = ctx.plan.infos[key], ctx.plan.compute[key]
        xs = []
        for i, src in enumerate(ctx.sources):
            raw = src.read_into(key, s, self.buf(f"raw{i}", info.dtype, e - s))
            x = raw if info.dtype == cd else self.buf(f"in{i}", cd, e - s).copy_(raw)
            if validate and validate[i] and not torch.isfinite(x.sum()):
                ctx._validate(src.get(key).to(cd), i, key)
            xs.append(x)
        return xs


ChunkFn = Callable[[Workspace, int, int], Any]


class _Ahead:
    """The next tensor's chunks started before its turn: the ranges still to start, and those running."""

    __slots__ = ("key", "fn", "ranges", "pending")

    def __init__(self, key: str, fn: ChunkFn, ranges: deque):
        self.key, self.fn, self.ranges, self.pending = key, fn, ranges, deque()


class Chunks:
    """Runs a per-chunk function over a tensor's chunks on `workers` threads (each with its own
    workspace, torch ops single-threaded) and hands the results back in order.

    Threads work on different chunks, so no thread waits for another inside an operation (torch's
    intra-op parallelism makes every operation wait for its slowest thread: costly on a busy machine).
    A workspace is reused only after its result has been consumed.

    `ahead(key)` (optional, set by `chunked_streams`) names the next tensor's (key, chunk function):
    once a tensor's last chunks are running, idle workers start the next tensor's first chunks, so
    that the workers never all wait at a tensor's end and then start the next in lockstep (both
    reading, then both computing — half the overlap of reads and arithmetic lost on every tensor).
    """

    def __init__(self, ctx: Context | None, chunk: int = DEFAULT_CHUNK, workers: int = 1, depth: int = 2):
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1024:
            raise ValueError(f"chunk must be an int ≥ 1024 (entries), got {chunk!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int ≥ 1, got {workers!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int ≥ 1, got {depth!r}")
        self.ctx, self.chunk, self.workers = ctx, chunk, workers
        # `depth` chunks queued per worker: a worker that finishes finds its next chunk waiting instead
        # of idling until the consuming thread wakes up and submits one (~50 µs a chunk on 2 cores)
        self.depth = depth if workers > 1 else 1
        self._spaces = [Workspace(self) for _ in range(workers * self.depth + 1 if workers > 1 else 1)]
        self._free = list(self._spaces)
        self._pool: ThreadPoolExecutor | None = None
        self.ahead: Callable[[str], tuple[str, ChunkFn] | None] | None = None
        self._early: _Ahead | None = None
        self._thread_bufs: dict[tuple, torch.Tensor] = {}

    def thread_buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer reused by the calling thread across tensors and passes (fresh multi-megabyte
        tensors cost page faults on every use)."""
        key = (name, threading.get_ident(), dtype)
        b = self._thread_bufs.get(key)
        if b is None or b.numel() < numel:
            b = self._thread_bufs[key] = torch.empty(numel, dtype=dtype)
        return b[:numel]

    def validate_flags(self, key: str) -> list[bool]:
        """Which sources still need their NaN/Inf check for `key` (the caller marks them done)."""
        ctx = self.ctx
        return [ctx.check_finite and (i, key) not in ctx._checked for i in range(len(ctx.sources))]

    def mark_checked(self, key: str, flags: list[bool]) -> None:
        self.ctx._checked.update((i, key) for i, f in enumerate(flags) if f)

    def _ranges(self, key: str) -> deque:
        n = self.ctx.plan.infos[key].numel
        return deque((s, min(s + self.chunk, n)) for s in range(0, n, self.chunk))

    def map(self, key: str, fn: ChunkFn) -> Iterator[Any]:
        """fn(workspace, start, end) over the chunks of `key`, results in order."""
        ranges, pending = self._ranges(key), deque()
        early, self._early = self._early, None
        if early is not None and early.key == key:  # its first chunks already run: continue after them
            ranges, pending = early.ranges, early.pending
        elif early is not None:
            self._settle(early.pending)
        if not pending and (self.workers == 1 or len(ranges) < 2):
            ws = self._free[0]
            for s, e in ranges:
                yield fn(ws, s, e)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mtl-merge")
        looked = self.ahead is None
        try:
            while True:
                while self._free and len(pending) + self._n_early() < self.workers * self.depth:
                    if ranges:
                        ws = self._free.pop()
                        pending.append((ws, self._pool.submit(fn, ws, *ranges.popleft())))
                    elif not looked:
                        looked = True
                        self._start_next(key)
                    elif not self._more_early():
                        break
                if not pending:
                    return
                ws, fut = pending.popleft()
                yield fut.result()
                self._free.append(ws)
        finally:
            self._settle(pending)  # an error or an abandoned stream: let the running chunks finish

    def _n_early(self) -> int:
        return len(self._early.pending) if self._early is not None else 0

    def _start_next(self, key: str) -> None:
        try:
            nxt = self.ahead(key)
        except Exception:  # building it again when its turn comes reports the error there
            nxt = None
        if nxt is not None:
            self._early = _Ahead(nxt[0], nxt[1], self._ranges(nxt[0]))

    def _more_early(self) -> bool:
        """Start one more of the next tensor's chunks (a workspace is free); False when none is left."""
        early = self._early
        if early is None or not early.ranges:
            return False
        ws = self._free.pop()
        early.pending.append((ws, self._pool.submit(early.fn, ws, *early.ranges.popleft())))
        return True

    def _settle(self, pending: deque) -> None:
        for _, fut in pending:
            fut.cancel()
        wait([f for _, f in pending])
        self._free.extend(ws for ws, _ in pending)
        pending.clear()

    def close(self) -> None:
        if self._early is not None:
            self._settle(self._early.pending)
            self._early = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


#: a kernel: (method, chunks, key) -> the per-chunk function giving the merged chunk in compute dtype
Kernel = Callable[[Any, Chunks, str], ChunkFn]


def _runner(method, kernel: Kernel, chunks: Chunks, key: str) -> ChunkFn:
    """The chunk function of `key` that gives each merged chunk in the model's dtype."""
    ctx = chunks.ctx
    info = ctx.plan.infos[key]
    fn = kernel(method, chunks, key)

    def run(ws: Workspace, s: int, e: int) -> torch.Tensor:
        out = fn(ws, s, e)
        if isinstance(out, Final):
            return out.tensor
        if out.dtype != info.dtype:
            out = to_output_dtype(out, info.dtype, ws.buf("out_raw", info.dtype, e - s))
        ctx.check_output(key, out)  # every method, after the cast: an overflow is an error, not an Inf
        return out

    return run


def stream_tensor(method, kernel: Kernel, chunks: Chunks, key: str, runner: ChunkFn | None = None) -> Streamed:
    """The merged tensor `key` as a `Streamed` in the model's dtype (`runner`: its chunk function, when
    already built)."""

    def pieces():
        yield from chunks.map(key, runner or _runner(method, kernel, chunks, key))

    return Streamed(chunks.ctx.plan.infos[key], pieces())


def chunked_streams(method, kernel: Kernel, chunks: Chunks) -> Callable[[str], Streamed]:
    """`key -> Streamed` for `merging.engine.produce`, in the plan's order. Kernels whose chunk function
    is cheap to build (`kernel.prebuilt`: no pass over the tensor first) also let idle workers start
    the next merged tensor's first chunks while a tensor's last ones run (`Chunks.ahead`); the chunk
    function built for that is the one the tensor's own turn then uses."""
    built: dict[str, ChunkFn] = {}
    if getattr(kernel, "prebuilt", False):
        plan = chunks.ctx.plan
        merged = [k for k in plan.order if plan.kind[k] == "merge"]
        following = dict(zip(merged, merged[1:]))

        def ahead(key: str):
            nkey = following.get(key)
            if nkey is None:
                return None
            built[nkey] = _runner(method, kernel, chunks, nkey)
            return nkey, built[nkey]

        chunks.ahead = ahead
    return lambda key: stream_tensor(method, kernel, chunks, key, built.pop(key, None))
