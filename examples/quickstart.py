"""mtlkit from Python, end to end in under a minute on a CPU (smoke-sized settings).

    python examples/quickstart.py
"""
import os
import shutil
from pathlib import Path

import torch

import merging
import mtl
from merging.job import build_smoke_pool
from mtl.train import run

out = Path(os.environ.get("MTL_OUTPUT_DIR") or "outputs") / "examples"  # where the CLIs would write
shutil.rmtree(out, ignore_errors=True)  # a re-run starts afresh: a run folder holding a finished run is refused

# 1. train a multi-task model with the same config system as `mtl-train`
run_dir = run(["experiment=scenes_hps", "debug=smoke"], run_dir=out / "train")
model = mtl.load_model(run_dir / "model")
images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
print({task: tuple(p.shape) for task, p in model(images).items()})
print("depth only:", tuple(model(images, tasks=["depth"])["depth"].shape))

# 2. a pool of single-task fine-tunes from one base, merged with TIES and TALL masks
pool = build_smoke_pool(out / "pool")
merged = merging.merge("ties", pool.pretrained, pool.member_paths, lam=1.0, k=20, merge_func="mean")
print(f"TIES merged {len(merged)} shared tensors; heads stay per task")
tall = merging.tall_masks(pool.pretrained, pool.member_paths, lam=0.4)
print("TALL mask overlap:", {k: v for k, v in merging.mask_overlap(tall).items() if k in ("selfish", "catastrophic")})
