"""Where one training step of the demo's six-task model goes, and what each speed switch buys.

Part 1 (``--profile``): torch.profiler over a few steps of the demo model (resnet10t + HPS, six
tasks, scenes data), split into data fetch, uint8 -> float, backbone, neck, heads, losses, backward
and the optimiser step.

Part 2: A/B variants of the step interleaved round by round in one process (machine noise hits all
alike); each is reported as wall and CPU ms/step and its CPU time per sample as a ratio to the
baseline's (on a loaded machine the process's CPU time is the stable measure; ``--threads 1`` makes it
pure work):

    baseline        the step as MultiTaskModule runs it (fused AdamW, the tasks' own losses)
    unfused_adamw   AdamW as torch picks it on CPU (a per-parameter loop of small ops)
    indexed_losses  depth/normals losses by boolean indexing and F.normalize (their former form)
    channels_last   model and input in channels-last memory format
    monitor         the balancer monitor's gradient cosines (T extra backwards) on every step
    threads_1       torch.set_num_threads(1) for the step
    size_N          the baseline step on N px inputs (e.g. size_64 against --size 48)
    batch_N         the baseline step on batches of N (e.g. batch_16 against --batch-size 32)
    single_TASK     the step of a model with that one task (e.g. single_semseg); with several, their mean
    eval_forward    the evaluation forward (eval mode, no grad) of the six-task model

    python scripts/profile_step.py --size 48 --rounds 4 --threads 1 --profile
    python scripts/profile_step.py --size 48 --rounds 4 --threads 1 --variants baseline,size_64,batch_16,\
eval_forward,single_semseg,single_depth,single_normals,single_edges,single_classification,single_regression
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from mtl.balancers import BalancerMonitor, StepContext
from mtl.data import create_datamodule
from mtl.models import create_model

TASKS = ["semseg", "depth", "normals", "edges", "classification", "regression"]
PARTS = ("data", "normalize", "backbone", "neck", "heads", "losses", "backward", "optimizer")


def make_model(tasks: list[str] = TASKS):
    torch.manual_seed(0)
    return create_model(list(tasks), backbone={"name": "resnet10t", "out_indices": [1, 2, 3, 4]},
                        decoder={"name": "hps", "channels": 64}).train()


def indexed_loss(kind: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The depth / normals losses in their former form (same values, boolean indexing)."""
    if kind == "depth":
        valid = target > 0
        return F.l1_loss(pred.float()[valid], target.float()[valid])
    valid = (target != 0).any(dim=1)
    cos = (F.normalize(pred.float(), dim=1) * F.normalize(target.float(), dim=1)).sum(dim=1)
    return (1.0 - cos[valid]).mean()


def make_step(fused: bool = True, channels_last: bool = False, monitor: bool = False,
              threads: int | None = None, indexed: bool = False, tasks: list[str] = TASKS,
              evaluate: bool = False) -> Callable[[dict], None]:
    model = make_model(tasks)
    if evaluate:  # what validation and test run per batch
        model.eval()

        @torch.no_grad()
        def forward(batch: dict) -> None:
            x = batch["image"]
            model.heads(model.shared(x), tuple(x.shape[-2:]))

        return forward
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True if fused else None)

    def loss(name, task, pred, target):
        if indexed and task.kind in ("depth", "normals"):
            return indexed_loss(task.kind, pred, target)
        return task.loss(pred, target)

    mon = BalancerMonitor(every=1) if monitor else None
    default_threads = torch.get_num_threads()

    def step(batch: dict) -> None:
        if threads:
            torch.set_num_threads(threads)
        x = batch["image"]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        z = model.shared(x)
        preds = model.heads(z, tuple(x.shape[-2:]))
        losses = {n: loss(n, t, preds[n], batch[t.target_key]) for n, t in model.tasks.items()}
        if mon:
            mon.before_backward(StepContext(losses=losses, shared_params=model.shared_parameters(), task_params={},
                                            features=z, backward=None, recompute=None, step=0, epoch=0))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        if threads:
            torch.set_num_threads(default_threads)

    return step


