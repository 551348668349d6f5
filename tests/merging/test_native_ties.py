"""TIES in the native kernel (`merging.native`): the merge step and the radix-select thresholds are
bit-identical to the torch chunk path, checked by hand and on random tensors full of ties and zeros."""
import math

import pytest
import torch
from safetensors.torch import save_file

import merging
from merging import native
from merging.chunks import Chunks
from merging.engine import KeyOptions, open_context
from merging.kernels import ties_thresholds
from merging.methods import Ties

LIB = native.library()
pytestmark = pytest.mark.skipif(LIB is None, reason="no C compiler (the torch chunk path is used)")
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _torch_ties(xs, thr, zero_sign, mean, lam, dtype):
    """The torch chunk path's operations (`merging.kernels._ties`) on float32 copies of xs."""
    pre = xs[0].float()
    n = pre.numel()
    taus = [x.float() - pre for x in xs[1:]]
    mag, keep, total = torch.empty(n), torch.empty(n, dtype=torch.bool), torch.empty(n)
    trimmed, sign = Ties.trim_and_elect(taus, thr, mag, keep, total)
    if zero_sign:
        sign.masked_fill_(sign == 0, zero_sign)
    cnt = torch.zeros(n, dtype=torch.uint8) if mean else None
    return Ties.disjoint_merge(trimmed, sign, mag, keep, torch.zeros(n), cnt).mul_(lam).add_(pre).to(dtype)


def _tied(n, T, dtype, g):
    """θ0 and T fine-tunes whose deltas repeat values (bf16 rounding, exact zeros, signed zeros in θ0)."""
    pre = torch.randn(n, generator=g)
    pre[::31], pre[1::31] = 0.0, -0.0
    xs = [pre.to(dtype)]
    for _ in range(T):
        d = torch.randn(n, generator=g) * 0.01
        d[torch.rand(n, generator=g) < 0.25] = 0.0
        xs.append((pre + d).to(dtype))
    return xs


def _n(x):
    return 0.0 if x is None else x


def test_ties_by_hand():
    # θ0 = 0, thresholds 0.5: τ̂1 = [1, −2, 0.5, 0], τ̂2 = [3, 1, −0.5, 0], τ̂3 = [−1, −1, 0 (0.2 dropped), 0]
    # Σ = [3, −2, 0, 0] → γ = [+, −, 0, 0]; agreeing entries: {1, 3}, {−2, −1}, none, none
    xs = [torch.zeros(4), torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([3.0, 1.0, -0.5, 0.0]),
          torch.tensor([-1.0, -1.0, 0.2, 0.0])]
    work, out = torch.empty(3 * native.TIES_WORK), torch.empty(4)
    thr = [0.5] * 3
    assert native.ties(LIB, xs, thr, 0.0, True, 1.0, out, work)
    assert out.tolist() == [2.0, -1.5, 0.0, 0.0]  # disjoint mean
    assert native.ties(LIB, xs, thr, 0.0, False, 1.0, out, work)
    assert out.tolist() == [4.0, -3.0, 0.0, 0.0]  # disjoint sum
    assert native.ties(LIB, xs, thr, 1.0, True, 0.5, out, work)
    assert out.tolist() == [1.0, -0.75, 0.25, 0.0]  # γ = 0 takes +1 (FusionBench): only 0.5 agrees; λ = 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_matches_torch_chunk_path(dtype):
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 3, 5):
        for n in (1, 511, 513, 4099):  # not multiples of any vector width or block
            xs = _tied(n, T, dtype, g)
            thr = [float(torch.tensor(abs(float(torch.randn(1, generator=g))) * 0.005)) for _ in range(T)]
            thr[0] = math.inf if T > 2 else thr[0]  # a task that keeps nothing
            work, out = torch.empty(T * native.TIES_WORK), torch.empty(n, dtype=dtype)
            for zs, mean, lam in ((0.0, True, 1.0), (1.0, True, 0.7), (-1.0, False, 0.1)):
                assert native.ties(LIB, xs, thr, zs, mean, lam, out, work)
                ref = _torch_ties(xs, thr, zs, mean, lam, dtype)
                assert torch.equal(out.view(BITS[dtype]), ref.view(BITS[dtype])), (T, n, zs, mean, lam)


def test_ties_flags_non_finite():
    xs = [torch.zeros(100), torch.ones(100), torch.ones(100)]
    xs[2][40] = math.nan
    work, out = torch.empty(2 * native.TIES_WORK), torch.empty(100)
    assert not native.ties(LIB, xs, [0.5, 0.5], 0.0, True, 1.0, out, work)
    hist = torch.zeros(2 * native.SUBHISTS * native.BUCKETS, dtype=torch.int64)
    assert not native.ties_hist(LIB, xs, [-1, -1], hist)


