"""`merging.chunks`: in-order results, the next tensor's chunks started early, and the page-cache probe
that keeps read-ahead hints off cached inputs."""
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging
from merging.chunks import Chunks
from merging.safetensors_source import SafetensorsSource, in_page_cache


def _ctx(sizes: dict[str, int]):
    infos = {k: SimpleNamespace(numel=n) for k, n in sizes.items()}
    return SimpleNamespace(plan=SimpleNamespace(infos=infos))


def _recording(log, key, delay=0.0):
    def fn(ws, s, e):
        log.append((key, s, threading.current_thread().name))
        time.sleep(delay)
        return (key, s, e)
    return fn


def test_results_in_order_with_every_worker_count():
    for workers in (1, 2, 3):
        ch = Chunks(_ctx({"a": 10_000}), chunk=1024, workers=workers)
        got = list(ch.map("a", lambda ws, s, e: (s, e)))
        ch.close()
        assert got == [(s, min(s + 1024, 10_000)) for s in range(0, 10_000, 1024)]


def test_next_tensor_starts_before_its_turn_and_is_not_redone():
    log = []
    ch = Chunks(_ctx({"a": 4096, "b": 8192}), chunk=1024, workers=2)
    ch.ahead = lambda key: ("b", _recording(log, "b")) if key == "a" else None
    got_a = list(ch.map("a", _recording(log, "a", delay=0.02)))
    early = ch._early
    assert early.key == "b" and early.pending, "idle workers should start b while a's last chunks run"
    seen_b = []
    got_b = list(ch.map("b", lambda ws, s, e: seen_b.append(s) or ("b", s, e)))
    ch.close()
    assert got_a == [("a", s, s + 1024) for s in range(0, 4096, 1024)]
    assert got_b == [("b", s, s + 1024) for s in range(0, 8192, 1024)]  # complete, in order
    early = {s for k, s, name in log if k == "b" and name.startswith("mtl-merge")}
    assert early and not early & set(seen_b)  # each chunk computed once
    assert len(ch._free) == len(ch._spaces)  # every workspace back


def test_early_chunks_of_a_tensor_never_asked_for_are_dropped():
    log = []
    ch = Chunks(_ctx({"a": 4096, "b": 4096, "c": 2048}), chunk=1024, workers=2)
    ch.ahead = lambda key: ("b", _recording(log, "b")) if key == "a" else None
    list(ch.map("a", _recording(log, "a", delay=0.01)))
    got_c = list(ch.map("c", lambda ws, s, e: ("c", s)))  # b was skipped after all
    assert got_c == [("c", 0), ("c", 1024)]
    assert len(ch._free) == len(ch._spaces)
    ch.close()


def test_early_start_errors_surface_with_their_own_tensor():
    ch = Chunks(_ctx({"a": 4096, "b": 4096}), chunk=1024, workers=2)

    def bad(ws, s, e):
        raise OSError("b is unreadable")

    ch.ahead = lambda key: ("b", bad) if key == "a" else None
    assert len(list(ch.map("a", lambda ws, s, e: s))) == 4  # a itself is unaffected
    with pytest.raises(OSError, match="b is unreadable"):
        list(ch.map("b", bad))
    ch.close()


def test_merge_to_file_with_lookahead_equals_merge(tmp_path):
    g = torch.Generator().manual_seed(3)
    shapes = {f"l{i}.weight": (70, 41 + i) for i in range(6)} | {"norm": (40,)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    paths = []
    for i, sd in enumerate([pre, *fts]):
        save_file(sd, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    for method, hp in (("task_arithmetic", {"lam": 0.3}), ("average", {})):
        ref = merging.merge(method, pre, fts, **hp)
        for threads in (1, 2, 3):
            out = merging.merge_to_file(method, paths[0], paths[1:], tmp_path / f"{method}{threads}.safetensors",
                                        chunk=1024, threads=threads, **hp)
            got = load_file(str(out))
            assert all(torch.equal(got[k], ref[k]) for k in ref), (method, threads)


MB = 1 << 20


def _uncached_file(tmp_path):
    p = tmp_path / "probe.bin"
    with open(p, "wb") as f:
        f.write(os.urandom(8 * MB))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead around our reads
    return fd


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="needs preadv with RWF_NOWAIT (Linux)")
def test_page_cache_probe(tmp_path):
    # each range is probed once: a probe that misses may itself start reading that page in
    fd = _uncached_file(tmp_path)
    try:
        if in_page_cache(fd, 7 * MB, 1):
            pytest.skip("this file system keeps the pages after POSIX_FADV_DONTNEED (tmpfs)")
        os.pread(fd, MB, 0)
        assert in_page_cache(fd, 0, MB)
        assert not in_page_cache(fd, 0, 4 * MB)  # the probe at 1.14 MB misses
        os.pread(fd, 8 * MB, 0)
        assert in_page_cache(fd, 0, 8 * MB)
        assert not in_page_cache(fd, 0, 0)
    finally:
        os.close(fd)


def test_hints_only_for_bytes_not_in_page_cache(tmp_path, monkeypatch):
    save_file({"w": torch.randn(512, 512)}, tmp_path / "m.safetensors")
    src = SafetensorsSource(tmp_path / "m.safetensors")
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr("merging.safetensors_source.in_page_cache", lambda fd, s, n: True)
    src.prefetch("w")
    assert calls == []
    monkeypatch.setattr("merging.safetensors_source.in_page_cache", lambda fd, s, n: False)
    src.prefetch("w")
    assert calls == [os.POSIX_FADV_WILLNEED]
    src.close()
