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
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .engine import Context
from .sources import TensorInfo

__all__ = ["DEFAULT_CHUNK", "Chunks", "Streamed", "fused_kernel", "stream_tensor"]

#: entries per chunk: 1 MB of float32 per buffer, so TIES's ~T + 6 buffers stay in the L2/L3 caches
DEFAULT_CHUNK = 1 << 18


class Streamed:
    """A merged tensor produced as flat chunks in its output dtype, in order; can be consumed once.
    Each chunk is a reused buffer: write it out before asking for the next."""

    def __init__(self, info: TensorInfo, pieces: Iterator[torch.Tensor]):
        self.shape, self.dtype, self.numel = info.shape, info.dtype, info.numel
        self._pieces = pieces

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._pieces

    def materialize(self) -> torch.Tensor:
        out = torch.empty(self.numel, dtype=self.dtype)
        i = 0
        for p in self:
            out[i : i + p.numel()] = p
            i += p.numel()
        return out.view(self.shape)


class Chunks:
    """Chunk-wise reads of θ0 and the fine-tuned models in compute dtype, into reusable buffers."""

    def __init__(self, ctx: Context, chunk: int = DEFAULT_CHUNK):
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1024:
            raise ValueError(f"chunk must be an int ≥ 1024 (entries), got {chunk!r}")
        self.ctx, self.chunk = ctx, chunk
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def buf(self, name: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        b = self._bufs.get((name, dtype))
        if b is None:
            b = self._bufs[(name, dtype)] = torch.empty(self.chunk, dtype=dtype)
        return b[:n]

    def sweep(self, key: str, validate: bool) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """(start, end, [θ0, θ_1, ..., θ_T] chunks) over the whole tensor. With `validate`, every
        source's chunk is checked for NaN/Inf (once per key and source, as the whole-tensor path does)."""
        ctx = self.ctx
        info, cd = ctx.plan.infos[key], ctx.plan.compute[key]
        n = info.numel
        todo = [validate and ctx.check_finite and (i, key) not in ctx._checked for i in range(len(ctx.sources))]
        for s in range(0, n, self.chunk):
            m = min(self.chunk, n - s)
            xs = []
            for i, src in enumerate(ctx.sources):
                raw = src.read_into(key, s, self.buf(f"raw{i}", info.dtype, m))
                x = raw if info.dtype == cd else self.buf(f"in{i}", cd, m).copy_(raw)
                if todo[i] and not torch.isfinite(x.sum()):
                    ctx._validate(src.get(key).to(cd), i, key)  # the whole tensor: names the counts
                xs.append(x)
            yield s, s + m, xs
        for i, flag in enumerate(todo):
            if flag:
                ctx._checked.add((i, key))


Kernel = Callable[[Chunks, str], Iterator[torch.Tensor]]


def stream_tensor(kernel: Kernel, chunks: Chunks, key: str, propagates: bool) -> Streamed:
    """The merged tensor `key` as a `Streamed` in the model's dtype."""
    ctx = chunks.ctx
    info = ctx.plan.infos[key]

    def pieces():
        for out in kernel(chunks, key):
            if propagates and ctx.check_finite and not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
                ctx.trace_nonfinite(key)
            yield out if out.dtype == info.dtype else chunks.buf("out_raw", info.dtype, out.numel()).copy_(out)

    return Streamed(info, pieces())


def fused_kernel(method) -> Kernel | None:
    """The chunked kernel of `method`, or None when it has none (the whole-tensor path is used)."""
    from . import mergekit, methods

    if getattr(method, "transform", None) is not None:
        return None
    kind = type(method)
    if kind is methods.TaskArithmetic:
        return lambda chunks, key: _task_arithmetic(method, chunks, key)
    if kind is methods.Average:
        return lambda chunks, key: _average(method, chunks, key)
    if kind is methods.Ties:
        return lambda chunks, key: _ties(method, chunks, key)
    if kind is mergekit.TaskArithmetic:
        return lambda chunks, key: _mergekit_linear_delta(method, chunks, key)
    return None


# -- the kernels: the whole-tensor kernels' operations, in their order, on one chunk ---------------------
def _task_arithmetic(m, chunks: Chunks, key: str) -> Iterator[torch.Tensor]:
    cd = chunks.ctx.plan.compute[key]
    for s, e, xs in chunks.sweep(key, validate=False):
        n = e - s
        pre, acc, tau = xs[0], chunks.buf("acc", cd, n), chunks.buf("tau", cd, n)
        for t in range(len(xs) - 1):
            x = torch.sub(xs[t + 1], pre, out=acc if t == 0 else tau)
            if m.scalar:
                if t:
                    acc.add_(x)
            elif t:
                acc.add_(x, alpha=m.lams[t])
            else:
                acc.mul_(m.lams[0])
        out = chunks.buf("out", cd, n)
        yield torch.add(pre, acc, alpha=m.lams[0], out=out) if m.scalar else torch.add(pre, acc, out=out)


def _average(m, chunks: Chunks, key: str) -> Iterator[torch.Tensor]:
    cd = chunks.ctx.plan.compute[key]
    for s, e, xs in chunks.sweep(key, validate=False):
        acc = chunks.buf("acc", cd, e - s).copy_(xs[1])
        for x in xs[2:]:
            acc.add_(x)
        yield acc.div_(len(xs) - 1)


def ties_thresholds(m, chunks: Chunks, keys, n_keep: int) -> list[float]:
    """Per-task n_keep-th largest |τ_t| over `keys`, by the exact radix select over chunks (validates
    the inputs on the first pass, as the whole-tensor path's first read does)."""
    from .selection import radix_thresholds

    ctx = chunks.ctx
    dtype = torch.float64 if any(ctx.plan.compute[k] == torch.float64 for k in keys) else torch.float32

    def pieces():
        for key in keys:
            cd = ctx.plan.compute[key]
            for s, e, xs in chunks.sweep(key, validate=True):
                tau = chunks.buf("sel", cd, e - s)
                for t in range(len(xs) - 1):
                    a = torch.sub(xs[t + 1], xs[0], out=tau).abs_()
                    yield t, a if a.dtype == dtype else a.to(dtype)

    return radix_thresholds(pieces, [n_keep] * ctx.T, dtype)


def _ties(m, chunks: Chunks, key: str) -> Iterator[torch.Tensor]:
    from .selection import as_threshold, keep_count

    ctx = chunks.ctx
    cd = ctx.plan.compute[key]
    T = ctx.T
    thr = m.thresholds
    if thr is None:
        thr = ties_thresholds(m, chunks, [key], keep_count(ctx.plan.infos[key].numel, m.hp["k"]))
    thr = [as_threshold(v, cd) for v in thr]
    mean = m.hp["merge_func"] == "mean"
    cnt_dtype = torch.uint8 if T < 256 else torch.int32
    for s, e, xs in chunks.sweep(key, validate=True):
        n = e - s
        pre = xs[0]
        mag, keep = chunks.buf("abs", cd, n), chunks.buf("keep", torch.bool, n)
        total = chunks.buf("total", cd, n)
        trimmed = []
        for t in range(T):
            tau = torch.sub(xs[t + 1], pre, out=chunks.buf(f"tau{t}", cd, n))
            torch.ge(torch.abs(tau, out=mag), thr[t], out=keep)
            trimmed.append(tau.mul_(keep))
            if t == 0:
                total.copy_(tau)
            else:
                total.add_(tau)
        sign = total.sign_()
        if m.zero_sign:
            sign.masked_fill_(sign == 0, m.zero_sign)
        out = chunks.buf("mtv", cd, n).zero_()
        cnt = chunks.buf("cnt", cnt_dtype, n).zero_() if mean else None
        for tt in trimmed:
            torch.mul(tt, sign, out=mag).clamp_(min=0)
            if mean:
                cnt.add_(torch.gt(mag, 0, out=keep))
            out.add_(mag)
        out.mul_(sign)
        if mean:
            out.div_(cnt.clamp_(min=1))
        yield out.mul_(m.hp["lam"]).add_(pre)


def _mergekit_linear_delta(m, chunks: Chunks, key: str) -> Iterator[torch.Tensor]:
    """mergekit's task arithmetic (no sparsification, no consensus): `MergekitMethod.merge_tensor`."""
    ctx = chunks.ctx
    cd, T = ctx.plan.compute[key], ctx.T
    weights = torch.tensor(m.weights, dtype=cd).unsqueeze(-1)
    divisor = weights.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    for s, e, xs in chunks.sweep(key, validate=True):
        n = e - s
        deltas = chunks.buf("deltas", cd, 0)
        if deltas.numel() < T * chunks.chunk:
            deltas = chunks._bufs[("deltas", cd)] = torch.empty(T * chunks.chunk, dtype=cd)
        deltas = deltas[: T * n].view(T, n)
        for t in range(T):
            torch.sub(xs[t + 1], xs[0], out=deltas[t])
        deltas.mul_(weights)
        mixed = torch.sum(deltas, dim=0, out=chunks.buf("mixed", cd, n))
        if m.hp["normalize"]:
            mixed /= divisor
        if m.hp["lam"] != 1:
            mixed *= m.hp["lam"]
        yield torch.add(xs[0], mixed, out=chunks.buf("out", cd, n))
