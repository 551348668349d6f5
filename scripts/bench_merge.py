#!/usr/bin/env python
"""Merging benchmarks: speed and peak memory of the streaming engine against in-memory baselines.

    python scripts/bench_merge.py            # full: ViT-B/32-shaped × 8 and Llama-shaped (134M) × 4
    python scripts/bench_merge.py --small    # a smoke version of the same runs (~1-2 min: ~40 subprocesses)
    python scripts/bench_merge.py --llm --sizes 0.25 0.5   # bf16 Llama-shaped, vs mergekit (bench_merge_llm.py)

ViT part: 8 fine-tuned copies of a random ViT-B/32-shaped float32 state dict (~88M parameters) plus the
pretrained one, as safetensors files. Task arithmetic and TIES (global top-20%) are run (a) with
`merging.merge_to_file` (streaming) and (b) with a straightforward in-memory implementation (load every
model, stack the task vectors, torch ops). Read bandwidth = bytes of all inputs / time to read them, four
ways: `safe_open` handing out every tensor, file by file, each touched by a sum; plain `read()` of each
file; the same after asking for all files at once (POSIX_FADV_WILLNEED); and the merge's own pattern
(key by key across all files, next key announced ahead, every tensor touched, nothing computed). Each is
measured with the files in page cache ("warm") and after evicting them with posix_fadvise(DONTNEED)
("cold"); task arithmetic's throughput is the same input bytes over its merge time, same cache state.

LLM part: 4 fine-tuned copies of a Llama-shaped float32 state dict (~134M parameters): per-tensor TIES
(top-k inside each tensor, as LLM merging tools do) streamed with `kthvalue` (and with the radix
select), against a per-tensor baseline written here that fully sorts each tensor's magnitudes.

Every run is a separate subprocess; its peak RSS is that process's VmHWM (high-water RSS since exec,
mapped file pages included), which includes the interpreter + torch import (reported as "import
baseline"). Files are created in
a temporary folder (--workdir) and deleted at the end. Results are printed as a markdown snippet.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from merge_bench_lib import (  # noqa: E402
    generate, llama_shapes, naive_task_arithmetic, naive_ties, numel, sort_ties_per_tensor, vit_shapes,
)


def evict(paths):
    """Drop the files' clean pages from page cache (best effort; no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- workers (run in their own process) ---------------------------------------------------------------
def vm_hwm_mb() -> float:
    """Peak RSS of this process since exec (VmHWM). ru_maxrss of a child is no good here: Linux folds in
    the pre-exec memory, i.e. the parent's RSS at fork time."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(spec: dict) -> dict:
    res = _work(spec)
    res["peak_rss_mb"] = vm_hwm_mb()
    return res


def _work(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    if kind == "baseline":
        import merging  # noqa: F401  (the import cost is what is measured)

        return {}
    pre, fts, out = spec["pre"], spec["fts"], spec.get("out")
    t0 = time.perf_counter()
    if kind == "read":
        from safetensors import safe_open

        nbytes = 0
        for p in [pre, *fts]:
            with safe_open(p, "pt") as f:
                for k in f.keys():
                    x = f.get_tensor(k)
                    x.sum()  # touch every byte
                    nbytes += x.numel() * x.element_size()
                    del x
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes}
    if kind == "engine_read":
        # The merge's own read pattern (merging's sources, key by key across all files, next key
        # announced ahead), touching every tensor but computing nothing: the I/O share of a merge.
        from merging.sources import open_source

        srcs = [open_source(p) for p in [pre, *fts]]
        keys = srcs[0].keys()
        nbytes = 0
        for i, k in enumerate(keys):
            if i + 1 < len(keys):
                for src in srcs:
                    src.prefetch(keys[i + 1])
            for src in srcs:
                x = src.get(k)
                x.sum()
                nbytes += x.numel() * x.element_size()
                del x
        for src in srcs:
            src.close()
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes}
    if kind in ("rawread", "rawread_prefetch"):
        # Plain read() of the files into one buffer: what the disk (or page cache) delivers. The
        # prefetch variant first asks for every file at once (POSIX_FADV_WILLNEED), so the device sees
        # a deep queue, as it does when the merge announces the next tensor of all 9 files.
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        nbytes = 0
        files = [open(p, "rb", buffering=0) for p in [pre, *fts]]
        for f in files:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if kind == "rawread_prefetch":
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        for f in files:
            while n := f.readinto(view):
                nbytes += n
            f.close()
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes}
    if kind == "stream":
        import merging

        # fused=False: the whole-tensor kernels (where `select` applies); --fused: merge_to_file's default
        merging.merge_to_file(spec["method"], pre, fts, out, overwrite=True, fused=spec.get("fused", False),
                              **spec.get("hp", {}))
    elif kind == "naive_ta":
        naive_task_arithmetic(pre, fts, out, spec["hp"]["lam"])
    elif kind == "naive_ties":
        naive_ties(pre, fts, out, spec["hp"]["k"], spec["hp"]["lam"])
    elif kind == "sort_ties_per_tensor":
        sort_ties_per_tensor(pre, fts, out, spec["hp"]["k"], spec["hp"]["lam"])
    else:
        raise ValueError(kind)
    return {"seconds": time.perf_counter() - t0}


FUSED = False  # set by --fused: the stream rows use the chunked kernels


def run_worker(spec: dict) -> dict:
    """Run one benchmark in a fresh interpreter, so each peak RSS (its VmHWM) is that run's alone."""
    spec = {**spec, "fused": FUSED}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE), "--worker", json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "process_seconds": wall}
    res = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    res["process_seconds"] = wall
    return res


