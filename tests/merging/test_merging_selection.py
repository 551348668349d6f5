"""Radix select: the exact same threshold as torch.kthvalue over the concatenated magnitudes."""
import math

import pytest
import torch

from merging.selection import keep_count, kthvalue_threshold, radix_thresholds


def _pieces(T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(T):
        ps = [
            torch.randn(1000, generator=g, dtype=dtype).abs() * 1e-3,
            torch.randn(37, 11, generator=g, dtype=dtype).abs(),
            (torch.randint(0, 5, (500,), generator=g) / 4).to(dtype),  # heavy ties, zeros
            torch.zeros(13, dtype=dtype),
            torch.rand(2000, generator=g, dtype=dtype) * 1e4,
        ]
        out.append(ps)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gather_cap", [0, 64, 1 << 21])  # 0 forces histogram refinement to the last bit
def test_radix_equals_kthvalue(dtype, gather_cap):
    T = 3
    pieces = _pieces(T, dtype)
    P = sum(p.numel() for p in pieces[0])
    for k in (0, 0.1, 3, 20, 50, 99.9, 100):
        n = keep_count(P, k)
        got = radix_thresholds(
            lambda: ((t, p) for t in range(T) for p in pieces[t]), [n] * T, dtype, gather_cap=gather_cap
        )
        for t in range(T):
            cat = torch.cat([p.reshape(-1) for p in pieces[t]])
            want = kthvalue_threshold(cat, n)
            assert got[t] == want, (k, t)
            if n:
                assert want == cat.sort(descending=True).values[n - 1].item()
                assert int((cat >= want).sum()) >= n


def test_keep_count_and_edges():
    assert keep_count(10, 20) == 2
    assert keep_count(11, 20) == 3  # ⌈2.2⌉
    assert keep_count(1000, 12.5) == 125
    assert keep_count(7, 0) == 0 and keep_count(7, 100) == 7
    with pytest.raises(ValueError):
        keep_count(10, -1)
    v = torch.tensor([3.0, 1.0, 2.0])
    assert kthvalue_threshold(v, 0) == math.inf
    assert kthvalue_threshold(v, 3) == 1.0
    assert radix_thresholds(lambda: iter([(0, v)]), [0]) == [math.inf]


@pytest.mark.parametrize("primaries, mean", [(["mae", "miou"], False), (["accuracy", "accuracy"], True)])
def test_the_task_plot_shows_a_mean_only_where_metrics_json_has_one(tmp_path, monkeypatch, primaries, mean):
    """A mean of an MAE and an mIoU means nothing: metrics.json stores null for it, and the PNG drew it."""
    import merging
    from merging.report import write_report

    seen = {}
    monkeypatch.setattr(merging, "plot_task_accuracy", lambda results, path, **kw: seen.update(kw))
    tasks = {f"t{i}": {"merged": {p: 0.5}, "individual": {p: 0.6}, "primary": p} for i, p in enumerate(primaries)}
    write_report({"method": "ties", "tasks": tasks}, tmp_path)
    assert seen["mean"] is mean and "accuracy" not in seen["title"]
