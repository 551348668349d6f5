#!/usr/bin/env python
"""Chunk size and worker count of the chunked kernels (`merge_to_file(fused=True)`), with the native
chunk kernel and with the torch chunk path (`MTLKIT_NATIVE=0`), against the whole-tensor kernels and
two plain copies of the same input bytes, interleaved in one process.

    python scripts/bench_merge_chunked.py --size 0.25 --workdir /tmp/bllm --out /dev/shm/chunked \\
        [--method task_arithmetic|average|ties] [--chunks 65536 262144 1048576] [--workers 1 2] \\
        [--paths native torch] [--no-whole] [--repeat 2]

Inputs: the synthetic Llama-shaped bf16 folders of `bench_merge_llm.py` (generated once, kept in
`--workdir`), in page cache. `--out` on a tmpfs keeps the disk out of the timing; the previous output is
removed before each timed merge. Prints wall time and input bytes / time per run, and the 1-minute load
average (the machine may be shared). Besides the two copies of the input bytes, two floors: the `pread`
copy plus writing the output's bytes to a new file in `--out` (what any file-to-file merge must do), and
"merge step only": the chunk kernels over every merged tensor, chunks discarded (no output file).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import merging  # noqa: E402
from bench_merge_llm import SIZES, copy_mmap, copy_pread, generate, ratios, warm  # noqa: E402
from merging.engine import KeyOptions, open_context, produce, torch_threads  # noqa: E402
from merging.kernels import DEFAULT_CHUNK, Chunks, Streamed, chunked_streams, fused_kernel  # noqa: E402
from merging.methods import create_method  # noqa: E402


def copy_and_write(files, out: Path, nbytes: int) -> None:
    """The pread copy of the inputs, then `nbytes` written to a new file under `out` in 1 MB pieces."""
    copy_pread(files)
    out.mkdir(parents=True, exist_ok=True)
    piece = memoryview(bytearray(1 << 20))
    with open(out / "copy.bin", "wb") as f:
        for _ in range(nbytes // len(piece)):
            f.write(piece)
        f.write(piece[: nbytes % len(piece)])


def merge_step(method: str, folders, hp: dict, chunk: int | None, workers: int, old: bool = False) -> None:
    """Every merged tensor through the chunk kernels (as `merge_to_file(fused=True)`), chunks discarded.
    `chunk` None: the kernel's default. `old`: the dispatch before 2026-12-02 — one chunk queued per
    worker, no early start of the next tensor, read-ahead hints also for cached bytes."""
    opts, hp = KeyOptions.split(dict(hp))
    m = create_method(method, **hp)
    kernel = fused_kernel(m)
    ctx = open_context(folders[0], folders[1:], opts, m.min_models(), method)
    try:
        ctx.chunks = Chunks(ctx, chunk or getattr(kernel, "chunk", DEFAULT_CHUNK), workers=workers,
                            depth=1 if old else 2)
        with torch_threads(1), always_hint(old):
            m.prepare(ctx, "radix")
            streams = chunked_streams(m, kernel, ctx.chunks)
            if old:
                ctx.chunks.ahead = None
            for _, t in produce(m, ctx, streams):
                if isinstance(t, Streamed):
                    for _ in t:
                        pass
    finally:
        ctx.chunks.close()
        ctx.close()


@contextmanager
def always_hint(on: bool):
    """Read-ahead hints also for bytes already in page cache (as before the page-cache probe)."""
    import merging.safetensors_source as sources

    probe = sources.in_page_cache
    if on:
        sources.in_page_cache = lambda fd, start, length: False
    try:
        yield
    finally:
        sources.in_page_cache = probe


def sync_hints(fn) -> None:
    """Run `fn` with the engine's read-ahead hints issued on the calling thread (as before they moved
    to a background thread)."""
    from merging.engine import Context

    background = Context.prefetch
    Context.prefetch = lambda self, key: [s.prefetch(key) for s in self.sources] and None
    try:
        fn()
    finally:
        Context.prefetch = background


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=0.25, choices=sorted(SIZES))
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", default="/dev/shm/bench_chunked")
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1 << 16, 1 << 18, 1 << 20],
                    help="entries per chunk; 0: the kernel's default (merge_to_file's)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=["native", "torch"], choices=["native", "torch"],
                    help="chunk step: the native kernel (task arithmetic, average) and/or torch's operations")
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-tensor kernels")
    ap.add_argument("--steps-only", action="store_true",
                    help="only the pread copy and the merge-step runs, back to back (no file-to-file merges)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--old-dispatch", action="store_true",
                    help="also time the merge step with the dispatch before 2026-12-02 (chunk 262144, one chunk "
                         "queued per worker, no early start of the next tensor, hints for cached bytes)")
    ap.add_argument("--sync-hints", action="store_true",
                    help="also time the merge step with the read-ahead hints on the merging thread (the old way)")
    args = ap.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["models", "workers", "repeat"])
    require_positive(args, ["chunks"], least=0)  # 0: the kernel's default
    hp = {"task_arithmetic": {"lam": 0.3}, "average": {}}.get(args.method, {"trim": "per_tensor", "k": 20})
    create_method(args.method, **hp)  # an unknown --method is refused before the inputs are generated
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not any(out.glob("*.safetensors")):  # --out is deleted between runs
        raise ValueError(f"--out {out} holds files that are not an earlier merge's (no .safetensors); "
                         "give an empty or new folder: this benchmark deletes --out")
    import warnings

    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    folders = generate(Path(args.workdir) / f"llama_{args.size}", args.size, args.models)
    files = [f for p in folders for f in sorted(p.glob("*.safetensors"))]
    nbytes = sum(f.stat().st_size for f in files)
    warm(folders)

    def merge(path="native", **kw):
        os.environ["MTLKIT_NATIVE"] = "1" if path == "native" else "0"  # read at each merge
        if kw.get("chunk") == 0:
            kw.pop("chunk")  # the kernel's default
        merging.merge_to_file(args.method, folders[0], folders[1:], args.out, overwrite=True, shard_size="1GB", **hp, **kw)

    def step(path, chunk, workers):
        os.environ["MTLKIT_NATIVE"] = "1" if path == "native" else "0"
        merge_step(args.method, folders, hp, chunk or None, workers)

    def old_step(path, workers):
        os.environ["MTLKIT_NATIVE"] = "1" if path == "native" else "0"
        merge_step(args.method, folders, hp, 1 << 18, workers, old=True)

    merge()
    out_bytes = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))

    if "native" in args.paths:
        from merging import native

        print(f"# native kernel: {'loaded' if native.library() is not None else 'NOT available (torch path runs)'}")

    runs = [("memory copy (mmap)", lambda: copy_mmap(files)), ("memory copy (pread)", lambda: copy_pread(files)),
            ("pread copy + writing the output bytes", lambda: copy_and_write(files, Path(args.out), out_bytes))]
    runs += [(f"merge step only {p}, chunk={c}, workers={w}", lambda c=c, w=w, p=p: step(p, c, w))
             for c in args.chunks for w in args.workers for p in args.paths]
    if args.old_dispatch:
        runs += [(f"merge step only {p}, OLD dispatch, workers={w}", lambda w=w, p=p: old_step(p, w))
                 for w in args.workers for p in args.paths]
    if args.sync_hints:
        runs += [(f"merge step only {p}, chunk={c}, workers={w}, sync hints",
                  lambda c=c, w=w, p=p: sync_hints(lambda: step(p, c, w)))
                 for c in args.chunks for w in args.workers for p in args.paths]
    runs += [(f"chunked {p}, chunk={c}, workers={w}", lambda c=c, w=w, p=p: merge(p, chunk=c, threads=w))
             for c in args.chunks for w in args.workers for p in args.paths]
    if args.steps_only:
        runs = [r for r in runs if r[0] == "memory copy (pread)" or r[0].startswith("merge step only")]
    if not args.no_whole and not args.steps_only:
        runs += [(f"whole-tensor kernels, threads={w}", lambda w=w: merge(fused=False, threads=w)) for w in args.workers]
    print(f"# {args.method}, {args.size}B, {nbytes / 1e9:.2f} GB of inputs, load {os.getloadavg()[0]:.1f}", flush=True)
    times: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for label, fn in runs:
            shutil.rmtree(args.out, ignore_errors=True)  # removing the last output is not part of a merge
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            times.setdefault(label, []).append({"seconds": dt})
            print(f"{label:50s} {dt:7.2f} s  {nbytes / dt / 1e9:6.2f} GB/s  load {os.getloadavg()[0]:.1f}", flush=True)
    shutil.rmtree(args.out, ignore_errors=True)
    print("\n".join(f"# ratio: {line}" for line in ratios(times, copy="memory copy (pread)", pairs=())), flush=True)


if __name__ == "__main__":
    from script_cli import run

    run(main)