# -- driver -------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_available_gb() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def fmt(r: dict, key="seconds", unit="s", digits=1):
    if "error" in r:
        return r["error"]
    if "skipped" in r:
        return "skipped"
    return f"{r[key]:.{digits}f} {unit}"


def bench_vit(root: Path, small: bool, T: int, results: dict, log, threads: int, repeat: int):
    shapes = vit_shapes(width=128, layers=2) if small else vit_shapes()
    P = numel(shapes)
    folder = root / "vit"
    folder.mkdir()
    log(f"generating ViT-B/32-shaped set: θ0 + {T} fine-tunes × {P / 1e6:.1f}M params")
    pre, fts = generate(folder, shapes, T)
    pre, fts = str(pre), [str(f) for f in fts]
    inputs = [pre, *fts]
    in_bytes = sum(os.path.getsize(p) for p in inputs)
    out = str(folder / "out.safetensors")
    rows = {}

    def run(name, spec, cold=False):
        if cold:
            evict(inputs)
        r = run_worker({**spec, "pre": pre, "fts": fts, "out": out, "threads": threads})
        log(f"  {name}: {fmt(r, digits=2)}  peak RSS {r.get('peak_rss_mb', float('nan')):.0f} MB")
        if os.path.exists(out):
            os.remove(out)
        best = rows.get(name)
        if best is None or ("seconds" in r and ("seconds" not in best or r["seconds"] < best["seconds"])):
            r["peak_rss_mb"] = max(r.get("peak_rss_mb", 0), (best or {}).get("peak_rss_mb", 0))
            rows[name] = r
        else:
            best["peak_rss_mb"] = max(best.get("peak_rss_mb", 0), r.get("peak_rss_mb", 0))
        return r

    ta = {"lam": 0.3}
    ties = {"k": 20, "lam": 1.0}
    run_worker({"kind": "read", "pre": pre, "fts": fts, "threads": threads})  # prime the page cache
    for cache in ("warm", "cold"):
        for _ in range(repeat):  # interleaved repeats, best time kept: the machine is shared and noisy
            run(f"safe_open read {cache}", {"kind": "read"}, cache == "cold")
            run(f"raw read {cache}", {"kind": "rawread"}, cache == "cold")
            run(f"raw read, all files prefetched {cache}", {"kind": "rawread_prefetch"}, cache == "cold")
            run(f"safe_open read, merge's pattern {cache}", {"kind": "engine_read"}, cache == "cold")
            run(f"stream TA {cache}", {"kind": "stream", "method": "task_arithmetic", "hp": ta}, cache == "cold")
            run(f"naive TA {cache}", {"kind": "naive_ta", "hp": ta}, cache == "cold")
    run("stream TIES", {"kind": "stream", "method": "ties", "hp": ties})
    need = 4.2 * T * P * 4 / 2**30 + 1.5
    if mem_available_gb() >= need + 4:  # keep room for the other people on this machine
        run("naive TIES", {"kind": "naive_ties", "hp": ties})
    else:
        rows["naive TIES"] = {"skipped": f"needs ~{need:.0f} GB, {mem_available_gb():.0f} GB available"}
        log(f"  naive TIES skipped: {rows['naive TIES']['skipped']}")
    results["vit"] = {"params": P, "T": T, "input_bytes": in_bytes, "runs": rows}
    shutil.rmtree(folder)


