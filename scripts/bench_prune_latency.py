"""CPU latency of pruned model folders against their unpruned base, rounds interleaved.

    python scripts/bench_prune_latency.py --base outputs/bench_prune_q60/base/model \
        outputs/bench_prune_q60/pagcp_60/model outputs/bench_prune_q60/l1_60/model --sizes 32 64 128

`mtl-prune`'s own report times before and after one after the other; on a shared machine the load can
change in between. Here every round times the base and each pruned model back to back (median of
`--repeats` forward passes each, fixed threads), and the speed-up is the median over rounds of the
per-round ratio, per input size: small inputs show fixed per-layer overheads, large ones approach the
FLOPs ratio.

`--breakdown SIZE` adds where the time goes at that input size: per leaf module (forward hooks, median
over rounds) and per block (stem, stages, neck, heads; "unhooked" = residual adds, interpolation and
other functional ops), base against each pruned model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pruned", nargs="+", help="pruned model folders")
    ap.add_argument("--base", required=True, help="the unpruned model folder")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help='write {"speedup": rows, "breakdown": the --breakdown table or null} as JSON here')
    ap.add_argument("--breakdown", type=int, default=None, metavar="SIZE", help="per-module time at this input size")
    ap.add_argument("--top", type=int, default=12, help="leaf modules listed in the breakdown")
    args = ap.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["sizes", "batch", "threads", "repeats", "rounds", "breakdown", "top"])

    import mtl
    from mtl.flops import count_flops
    from pruning.report import latency_ms

    models = {"base": mtl.load_model(args.base)}
    for p in args.pruned:
        label = Path(p).parent.name if Path(p).name == "model" else Path(p).name
        if label in models:  # two runs named alike (A/l1_40, B/l1_40): one row each, never one over the other
            label = str(Path(p).parent if Path(p).name == "model" else Path(p))
        if label in models:
            raise SystemExit(f"error: {p} is given twice")
        models[label] = mtl.load_model(p)
    rows = []
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        flops = {k: count_flops(m.eval(), x[:1]) for k, m in models.items()}
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.rounds):
            for k, m in models.items():
                times[k].append(latency_ms(m, x, repeats=args.repeats, threads=args.threads))
        for k in models:
            if k == "base":
                continue
            ratios = [b / t for b, t in zip(times["base"], times[k])]
            rows.append({"model": k, "size": size, "batch": args.batch, "threads": args.threads,
                         "base_ms": statistics.median(times["base"]), "pruned_ms": statistics.median(times[k]),
                         "speedup": statistics.median(ratios), "flops_ratio": flops[k] / flops["base"]})
            r = rows[-1]
            print(f"{k:>14} {size:>4}px  base {r['base_ms']:8.2f} ms  pruned {r['pruned_ms']:8.2f} ms  "
                  f"speed-up {r['speedup']:.2f}x  (FLOPs ×{r['flops_ratio']:.3f})", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")
    out = {"speedup": rows, "breakdown": None}  # one shape with or without --breakdown
    if args.breakdown:
        out["breakdown"] = breakdown(models, args.breakdown, args.batch, args.threads, args.repeats, args.rounds, args.top)
        print(f"load average {os.getloadavg()[0]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


def _block(name: str) -> str:
    """The block a leaf belongs to: stem, a residual stage, the neck, one task head."""
    parts = name.split(".")
    if parts[:2] == ["backbone", "body"]:
        return "stem" if parts[2].startswith(("conv1", "bn1", "act1", "maxpool")) else parts[2]
    if parts[:2] == ["decoder", "heads"]:
        return f"head.{parts[2]}"
    return ".".join(parts[:2])


def module_ms(model, x, threads: int, repeats: int) -> tuple[dict[str, float], float]:
    """Median ms per leaf module (pre/post forward hooks) and of the whole forward, over ``repeats`` passes."""
    import time

    leaves = {n: m for n, m in model.named_modules() if not list(m.children())}
    acc: dict[str, list[float]] = {n: [] for n in leaves}
    total: list[float] = []
    start: dict[str, float] = {}
    hooks = []
    for n, m in leaves.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, i, n=n: start.__setitem__(n, time.perf_counter())))
        hooks.append(m.register_forward_hook(lambda mod, i, o, n=n: acc[n].append(1e3 * (time.perf_counter() - start[n]))))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            for v in acc.values():
                v.clear()
            for _ in range(repeats):
                t = time.perf_counter()
                model(x)
                total.append(1e3 * (time.perf_counter() - t))
    finally:
        torch.set_num_threads(old)
        for h in hooks:
            h.remove()
    # a module called k times per pass (none here) would count k entries per pass: sum per pass
    per_pass = {n: sum(v) / repeats for n, v in acc.items() if v}
    return per_pass, statistics.median(total)


def breakdown(models, size, batch, threads, repeats, rounds, top):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    samples: dict[str, list] = {k: [] for k in models}
    for _ in range(rounds):  # interleaved like the speed-up rounds
        for k, m in models.items():
            samples[k].append(module_ms(m.eval(), x, threads, repeats))
    med = {}
    for k, runs in samples.items():
        names = runs[0][0].keys()
        med[k] = ({n: statistics.median(r[0][n] for r in runs) for n in names}, statistics.median(r[1] for r in runs))
    shapes = {k: {n: _shape(mod) for n, mod in m.named_modules() if not list(mod.children())} for k, m in models.items()}
    base_leaf, base_total = med["base"]
    result = {}
    for k in models:
        if k == "base":
            continue
        leaf, total = med[k]
        blocks: dict[str, list[float]] = {}
        for n, t in base_leaf.items():
            b = blocks.setdefault(_block(n), [0.0, 0.0])
            b[0] += t
            b[1] += leaf.get(n, 0.0)
        blocks["unhooked"] = [base_total - sum(base_leaf.values()), total - sum(leaf.values())]
        print(f"\n{k} at {size}px (batch {batch}, {threads} thread): whole pass base {base_total:.2f} ms, "
              f"pruned {total:.2f} ms ({base_total / total:.2f}x)")
        print(f"{'block':>22} {'base ms':>9} {'pruned ms':>9} {'saved':>7} {'share of base':>13}")
        for b, (tb, tp) in sorted(blocks.items(), key=lambda kv: -kv[1][0]):
            print(f"{b:>22} {tb:9.2f} {tp:9.2f} {tb - tp:7.2f} {tb / base_total:13.0%}")
        print(f"{'leaf module':>40} {'base ms':>8} {'pruned':>8} {'ratio':>6}  base shape -> pruned shape")
        for n, tb in sorted(base_leaf.items(), key=lambda kv: -kv[1])[:top]:
            tp = leaf.get(n, float("nan"))
            print(f"{n:>40} {tb:8.2f} {tp:8.2f} {tb / tp:5.2f}x  {shapes['base'][n]} -> {shapes[k].get(n)}")
        result[k] = {"size": size, "base_ms": base_total, "pruned_ms": total,
                     "blocks": {b: {"base_ms": v[0], "pruned_ms": v[1]} for b, v in blocks.items()},
                     "leaves": {n: {"base_ms": base_leaf[n], "pruned_ms": leaf.get(n)} for n in base_leaf}}
    return result


def _shape(m) -> str:
    if isinstance(m, torch.nn.Conv2d):
        return f"conv{m.kernel_size[0]}x{m.kernel_size[1]}/{m.stride[0]} {m.in_channels}->{m.out_channels}"
    if isinstance(m, torch.nn.Linear):
        return f"linear {m.in_features}->{m.out_features}"
    if isinstance(m, torch.nn.BatchNorm2d):
        return f"bn {m.num_features}"
    return type(m).__name__


if __name__ == "__main__":
    from script_cli import run

    run(main)
