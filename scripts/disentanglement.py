"""How much a zoo's task vectors interfere: the weight disentanglement error ξ of every task pair
(Ortiz-Jiménez et al., NeurIPS 2023; `merging.weight_disentanglement`, docs/merging.md).

    python scripts/disentanglement.py --manifest outputs/zoo_cnn/manifest.json --alphas 0.1 0.3 1.0
    python scripts/disentanglement.py --manifest outputs/zoo_cnn/manifest.json --pair mnist digits --grid -1 2 7

ξ(α_s, α_t) sums, over the two tasks, the share of their images whose predicted class changes when the
other task's vector is added: 0 = disentangled, 2 = every prediction changed. `--alphas a ...` measures
every pair at (a, a); `--pair s t --grid LO HI N` one pair over an N × N grid of (α_s, α_t) — the
paper's heatmap. Writes <out>/disentanglement.json, <out>/disentanglement.png and prints a table.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="zoo manifest (scripts/build_zoo.py)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.3, 1.0], help="α points (α, α) for every pair")
    p.add_argument("--tasks", nargs="+", help="subset of the pool's tasks (default: all)")
    p.add_argument("--pair", nargs=2, metavar=("S", "T"), help="one pair only")
    p.add_argument("--grid", nargs=3, metavar=("LO", "HI", "N"), help="with --pair: an N x N grid of α from LO to HI")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--max-batches", type=int, help="cap the batches per task (smoke runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", help="default: <manifest folder>/disentanglement (…_linear for manifest_linear.json)")
    args = p.parse_args(argv)
    if args.grid and not args.pair:
        p.error("--grid needs --pair S T")
    return args


def check_args(args) -> None:
    """Before any model loads (a ValueError: one `error:` line)."""
    from script_cli import require_positive

    require_positive(args, ["max_batches", "threads"])
    if not all(math.isfinite(a) for a in args.alphas):
        raise ValueError(f"--alphas must be finite numbers, got {args.alphas}")
    if args.grid:
        try:
            lo, hi, n = float(args.grid[0]), float(args.grid[1]), int(args.grid[2])
        except ValueError:
            raise ValueError(f"--grid takes LO HI N (two numbers and a count), got {args.grid}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or n < 1:
            raise ValueError(f"--grid takes finite LO HI and a count N >= 1, got {args.grid}")
        args.grid = (lo, hi, n)


def main(argv=None) -> int:
    import torch

    import merging
    from mtl.io import write_json

    args = parse_args(argv)
    check_args(args)
    torch.set_num_threads(args.threads)
    if args.grid:
        lo, hi, n = args.grid
        axis = [round(v, 6) for v in torch.linspace(lo, hi, n).tolist()]
        alphas = [(a, b) for a in axis for b in axis]
    else:
        alphas = args.alphas
    # one folder per manifest: a linearised zoo's results sit beside the plain zoo's, not over them
    manifest = Path(args.manifest)
    out = Path(args.out or manifest.parent / manifest.stem.replace("manifest", "disentanglement", 1))
    start = time.perf_counter()
    res = merging.weight_disentanglement(args.manifest, alphas=alphas, tasks=args.tasks,
                                         pairs=[args.pair] if args.pair else None, split=args.split,
                                         max_batches=args.max_batches, device=args.device)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    write_json(out / "disentanglement.json", {"command": " ".join(sys.argv), "seconds": round(seconds, 1),
                                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                              **res.to_dict()})
    merging.plot_disentanglement(res, out / "disentanglement.png")
    if not args.grid:
        print("\n| pair | " + " | ".join(f"ξ at α = {a[0]:g}" for a in res.alphas) + " |")
        print("|---|" + "---:|" * len(res.alphas))
        for (s, t), by in res.errors.items():
            print(f"| {s} + {t} | " + " | ".join(f"{by[a]:.3f}" for a in res.alphas) + " |")
        print("| **mean** | " + " | ".join(f"**{res.mean(a):.3f}**" for a in res.alphas) + " |")
    else:
        (s, t), by = next(iter(res.errors.items()))
        low = sorted(a for a, v in by.items() if v <= 0.1)
        print(f"\n{s} + {t}: ξ ≤ 0.1 at {len(low)} of {len(by)} grid points"
              + (f"; ξ at (1, 1): {by[(1.0, 1.0)]:.3f}" if (1.0, 1.0) in by else ""))
    print(f"\n{seconds:.0f} s; wrote {out / 'disentanglement.json'}, {out / 'disentanglement.png'}")
    return 0


if __name__ == "__main__":
    from script_cli import run

    run(main)  # a bad manifest, pair or option: one line, exit 1
