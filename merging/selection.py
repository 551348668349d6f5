"""Exact top-k magnitude thresholds: `kthvalue` over a concatenation, or a memory-bounded radix select.

Convention (TIES trimming): keeping k percent of P entries keeps the n = ⌈P·k/100⌉ largest magnitudes.
The threshold is the n-th largest |τ| and an entry is kept when |τ| ≥ threshold, so exactly n entries
survive when magnitudes are distinct and every tie at the threshold survives otherwise. (Tools that
take the ⌊P·(1−k/100)⌋-th smallest value as the threshold keep one entry more.) n = 0 gives an
infinite threshold (nothing kept); k = 100 keeps everything.

Radix select: non-negative IEEE floats order like their bit patterns read as integers. Pass 1 builds a
histogram of the top 16 bits of every |τ| (per task, across all tensors) and finds the bucket holding
the n-th largest; the next pass either gathers that bucket's values (when few) for `kthvalue`, or
histograms the next 16 bits of the bucket's members. Each pass streams the data once and holds only
65,536 counters per task, so memory stays bounded whatever the model size; the result is exact.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from fractions import Fraction

import torch

__all__ = ["as_threshold", "keep_count", "kthvalue_threshold", "locate", "radix_thresholds"]

_BITS = {torch.float32: (32, torch.int32), torch.float64: (64, torch.int64)}
_LITTLE = sys.byteorder == "little"


def keep_count(numel: int, k: float) -> int:
    """n = ⌈numel·k/100⌉ computed exactly (k may be a float like 12.5)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 <= k <= 100:
        raise ValueError(f"k is a percentage in [0, 100], got {k!r}")
    return math.ceil(Fraction(str(k)) * numel / 100)


def kthvalue_threshold(values: torch.Tensor, n: int) -> float:
    """n-th largest of a 1-D tensor of magnitudes (inf when n == 0)."""
    if n <= 0:
        return math.inf
    return values.kthvalue(values.numel() - n + 1).values.item()


def as_threshold(thr: float, dtype: torch.dtype) -> float:
    """Smallest value of `dtype` ≥ thr, so `a >= result` in `dtype` equals the exact `a >= thr`."""
    if math.isinf(thr) or dtype == torch.float64:
        return thr
    t = torch.tensor(thr, dtype=dtype)
    if t.item() < thr:
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    return t.item()


def _bincount(idx: torch.Tensor) -> torch.Tensor:
    # torch's multi-threaded CPU bincount with 65,536 bins is up to 100× slower than one thread (and
    # very slow on a busy machine), so run it single-threaded and restore the setting.
    n = torch.get_num_threads()
    if n == 1:
        return torch.bincount(idx, minlength=1 << 16)
    torch.set_num_threads(1)
    try:
        return torch.bincount(idx, minlength=1 << 16)
    finally:
        torch.set_num_threads(n)


def _top16(a: torch.Tensor, width: int, ibits: torch.dtype) -> torch.Tensor:
    if _LITTLE:  # the high half-word of each element, read in place: no shift kernel needed
        step = width // 16
        return a.view(torch.int16)[step - 1 :: step]
    return a.view(ibits) >> (width - 16)


def locate(hist: torch.Tensor, r: int) -> tuple[int, int, int]:
    """Bucket holding the r-th largest value (1-based), the rank inside it, and its size."""
    desc = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(desc, torch.tensor([r], dtype=desc.dtype)).item())
    b = hist.numel() - 1 - i
    above = int(desc[i].item()) - int(hist[b].item())
    return b, r - above, int(hist[b].item())


class _TaskState:
    __slots__ = ("rank", "prefix", "known", "mode", "hist", "gathered", "value")

    def __init__(self, n: int):
        self.rank, self.prefix, self.known = n, 0, 0
        self.mode = "hist"
        self.hist: torch.Tensor | None = None
        self.gathered: list[torch.Tensor] = []
        self.value = math.inf if n <= 0 else None


def radix_thresholds(
    stream: Callable[[], Iterable[tuple[int, torch.Tensor]]],
    ns: list[int],
    dtype: torch.dtype = torch.float32,
    gather_cap: int = 1 << 21,
) -> list[float]:
    """Exact n_t-th largest magnitude for each task t over everything `stream()` yields.

    `stream()` is called once per pass and yields `(t, |τ_t| piece)` pairs, every piece non-negative,
    finite and of `dtype` (float32 or float64). Buckets up to `gather_cap` values are gathered for
    `kthvalue`; larger ones are refined by another 16-bit histogram (float32 needs at most two).
    """
    width, ibits = _BITS[dtype]
    states = [_TaskState(n) for n in ns]
    scratch = torch.empty(0, dtype=torch.int16)  # reused: a new buffer per piece costs page faults
    while any(s.value is None for s in states):
        for s in states:
            if s.value is None and s.mode == "hist":
                s.hist = torch.zeros(1 << 16, dtype=torch.int64)
        for t, a in stream():
            s = states[t]
            if s.value is not None:
                continue
            a = a.reshape(-1)
            if s.known == 0:
                hi = _top16(a, width, ibits)
                if not hi.is_contiguous():
                    if scratch.numel() < hi.numel():
                        scratch = torch.empty(hi.numel(), dtype=torch.int16)
                    hi = scratch[: hi.numel()].copy_(hi)
                s.hist += _bincount(hi)
                continue
            if _LITTLE and width == 32 and s.known == 16:  # compare the high half-words in place
                halves = a.view(torch.int16)
                sel = halves[1::2] == s.prefix
                if s.mode == "gather":
                    s.gathered.append(a[sel])
                else:
                    s.hist += _bincount(halves[0::2][sel].to(torch.int32).bitwise_and_(0xFFFF))
                continue
            bits = a.view(ibits)
            sel = (bits >> (width - s.known)) == s.prefix
            if s.mode == "gather":
                s.gathered.append(a[sel])
            else:
                idx = (bits[sel] >> (width - s.known - 16)) & 0xFFFF
                s.hist += _bincount(idx)
        for s in states:
            if s.value is not None:
                continue
            if s.mode == "gather":
                vals = torch.cat(s.gathered) if s.gathered else torch.empty(0, dtype=dtype)
                s.gathered = []
                s.value = vals.kthvalue(vals.numel() - s.rank + 1).values.item()
                continue
            b, s.rank, size = locate(s.hist, s.rank)
            s.prefix, s.known, s.hist = (s.prefix << 16) | b, s.known + 16, None
            if s.known == width:
                s.value = torch.tensor([s.prefix], dtype=ibits).view(dtype).item()
            elif size <= gather_cap:
                s.mode = "gather"
    return [s.value for s in states]