def bench_llama(root: Path, small: bool, T: int, results: dict, log, threads: int):
    shapes = llama_shapes(hidden=128, inter=384, layers=2, vocab=2000) if small else llama_shapes()
    P = numel(shapes)
    folder = root / "llama"
    folder.mkdir()
    log(f"generating Llama-shaped set: θ0 + {T} fine-tunes × {P / 1e6:.1f}M params")
    pre, fts = generate(folder, shapes, T, seed=1)
    pre, fts = str(pre), [str(f) for f in fts]
    out = str(folder / "out.safetensors")
    rows = {}
    hp = {"k": 20, "lam": 1.0}
    for name, spec in [
        ("stream per-tensor TIES (kthvalue)", {"kind": "stream", "method": "ties", "hp": {**hp, "trim": "per_tensor", "select": "kthvalue"}}),
        ("stream per-tensor TIES (radix)", {"kind": "stream", "method": "ties", "hp": {**hp, "trim": "per_tensor", "select": "radix"}}),
        ("full-sort per-tensor TIES", {"kind": "sort_ties_per_tensor", "hp": hp}),
    ]:
        r = run_worker({**spec, "pre": pre, "fts": fts, "out": out, "threads": threads})
        rows[name] = r
        log(f"  {name}: {fmt(r, digits=2)}  peak RSS {r.get('peak_rss_mb', float('nan')):.0f} MB")
        if os.path.exists(out):
            os.remove(out)
    results["llama"] = {"params": P, "T": T, "runs": rows}
    shutil.rmtree(folder)


