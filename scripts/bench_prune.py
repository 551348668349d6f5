"""Pruning benchmark on a scenes multi-task model: pagcp (pagcp_taylor: with Taylor importance), l1, l1_global and
taylor at matched FLOPs
reductions, each fine-tuned with the same short recipe; Δm%, params, FLOPs and CPU latency speed-up.

    python scripts/bench_prune.py --out /tmp/bench_prune            # defaults below (CPU, ~40 min when shared)
    python scripts/bench_prune.py --out /tmp/bp --smoke              # minutes: debug=smoke's tiny model and data, one target
                                                     # (--backbone, --size, --n-train, --targets given: used)
    python scripts/bench_prune.py --out /tmp/bp_r8 --reuse-base outputs/bench_prune_q60 --methods pagcp \
        --round-to 8 --targets 0.6 ...       # the same base and control run, channel counts multiples of 8

Δm% is against the unpruned model after the *same* extra fine-tuning (a control run), so it isolates
what pruning costs; the per-task metrics of every run are in <out>/bench_prune.json. Latency: median
of repeated forward passes, fixed threads, measured in the same process for before and after.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl.evaluation import delta_m  # noqa: E402
from mtl.io import load_model, read_json  # noqa: E402
from pruning.report import plot_delta_m_vs_flops  # noqa: E402

METHODS = ("pagcp", "l1", "l1_global", "taylor", "pagcp_taylor")
# bench method name -> prune overrides (pagcp_taylor: PAGCP ranking channels by Taylor importance)
_PRUNE = {"pagcp_taylor": ["prune=pagcp", "prune.importance=taylor"]}


def train(overrides: list[str], run_dir: Path) -> Path:
    from bench_runs import record, reusable
    from mtl.train import run

    if reusable(run_dir, overrides):  # resume a partly done benchmark (same recipe only)
        return run_dir
    run(overrides, run_dir=run_dir)
    record(run_dir, overrides)
    return run_dir


# the model and data options' defaults; --smoke's are debug=smoke's (configs/debug/smoke.yaml) and one target
RECIPE = {"backbone": "resnet10t", "size": 32, "n_train": 256, "targets": [0.4, 0.6]}
SMOKE_RECIPE = {"backbone": "test_resnet", "size": 32, "n_train": 64, "targets": [0.4]}


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before any work, with every model and data option set to what will run (so
    bench_prune.json and --reuse-base compare the recipe that ran)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--merge", type=Path, nargs="+", help="only combine these bench_prune.json files into --out (table + PNGs)")
    ap.add_argument("--tasks", default="semseg,depth,normals,classification")
    ap.add_argument("--backbone", default=None, help="default: resnet10t (--smoke: test_resnet)")
    ap.add_argument("--size", type=int, default=None, help="default: 32 (--smoke too)")
    ap.add_argument("--n-train", type=int, default=None, help="default: 256 (--smoke: 64)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--targets", type=float, nargs="+", default=None,
                    help="FLOPs reductions in (0, 1) (default: 0.4 0.6; --smoke: 0.4)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--search-steps", type=int, default=2, help="PAGCP budget bisection steps")
    ap.add_argument("--max-budget", type=float, default=None, help="PAGCP prune.max_budget (default: the config's)")
    ap.add_argument("--pagcp-earlier", action="store_true",
                    help="PAGCP with the rules of the numbers in docs/BENCHMARKS.md before 2026-12-06 "
                         "(prune.decay_on=visited prune.reference=last)")
    ap.add_argument("--latency-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round-to", type=int, default=None,
                    help="prune.round_to for every method (kept channels per layer multiples of it); names get _r<N>")
    ap.add_argument("--reuse-base", type=Path, default=None,
                    help="an earlier --out folder: reuse its base model and fine-tuned control (data/model options must match)")
    ap.add_argument("--smoke", action="store_true",
                    help="debug=smoke's model and data (and one target) for the options not given")
    args = ap.parse_args(argv)
    from pruning.methods import check_ratio
    from script_cli import require_positive

    require_positive(args, ["size", "n_train", "epochs", "ft_epochs", "calib_batches", "latency_batch", "threads",
                            "round_to"])
    for target in args.targets or []:
        check_ratio("--targets", target, open_low=True)
    twice = sorted({t for t in args.targets or [] if (args.targets or []).count(t) > 1})
    if twice:  # two runs would share one name and one row
        raise ValueError(f"--targets lists {twice[0]} twice; name each target once")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    require_positive(args, ["search_steps"], least=0)
    if args.max_budget is not None and not args.max_budget > 0:
        raise ValueError(f"--max-budget must be a positive number, got {args.max_budget}")
    for key, value in (SMOKE_RECIPE if args.smoke else RECIPE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def training_overrides(args) -> list[str]:
    """The base model's and the control's overrides without their epochs."""
    model_data = {"backbone": f"backbone={args.backbone}", "size": f"data.size={args.size}",
                  "n_train": f"data.n_train={args.n_train}"}
    head = ["experiment=scenes_hps", f"task=[{args.tasks}]", "logger=none", "viz.num_samples=0", "log_weights_every=0"]
    if args.smoke:  # debug=smoke's model and data, an option given with another value on top
        return head[:1] + ["debug=smoke"] + head[1:] + [o for k, o in model_data.items() if getattr(args, k) != SMOKE_RECIPE[k]]
    return head + list(model_data.values()) + ["data.n_val=128", "data.n_test=256"]


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # PAGCP's per-layer progress
    out = args.out
    if args.merge:
        missing = [str(p) for p in args.merge if not p.is_file()]
        if missing:
            raise SystemExit(f"error: --merge: no such file(s): {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)  # after the --merge check: a refused run leaves no empty --out
    if args.merge:
        runs = [json.loads(p.read_text()) for p in args.merge]
        report(out, [r for run in runs for r in run["rows"]], runs[0]["base_flops"] / 1e6, args.methods)
        return
    common = training_overrides(args)
    t0 = time.perf_counter()
    # validation only picks the checkpoint of a short fine-tune: two batches do
    ft = common + [f"trainer.max_epochs={args.ft_epochs}", "optim.lr=1e-3", "optim.warmup_ratio=0.0",
                   "++trainer.limit_val_batches=2"]
    if args.reuse_base is not None:
        base, control = _reused(args)
    else:
        base = train(common + [f"trainer.max_epochs={args.epochs}"], out / "base") / "model"
        control = train(ft + [f"init_from={base}"], out / "control_ft")
    base_model = load_model(base)
    tasks = base_model.tasks
    base_test = read_json(base / "config.json")["meta"]["test"]
    control_test = read_json(control / "metrics.json")["test"]
    # phase 1 prunes every (method, target), phase 2 fine-tunes them: on a busy machine the pruning
    # numbers of every method come first
    from bench_runs import record, reusable
    from pruning.job import run as prune_run

    rows = []
    for target in args.targets:
        for method in args.methods:
            name = f"{method}_{int(round(100 * target))}" + (f"_r{args.round_to}" if args.round_to else "")
            pdir = out / name
            hp = _PRUNE.get(method, [f"prune={method}"]) + [f"model={base}", f"prune.flops_target={target}",
                  f"calib.batches={args.calib_batches}", f"eval.latency_batch={args.latency_batch}",
                  f"eval.latency_threads={args.threads}", "eval.latency_repeats=20", "overwrite=true"]
            if args.round_to:
                hp.append(f"prune.round_to={args.round_to}")
            if method.startswith("pagcp"):
                hp += [f"prune.search_steps={args.search_steps}", "+prune.ratios=[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9]"]
                if args.max_budget is not None:
                    hp.append(f"prune.max_budget={args.max_budget}")
                if args.pagcp_earlier:  # the rules every PAGCP number before 2026-12-06 was measured with
                    hp += ["prune.decay_on=visited", "prune.reference=last"]
            # a pruned run of other settings (calibration, latency batch, search) is refused, not reused
            if not reusable(pdir, hp):
                t = time.perf_counter()
                prune_run(hp, run_dir=pdir)
                record(pdir, hp)
                print(f"[bench] {name}: pruned in {time.perf_counter() - t:.0f}s", flush=True)
            rep = read_json(pdir / "metrics.json")
            rows.append({
                "name": name, "method": method, "target": target,
                "flops_reduction": rep["flops"]["reduction"], "params_reduction": rep["params"]["reduction"],
                "flops": rep["flops"]["after"], "params": rep["params"]["after"],
                "latency_speedup": rep["latency_ms"]["speedup"], "latency_ms": rep["latency_ms"],
                "delta_m_pruned": delta_m(rep["metrics"]["after"], base_test, tasks),
                "delta_m_finetuned": None, "prune_seconds": rep["prune_seconds"],
            })
            print(f"[bench] {name}: FLOPs -{rows[-1]['flops_reduction']:.1%}, Δm pruned {rows[-1]['delta_m_pruned']:+.2f}, "
                  f"speed-up {rows[-1]['latency_speedup']:.2f}x", flush=True)
            _write(out, args, rows, base_test, control_test, rep)
    for r in rows:
        tuned = train(ft + [f"init_from={out / r['name'] / 'model'}"], out / f"{r['name']}_ft")
        r["test_finetuned"] = read_json(tuned / "metrics.json")["test"]
        r["delta_m_finetuned"] = delta_m(r["test_finetuned"], control_test, tasks)
        print(f"[bench] {r['name']}: Δm fine-tuned {r['delta_m_finetuned']:+.2f}", flush=True)
        _write(out, args, rows, base_test, control_test, rep)
    report(out, rows, rows[0]["flops"] / (1 - rows[0]["flops_reduction"]) / 1e6, args.methods)
    print(f"total {time.perf_counter() - t0:.0f}s; results in {out / 'bench_prune.json'}")


_MUST_MATCH = ("smoke", "tasks", "backbone", "size", "n_train", "epochs", "ft_epochs")


def _reused(args) -> tuple[Path, Path]:
    """Base model folder and fine-tuned control run of an earlier benchmark, if it ran the same recipe."""
    src = args.reuse_base
    base, control = src / "base" / "model", src / "control_ft"
    for path in (base / "config.json", control / "metrics.json", src / "bench_prune.json"):
        if not path.exists():
            raise SystemExit(f"error: --reuse-base {src}: {path} is missing (run the full benchmark there first)")
    earlier = json.loads((src / "bench_prune.json").read_text())["args"]
    diff = {k: (earlier.get(k), getattr(args, k)) for k in _MUST_MATCH if earlier.get(k) != getattr(args, k)}
    if diff:
        raise SystemExit(f"error: --reuse-base {src} ran another recipe; differing options (earlier, now): {diff}")
    return base, control


def report(out: Path, rows: list[dict], base_mflops: float, methods) -> None:
    for key, title in (("delta_m_finetuned", "after fine-tuning"), ("delta_m_pruned", "right after pruning")):
        pts = {m: [(base_mflops, 0.0)] + [(r["flops"] / 1e6, r[key]) for r in rows if r["method"] == m and r[key] is not None]
               for m in methods}
        plot_delta_m_vs_flops(pts, out / f"delta_m_vs_flops_{key.split('_')[-1]}.png", title=f"Δm% vs FLOPs, {title}")
    fmt = lambda v: "—" if v is None else f"{v:+.2f}"  # noqa: E731
    print(f"\n{'method':10} {'target':>6} {'FLOPs':>7} {'params':>7} {'Δm pruned':>10} {'Δm ft':>7} {'speed-up':>8}")
    for r in rows:
        print(f"{r['method']:10} {r['target']:6.0%} {-r['flops_reduction']:7.1%} {-r['params_reduction']:7.1%} "
              f"{fmt(r['delta_m_pruned']):>10} {fmt(r['delta_m_finetuned']):>7} {r['latency_speedup']:7.2f}x")


def _write(out: Path, args, rows, base_test, control_test, rep) -> None:
    (out / "bench_prune.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows, "base_test": base_test, "control_test": control_test,
         "base_flops": rep["flops"]["before"], "base_params": rep["params"]["before"]}, indent=2))


if __name__ == "__main__":
    from script_cli import run

    run(main)
