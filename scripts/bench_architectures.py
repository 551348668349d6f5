"""Benchmark multi-task architectures on `scenes`: quality at one training budget, size and FLOPs,
MoE dispatch efficiency and single- vs all-task latency.

1. quality (--families): one `mtl-train` run per family with the same data, seed and epochs;
   per-task primary metrics, Δm% vs single-task baselines (hps, one run per task, same recipe;
   --no-baselines: Δm vs the hps multi-task run instead), params, FLOPs/sample (all tasks, one task);
   for routed families, the active-FLOPs identity: single-task FLOPs = non-expert FLOPs + k/E of the
   FLOPs of all experts on all tokens (both sides measured with mtl.flops.flop_counter: torch's
   FlopCounterMode plus the CPU attention kernel, which torch counts as 0 FLOPs);
   phases 2 and 3 run unless --skip-timing; --skip-quality runs them alone;
2. dispatch (--dispatch-experts/--dispatch-top-k/--dispatch-tokens): one MoE layer (router + sparse dispatch; E experts, top-k, N tokens, CPU)
   vs a dense MLP with k x the expert hidden width (the same active FLOPs), forward + backward,
   interleaved rounds, ratio of medians;
3. latency: the task-MoE ViT's inference, one task vs all tasks (eval, no grad).

    python scripts/bench_architectures.py --out outputs/bench_arch                 # everything
    python scripts/bench_architectures.py --families hps,moe --epochs 2            # a subset
    python scripts/bench_architectures.py --skip-quality                           # timing only

    python scripts/bench_architectures.py --family slimmable --part speed          # one family's own benchmark

A family is an entry of FAMILIES (its mtl-train overrides); add one there. `--family NAME` runs one
family's full benchmark: for `slimmable` that is scripts/bench_slimmable.py (width quality with and
without CI-KD, controllability, extracted vs sliced latency), which receives every other argument;
for the others, the quality run of that family plus the timing phases above.
Finished runs (OUT/runs/<key>/metrics.json, the single-task runs stl_<task> included; OUT/baselines.json
is rebuilt from those) are reused unless --force, only when they ran the same recipe: a run of other
settings (another --epochs, --size, ...) is refused with an error naming them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

TASKS = ["semseg", "depth", "normals", "edges", "classification", "regression"]
# family -> mtl-train overrides on top of the shared recipe
FAMILIES: dict[str, list[str]] = {
    "hps": ["experiment=scenes_hps"],
    "moe": ["experiment=scenes_moe", "decoder.num_experts=8"],
    "task_moe_vit": ["experiment=scenes_task_moe_vit"],
    # full-width quality in this comparison; width control, CI-KD and extraction speed: scripts/bench_slimmable.py
    "slimmable": ["experiment=scenes_slimmable", f"task=[{','.join(TASKS)}]"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_arch")
    p.add_argument("--family", choices=list(FAMILIES),
                   help="one family's full benchmark (slimmable: scripts/bench_slimmable.py with the other arguments)")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--n-val", type=int, default=128)
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--backbone", default="resnet10t", help="CNN backbone of the hps and moe families")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-baselines", action="store_true", help="Δm vs the hps multi-task run, no single-task runs")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-timing", action="store_true", help="no dispatch and latency phases")
    p.add_argument("--force", action="store_true", help="retrain runs that already finished")
    p.add_argument("--dispatch-experts", type=int, default=16)
    p.add_argument("--dispatch-top-k", type=int, default=4)
    p.add_argument("--dispatch-tokens", type=int, default=4096)
    p.add_argument("--dispatch-dim", type=int, default=384)
    p.add_argument("--dispatch-hidden", type=int, nargs="+", default=[96, 384], help="expert hidden widths")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the timing phases (1: no OpenMP barrier stalls on a shared machine)")
    p.add_argument("--latency-batch", type=int, default=8)
    return p.parse_args(argv)


# --- 1. quality --------------------------------------------------------------------------------


def recipe(args) -> list[str]:
    return [
        f"seed={args.seed}", f"data.size={args.size}", f"data.n_train={args.n_train}", f"data.n_val={args.n_val}",
        f"data.n_test={args.n_test}", f"data.batch_size={args.batch_size}", f"optim.lr={args.lr}",
        f"trainer.max_epochs={args.epochs}", "viz.num_samples=0", "~callbacks.progress_bar",
        "+trainer.enable_progress_bar=false", "logger=none",
    ]


def cnn_overrides(args) -> list[str]:
    return [f"backbone.name={args.backbone}", f"decoder.channels={args.channels}"]


def train_run(args, out: Path, key: str, overrides: list[str]) -> tuple[dict, Path]:
    from bench_runs import record, reusable
    from mtl.train import run

    run_dir = out / "runs" / key
    overrides = recipe(args) + overrides
    if not args.force and reusable(run_dir, overrides):
        print(f"[bench] {key}: reusing {run_dir}", flush=True)
    else:
        start = time.perf_counter()
        print(f"[bench] {key}: training ...", flush=True)
        if run_dir.exists():  # --force, or a half-written run: train it again from scratch
            shutil.rmtree(run_dir)
        run(overrides, run_dir=run_dir)
        record(run_dir, overrides)
        print(f"[bench] {key}: trained in {time.perf_counter() - start:.0f}s", flush=True)
    return json.loads((run_dir / "metrics.json").read_text()), run_dir


def single_task_baselines(args, out: Path) -> Path:
    from bench_runs import single_task_baselines

    path = out / "baselines.json"
    return single_task_baselines(path, TASKS, lambda task: train_run(
        args, out, f"stl_{task}", FAMILIES["hps"] + cnn_overrides(args) +
        [f"task={task}", f"baselines.save_to={path.resolve()}"])[0])


def routed_flops_identity(model, x: torch.Tensor, task: str) -> dict | None:
    """Single-task FLOPs split into expert and non-expert parts, and all experts on all tokens."""
    from mtl.flops import flop_counter

    moes = model.moe_modules() if hasattr(model, "moe_modules") else []
    if not moes:
        return None
    active, dense = [0], 0
    originals = []
    for m in moes:
        orig = m.experts.sparse

        def counted(*a, _orig=orig, **kw):
            with flop_counter() as inner:
                y = _orig(*a, **kw)
            active[0] += inner.get_total_flops()
            return y

        originals.append((m.experts, orig))
        m.experts.sparse = counted
    model.eval()
    try:
        with torch.no_grad(), flop_counter() as outer:
            model(x, tasks=[task])
        tokens = (x.shape[-2] // model._vit["patch_size"]) * (x.shape[-1] // model._vit["patch_size"]) * x.shape[0]
        for m in moes:
            with torch.no_grad(), flop_counter() as c:
                m.experts.dense(torch.zeros(tokens, m.experts.dim))
            dense += c.get_total_flops()
    finally:
        for experts, orig in originals:
            del experts.sparse
    k, e = model._moe["top_k"], model._moe["num_experts"]
    total = outer.get_total_flops()
    return {"single_task": total, "expert_active": active[0], "non_expert": total - active[0], "experts_dense": dense,
            "k_over_e": k / e, "identity_holds": total == (total - active[0]) + k / e * dense}


def quality(args, out: Path, families: list[str]) -> dict:
    import mtl
    from mtl.evaluation import delta_m, delta_m_per_task
    from mtl.tasks import create_task

    results = {}
    for fam in families:
        extra = cnn_overrides(args) if fam in ("hps", "moe") else []
        metrics, run_dir = train_run(args, out, fam, FAMILIES[fam] + extra)
        model = mtl.load_model(run_dir / "model")
        x = torch.randint(0, 255, (1, 3, args.size, args.size), dtype=torch.uint8)
        results[fam] = {"test": metrics["test"], "stats": metrics.get("model_stats") or mtl.model_stats(model, x),
                        "fit_seconds": metrics["fit_seconds"], "flops_identity": routed_flops_identity(model, x, "depth")}
    tasks = {t: create_task(t) for t in TASKS}
    if args.no_baselines:  # without an hps run in --families there is nothing to compare with
        base = results.get("hps", {}).get("test")
        base_name = "hps multi-task run" if base is not None else None
    else:
        base, base_name = json.loads(single_task_baselines(args, out).read_text()), "single-task hps runs"
    for fam, r in results.items():
        if base is not None:
            try:
                r["delta_m"] = delta_m(r["test"], base, tasks)
                r["delta_m_per_task"] = delta_m_per_task(r["test"], base, tasks)
            except ValueError as e:  # e.g. a baseline metric of 0 (a tiny run's edge F-score): no Δm, keep the rest
                print(f"[bench] {fam}: no Δm ({e})", flush=True)
    return {"results": results, "delta_m_vs": base_name}


# --- 2. dispatch efficiency ----------------------------------------------------------------------


def _median_time(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def dispatch(args) -> list[dict]:
    from torch import nn

    from mtl.models.moe import StackedExperts, TopKRouter

    torch.manual_seed(0)
    e, k, n, d = args.dispatch_experts, args.dispatch_top_k, args.dispatch_tokens, args.dispatch_dim
    rows = []
    for h in args.dispatch_hidden:
        router, experts = TopKRouter(d, e, k, noisy=True), StackedExperts(e, d, h)
        dense = nn.Sequential(nn.Linear(d, k * h), nn.GELU(), nn.Linear(k * h, d))
        x = torch.randn(n, d, requires_grad=True)

        def moe_step():
            r = router(x)
            y = experts.sparse(x, r.index, r.weight)
            (y.square().mean() + 0.01 * r.balance).backward()

        def dense_step():
            dense(x).square().mean().backward()

        for f in (moe_step, dense_step):  # warm-up
            f()
        t_moe, t_dense = [], []
        for _ in range(args.rounds):  # interleaved: both see the same machine load
            t_moe += _median_time(moe_step, 1)
            t_dense += _median_time(dense_step, 1)
        m, dn = statistics.median(t_moe), statistics.median(t_dense)
        rows.append({"experts": e, "top_k": k, "tokens": n, "dim": d, "expert_hidden": h, "dense_hidden": k * h,
                     "moe_ms": 1e3 * m, "dense_ms": 1e3 * dn, "ratio": m / dn, "threads": torch.get_num_threads()})
        print(f"[bench] dispatch h={h}: MoE {1e3 * m:.1f} ms, dense {1e3 * dn:.1f} ms, ratio {m / dn:.2f}", flush=True)
    return rows


# --- 3. single- vs all-task latency ----------------------------------------------------------------


@torch.no_grad()
def latency(args) -> dict:
    from mtl.models.task_moe_vit import TaskMoEViT
    from mtl.tasks import create_task

    torch.manual_seed(0)
    model = TaskMoEViT([create_task(t) for t in TASKS], {"img_size": 64}, {"num_experts": 16, "top_k": 4}).eval()
    x = torch.randint(0, 255, (args.latency_batch, 3, 64, 64), dtype=torch.uint8)
    one, every = (lambda: model(x, tasks=["depth"])), (lambda: model(x))
    one(), every()
    t_one, t_all = [], []
    for _ in range(args.rounds):
        t_one += _median_time(one, 1)
        t_all += _median_time(every, 1)
    a, b = statistics.median(t_one), statistics.median(t_all)
    print(f"[bench] latency: one task {1e3 * a:.1f} ms, all {len(TASKS)} tasks {1e3 * b:.1f} ms", flush=True)
    return {"batch": args.latency_batch, "img_size": 64, "one_task_ms": 1e3 * a, "all_tasks_ms": 1e3 * b,
            "all_over_one": b / a, "tasks": len(TASKS)}


# --- report --------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = []
    q = report.get("quality")
    if q:
        lines += [f"Δm% vs {q['delta_m_vs']} (primary metrics)." if q["delta_m_vs"] else
                  "No Δm: --no-baselines without an hps run in --families leaves nothing to compare with.", "",
                  "| family | " + " | ".join(TASKS) + " | Δm% | params | MFLOPs all | MFLOPs one task (depth) | fit s |",
                  "|---|" + "---|" * (len(TASKS) + 5)]
        from mtl.tasks import create_task

        for fam, r in q["results"].items():
            cells = []
            for t in TASKS:
                prim = create_task(t).primary
                cells.append(f"{r['test'][t][prim]:.3f}")
            st = r["stats"]
            dm = f"{r['delta_m']:+.2f}" if "delta_m" in r else "–"
            lines.append(f"| {fam} | " + " | ".join(cells) + f" | {dm} | {st['params']:,} | {st['flops_all_tasks'] / 1e6:.1f} | "
                         f"{st['flops_per_task']['depth'] / 1e6:.1f} | {r['fit_seconds']:.0f} |")
        for fam, r in q["results"].items():
            fi = r.get("flops_identity")
            if fi:
                lines += ["", f"{fam} active FLOPs (one image, task depth): total {fi['single_task'] / 1e6:.2f}M = "
                          f"non-expert {fi['non_expert'] / 1e6:.2f}M + expert {fi['expert_active'] / 1e6:.2f}M; "
                          f"k/E × all experts on all tokens = {fi['k_over_e']:.3f} × {fi['experts_dense'] / 1e6:.2f}M = "
                          f"{fi['k_over_e'] * fi['experts_dense'] / 1e6:.2f}M → identity holds: {fi['identity_holds']}"]
    if report.get("dispatch"):
        lines += ["", "| experts | top-k | tokens | dim | expert hidden | dense hidden | MoE ms | dense ms | ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["dispatch"]:
            lines.append(f"| {r['experts']} | {r['top_k']} | {r['tokens']} | {r['dim']} | {r['expert_hidden']} | "
                         f"{r['dense_hidden']} | {r['moe_ms']:.1f} | {r['dense_ms']:.1f} | {r['ratio']:.2f} |")
    if report.get("latency"):
        lt = report["latency"]
        lines += ["", f"task-MoE ViT inference (batch {lt['batch']}, {lt['img_size']} px): one task {lt['one_task_ms']:.1f} ms, "
                  f"all {lt['tasks']} tasks {lt['all_tasks_ms']:.1f} ms (×{lt['all_over_one']:.2f})"]
    return "\n".join(lines)


def main(argv=None) -> None:
    from mtl.io import write_json

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--family")
    family, rest = pre.parse_known_args(argv)
    if family.family == "slimmable":  # its benchmark (widths, CI-KD, control, extraction) lives in its own script
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_slimmable

        raise SystemExit(bench_slimmable.main(rest))
    from script_cli import require_positive

    args = parse_args(argv)
    require_positive(args, ["size", "n_train", "n_val", "n_test", "batch_size", "epochs", "channels", "dispatch_experts",
                            "dispatch_top_k", "dispatch_tokens", "dispatch_dim", "dispatch_hidden", "rounds", "threads",
                            "latency_batch"])
    if args.dispatch_top_k > args.dispatch_experts:  # TopKRouter refused it in dispatch(): after --out and training
        raise ValueError(f"--dispatch-top-k {args.dispatch_top_k} exceeds --dispatch-experts {args.dispatch_experts}: "
                         "a token picks top-k of the experts")
    if args.family:
        args.families = args.family
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"--families: unknown family {unknown}; known: {', '.join(FAMILIES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a refused run leaves no empty --out
    report: dict = {"args": vars(args), "threads": torch.get_num_threads()}
    if not args.skip_quality:
        report["quality"] = quality(args, out, families)
    if not args.skip_timing:
        torch.set_num_threads(args.threads)
        report["dispatch"] = dispatch(args)
        report["latency"] = latency(args)
    write_json(out / "results.json", report)
    text = markdown(report)
    (out / "architectures.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    from script_cli import run

    run(main)
