"""Samples/s of the Lightning training path (MultiTaskModule + Trainer) vs a bare PyTorch loop.

Same model, data, batch size and optimiser (fused AdamW, as MultiTaskModule builds it); the two are
interleaved in one process so machine noise hits both alike. Reports the median of each and the
ratio Lightning / bare (target >= 0.98).

    python scripts/bench_train.py --rounds 3 --steps 40
    python scripts/bench_train.py --clock cpu --threads 1   # on a shared machine: process CPU time
"""
from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from mtl.data import create_datamodule
from mtl.models import create_model
from mtl.module import MultiTaskModule, cosine_with_warmup

TASKS = ["semseg", "depth", "normals", "edges", "classification", "regression"]
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set from --clock


def make_model(args):
    torch.manual_seed(0)
    return create_model(TASKS, backbone={"name": args.backbone, "out_indices": [1, 2, 3, 4]},
                        decoder={"name": "hps", "channels": 64})


def batches(dm, n):
    while True:
        for b in dm.train_dataloader():
            yield b
            n -= 1
            if n == 0:
                return


def bare_loop(args, dm) -> float:
    model = make_model(args).train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    # the optimiser MultiTaskModule.configure_optimizers builds (fused AdamW, two groups)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3,
                            fused=True)
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, int(0.05 * total)))
    tasks = model.tasks
    start = None
    for i, batch in enumerate(batches(dm, total)):
        if i == args.warmup:
            start = clock()
        x = batch["image"]
        preds = model(x)
        loss = sum(t.weight * t.loss(preds[n], batch[t.target_key]) for n, t in tasks.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return args.steps * args.batch_size / (clock() - start)


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = clock()

    def on_train_end(self, trainer, module):
        self.end = clock()


def lightning_loop(args, dm) -> float:
    module = MultiTaskModule(make_model(args), lr=1e-3, weight_decay=1e-4)
    timer = _Timer(args.warmup)
    callbacks = [timer]
    if args.progress:
        callbacks.append(L.pytorch.callbacks.RichProgressBar())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=args.progress, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    return args.steps * args.batch_size / (timer.end - timer.start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--size", type=int, default=48)  # the demo's image size
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="disable the Lightning progress bar")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or the process's CPU time (stable on a loaded machine)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args()
    from script_cli import require_positive

    require_positive(args, ["size", "batch_size", "steps", "rounds", "threads"])
    require_positive(args, ["warmup"], least=0)  # a negative one never started the clock: TypeError after training
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)

    dm = create_datamodule("scenes", size=args.size, n_train=512, n_val=32, n_test=32, batch_size=args.batch_size)
    dm.setup("fit")
    results = {"bare": [], "lightning": []}
    for r in range(args.rounds):
        for name, fn in (("bare", bare_loop), ("lightning", lightning_loop)) if r % 2 == 0 else \
                (("lightning", lightning_loop), ("bare", bare_loop)):
            results[name].append(fn(args, dm))
            print(f"round {r} {name:9s} {results[name][-1]:8.1f} samples/s ({args.clock})", flush=True)
    bare, light = statistics.median(results["bare"]), statistics.median(results["lightning"])
    print("\n| backbone | size | batch | bare loop (samples/s) | Lightning path (samples/s) | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.backbone} | {args.size} | {args.batch_size} | {bare:.1f} | {light:.1f} | {light / bare:.3f} |")


if __name__ == "__main__":
    from script_cli import run

    run(main)
