"""Peak memory of the whole-tensor merge kernels, as a multiple of the largest tensor's float32 size.

Writes a base and T fine-tuned `.safetensors` files (one `rows × 1024` tensor, the "largest tensor", plus a
small one) under --workdir (use /dev/shm, so the inputs are page cache the process maps, as on a real
run), then merges them with `merging.merge_to_file(..., threads=1)` in a fresh interpreter per method and
reports VmHWM (high-water RSS) after the merge minus VmHWM after `import merging`.

    python scripts/bench_merge_memory.py --workdir /dev/shm/dm --models 3 --rows 16384 --dtype float32 \\
        --runs 'dare {"p": 0.5}' 'dare {"p": 0.5, "base": "ties"}' 'consensus {}'
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def vm_hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def make(folder: Path, models: int, rows: int, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(rows, 1024, generator=g).to(dt), "small": torch.randn(64, 64, generator=g).to(dt)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / "base.safetensors"))
    for t in range(models):
        save_file({k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dt) for k, v in base.items()},
                  str(folder / f"ft{t}.safetensors"))


def worker(folder: Path, models: int, method: str, hp: dict) -> float:
    import merging

    before = vm_hwm_mb()
    merging.merge_to_file(method, folder / "base.safetensors", [folder / f"ft{t}.safetensors" for t in range(models)],
                          folder / "out.safetensors", overwrite=True, threads=1, **hp)
    return vm_hwm_mb() - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--rows", type=int, default=16384, help="rows of the largest tensor (× 1024 columns)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--runs", nargs="+", default=['dare {"p": 0.5}'], help="'<method> <json hyperparameters>'")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs (reused by the next run)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.workdir) / f"{args.models}_{args.rows}_{args.dtype}"
    if args.worker:
        print(json.dumps(worker(folder, args.models, args.worker[0], json.loads(args.worker[1]))))
        return
    if args.models < 1 or args.rows < 1:
        ap.error("--models and --rows must be >= 1")
    make(folder, args.models, args.rows, args.dtype)
    try:
        table(args, folder)
    finally:  # in /dev/shm the inputs are RAM: never leave them behind unasked
        if not args.keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def table(args, folder: Path) -> None:
    fp32 = args.rows * 1024 * 4 / 2**20
    print("| run | T | largest tensor | peak RSS above import | × its float32 size |\n|---|---:|---|---:|---:|")
    for run in args.runs:
        method, _, hp = run.partition(" ")
        out = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--models", str(args.models),
                              "--rows", str(args.rows), "--dtype", args.dtype, "--worker", method, hp or "{}"],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            sys.exit(f"{run}: {out.stderr.strip().splitlines()[-1]}")
        mb = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {run} | {args.models} | {args.rows}×1024 {args.dtype} | +{mb:.0f} MB | {mb / fp32:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
