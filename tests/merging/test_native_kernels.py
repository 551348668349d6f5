"""The native chunk kernel (`merging.native`): bit-identical to the torch chunk path, and optional."""
import logging
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging
from merging import native
from merging.methods import TaskArithmetic

LIB = native.library()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler (the torch chunk path is used)")
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def _random(n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Wide magnitudes, with float32 subnormals and exact zeros sprinkled in."""
    x = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))
    x[::13] *= 1e-39
    x[::29] = 0.0
    return x.to(dtype)


def _torch_chunk(m: TaskArithmetic, xs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The torch chunk path's operations (`_task_arithmetic`): float32 inputs, `combine`, output dtype."""
    cx = [x.float() for x in xs]
    bufs = [torch.empty(cx[0].numel()) for _ in range(3)]
    return m.combine(cx[0], lambda t, out: torch.sub(cx[t + 1], cx[0], out=out), len(xs) - 1, *bufs).to(dtype)


@needs_lib
def test_bf16_conversions_match_torch_on_every_pattern():
    every = torch.arange(65536, dtype=torch.int32)
    bf = every.to(torch.int16).view(torch.bfloat16)
    widened = torch.empty(65536)
    LIB.mtl_bf16_to_f32(65536, bf.data_ptr(), widened.data_ptr())
    assert torch.equal(widened.view(torch.int32), bf.float().view(torch.int32))
    g = torch.Generator().manual_seed(0)
    bits = torch.cat([every << 16,  # every bfloat16 value, exactly representable
                      (every << 16) | 0x8000,  # exact ties: round half to even
                      (every << 16) | 0x8001, (every << 16) | 0x7FFF,
                      torch.randint(-2**31, 2**31 - 1, (500_000,), generator=g, dtype=torch.int32)])
    f = bits.view(torch.float32)
    got = torch.empty(f.numel(), dtype=torch.int16)
    LIB.mtl_f32_to_bf16(f.numel(), f.data_ptr(), got.data_ptr())
    nan = torch.isnan(f)
    assert torch.equal(got[~nan], f[~nan].to(torch.bfloat16).view(torch.int16))
    assert torch.isnan(got[nan].view(torch.bfloat16).float()).all()  # NaNs stay NaN (never reach a merge output)
    # by hand: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 → the even one, 1; 1 + 3·2^-8 → 1 + 2^-6
    half = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 3.4e38])  # above the largest bfloat16 + half an ulp: inf
    LIB.mtl_f32_to_bf16(3, half.data_ptr(), got.data_ptr())
    assert got[:3].view(torch.bfloat16).float().tolist() == [1.0, 1 + 2**-6, math.inf]


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_task_arithmetic_matches_torch_chunk_path(dtype):
    g = torch.Generator().manual_seed(1)
    lams = [0.3, 0.1, 1 / 3, 1.0, -2.5, 1e-30]  # 0.1, 1/3: not representable in float32
    for T in range(1, 6):
        for n in (1, 15, 511, 513, 1031, 4099):  # not multiples of any vector width or block
            xs = [_random(n, dtype, g) for _ in range(T + 1)]
            for lam in lams + [[lams[(t + T) % len(lams)] for t in range(T)]]:
                m = TaskArithmetic(lam=lam)
                m.bind(T)
                out = torch.empty(n, dtype=dtype)
                assert native.task_arithmetic(LIB, xs, native.float32_lams(m.lams), m.scalar, out)
                assert _same_bits(out, _torch_chunk(m, xs, dtype)), (T, n, lam)


