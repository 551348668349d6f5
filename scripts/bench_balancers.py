"""Benchmark every balancer on `scenes`: same seed, model, data and step budget.

1. single-task baselines (one `mtl-train` run per task, same recipe) -> OUT/baselines.json
   (or pass --baselines); the runs OUT/runs/stl_<task> are reused like the others below, and
   OUT/baselines.json is rebuilt from them;
2. one multi-task run per method through the real training job (`mtl.train.run`), Δm% against
   the baselines from each run's metrics.json;
3. a timing phase: every method's training step (forward + balancer + AdamW step) on the same
   batch, methods interleaved in shuffled rounds; reported: the fastest step of each method and
   its ratio to ew's fastest (least disturbed by other jobs on a shared machine), and the median
   over rounds of the within-round ratio to ew;
4. a markdown table (stdout and OUT/balancers.md) and OUT/results.json.

    python scripts/bench_balancers.py --out outputs/bench_balancers            # everything
    python scripts/bench_balancers.py --methods ew,pcgrad,upgrad@features      # a subset

A method is a registry name, optionally `@features` (representation-level aggregation).
Finished runs (OUT/runs/<key>/metrics.json) are reused unless --force, only when they ran the same recipe:
a run of other settings (another --epochs, --size, ...) is refused with an error naming them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import random
import statistics
import time
from pathlib import Path

import torch

from mtl.balancers import BALANCERS, check_finite, create_balancer, freeze_norm_stats

TASKS = ["semseg", "depth", "normals", "edges", "classification", "regression"]
REP_LEVEL = ["upgrad@features", "mgda@features"]
VARIANTS = ["famo+recompute=false"]  # FAMO without the extra forward (loss decrease seen on the next batch)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_balancers")
    p.add_argument("--methods", default=",".join(BALANCERS.names() + REP_LEVEL + VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--n-val", type=int, default=256)
    p.add_argument("--n-test", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--baselines", default=None, help="existing baselines JSON (else trained into OUT)")
    p.add_argument("--timing-rounds", type=int, default=8)
    p.add_argument("--timing-steps", type=int, default=2)
    p.add_argument("--skip-training", action="store_true", help="only the timing phase (+ table from existing runs)")
    p.add_argument("--force", action="store_true", help="retrain runs that already finished")
    return p.parse_args(argv)


def split_method(method: str) -> tuple[str, dict]:
    """``name[@level][+key=value...]``, e.g. ``upgrad@features`` or ``famo+recompute=false``."""
    import yaml

    head, *extra = method.split("+")
    name, _, level = head.partition("@")
    BALANCERS.get(name)  # an unknown name raises with the valid names
    kw = {"level": level} if level else {}
    for item in extra:
        key, _, value = item.partition("=")
        kw[key] = yaml.safe_load(value)
    return name, kw


def run_key(method: str) -> str:
    return method.replace("@", "_").replace("+", "_").replace("=", "-")


def recipe(args) -> list[str]:
    return [
        "experiment=scenes_hps", f"seed={args.seed}", f"data.size={args.size}", f"data.n_train={args.n_train}",
        f"data.n_val={args.n_val}", f"data.n_test={args.n_test}", f"data.batch_size={args.batch_size}",
        f"backbone.name={args.backbone}", f"decoder.channels={args.channels}", f"optim.lr={args.lr}",
        f"trainer.max_epochs={args.epochs}", "viz.num_samples=0", "~callbacks.progress_bar",
        "+trainer.enable_progress_bar=false", "+callbacks.step_timer._target_=mtl.balancers.timing.StepTimer",
    ]


def train_run(args, out: Path, key: str, overrides: list[str]) -> dict:
    from bench_runs import record, reusable
    from mtl.train import run

    run_dir = out / "runs" / key
    overrides = recipe(args) + overrides
    if not args.force and reusable(run_dir, overrides):
        print(f"[bench] {key}: reusing {run_dir}", flush=True)
    else:
        start = time.perf_counter()
        if run_dir.exists():  # --force, or a half-written run: train it again from scratch
            shutil.rmtree(run_dir)
        run(overrides, run_dir=run_dir)
        record(run_dir, overrides)
        print(f"[bench] {key}: trained in {time.perf_counter() - start:.0f}s", flush=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    timing = run_dir / "step_time.json"
    metrics["step_time"] = json.loads(timing.read_text()) if timing.exists() else {}
    return metrics


def baselines(args, out: Path) -> Path:
    from bench_runs import single_task_baselines

    if args.baselines:
        return Path(args.baselines)
    path = out / "baselines.json"
    return single_task_baselines(path, TASKS, lambda task: train_run(
        args, out, f"stl_{task}", [f"task={task}", "balancer=ew", f"baselines.save_to={path.resolve()}"]))


# --- timing phase ----------------------------------------------------------------------------


def time_methods(args, methods: list[str]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Fastest seconds per training step, its ratio to ew's fastest, and the median over
    interleaved rounds of the within-round ratio to ew."""
    from mtl.data import create_datamodule
    from mtl.models import create_model

    dm = create_datamodule("scenes", size=args.size, n_train=args.batch_size, n_val=args.batch_size,
                           n_test=args.batch_size, batch_size=args.batch_size, seed=args.seed,
                           cache_dir=str(Path(args.out) / "timing_data"))
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    x = batch["image"]

    setups = {}
    for method in methods:
        name, kw = split_method(method)
        torch.manual_seed(args.seed)
        model = create_model(TASKS, backbone={"name": args.backbone}, decoder={"name": "hps", "channels": args.channels})
        balancer = create_balancer(name, TASKS, **kw)
        opt = torch.optim.AdamW(list(model.parameters()) + list(balancer.parameters()), lr=args.lr)
        setups[method] = (model.train(), balancer, opt)

    def step(model, balancer, opt, i):
        from mtl.balancers import StepContext

        def losses_of(names):
            preds = model.heads(model.shared(x), tuple(x.shape[-2:]), names)
            return {n: model.tasks[n].loss(preds[n], batch[model.tasks[n].target_key]) for n in names}

        def recompute(tasks=None):
            with freeze_norm_stats(model):
                return losses_of(list(tasks) if tasks is not None else TASKS)

        z = model.shared(x)
        preds = model.heads(z, tuple(x.shape[-2:]))
        losses = {n: t.loss(preds[n], batch[t.target_key]) * t.weight for n, t in model.tasks.items()}
        check_finite(losses)
        ctx = StepContext(losses, model.shared_parameters(), {t: model.task_parameters(t) for t in TASKS}, z,
                          recompute=recompute, step=i)
        opt.zero_grad(set_to_none=True)
        balancer.backward(ctx)
        opt.step()
        balancer.after_step(ctx)

    # per round: each method's median step time; the ratio to ew is taken within a round, so slow
    # drifts in machine load (other jobs on a shared machine) cancel; the order is shuffled per round
    rng = random.Random(args.seed)
    samples_all: dict[str, list[float]] = {m: [] for m in methods}
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.timing_rounds + 1):  # round 0 warms up (cvxpy problem set-up, allocator)
        order = list(setups)
        rng.shuffle(order)
        round_samples: dict[str, list[float]] = {}
        for method in order:
            model, balancer, opt = setups[method]
            samples = round_samples[method] = []
            for i in range(args.timing_steps):
                t0 = time.perf_counter()
                step(model, balancer, opt, r * args.timing_steps + i)
                samples.append(time.perf_counter() - t0)
        if r > 0:
            ew = statistics.median(round_samples["ew"])
            for method, samples in round_samples.items():
                samples_all[method].extend(samples)
                ratios[method].append(statistics.median(samples) / ew)
        print(f"[bench] timing round {r}/{args.timing_rounds} done", flush=True)
    # the fastest sample is the least disturbed by other jobs: its ratio is the headline figure,
    # the median of within-round ratios is reported next to it
    fastest = {m: min(v) for m, v in samples_all.items()}
    return (fastest,
            {m: fastest[m] / fastest["ew"] for m in methods},
            {m: statistics.median(v) for m, v in ratios.items()})


