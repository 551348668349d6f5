"""The chunk steps that run in the native kernel (`merging.native`): task arithmetic, the average and
TIES (its merge and the radix-select passes of its thresholds), each falling back to the torch chunk
step of `merging.kernels` when the kernel cannot run it or a chunk is not finite.
"""
from __future__ import annotations

import threading

import torch

from .chunks import ChunkFn, Chunks, Final, Workspace
from .engine import Context

__all__ = ["file_spans", "native_chunk", "native_ties_thresholds", "read_raw"]


def read_raw(ws: Workspace, key: str, s: int, e: int, first: int = 0) -> list[torch.Tensor]:
    """Sources `first`.. entries [s, e) of `key` in the file's dtype (no conversion)."""
    ctx = ws.chunks.ctx
    dtype = ctx.plan.infos[key].dtype
    return [src.read_into(key, s, ws.buf(f"raw{i}", dtype, e - s)) for i, src in enumerate(ctx.sources) if i >= first]


def file_spans(ctx: Context, key: str, first: int = 0) -> list[tuple[int, int]] | None:
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


def _library(ctx: Context, key: str):
    """The kernel library when it can run `key` (float32 or bfloat16 in, float32 compute), else None."""
    from . import native

    if ctx.plan.infos[key].dtype not in native.DTYPES or ctx.plan.compute[key] != torch.float32:
        return None
    return native.library()


def native_chunk(chunks: Chunks, key: str, kind: str, fallback: ChunkFn, **kw) -> ChunkFn:
    """The native chunk step of `kind` ("task_arithmetic", "average", "ties") for `key`, or `fallback`
    (the torch chunk step) when the native kernel cannot run it. A chunk whose result is not finite, or
    whose read fails, is redone by `fallback`, which reports it (and writes torch's bit patterns when
    non-finite outputs are allowed)."""
    from . import native

    ctx = chunks.ctx
    lib = _library(ctx, key)
    if lib is None:
        return fallback
    info = ctx.plan.infos[key]
    first = 1 if kind == "average" else 0
    spans = file_spans(ctx, key, first)
    nbytes = (ctx.T + 1 - first) * native.BLOCK * info.dtype.itemsize

    def fn(ws: Workspace, s: int, e: int) -> torch.Tensor | Final:
        out = ws.buf("out_raw", info.dtype, e - s)
        if kind == "ties":
            work = ws.scratch(ctx.T * native.TIES_WORK * 4, "ties_work").view(torch.float32)
            if spans is not None:
                done = native.pread_ties(lib, spans, s, e - s, info.dtype, ws.scratch(nbytes), out=out, work=work,
                                         **kw) == 0
            else:
                done = native.ties(lib, read_raw(ws, key, s, e), out=out, work=work, **kw)
        elif spans is not None:
            done = native.pread_merge(lib, kind, spans, s, out, ws.scratch(nbytes), **kw) == 0
        elif kind == "task_arithmetic":
            done = native.task_arithmetic(lib, read_raw(ws, key, s, e), out=out, **kw)
        else:
            done = native.average(lib, read_raw(ws, key, s, e, first=1), out)
        return Final(out) if done else fallback(ws, s, e)

    return fn


def native_ties_thresholds(chunks: Chunks, keys, n_keep: int) -> list[float] | None:
    """`merging.kernels.ties_thresholds` in the native kernel: the same exact radix select, two 16-bit
    histogram passes over the float32 |τ_t| (top bits, then the low bits inside the bucket holding the
    n_keep-th largest), each chunk read and histogrammed in one pass. None when the kernel cannot run
    every key, or a τ is not finite (the torch path then runs, and reports bad inputs by file)."""
    from . import native
    from .selection import locate

    ctx = chunks.ctx
    T = ctx.T
    if n_keep <= 0 or any(_library(ctx, key) is None for key in keys):
        return None
    lib = native.library()
    prefix, ranks = [-1] * T, [n_keep] * T
    size = T * native.SUBHISTS * native.BUCKETS
    # each key's file spans and block scratch, looked up once for both passes
    plan = [(key, ctx.plan.infos[key].dtype, file_spans(ctx, key),
             (T + 1) * native.BLOCK * ctx.plan.infos[key].dtype.itemsize) for key in keys]
    for level in (0, 1):
        # one histogram per thread, not per workspace: each is zeroed per pass (8 MB at T = 4), which
        # per-tensor trimming pays for every tensor
        used: dict[int, torch.Tensor] = {}

        def thread_hist() -> torch.Tensor:
            h = used.get(threading.get_ident())
            if h is None:
                h = used[threading.get_ident()] = chunks.thread_buffer("ties_hist", size, torch.int64).zero_()
            return h

        for key, dtype, spans, nbytes in plan:

            def fn(ws: Workspace, s: int, e: int, key=key, dtype=dtype, spans=spans, nbytes=nbytes) -> bool:
                if spans is not None:
                    return native.pread_ties(lib, spans, s, e - s, dtype, ws.scratch(nbytes), prefix=prefix,
                                             hist=thread_hist()) == 0
                return native.ties_hist(lib, read_raw(ws, key, s, e), prefix, thread_hist())

            if not all(chunks.map(key, fn)):
                return None
        hists = list(used.values())
        for h in hists[1:]:
            hists[0].add_(h)
        sub = hists[0].view(T, native.SUBHISTS, native.BUCKETS)
        for k in range(1, native.SUBHISTS):  # in place: `sum(1)` would allocate and fault a new tensor
            sub[:, 0].add_(sub[:, k])
        total = sub[:, 0]
        for t in range(T):
            b, ranks[t], _ = locate(total[t], ranks[t])
            prefix[t] = b if level == 0 else (prefix[t] << 16) | b
    for key in keys:  # every τ was finite, so every input was
        chunks.mark_checked(key, chunks.validate_flags(key))
    return [torch.tensor(p, dtype=torch.int32).view(torch.float32).item() for p in prefix]