def test_histograms_count_the_float_bits():
    g = torch.Generator().manual_seed(1)
    xs = _tied(5000, 3, torch.bfloat16, g)
    mags = [(x.float() - xs[0].float()).abs() for x in xs[1:]]
    hist = torch.zeros(3 * native.SUBHISTS * native.BUCKETS, dtype=torch.int64)
    per_task = lambda: hist.view(3, native.SUBHISTS, native.BUCKETS).sum(1)  # noqa: E731
    assert native.ties_hist(LIB, xs, [-1, -1, -1], hist)
    hi = [m.view(torch.int32) >> 16 for m in mags]
    for t in range(3):
        assert torch.equal(per_task()[t], torch.bincount(hi[t], minlength=native.BUCKETS))
    # second level: the low 16 bits of the entries in one chosen bucket per task; task 2 skipped
    prefix = [int(hi[0][7]), int(hi[1][9]), -2]
    hist.zero_()
    assert native.ties_hist(LIB, xs, prefix, hist)
    for t in range(2):
        sel = mags[t].view(torch.int32)[hi[t] == prefix[t]] & 0xFFFF
        assert torch.equal(per_task()[t], torch.bincount(sel, minlength=native.BUCKETS))
    assert per_task()[2].sum() == 0


def _files(tmp_path, dtype, T=3, seed=0, shapes=((37, 111), (3001,), (5, 7, 3, 3), (9,))):
    g = torch.Generator().manual_seed(seed)
    sds = [{} for _ in range(T + 1)]
    for i, s in enumerate(shapes):
        xs = _tied(math.prod(s), T, torch.float32, g)
        for j in range(T + 1):
            sds[j][f"k{i}.weight"] = xs[j].reshape(s).to(dtype)
    paths = [tmp_path / f"m{j}.safetensors" for j in range(T + 1)]
    for p, sd in zip(paths, sds):
        save_file(sd, str(p))
    return paths[0], paths[1:], sds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thresholds_are_the_exact_nth_largest(dtype, tmp_path):
    pre, fts, sds = _files(tmp_path, dtype)
    keys = list(sds[0])
    mags = [torch.cat([(sds[t + 1][k].float() - sds[0][k].float()).abs().reshape(-1) for k in keys]) for t in range(3)]
    ctx = open_context(pre, fts, KeyOptions.split({})[0], 1, "ties")
    chunks = Chunks(ctx, 1024, workers=2)
    try:
        for n in (1, 7, 1000, mags[0].numel() // 5, mags[0].numel()):
            got = ties_thresholds(chunks, keys, n)
            assert got == [float(m.sort(descending=True).values[n - 1]) for m in mags], n
        for key in keys:  # one tensor at a time, as per-tensor trimming asks
            n = max(1, ctx.plan.infos[key].numel // 5)
            want = [float((sds[t + 1][key].float() - sds[0][key].float()).abs().reshape(-1).sort(descending=True).values[n - 1])
                    for t in range(3)]
            assert ties_thresholds(chunks, [key], n) == want
    finally:
        chunks.close()
        ctx.close()


def _spy(monkeypatch):
    calls = {"hist": 0, "merge": 0}
    real = native.pread_ties

    def spy(*a, **k):
        calls["hist" if k.get("hist") is not None else "merge"] += 1
        return real(*a, **k)

    monkeypatch.setattr(native, "pread_ties", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hp", [{}, {"trim": "per_tensor", "k": 10}, {"k": 35, "merge_func": "sum", "lam": 0.7},
                                {"tie_rule": "fusionbench", "k": 30}], ids=str)
def test_file_merge_identical_with_and_without_native(hp, dtype, tmp_path, monkeypatch):
    pre, fts, _ = _files(tmp_path, dtype)
    calls = _spy(monkeypatch)
    fast = merging.merge_to_file("ties", pre, fts, tmp_path / "fast.safetensors", chunk=1024, threads=2, **hp)
    assert calls["hist"] > 0 and calls["merge"] > 0  # thresholds and merge in the native kernel
    monkeypatch.setenv("MTLKIT_NATIVE", "0")
    slow = merging.merge_to_file("ties", pre, fts, tmp_path / "slow.safetensors", chunk=1024, threads=1, **hp)
    whole = merging.merge_to_file("ties", pre, fts, tmp_path / "whole.safetensors", fused=False, **hp)
    assert fast.read_bytes() == slow.read_bytes() == whole.read_bytes()


def test_bad_input_is_reported_by_file_through_the_native_path(tmp_path):
    pre, fts, sds = _files(tmp_path, torch.bfloat16)
    sds[2]["k1.weight"][17] = math.inf
    save_file(sds[2], str(fts[1]))
    with pytest.raises(merging.MergeInputError, match=r"'k1.weight' in .*m2.safetensors has non-finite values"):
        merging.merge_to_file("ties", pre, fts, tmp_path / "o.safetensors", chunk=1024, trim="per_tensor")
    assert not (tmp_path / "o.safetensors").exists()
