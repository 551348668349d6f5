"""CPU latency of pruned model folders against their unpruned base, rounds interleaved.

    python scripts/bench_prune_latency.py --base outputs/bench_prune_q60/base/model \
        outputs/bench_prune_q60/pagcp_60/model outputs/bench_prune_q60/l1_60/model --sizes 32 64 128

`mtl-prune`'s own report times before and after one after the other; on a shared machine the load can
change in between. Here every round times the base and each pruned model back to back (median of
`--repeats` forward passes each, fixed threads), and the speed-up is the median over rounds of the
per-round ratio, per input size: small inputs show fixed per-layer overheads, large ones approach the
FLOPs ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pruned", nargs="+", help="pruned model folders")
    ap.add_argument("--base", required=True, help="the unpruned model folder")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()

    import mtl
    from mtl.flops import count_flops
    from pruning.report import latency_ms

    models = {"base": mtl.load_model(args.base)}
    for p in args.pruned:
        models[Path(p).parent.name if Path(p).name == "model" else Path(p).name] = mtl.load_model(p)
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
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
