"""Draw a PNG grid of the zoo datasets (one row per dataset) and optionally time their generation.

    python scripts/show_zoo.py --out outputs/zoo.png --cols 16 [--split test] [--time]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/zoo.png")
    p.add_argument("--cols", type=int, default=16)
    p.add_argument("--split", default="train", choices=("train", "val", "test"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--names", nargs="*", help="datasets to show (default: all)")
    p.add_argument("--time", action="store_true", help="also time a default-size build of each dataset")
    args = p.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["cols", "size"])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtl.data.zoo import ZOO, ZOO_TASKS, build_zoo_dataset, class_names

    names = args.names or [*ZOO_TASKS, *(n for n in ZOO.names() if n not in ZOO_TASKS)]
    if args.time:
        total = 0.0
        for name in names:
            t = time.perf_counter()
            d = build_zoo_dataset(name, seed=args.seed, size=args.size)
            dt = time.perf_counter() - t
            total += dt if name in ZOO_TASKS else 0.0
            print(f"{name:12s} {dt:6.2f} s  " + "  ".join(f"{s}={len(v[1])}" for s, v in d.items()))
        print(f"all {len(ZOO_TASKS)} tasks: {total:.2f} s")

    fig, axes = plt.subplots(len(names), args.cols, figsize=(args.cols * 0.9, len(names) * 1.05), squeeze=False)
    for r, name in enumerate(names):
        n = {"train": 0, "val": 0, "test": 0, args.split: 4 * args.cols}
        spec = ZOO.get(name)
        if spec.max_total is not None:
            n[args.split] = min(n[args.split], spec.max_total)
        x, y = build_zoo_dataset(name, n["train"], n["val"], n["test"], seed=args.seed, size=args.size)[args.split]
        # one sample per class first, so each row shows as many classes as fit
        firsts = [int(np.flatnonzero(y == c)[0]) for c in np.unique(y)]
        order = (firsts + [i for i in range(len(y)) if i not in firsts])[:args.cols]
        order = sorted(order, key=lambda i: (y[i], i))
        labels = class_names(name)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(order):
                i = order[c]
                ax.imshow(x[i], interpolation="nearest")
                ax.set_title(labels[y[i]][:11], fontsize=6, pad=2)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3)
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from script_cli import run

    run(main)