@needs_lib
def test_task_arithmetic_rounds_like_torch_by_hand():
    # scalar λ: θ0 + λ·τ rounds once (a fused multiply-add, as torch.add(·, alpha=λ) on CPU):
    # τ = 1 + 2^-12, λ = 1 + 2^-12, θ0 = −(1 + 2^-11): λτ = 1 + 2^-11 + 2^-24 exactly, so the sum is
    # 2^-24; rounding the product first (a tie, to even: 1 + 2^-11) would give 0.
    pre, ft = torch.tensor([-(1 + 2**-11)]), torch.tensor([-(2**-12)])
    out = torch.empty(1)
    assert native.task_arithmetic(LIB, [pre, ft], native.float32_lams([1 + 2**-12]), True, out)
    assert out.item() == 2**-24
    # λ = 0.1 is used as the float32 nearest to it (torch's scalar conversion), not as the double
    m = TaskArithmetic(lam=0.1)
    m.bind(1)
    assert native.float32_lams(m.lams) == [float(torch.tensor(0.1, dtype=torch.float32))]
    assert native.float32_lams([1e39]) is None  # not a float32: the torch path decides


@needs_lib
def test_non_finite_results_are_flagged():
    pre = torch.zeros(1000)
    ft = torch.ones(1000)
    ft[777] = math.inf
    out = torch.empty(1000)
    assert not native.task_arithmetic(LIB, [pre, ft], [0.5], True, out)
    huge = torch.full((1000,), 3e38)  # finite inputs whose sum overflows
    assert not native.average(LIB, [huge, huge], out)
    assert native.average(LIB, [huge, -huge], out) and torch.equal(out, torch.zeros(1000))


@needs_lib
def test_bfloat16_results_rounding_to_inf_are_flagged():
    """A float32 result finite but above bfloat16's range rounds to Inf when stored: flagged too."""
    big = torch.finfo(torch.bfloat16).max
    pre = torch.zeros(1000, dtype=torch.bfloat16)
    xs = [pre, torch.full((1000,), big, dtype=torch.bfloat16), torch.full((1000,), 1e36, dtype=torch.bfloat16)]
    out = torch.empty(1000, dtype=torch.bfloat16)
    assert not native.task_arithmetic(LIB, xs, [1.0], True, out)
    assert not native.average(LIB, [xs[1], xs[1]], out)  # (max + max) / 2 overflows before the division
    assert native.task_arithmetic(LIB, xs[:2], [1.0], True, out) and torch.equal(out, xs[1])


def _models(folder, dtype, T, seed=0, shapes=((37, 111), (3001,), (5, 7, 3, 3), (9,))):
    g = torch.Generator().manual_seed(seed)
    pre = {f"k{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    sds = [pre] + [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(T)]
    paths = []
    for i, sd in enumerate(sds):
        save_file({k: v.to(dtype) for k, v in sd.items()}, str(folder / f"m{i}.safetensors"))
        paths.append(folder / f"m{i}.safetensors")
    return paths[0], paths[1:]


def _count_native_calls(monkeypatch) -> dict:
    calls = {"n": 0}
    for name in ("task_arithmetic", "average", "pread_merge"):
        real = getattr(native, name)

        def spy(*a, _real=real, **k):
            calls["n"] += 1
            return _real(*a, **k)

        monkeypatch.setattr(native, name, spy)
    return calls


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method,hp", [("task_arithmetic", {"lam": 0.3}), ("task_arithmetic", {"lam": [0.2, -0.5, 1.1]}),
                                       ("average", {})])
def test_file_merge_identical_with_and_without_native(method, hp, dtype, tmp_path, monkeypatch):
    pre, fts = _models(tmp_path, dtype, T=3)
    calls = _count_native_calls(monkeypatch)
    fast = merging.merge_to_file(method, pre, fts, tmp_path / "fast.safetensors", chunk=1024, threads=2, **hp)
    assert calls["n"] > 0  # the native kernel ran
    monkeypatch.setenv("MTLKIT_NATIVE", "0")
    calls["n"] = 0
    slow = merging.merge_to_file(method, pre, fts, tmp_path / "slow.safetensors", chunk=1024, threads=1, **hp)
    assert calls["n"] == 0
    whole = merging.merge_to_file(method, pre, fts, tmp_path / "whole.safetensors", fused=False, **hp)
    assert fast.read_bytes() == slow.read_bytes() == whole.read_bytes()
    # in-memory inputs: the native kernel gets the chunk buffers instead of the files
    monkeypatch.delenv("MTLKIT_NATIVE")
    mem = [load_file(str(p)) for p in (pre, *fts)]
    buffered = merging.merge_to_file(method, mem[0], mem[1:], tmp_path / "mem.safetensors", chunk=1024, **hp)
    assert calls["n"] > 0 and buffered.read_bytes() == whole.read_bytes()


