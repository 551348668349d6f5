"""Fused, chunked per-tensor kernels for file-to-file merging: memory bounded by the chunk, not the tensor.

The whole-tensor kernels (`merging.methods`) make one pass over memory per operation, and their
scratch buffers are sized for the largest tensor (an LLM's embedding). Here each merged tensor is
processed in flat chunks of `chunk` entries: every input chunk is read with `pread` into a reusable
buffer (no file mapping, so input pages never count towards our RSS), all the method's operations
run on that chunk while it sits in cache, and the result is handed to the writer chunk by chunk.

The operations are the whole-tensor kernels' own, in the same order, applied element-wise, so the
results are bit-identical (tested for every dtype). Methods whose per-tensor step is not element-wise
(DARE's seeded masks, TALL/Consensus, mergekit's sort-ranked trimming) keep the whole-tensor path.
Per-tensor TIES thresholds come from the exact radix select over the chunks (the same value as
`kthvalue`); the global ones too, inside `prepare`.

Task arithmetic and the plain average run their chunk step in the native kernel (`merging.native`:
one pass, same roundings, same bytes) when it is available, with the torch operations below as the
fallback and as the path for any chunk whose result is not finite.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

from .engine import Context
from .sources import TensorInfo

__all__ = ["DEFAULT_CHUNK", "Chunks", "Final", "Streamed", "Workspace", "fused_kernel", "stream_tensor", "ties_thresholds"]

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

    def buf(self, name: str, dtype: torch.dtype, n: int, rows: int = 1) -> torch.Tensor:
        b = self._bufs.get((name, dtype))
        if b is None:
            b = self._bufs[(name, dtype)] = torch.empty(rows * self.chunks.chunk, dtype=dtype)
        return b[: rows * n] if rows == 1 else b[: rows * n].view(rows, n)

    def scratch(self, nbytes: int) -> torch.Tensor:
        """A reusable byte buffer of at least `nbytes` (the native kernel's blocks)."""
        b = self._bufs.get(("scratch", torch.uint8))
        if b is None or b.numel() < nbytes:
            b = self._bufs[("scratch", torch.uint8)] = torch.empty(nbytes, dtype=torch.uint8)
        return b

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


class Chunks:
    """Runs a per-chunk function over a tensor's chunks on `workers` threads (each with its own
    workspace, torch ops single-threaded) and hands the results back in order.

    Threads work on different chunks, so no thread waits for another inside an operation (torch's
    intra-op parallelism makes every operation wait for its slowest thread: costly on a busy machine).
    A workspace is reused only after its result has been consumed.
    """

    def __init__(self, ctx: Context | None, chunk: int = DEFAULT_CHUNK, workers: int = 1):
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1024:
            raise ValueError(f"chunk must be an int ≥ 1024 (entries), got {chunk!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int ≥ 1, got {workers!r}")
        self.ctx, self.chunk, self.workers = ctx, chunk, workers
        self._spaces = [Workspace(self) for _ in range(workers + 1 if workers > 1 else 1)]
        self._pool: ThreadPoolExecutor | None = None

    def validate_flags(self, key: str) -> list[bool]:
        """Which sources still need their NaN/Inf check for `key` (the caller marks them done)."""
        ctx = self.ctx
        return [ctx.check_finite and (i, key) not in ctx._checked for i in range(len(ctx.sources))]

    def mark_checked(self, key: str, flags: list[bool]) -> None:
        self.ctx._checked.update((i, key) for i, f in enumerate(flags) if f)

    def map(self, key: str, fn: ChunkFn) -> Iterator[Any]:
        """fn(workspace, start, end) over the chunks of `key`, results in order."""
        n = self.ctx.plan.infos[key].numel
        ranges = [(s, min(s + self.chunk, n)) for s in range(0, n, self.chunk)]
        if self.workers == 1 or len(ranges) < 2:
            ws = self._spaces[0]
            for s, e in ranges:
                yield fn(ws, s, e)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mtl-merge")
        free = list(self._spaces)
        pending: deque = deque()
        todo = iter(ranges)
        try:
            while True:
                while free and len(pending) < self.workers:
                    r = next(todo, None)
                    if r is None:
                        break
                    ws = free.pop()
                    pending.append((ws, self._pool.submit(fn, ws, *r)))
                if not pending:
                    return
                ws, fut = pending.popleft()
                yield fut.result()
                free.append(ws)
        finally:
            for _, fut in pending:  # an error or an abandoned stream: let the running chunks finish
                fut.cancel()
            wait([f for _, f in pending])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


#: a kernel: (method, chunks, key) -> the per-chunk function giving the merged chunk in compute dtype
Kernel = Callable[[Any, Chunks, str], ChunkFn]


def stream_tensor(method, kernel: Kernel, chunks: Chunks, key: str, propagates: bool) -> Streamed:
    """The merged tensor `key` as a `Streamed` in the model's dtype."""
    ctx = chunks.ctx
    info = ctx.plan.infos[key]

    def pieces():
        fn = kernel(method, chunks, key)

        def run(ws: Workspace, s: int, e: int) -> torch.Tensor:
            out = fn(ws, s, e)
            if isinstance(out, Final):
                return out.tensor
            if propagates and ctx.check_finite and not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
                ctx.trace_nonfinite(key)
            return out if out.dtype == info.dtype else ws.buf("out_raw", info.dtype, e - s).copy_(out)

        yield from chunks.map(key, run)

    return Streamed(info, pieces())


def fused_kernel(method) -> Kernel | None:
    """The chunked kernel of `method`, or None when it has none (the whole-tensor path is used)."""
    from . import mergekit, methods

    if getattr(method, "transform", None) is not None:
        return None
    return {
        methods.TaskArithmetic: _task_arithmetic,
        methods.Average: _average,
        methods.Ties: _ties,
        mergekit.TaskArithmetic: _mergekit_linear_delta,
    }.get(type(method))


# -- the kernels: the whole-tensor kernels' operations, in their order, on one chunk ---------------------
def _read_raw(ws: Workspace, key: str, s: int, e: int, first: int = 0) -> list[torch.Tensor]:
    """Sources `first`.. entries [s, e) of `key` in the file's dtype (no conversion)."""
    ctx = ws.chunks.ctx
    dtype = ctx.plan.infos[key].dtype
    return [src.read_into(key, s, ws.buf(f"raw{i}", dtype, e - s)) for i, src in enumerate(ctx.sources) if i >= first]


def _file_spans(ctx: Context, key: str, first: int = 0) -> list[tuple[int, int]] | None:
    """(file descriptor, byte offset of `key`'s data) of sources `first`.. when each can give one in the
    merged dtype (`StateSource.file_span`), else None (the native kernel then gets buffers)."""
    dtype = ctx.plan.infos[key].dtype
    spans = []
    for src in ctx.sources[first:]:
        span = src.file_span(key) if src.info(key).dtype == dtype else None
        if span is None:
            return None
        spans.append(span)
    return spans


def _native_chunk(chunks: Chunks, key: str, kind: str, fallback: ChunkFn, **kw) -> ChunkFn:
    """The native chunk step of `kind` for `key`, or `fallback` (the torch chunk step) when the native
    kernel cannot run it. A chunk whose result is not finite, or whose read fails, is redone by
    `fallback`, which reports it (and writes torch's bit patterns when non-finite outputs are allowed)."""
    from . import native

    ctx = chunks.ctx
    info = ctx.plan.infos[key]
    if info.dtype not in native.DTYPES or ctx.plan.compute[key] != torch.float32:
        return fallback
    lib = native.library()
    if lib is None:
        return fallback
    first = 0 if kind == "task_arithmetic" else 1
    spans = _file_spans(ctx, key, first)
    nbytes = (ctx.T + 1 - first) * native.BLOCK * info.dtype.itemsize

    def fn(ws: Workspace, s: int, e: int) -> torch.Tensor | Final:
        out = ws.buf("out_raw", info.dtype, e - s)
        if spans is not None:
            done = native.pread_merge(lib, kind, spans, s, out, ws.scratch(nbytes), **kw) == 0
        elif kind == "task_arithmetic":
            done = native.task_arithmetic(lib, _read_raw(ws, key, s, e), out=out, **kw)
        else:
            done = native.average(lib, _read_raw(ws, key, s, e, first=1), out)
        return Final(out) if done else fallback(ws, s, e)

    return fn


def _task_arithmetic(m, chunks: Chunks, key: str) -> ChunkFn:
    from . import native

    cd = chunks.ctx.plan.compute[key]

    def fn(ws: Workspace, s: int, e: int) -> torch.Tensor:
        n = e - s
        xs = ws.read(key, s, e)
        pre = xs[0]
        return m.combine(pre, lambda t, out: torch.sub(xs[t + 1], pre, out=out), len(xs) - 1,
                         *(ws.buf(b, cd, n) for b in ("acc", "tau", "out")))

    lams = native.float32_lams(m.lams)
    if lams is None:
        return fn
    return _native_chunk(chunks, key, "task_arithmetic", fn, lams=lams, scalar=m.scalar)


def _average(m, chunks: Chunks, key: str) -> ChunkFn:
    cd = chunks.ctx.plan.compute[key]

    def fn(ws: Workspace, s: int, e: int) -> torch.Tensor:
        xs = ws.read(key, s, e)
        acc = ws.buf("acc", cd, e - s).copy_(xs[1])
        for x in xs[2:]:
            acc.add_(x)
        return acc.div_(len(xs) - 1)

    return _native_chunk(chunks, key, "average", fn)


def ties_thresholds(chunks: Chunks, keys, n_keep: int) -> list[float]:
    """Per-task n_keep-th largest |τ_t| over `keys`, by the exact radix select over chunks (the chunks'
    |τ_t| are computed on the workers; validates the inputs on the first pass, as the whole-tensor
    path's first read does)."""
    from .selection import radix_thresholds

    ctx = chunks.ctx
    T = ctx.T
    dtype = torch.float64 if any(ctx.plan.compute[k] == torch.float64 for k in keys) else torch.float32

    def pieces():
        for key in keys:
            cd = ctx.plan.compute[key]
            flags = chunks.validate_flags(key)

            def fn(ws: Workspace, s: int, e: int) -> list[torch.Tensor]:
                xs = ws.read(key, s, e, flags)
                out = []
                for t in range(T):
                    a = torch.sub(xs[t + 1], xs[0], out=ws.buf(f"sel{t}", cd, e - s)).abs_()
                    out.append(a if a.dtype == dtype else a.to(dtype))
                return out

            for mags in chunks.map(key, fn):
                yield from enumerate(mags)
            chunks.mark_checked(key, flags)

    return radix_thresholds(pieces, [n_keep] * T, dtype)


def _elect(ws: Workspace, xs: list[torch.Tensor], thr: list[float], cd: torch.dtype):
    """TIES's trimmed τ_t and elected sign γ for one chunk (`Ties._elected`'s operations)."""
    from .methods import Ties

    n = xs[0].numel()
    taus = [torch.sub(x, xs[0], out=ws.buf(f"tau{t}", cd, n)) for t, x in enumerate(xs[1:])]
    return Ties.trim_and_elect(taus, thr, ws.buf("abs", cd, n), ws.buf("keep", torch.bool, n), ws.buf("total", cd, n))


def _key_thresholds(m, chunks: Chunks, key: str) -> list[float]:
    from .selection import as_threshold, keep_count

    ctx = chunks.ctx
    thr = m.thresholds
    if thr is None:
        thr = ties_thresholds(chunks, [key], keep_count(ctx.plan.infos[key].numel, m.hp["k"]))
    return [as_threshold(v, ctx.plan.compute[key]) for v in thr]


def majority_sign(m, chunks: Chunks) -> float:
    """FusionBench's model-wide majority sign (`Ties._majority_sign`) over chunks: Σ γ in float64 is a
    sum of integers, so it is exact in any order."""
    ctx = chunks.ctx
    total = 0.0
    for key in ctx.plan.merge:
        cd = ctx.plan.compute[key]
        thr = _key_thresholds(m, chunks, key)
        flags = chunks.validate_flags(key)

        def fn(ws: Workspace, s: int, e: int) -> float:
            return float(_elect(ws, ws.read(key, s, e, flags), thr, cd)[1].sum(dtype=torch.float64))

        total += sum(chunks.map(key, fn))
        chunks.mark_checked(key, flags)
    return math.copysign(1.0, total) if total else 0.0


def _ties(m, chunks: Chunks, key: str) -> ChunkFn:
    ctx = chunks.ctx
    cd, T = ctx.plan.compute[key], ctx.T
    thr = _key_thresholds(m, chunks, key)
    mean = m.hp["merge_func"] == "mean"
    cnt_dtype = torch.uint8 if T < 256 else torch.int32
    flags = chunks.validate_flags(key)  # all checked already unless the thresholds came from elsewhere

    def fn(ws: Workspace, s: int, e: int) -> torch.Tensor:
        n = e - s
        xs = ws.read(key, s, e, flags)
        pre = xs[0]
        trimmed, sign = _elect(ws, xs, thr, cd)
        mag, keep = ws.buf("abs", cd, n), ws.buf("keep", torch.bool, n)
        if m.zero_sign:
            sign.masked_fill_(sign == 0, m.zero_sign)
        out = ws.buf("mtv", cd, n).zero_()
        cnt = ws.buf("cnt", cnt_dtype, n).zero_() if mean else None
        return m.disjoint_merge(trimmed, sign, mag, keep, out, cnt).mul_(m.hp["lam"]).add_(pre)

    return fn


def _mergekit_linear_delta(m, chunks: Chunks, key: str) -> ChunkFn:
    """mergekit's task arithmetic (no sparsification, no consensus): `MergekitMethod.merge_tensor`."""
    ctx = chunks.ctx
    cd, T = ctx.plan.compute[key], ctx.T
    weights = torch.tensor(m.weights, dtype=cd).unsqueeze(-1)
    divisor = weights.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    flags = chunks.validate_flags(key)

    def fn(ws: Workspace, s: int, e: int) -> torch.Tensor:
        n = e - s
        xs = ws.read(key, s, e, flags)
        deltas = ws.buf("deltas", cd, n, rows=T)
        for t in range(T):
            torch.sub(xs[t + 1], xs[0], out=deltas[t])
        deltas.mul_(weights)
        mixed = torch.sum(deltas, dim=0, out=ws.buf("mixed", cd, n))
        if m.hp["normalize"]:
            mixed /= divisor
        if m.hp["lam"] != 1:
            mixed *= m.hp["lam"]
        return torch.add(xs[0], mixed, out=ws.buf("out", cd, n))

    return fn
