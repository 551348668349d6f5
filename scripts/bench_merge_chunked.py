#!/usr/bin/env python
"""Chunk size and worker count of the chunked kernels (`merge_to_file(fused=True)`), with the native
chunk kernel and with the torch chunk path (`MTLKIT_NATIVE=0`), against the whole-tensor kernels and
two plain copies of the same input bytes, interleaved in one process.

    python scripts/bench_merge_chunked.py --size 0.25 --workdir /tmp/bllm --out /dev/shm/chunked \\
        [--method task_arithmetic|average|ties] [--chunks 65536 262144 1048576] [--workers 1 2] \\
        [--paths native torch] [--no-whole] [--repeat 2]

Inputs: the synthetic Llama-shaped bf16 folders of `bench_merge_llm.py` (generated once, kept in
`--workdir`), in page cache. `--out` on a tmpfs keeps the disk out of the timing. Prints wall time and
input bytes / time per run, and the 1-minute load average (the machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import merging  # noqa: E402
from bench_merge_llm import SIZES, copy_mmap, copy_pread, generate, warm  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=0.25, choices=sorted(SIZES))
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", default="/dev/shm/bench_chunked")
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1 << 16, 1 << 18, 1 << 20])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=["native", "torch"], choices=["native", "torch"],
                    help="chunk step: the native kernel (task arithmetic, average) and/or torch's operations")
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-tensor kernels")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    folders = generate(Path(args.workdir) / f"llama_{args.size}", args.size, args.models)
    files = [f for p in folders for f in sorted(p.glob("*.safetensors"))]
    nbytes = sum(f.stat().st_size for f in files)
    warm(folders)
    hp = {"task_arithmetic": {"lam": 0.3}, "average": {}}.get(args.method, {"trim": "per_tensor", "k": 20})

    def merge(path="native", **kw):
        os.environ["MTLKIT_NATIVE"] = "1" if path == "native" else "0"  # read at each merge
        merging.merge_to_file(args.method, folders[0], folders[1:], args.out, overwrite=True, shard_size="1GB", **hp, **kw)

    if "native" in args.paths:
        from merging import native

        print(f"# native kernel: {'loaded' if native.library() is not None else 'NOT available (torch path runs)'}")

    runs = [("memory copy (mmap)", lambda: copy_mmap(files)), ("memory copy (pread)", lambda: copy_pread(files))]
    runs += [(f"chunked {p}, chunk={c}, workers={w}", lambda c=c, w=w, p=p: merge(p, chunk=c, threads=w))
             for c in args.chunks for w in args.workers for p in args.paths]
    if not args.no_whole:
        runs += [(f"whole-tensor kernels, threads={w}", lambda w=w: merge(fused=False, threads=w)) for w in args.workers]
    print(f"# {args.method}, {args.size}B, {nbytes / 1e9:.2f} GB of inputs, load {os.getloadavg()[0]:.1f}", flush=True)
    for _ in range(args.repeat):
        for label, fn in runs:
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            print(f"{label:40s} {dt:7.2f} s  {nbytes / dt / 1e9:6.2f} GB/s  load {os.getloadavg()[0]:.1f}", flush=True)
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