@needs_lib
def test_truncated_file_is_reported_as_before(tmp_path):
    pre, fts = _models(tmp_path, torch.bfloat16, T=2)
    size = fts[0].stat().st_size
    with open(fts[0], "r+b") as f:  # the last tensor loses its tail: the header still describes it
        f.truncate(size - 100)
    with pytest.raises(merging.MergeInputError, match=r"m1.safetensors: truncated safetensors file"):
        merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "o.safetensors", chunk=1024, lam=0.5)
    # a file that shrinks once opened: the native kernel's failed read is reported by the torch path
    with open(fts[0], "r+b") as f:
        f.truncate(size)
    src = merging.sources.open_source(fts[0])
    with open(fts[0], "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(merging.MergeInputError, match=r"m1.safetensors: file ends inside tensor"):
        merging.merge_to_file("task_arithmetic", pre, [src, fts[1]], tmp_path / "o.safetensors", chunk=1024, lam=0.5)
    assert not (tmp_path / "o.safetensors").exists()


def test_torch_path_when_switched_off_or_no_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLKIT_NATIVE", "0")
    assert native.library() is None
    monkeypatch.delenv("MTLKIT_NATIVE")
    # no compiler, or one that fails: None (and one debug line), then the merge still runs
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.library() is None
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    monkeypatch.setenv("MTLKIT_KERNEL_CACHE", str(tmp_path / "cache"))
    assert native.library() is None
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written
    pre, fts = _models(tmp_path, torch.bfloat16, T=2)
    out = merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "o.safetensors", chunk=1024, lam=0.5)
    ref = merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "r.safetensors", fused=False, lam=0.5)
    assert out.read_bytes() == ref.read_bytes()


@needs_lib
def test_builds_once_into_a_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("MTLKIT_KERNEL_CACHE", str(tmp_path / "cache"))
    lib = native.library()
    assert lib is not None and native.library() is lib
    assert len(list((tmp_path / "cache").glob("chunk_kernels-*.so"))) == 1
    [record] = (tmp_path / "cache").glob("chunk_kernels-*.so.sha256")
    assert record.stat().st_mode & 0o044 == 0o044  # others sharing the cache can check it too
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("chunk_kernels-")]


@needs_lib
@pytest.mark.parametrize("check_finite", [True, False])
def test_non_finite_chunk_goes_through_torch(check_finite, tmp_path, monkeypatch):
    pre, fts = _models(tmp_path, torch.bfloat16, T=2)
    bad = merging.sources.open_source(fts[1])
    sd = {k: bad.get(k).clone() for k in bad.keys()}
    bad.close()
    sd["k0.weight"][3, 5] = math.nan
    sd["k1.weight"][2000] = math.inf
    save_file(sd, str(fts[1]))
    kw = {} if check_finite else {"check_finite": False}
    if check_finite:
        with pytest.raises(merging.MergeInputError, match=r"'k0.weight' in .*m2.safetensors has non-finite values"):
            merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "o.safetensors", chunk=1024, **kw)
        assert not (tmp_path / "o.safetensors").exists()
        return
    fast = merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "fast.safetensors", chunk=1024, **kw)
    monkeypatch.setenv("MTLKIT_NATIVE", "0")
    slow = merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "slow.safetensors", chunk=1024, **kw)
    assert fast.read_bytes() == slow.read_bytes()  # NaN/Inf bit patterns included