def profile_parts(ds, batch_size: int, steps: int) -> dict[str, float]:
    """Share of the step's CPU time per part (torch.profiler, after two warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        with record_function("data"):
            batch = ds.__getitems__(torch.randperm(len(ds))[:batch_size].tolist())
        with record_function("normalize"):
            x = model.normalize(batch["image"])
        with record_function("backbone"):
            feats = model.backbone(x)
        with record_function("neck"):
            z = model.decoder.shared(feats)
        with record_function("heads"):
            preds = model.heads(z, tuple(x.shape[-2:]))
        with record_function("losses"):
            loss = sum(t.loss(preds[n], batch[t.target_key]) for n, t in model.tasks.items())
        with record_function("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("optimizer"):
            opt.step()

    step(), step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in PARTS}
    whole = sum(totals.values())
    return {k: totals.get(k, 0.0) / whole for k in PARTS}


FIXED = {"baseline": {}, "unfused_adamw": {"fused": False}, "indexed_losses": {"indexed": True},
         "channels_last": {"channels_last": True}, "monitor": {"monitor": True}, "threads_1": {"threads": 1},
         "eval_forward": {"evaluate": True}}


def variant(name: str, size: int, batch_size: int) -> tuple[dict, int, int]:
    """A --variants name as (make_step's options, input size, batch size)."""
    if name in FIXED:
        return FIXED[name], size, batch_size
    kind, _, value = name.partition("_")
    if kind == "single" and value in TASKS:
        return {"tasks": [value]}, size, batch_size
    if kind in ("size", "batch") and value.isdigit() and int(value) >= 1:
        return {}, int(value) if kind == "size" else size, int(value) if kind == "batch" else batch_size
    raise ValueError(f"--variants: unknown {name!r} (valid: {', '.join(FIXED)}, size_N, batch_N, "
                     f"single_<task> with a task of {', '.join(TASKS)})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--profile", action="store_true", help="also print the per-part profile")
    p.add_argument("--variants", default="baseline,unfused_adamw,indexed_losses,channels_last,monitor,threads_1",
                   help="comma-separated; see above")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["size", "batch_size", "rounds", "steps", "threads"])
    names = [v for v in args.variants.split(",") if v]
    shapes = {n: variant(n, args.size, args.batch_size) for n in names}  # unknown names refused before any work
    if "baseline" not in names:
        raise ValueError("--variants must include baseline (every variant is timed against it)")
    if args.threads:
        torch.set_num_threads(args.threads)

    most = max(b for _, _, b in shapes.values())
    data = {s: create_datamodule("scenes", size=s, n_train=8 * most, n_val=most, n_test=most, batch_size=most)
            .dataset("train") for s in sorted({s for _, s, _ in shapes.values()})}
    batches = {(s, b): [data[s].__getitems__(list(range(i * b, (i + 1) * b))) for i in range(8)]
               for _, s, b in shapes.values()}
    ds = data[args.size]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}px, batch {args.batch_size}",
          flush=True)
    if args.profile:
        shares = profile_parts(ds, args.batch_size, steps=4)
        print("| part | share of the step |\n|---|---|")
        for k, v in shares.items():
            print(f"| {k} | {100 * v:.1f} % |")

    steps = {n: make_step(**shapes[n][0]) for n in names}
    data_of = {n: batches[shapes[n][1:]] for n in names}
    for n, s in steps.items():  # warm-up: first calls allocate and pick kernels
        s(data_of[n][0]), s(data_of[n][1])
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                steps[n](data_of[n][(r * args.steps + i) % 8])
            wall[n].append((time.perf_counter() - start) / args.steps)
            cpu[n].append((time.process_time() - start_cpu) / args.steps)
        print(f"round {r}: " + ", ".join(f"{n} {1000 * cpu[n][-1]:.0f} ms cpu" for n in names), flush=True)
    per_sample = {n: statistics.median(cpu[n]) / shapes[n][2] for n in names}
    print("\n| variant | input | wall ms/step | CPU ms/step | samples per CPU-second | CPU time per sample, ratio to "
          "baseline |")
    print("|---|---|---|---|---|---|")
    for n in names:
        w, c, (_, size, batch) = statistics.median(wall[n]), statistics.median(cpu[n]), shapes[n]
        print(f"| {n} | {batch} x {size} px | {1000 * w:.0f} | {1000 * c:.0f} | {batch / c:.1f} | "
              f"{per_sample[n] / per_sample['baseline']:.3f} |")
    single = [per_sample[n] / per_sample["baseline"] for n in names if n.startswith("single_")]
    if len(single) > 1:
        print(f"\nsingle-task steps: mean {statistics.mean(single):.3f} of the six-task step "
              f"({min(single):.2f}–{max(single):.2f})")


if __name__ == "__main__":
    from script_cli import run

    run(main)
