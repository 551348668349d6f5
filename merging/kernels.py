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

import torch

from .chunks import DEFAULT_CHUNK, ChunkFn, Chunks, Final, Kernel, Streamed, Workspace, chunked_streams, stream_tensor
from .native_steps import native_chunk, native_ties_thresholds

__all__ = ["DEFAULT_CHUNK", "Chunks", "Final", "Streamed", "Workspace", "chunked_streams", "fused_kernel",
           "stream_tensor", "ties_thresholds"]


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
    return native_chunk(chunks, key, "task_arithmetic", fn, lams=lams, scalar=m.scalar)


def _average(m, chunks: Chunks, key: str) -> ChunkFn:
    cd = chunks.ctx.plan.compute[key]

    def fn(ws: Workspace, s: int, e: int) -> torch.Tensor:
        xs = ws.read(key, s, e)
        acc = ws.buf("acc", cd, e - s).copy_(xs[1])
        for x in xs[2:]:
            acc.add_(x)
        return acc.div_(len(xs) - 1)

    return native_chunk(chunks, key, "average", fn)


# no pass over the tensor before the first chunk: `chunked_streams` may build them for the next tensor early
_task_arithmetic.prebuilt = _average.prebuilt = True
# their default chunk: half as many hand-offs between threads as DEFAULT_CHUNK (~50 µs each on 2 cores);
# their buffers are small (the native step reads 65,536-entry blocks, whatever the chunk)
_task_arithmetic.chunk = _average.chunk = 1 << 19


def ties_thresholds(chunks: Chunks, keys, n_keep: int) -> list[float]:
    """Per-task n_keep-th largest |τ_t| over `keys`, by the exact radix select over chunks (the chunks'
    |τ_t| are computed on the workers; validates the inputs on the first pass, as the whole-tensor
    path's first read does)."""
    from .selection import radix_thresholds

    native = native_ties_thresholds(chunks, keys, n_keep)
    if native is not None:
        return native
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

    from . import native

    lam = native.float32_lams([m.hp["lam"]])
    if lam is None:
        return fn
    return native_chunk(chunks, key, "ties", fn, thr=thr, zero_sign=float(m.zero_sign), mean=mean, lam=lam[0])


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
