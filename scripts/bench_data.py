"""Data-loader throughput of ``data=nyuv2`` vs the training step rate, in one process.

Writes a synthetic NYUv2-sized fixture (288x384, the MTAN/LibMTL npy layout: float32 images, labels,
depth, normals) to a temporary folder, then reports in samples/s:
  * read: loading the folder into memory (``setup``, once per run);
  * loader: iterating ``train_dataloader()`` (the per-epoch cost that could starve training);
  * step: forward + backward + AdamW of the ``experiment=nyuv2`` network (resnet18 + HPS decoder,
    semseg/depth/normals) on those batches.
Loader and step rounds are interleaved so machine noise hits both alike; medians and the ratio
loader / step (> 1: data never starves the model) are printed.

    python scripts/bench_data.py --n 48 --rounds 3 --steps 3
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtl.data import create_datamodule
from mtl.models import create_model
from mtl.tasks import create_task

HW = (288, 384)


def write_fixture(root: Path, n_train: int, n_val: int) -> None:
    rng = np.random.default_rng(0)
    h, w = HW
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in ("image", "label", "depth", "normal"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(root / split / "image" / f"{i}.npy", rng.random((h, w, 3), dtype=np.float32))
            np.save(root / split / "label" / f"{i}.npy", rng.integers(-1, 13, (h, w)).astype(np.float32))
            np.save(root / split / "depth" / f"{i}.npy", rng.uniform(0, 10, (h, w, 1)).astype(np.float32))
            nrm = rng.normal(size=(h, w, 3)).astype(np.float32)
            np.save(root / split / "normal" / f"{i}.npy", nrm / np.linalg.norm(nrm, axis=-1, keepdims=True))


def loader_rate(dm) -> float:
    n, start = 0, time.perf_counter()
    for batch in dm.train_dataloader():
        n += len(batch["image"])
    return n / (time.perf_counter() - start)


def step_rate(model, opt, dm, steps: int) -> float:
    tasks = model.tasks
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(steps + 1)]
    n, start = 0, None
    for i, batch in enumerate(batches):
        if i == 1:  # the first step is warm-up
            start = time.perf_counter()
        preds = model(batch["image"])
        loss = sum(t.loss(preds[name], batch[t.target_key]) for name, t in tasks.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(batch["image"]) if i else 0
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="training samples in the fixture")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per round")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    from script_cli import require_positive

    require_positive(args, ["n", "batch_size", "rounds", "steps", "threads"])
    require_positive(args, ["num_workers"], least=0)
    batches = args.n // args.batch_size + (args.n % args.batch_size > 0)
    if batches < args.steps + 1:  # one warm-up step, then the timed ones
        raise ValueError(f"--steps {args.steps} needs {args.steps + 1} training batches (one warm-up); --n {args.n} at "
                 f"--batch-size {args.batch_size} gives {batches}: raise --n or lower --steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_fixture(Path(tmp), args.n, 4)
        print(f"fixture: {args.n} train samples at {HW[0]}x{HW[1]} written in {time.perf_counter() - t0:.1f}s",
              flush=True)
        dm = create_datamodule("nyuv2", root=tmp, batch_size=args.batch_size, num_workers=args.num_workers)
        t0 = time.perf_counter()
        dm.setup()
        read = (args.n + 4) / (time.perf_counter() - t0)
        torch.manual_seed(0)
        tasks = [create_task("semseg", num_classes=13), create_task("depth", metrics=["abs_err", "abs_rel"]),
                 create_task("normals")]
        model = create_model(tasks, backbone={"name": "resnet18", "out_indices": [1, 2, 3, 4]},
                             decoder={"name": "hps"}).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
        loads, steps = [], []
        for r in range(args.rounds):
            loads.append(loader_rate(dm))
            steps.append(step_rate(model, opt, dm, args.steps))
            print(f"round {r + 1}/{args.rounds}: loader {loads[-1]:.1f} samples/s, step {steps[-1]:.2f} samples/s",
                  flush=True)
    load, step = statistics.median(loads), statistics.median(steps)
    print("\n| measure | samples/s |\n|---|---|")
    print(f"| read folder into memory (setup) | {read:.1f} |")
    print(f"| train_dataloader iteration | {load:.1f} |")
    print(f"| training step (resnet18 + HPS, 3 tasks, batch {args.batch_size}) | {step:.2f} |")
    print(f"| ratio loader / step | {load / step:.2f}x |")


if __name__ == "__main__":
    from script_cli import run

    run(main)
