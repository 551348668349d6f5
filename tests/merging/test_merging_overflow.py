"""A merged tensor that overflows (finite inputs, non-finite output, in the output's own dtype) is an
error naming the tensor, for every method and both engines; check_finite=False lets it through."""
import pytest
import torch

import merging

F32, F16 = torch.finfo(torch.float32).max, torch.finfo(torch.float16).max


def _inputs(dtype, value, T=3):
    return {"a": torch.zeros(8, dtype=dtype)}, [{"a": torch.full((8,), value, dtype=dtype)} for _ in range(T)]


CASES = [  # each overflows: θ0 = 0, every fine-tune near its dtype's largest value
    ("ties", {"merge_func": "sum", "k": 100}, torch.float32, 3e38),
    ("ties", {"k": 100, "lam": 2.0}, torch.float32, 3e38),
    ("consensus", {"lam": 1.0, "k": 1}, torch.float32, 3e38),
    ("dare", {"base": "ties", "p": 0.0, "k": 100, "lam": 2.0}, torch.float32, 3e38),
    ("task_arithmetic", {"lam": 1.0}, torch.float16, 60000.0),  # finite in float32, Inf once cast to fp16
    ("ties", {"merge_func": "sum", "k": 100}, torch.float16, 60000.0),
    ("task_arithmetic", {"lam": 1.0}, torch.float8_e4m3fn, 400.0),  # torch's cast to e4m3fn saturates at 448
    ("average", {}, torch.float32, F32),  # (F32 + F32) overflows before the division
]


@pytest.mark.parametrize("method, hp, dtype, value", CASES)
def test_overflow_is_an_error_in_memory(method, hp, dtype, value):
    pre, fts = _inputs(dtype, value)
    with pytest.raises(merging.MergeInputError, match="merged tensor 'a' overflowed"):
        merging.merge(method, pre, fts, **hp)
    out = merging.merge(method, pre, fts, check_finite=False, **hp)
    assert not torch.isfinite(out["a"].float()).all()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method, hp, dtype, value", CASES)
def test_overflow_is_an_error_in_merge_to_file(tmp_path, method, hp, dtype, value, fused):
    pre, fts = _inputs(dtype, value)
    out = tmp_path / "new" / "merged.safetensors"
    with pytest.raises(merging.MergeInputError, match="merged tensor 'a' overflowed"):
        merging.merge_to_file(method, pre, fts, out, fused=fused, **hp)
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_result_rounding_to_inf_is_an_error(tmp_path):
    """A float32 result just above bfloat16's range is finite before the cast and Inf after it (the
    native chunk kernel checked the float32 value)."""
    big = torch.finfo(torch.bfloat16).max
    pre = {"a": torch.zeros(4096, dtype=torch.bfloat16)}
    fts = [{"a": torch.full((4096,), big, dtype=torch.bfloat16)}, {"a": torch.full((4096,), 1e36, dtype=torch.bfloat16)}]
    for fused in (True, False):
        with pytest.raises(merging.MergeInputError, match="merged tensor 'a' overflowed"):
            merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "o.safetensors", lam=1.0, fused=fused, chunk=1024)


def test_float8_e4m3fn_overflow_is_an_error_not_a_clamped_448(tmp_path):
    """e4m3fn has no Inf and torch's cast clamps to ±448; a result past it must still be an overflow
    (every path), while one that merely rounds down to 448 is not."""
    e4 = torch.float8_e4m3fn
    pre = {"a": torch.zeros(4096, dtype=e4)}
    fts = [{"a": torch.full((4096,), 400.0, dtype=e4)}, {"a": torch.full((4096,), 100.0, dtype=e4)}]
    for kw in ({}, {"fused": False}, {"chunk": 1024, "threads": 2}):
        with pytest.raises(merging.MergeInputError, match=r"merged tensor 'a' overflowed .*float8_e4m3fn"):
            merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "o.safetensors", lam=1.0, **kw)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(merging.MergeInputError, match=r"θ0 \+ λ·τ tensor 'a' overflowed"):
        merging.apply_task_vector(pre, {"a": torch.full((4096,), 1000.0)})
    with pytest.raises(merging.MergeInputError, match="merged tensor 'a' overflowed"):
        merging.tall_masks(pre, fts)
    # e4m3fn stores 400 and 100 as 384 and 96: 0.955 · 480 = 458.4 rounds to 448 (the next step would be
    # 480), so it is no overflow
    assert merging.merge("task_arithmetic", pre, fts, lam=0.955)["a"].float().eq(448).all()


def test_unchecked_tall_masks_give_nan_not_a_clamped_448_in_float8_e4m3fn():
    """check_finite=False lets an overflow through as NaN for e4m3fn (as merge does), never as ±448."""
    e4 = torch.float8_e4m3fn
    pre = {"a": torch.full((8,), 100.0, dtype=e4)}
    fts = [{"a": torch.full((8,), 320.0, dtype=e4)} for _ in range(2)]
    tall = merging.tall_masks(pre, fts, lam=0.4, check_finite=False)  # θ0 + τ_MTL = 96 + 2·224 (100 is stored as 96)
    assert tall.merged["a"].float().isnan().all()
    assert tall.reconstruct(0)["a"].float().isnan().all()


@pytest.mark.parametrize("mtv", ["sum", "ties"])
def test_tall_masks_overflow_is_an_error(tmp_path, mtv):
    pre, fts = _inputs(torch.float32, 3e38)
    hp = {"mtv": mtv, "merge_func": "sum", "k": 100} if mtv == "ties" else {"mtv": mtv}
    with pytest.raises(merging.MergeInputError, match="merged tensor 'a' overflowed"):
        merging.tall_masks(pre, fts, **hp)
    with pytest.raises(merging.MergeInputError, match="merged tensor 'a' overflowed"):
        merging.write_tall_store(pre, fts, tmp_path / "store", **hp)
    assert not (tmp_path / "store").exists()
    pre16, fts16 = _inputs(torch.float16, 60000.0)
    with pytest.raises(merging.MergeInputError, match="merged tensor 'a' overflowed"):
        merging.tall_masks(pre16, fts16)


def test_finite_merges_are_unchanged_by_the_check():
    pre, fts = _inputs(torch.float16, 100.0)
    assert torch.equal(merging.merge("ties", pre, fts, merge_func="sum", k=100)["a"], torch.full((8,), 300.0, dtype=torch.float16))