def markdown(results: dict) -> str:
    L = []
    m = results["machine"]
    L.append(f"Machine: {m['cpus']}-core CPU ({m['cpu']}), {m['mem_gb']:.0f} GB RAM, torch {m['torch']} "
             f"({m['threads']} intra-op thread(s)); load average at start {m['loadavg']} (a load above the "
             f"core count means other work shared the machine and timings are noisy) (read/TA rows: best of the repeats, RSS: the largest). {m['date']}. Command: `{m['command']}`. Import baseline (python + torch + merging): "
             f"{results['baseline']['peak_rss_mb']:.0f} MB peak RSS, included in every RSS below.")
    L.append("")
    if "vit" in results:
        v = results["vit"]
        r = v["runs"]
        gb = v["input_bytes"] / 1e9
        L.append(f"**ViT-B/32-shaped, {v['T']} fine-tuned + pretrained** ({v['params'] / 1e6:.1f}M float32 params each, "
                 f"{gb:.2f} GB of inputs)")
        L.append("")
        L.append("| run | merge time | process wall | peak RSS |")
        L.append("|---|---|---|---|")
        for name, x in r.items():
            if "skipped" in x:
                L.append(f"| {name} | skipped ({x['skipped']}) | | |")
                continue
            L.append(f"| {name} | {fmt(x, digits=2)} | {fmt(x, 'process_seconds', digits=1)} | {x.get('peak_rss_mb', 0):.0f} MB |")
        L.append("")
        for cache in ("warm", "cold"):
            ta = r.get(f"stream TA {cache}", {})
            if "seconds" not in ta:
                continue
            thr = v["input_bytes"] / ta["seconds"] / 1e9
            parts = []
            for what in ("safe_open read", "raw read", "raw read, all files prefetched", "safe_open read, merge's pattern"):
                rd = r.get(f"{what} {cache}", {})
                if "seconds" in rd:
                    bw = rd["bytes"] / rd["seconds"] / 1e9
                    parts.append(f"{what} {bw:.2f} GB/s → TA at **{100 * thr / bw:.0f}%**")
            label = "files in page cache" if cache == "warm" else "files evicted from page cache (posix_fadvise DONTNEED)"
            L.append(f"- {label}: streaming TA {thr:.2f} GB/s of input; " + "; ".join(parts))
        L.append("")
    if "llama" in results:
        v = results["llama"]
        r = v["runs"]
        L.append(f"**Llama-shaped per-tensor TIES, {v['T']} fine-tuned** ({v['params'] / 1e6:.1f}M float32 params each, k=20%)")
        L.append("")
        L.append("| run | merge time | process wall | peak RSS |")
        L.append("|---|---|---|---|")
        for name, x in r.items():
            L.append(f"| {name} | {fmt(x, digits=2)} | {fmt(x, 'process_seconds', digits=1)} | {x.get('peak_rss_mb', 0):.0f} MB |")
        base = r.get("full-sort per-tensor TIES", {})
        for name in ("stream per-tensor TIES (kthvalue)", "stream per-tensor TIES (radix)"):
            x = r.get(name, {})
            if "seconds" in x and "seconds" in base:
                L.append(f"- {name}: **{base['seconds'] / x['seconds']:.1f}×** faster than the full sort")
        L.append("")
    return "\n".join(L)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--llm" in argv:  # synthetic Llama-shaped bf16 models against mergekit: scripts/bench_merge_llm.py
        sys.path.insert(0, str(HERE.parent))
        from bench_merge_llm import main as llm_main

        argv.remove("--llm")
        return llm_main(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="--llm (first): the bf16 Llama-shaped comparison with mergekit; its own "
                                        "options: python scripts/bench_merge.py --llm --help")
    ap.add_argument("--small", action="store_true", help="tiny shapes: a quick check that everything runs")
    ap.add_argument("--only", choices=["vit", "llama"], help="run one part")
    ap.add_argument("--workdir", default=None, help="where the temporary model files go (default: system temp)")
    ap.add_argument("--json", default=None, help="also write raw results here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads in every run (default 1: on a shared machine more threads stall)")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of the read and task-arithmetic runs (best kept)")
    ap.add_argument("--fused", action="store_true",
                    help="stream rows through merge_to_file's chunked kernels (its default; there per-tensor TIES "
                         "always selects by radix). Default: the whole-tensor kernels (fused=False) the "
                         "2026-11-26 tables in docs/BENCHMARKS.md measured; bench_merge_chunked.py compares both")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["threads", "repeat"])
    global FUSED
    FUSED = args.fused
    if args.workdir and not Path(args.workdir).is_dir():
        raise SystemExit(f"error: --workdir {args.workdir}: no such folder")
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import signal

    import torch

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` removes the files on kill

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="bench_merge_", dir=args.workdir))
    need_gb = 0.1 if args.small else 3.6
    free_gb = shutil.disk_usage(root).free / 1e9
    log(f"work folder {root}: {free_gb:.0f} GB free, needs ~{need_gb} GB")
    if free_gb < need_gb + 1:
        shutil.rmtree(root)
        raise SystemExit(f"error: not enough disk space in {root.parent}: {free_gb:.1f} GB free")
    results = {
        "machine": {
            "cpus": os.cpu_count(), "cpu": cpu_model(),
            "mem_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "torch": torch.__version__, "threads": args.threads,
            "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "command": "python " + " ".join(["scripts/bench_merge.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d"),
        }
    }
    try:
        results["baseline"] = run_worker({"kind": "baseline", "threads": args.threads})
        if args.only in (None, "vit"):
            bench_vit(root, args.small, 3 if args.small else 8, results, log, args.threads, args.repeat)
        if args.only in (None, "llama"):
            bench_llama(root, args.small, 3 if args.small else 4, results, log, args.threads)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    from script_cli import run

    run(main)
