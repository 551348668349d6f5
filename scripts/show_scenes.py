"""Save a PNG grid of `scenes` samples with all their labels, one row per scene.

    python scripts/show_scenes.py --n 6 --size 64 --seed 0 --out outputs/scenes.png

Columns: image, semseg, depth, normals, edges, instance; the row title gives count and largest shape.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_cli, also when imported from elsewhere

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mtl.data.scenes import CLASS_NAMES, SHAPE_NAMES, render_scenes  # noqa: E402


def make_grid(seed: int, start: int, n: int, size: int):
    s = render_scenes(seed, start, n, size)
    cols = ["image", "semseg", "depth", "normals", "edges", "instance"]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.1 * len(cols), 2.2 * n), squeeze=False)
    cmap = plt.get_cmap("tab10", len(CLASS_NAMES))
    for i in range(n):
        panels = {
            "image": (s["image"][i], {}),
            "semseg": (s["semseg"][i], dict(cmap=cmap, vmin=-0.5, vmax=len(CLASS_NAMES) - 0.5)),
            "depth": (s["depth"][i], dict(cmap="viridis")),
            # camera-frame normals mapped from [-1, 1] to [0, 1]
            "normals": ((s["normals"][i] + 1) / 2, {}),
            "edges": (s["edges"][i], dict(cmap="gray", vmin=0, vmax=1)),
            "instance": (s["instance"][i], dict(cmap="tab10", vmin=0, vmax=9, interpolation="nearest")),
        }
        for j, name in enumerate(cols):
            ax = axes[i, j]
            img, kw = panels[name]
            ax.imshow(img, interpolation=kw.pop("interpolation", "nearest"), **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
        axes[i, 0].set_ylabel(
            f"#{start + i}: count={s['count'][i]}\nlargest={SHAPE_NAMES[s['largest'][i]]}\n"
            f"pitch={np.rad2deg(s['pitch'][i]):.0f}° h={s['height'][i]:.1f}",
            fontsize=7,
        )
    fig.suptitle("semseg: " + ", ".join(f"{k}={c}" for k, c in enumerate(CLASS_NAMES)), fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--out", default="outputs/scenes.png")
    args = ap.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["n", "size"])
    require_positive(args, ["start"], least=0)
    fig = make_grid(args.seed, args.start, args.n, args.size)
    out = os.path.abspath(args.out)
    from mtl.io import atomic_path  # the project's one atomic writer: no half-written PNG, the umask's mode

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    print(out)


if __name__ == "__main__":
    from script_cli import run

    run(main)
