"""Wall time of the six single-task baselines as one multirun: Hydra's sequential launcher vs
``launcher=joblib`` with N workers, same overrides, one after the other in this process.

    python scripts/bench_launchers.py --smoke          # timm test backbone, a few steps per run
    python scripts/bench_launchers.py                  # the demo recipe (experiment=scenes_hps)

Threads are split fairly: the sequential multirun uses all ``--cores`` torch threads per job, each of
the N joblib workers ``cores // N`` (OMP_NUM_THREADS), so the comparison is about filling the cores,
not oversubscribing them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TASKS = "semseg,depth,normals,edges,classification,regression"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_launchers")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    return p.parse_args()


def multirun(extra: list[str], out: Path, threads: int) -> float:
    env = dict(os.environ, MTL_OUTPUT_DIR=str(out), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "mtl.cli.train", "-m", "experiment=scenes_hps", f"task={TASKS}", "logger=none",
           "viz.num_samples=0", "log_weights_every=0", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:  # the error: line first, then the run's own last words
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}); its stderr ends:\n"
                         f"{proc.stderr[-3000:]}")
    runs = list(out.glob("*/multiruns/*/*/metrics.json"))
    if len(runs) != 6:
        raise SystemExit(f"error: expected 6 finished runs under {out}, found {len(runs)}")
    return seconds


def main():
    from script_cli import require_positive

    args = parse_args()
    require_positive(args, ["workers", "cores"])  # before the sequential multirun, not after it
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    try:  # before the sequential multirun: an unwritable --out failed only once it had run
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"--out {args.out}: cannot create {out}: {e.strerror}") from None
    extra = ["debug=smoke"] if args.smoke else []
    seq = multirun(extra, out / "sequential", args.cores)
    par = multirun(extra + ["launcher=joblib", f"hydra.launcher.n_jobs={args.workers}"], out / "joblib",
                   max(1, args.cores // args.workers))
    result = {"smoke": args.smoke, "cores": args.cores, "workers": args.workers, "sequential_s": round(seq, 1),
              "joblib_s": round(par, 1), "speedup": round(seq / par, 2),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| launcher | jobs at once | torch threads per job | wall s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(f"| basic (sequential) | 1 | {args.cores} | {seq:.1f} | 1.00 |")
    print(f"| joblib | {args.workers} | {max(1, args.cores // args.workers)} | {par:.1f} | {seq / par:.2f} |")


if __name__ == "__main__":
    from script_cli import run

    run(main)