# --- table -----------------------------------------------------------------------------------


def table(methods: list[str], results: dict[str, dict], step_times: dict[str, float], ratios: dict[str, float],
          median_ratios: dict[str, float], primary: dict[str, str]) -> str:
    cols = [f"{t} {primary[t]}" for t in TASKS]
    lines = ["| method | " + " | ".join(cols) + " | Δm% | s/step (min) | × ew (min) | × ew (median) |",
             "|---" * (len(cols) + 5) + "|"]
    for method in methods:
        test = results.get(method, {}).get("test", {})
        cells = [f"{test[t][primary[t]]:.4f}" if t in test else "—" for t in TASKS]
        dm = results.get(method, {}).get("delta_m", {}).get("value")
        cells.append(f"{dm:+.2f}" if dm is not None else "—")
        st = step_times.get(method)
        cells += [f"{st:.3f}", f"{ratios[method]:.2f}", f"{median_ratios[method]:.2f}"] if st else ["—"] * 3
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    from script_cli import require_positive

    args = parse_args()
    require_positive(args, ["size", "n_train", "n_val", "n_test", "batch_size", "epochs", "channels",
                            "timing_rounds", "timing_steps"])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "ew" not in methods:
        methods.insert(0, "ew")  # the reference for the time ratio
    for m in methods:
        split_method(m)
    if args.baselines and not args.skip_training and not Path(args.baselines).is_file():
        raise FileNotFoundError(f"--baselines {args.baselines}: file not found")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a refused run leaves no empty --out

    from mtl.tasks import create_task

    primary = {t: create_task(t).primary for t in TASKS}
    results: dict[str, dict] = {}
    if not args.skip_training:
        base = baselines(args, out)
        for method in methods:
            name, kw = split_method(method)
            overrides = [f"balancer={name}", f"baselines.path={base.resolve()}"]
            overrides += [f"balancer.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in kw.items()]
            results[method] = train_run(args, out, run_key(method), overrides)
    else:
        for method in methods:
            path = out / "runs" / run_key(method) / "metrics.json"
            if path.exists():
                results[method] = json.loads(path.read_text())
    step_times, ratios, median_ratios = time_methods(args, methods)
    md = table(methods, results, step_times, ratios, median_ratios, primary)
    (out / "balancers.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "fastest_step_s": step_times, "fastest_vs_ew": ratios,
         "median_round_ratio_vs_ew": median_ratios,
         "runs": {m: {"test": r.get("test"), "delta_m": r.get("delta_m"), "train_step_time": r.get("step_time"),
                      "fit_seconds": r.get("fit_seconds")} for m, r in results.items()}}, indent=2))
    print(md)


if __name__ == "__main__":
    from script_cli import run

    run(main)