def test_file_sources_give_their_byte_span_and_in_memory_ones_none(tmp_path):
    """The native kernel reads files itself only through `StateSource.file_span`: the span points at the
    tensor's bytes (read back and compared); an in-memory source has none."""
    from merging.sources import open_source

    pre, _ = _models(tmp_path, torch.float32, T=1)
    src = open_source(pre)
    key = "k1.weight"
    fd, off = src.file_span(key)
    want = src.get(key).reshape(-1)
    got = torch.frombuffer(bytearray(os.pread(fd, want.numel() * 4, off)), dtype=torch.float32)
    assert torch.equal(got, want)
    assert open_source({key: want}).file_span(key) is None

    class Own(type(src)):  # reads its own way: the native kernel must go through read_into
        def read_into(self, key, start, out):
            return super().read_into(key, start, out)

    assert Own(pre).file_span(key) is None
    src.close()


@needs_lib
@pytest.mark.parametrize("size", [0, 1000])
def test_damaged_cache_entry_is_rebuilt_not_loaded(size, tmp_path, monkeypatch):
    """A truncated cached .so (SIGBUS when mapped) or an empty one is rebuilt under the same name (the first
    flag variant's), not loaded or skipped for a slower variant."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("MTLKIT_KERNEL_CACHE", str(tmp_path / "cache"))
    assert native.library() is not None
    [so] = (tmp_path / "cache").glob("chunk_kernels-*.so")
    whole = so.read_bytes()
    damaged = tmp_path / "damaged.so"  # a new file: this process has the loaded one mapped
    damaged.write_bytes(whole[:size])
    os.replace(damaged, so)
    monkeypatch.setattr(native, "_tried", False)
    assert native._build() is not None
    assert list((tmp_path / "cache").glob("chunk_kernels-*.so")) == [so]
    assert so.stat().st_size == len(whole)


@needs_lib
def test_truncated_cache_entry_does_not_crash_a_new_process(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "MTLKIT_KERNEL_CACHE": str(tmp_path / "cache")}
    code = "from merging import native; import sys; sys.exit(native.library() is None)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    [so] = (tmp_path / "cache").glob("chunk_kernels-*.so")
    os.truncate(so, 1000)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert "does not match its size and sha256 record" in r.stderr and str(so) in r.stderr


@pytest.mark.parametrize("var, value, under", [("MTLKIT_KERNEL_CACHE", "~/kc", ("kc",)),
                                               ("XDG_CACHE_HOME", "~/xdg", ("xdg", "mtlkit", "kernels"))])
def test_a_kernel_cache_with_a_tilde_is_under_home(home_and_cwd, monkeypatch, var, value, under):
    """MTLKIT_KERNEL_CACHE="~/kc" made a literal ./~/kc folder in the working directory."""
    home, cwd = home_and_cwd
    monkeypatch.delenv("MTLKIT_KERNEL_CACHE", raising=False)
    monkeypatch.delenv("MTL_DATA_CACHE", raising=False)
    monkeypatch.setenv(var, value)
    assert native.cache_dir() == home.joinpath(*under)


def test_mtl_data_cache_moves_the_kernel_cache_unless_it_is_named(tmp_path, monkeypatch):
    """MTL_DATA_CACHE moved the data but the kernel cache still wrote to ~/.cache/mtlkit/kernels."""
    monkeypatch.delenv("MTLKIT_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MTL_DATA_CACHE", str(tmp_path / "data"))
    assert native.cache_dir() == tmp_path / "data" / "kernels"
    monkeypatch.setenv("MTLKIT_KERNEL_CACHE", str(tmp_path / "kc"))
    assert native.cache_dir() == tmp_path / "kc"
    monkeypatch.delenv("MTLKIT_KERNEL_CACHE")
    monkeypatch.setenv("MTL_DATA_CACHE", "")  # set but empty counts as unset, as for the data
    assert native.cache_dir() == tmp_path / "xdg" / "mtlkit" / "kernels"


@needs_lib
def test_an_unwritable_kernel_cache_is_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    """A kernel folder that cannot be written sent every merge down the slower torch path with a debug line only."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("MTLKIT_KERNEL_CACHE", str(tmp_path / "afile" / "kc"))
    with caplog.at_level(logging.WARNING, logger="merging.native"):
        assert native.library() is None
    [rec] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"cannot write the kernel cache {tmp_path}/afile/kc" in rec.getMessage()
    assert "torch chunk path" in rec.getMessage() and "MTLKIT_KERNEL_CACHE" in rec.getMessage()


