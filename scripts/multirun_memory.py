"""Resident memory of a process that runs several `mtl-train` jobs one after another, as a Hydra `-m`
multirun does, and what each job leaves alive.

    python scripts/multirun_memory.py --jobs 6 [--smoke]          # mtl.train.run, one call per job
    python scripts/multirun_memory.py --jobs 6 --smoke --hydra    # the real `mtl-train -m` multirun

Prints, after every job (or, with --hydra, before the next): RSS (MB) and the number of trainers,
modules, data modules and models still in memory, unreachable reference cycles included. A job that
releases everything leaves the counts at 0 and the RSS flat after the first jobs. A table of these
figures (with each job's seconds, without --hydra) closes the run.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def live(kinds) -> dict[str, int]:
    """Instances still in memory, collected or not: what a job left in reference cycles counts too."""
    counts = {k.__name__: 0 for k in kinds}
    with warnings.catch_warnings():  # isinstance on torch's deprecated torch.distributed.reduce_op warns
        warnings.simplefilter("ignore", FutureWarning)
        for o in gc.get_objects():
            for k in kinds:
                if isinstance(o, k):
                    counts[k.__name__] += 1
    return counts


def summary(rows: list[tuple[str, float | None, float, dict[str, int]]]) -> str:
    """The closing table: one row per measurement (when, job seconds, RSS, instances still in memory)."""
    kinds = list(rows[0][3]) if rows else []
    lines = ["| job | seconds | RSS MB | " + " | ".join(kinds) + " |", "|---|---:|---:|" + "---:|" * len(kinds)]
    lines += [f"| {when} | {'–' if sec is None else f'{sec:.1f}'} | {rss:.0f} | "
              + " | ".join(str(c[k]) for k in kinds) + " |" for when, sec, rss, c in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=6)
    p.add_argument("--smoke", action="store_true", help="debug=smoke data sizes (seconds per job)")
    p.add_argument("--hydra", action="store_true", help="through mtl-train's Hydra multirun (-m), in this process")
    p.add_argument("--no-release", action="store_true", help="skip the end-of-job release (the behaviour before it)")
    args = p.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["jobs"])

    import lightning as L

    from mtl.data.memory import TensorDataModule
    from mtl.models import MultiTaskModel
    from mtl.module import MultiTaskModule
    import mtl.train
    from mtl.train import run

    if args.no_release:
        mtl.train._release = lambda: None

    overrides = ["experiment=scenes_hps", "viz.num_samples=0", "~callbacks.progress_bar",
                 "+trainer.enable_progress_bar=false", "trainer.max_epochs=1", "++trainer.limit_train_batches=4",
                 "++trainer.limit_val_batches=2", "++trainer.limit_test_batches=2"]
    if args.smoke:
        overrides.insert(1, "debug=smoke")
    kinds = (L.Trainer, MultiTaskModule, MultiTaskModel, TensorDataModule)
    root = Path(tempfile.mkdtemp(prefix=f"multirun_memory_{os.getpid()}_"))  # removed at exit
    print(f"start: rss {rss_mb():.0f} MB", flush=True)
    rows = []
    balancers = ["ew", "dwa", "uw", "rlw", "famo", "gradnorm"]
    if args.hydra:
        from mtl.cli import train as cli

        inner, job = mtl.train.train, iter(range(args.jobs))

        def train(cfg, run_dir):  # what the previous jobs left, seen at the start of the next one
            counts, i = live(kinds), next(job)
            rows.append((f"before job {i}", None, rss_mb(), counts))
            print(f"before job {i}: rss {rows[-1][2]:.0f} MB  live "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
            return inner(cfg, run_dir)

        mtl.train.train = train
        os.environ["MTL_OUTPUT_DIR"] = str(root)
        sweep = ",".join(balancers[i % len(balancers)] for i in range(args.jobs))
        sys.argv = ["mtl-train", "-m", *overrides,
                    "logger=none", f"balancer={sweep}"]
        try:
            cli.main()
        except SystemExit:
            pass
        counts = live(kinds)
        rows.append(("after all", None, rss_mb(), counts))
        print(f"after all: rss {rows[-1][2]:.0f} MB  live " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        print("\n" + summary(rows), flush=True)
        return
    for i in range(args.jobs):
        t = time.perf_counter()
        run(overrides + [f"balancer={balancers[i % len(balancers)]}"], run_dir=root / str(i))
        seconds, counts = time.perf_counter() - t, live(kinds)
        rows.append((str(i), seconds, rss_mb(), counts))
        print(f"job {i}: {seconds:5.1f}s  rss {rows[-1][2]:.0f} MB  live "
              + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    print("\n" + summary(rows), flush=True)


if __name__ == "__main__":
    import atexit
    import shutil

    # the runs (checkpoints included) are scratch: only the printed memory figures matter
    atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True)
                             for p in Path(tempfile.gettempdir()).glob(f"multirun_memory_{os.getpid()}_*")])
    from script_cli import run

    run(main)