@needs_lib
def test_an_unwritable_data_cache_leaves_the_kernel_in_the_next_folder(tmp_path, monkeypatch, caplog):
    """A read-only MTL_DATA_CACHE (data prepared once on shared storage) turned the kernel off with a warning on every
    merge; the kernel goes to $XDG_CACHE_HOME/mtlkit/kernels then, as without MTL_DATA_CACHE."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.delenv("MTLKIT_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("MTL_DATA_CACHE", str(tmp_path / "afile"))  # nothing can be made under it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dirs() == [tmp_path / "afile" / "kernels", tmp_path / "xdg" / "mtlkit" / "kernels"]
    with caplog.at_level(logging.WARNING, logger="merging.native"):
        assert native.library() is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    [so] = (tmp_path / "xdg" / "mtlkit" / "kernels").glob("*.so")
    assert so.stat().st_mode & 0o777 == 0o755  # readable by every user of a shared cache, as its .sha256 record


@needs_lib
def test_a_kernel_this_user_cannot_read_is_rebuilt_in_its_writable_folder(tmp_path, monkeypatch, caplog):
    """Another user's 0600 object or record in a writable shared cache turned the kernel off, warning 'cannot read
    the kernel cache <folder>' and to set MTLKIT_KERNEL_CACHE to a writable folder (it was one); it is replaced."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("MTLKIT_KERNEL_CACHE", str(tmp_path / "kc"))
    assert native.library() is not None  # built and recorded
    [so] = (tmp_path / "kc").glob("*.so")
    before = so.stat().st_ino
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    real, calls = native._digest, []

    def denied_once(path):  # the check reads the cached object: denied, as for another user's 0600 file
        calls.append(path)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(native, "_digest", denied_once)
    with caplog.at_level(logging.WARNING, logger="merging.native"):
        assert native.library() is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert so.stat().st_ino != before  # rebuilt in place (a new file renamed over it)


@needs_lib
def test_a_kernel_file_this_user_cannot_replace_is_named(tmp_path, monkeypatch, caplog):
    """Another user's file in a sticky shared folder cannot be replaced: the warning names it."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("MTLKIT_KERNEL_CACHE", str(tmp_path / "kc"))

    def denied(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(native, "_replace_synced", denied)
    with caplog.at_level(logging.WARNING, logger="merging.native"):
        assert native.library() is None
    [rec] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"cannot replace {tmp_path}/kc/chunk_kernels-" in rec and "Permission denied" in rec, rec


@pytest.mark.parametrize("home", [None, "rel"])
def test_no_absolute_home_leaves_the_default_kernel_cache_out(tmp_path, monkeypatch, caplog, home):
    """With HOME unset (no password-database entry either) or relative, ~/.cache/mtlkit/kernels was a folder under
    the working directory (./~/.cache/... or rel/.cache/...): the kernel was built there. That candidate is left
    out; with none left the torch path runs, with one warning saying why."""
    monkeypatch.chdir(tmp_path)
    for var in ("MTLKIT_KERNEL_CACHE", "MTL_DATA_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    if home is None:
        monkeypatch.delenv("HOME", raising=False)
        monkeypatch.setattr(os.path, "expanduser", lambda p: p)  # as without a password-database entry
    else:
        monkeypatch.setenv("HOME", home)
    assert native.cache_dirs() == []
    monkeypatch.setenv("MTL_DATA_CACHE", str(tmp_path / "data"))
    assert native.cache_dirs() == [tmp_path / "data" / "kernels"]
    monkeypatch.delenv("MTL_DATA_CACHE")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/sh")  # any file: no compiler is needed to get this far
    with caplog.at_level(logging.WARNING, logger="merging.native"):
        assert native.library() is None
    [rec] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "no home folder" in rec.getMessage() and "torch chunk path" in rec.getMessage()
    assert list(tmp_path.iterdir()) == []  # nothing built under the working directory
