# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Train a multi-task model, look at its predictions and its Δm
#
# Smoke-sized settings (32 px images, timm's tiny test backbone, a few steps) so the notebook runs
# top to bottom on a CPU in about a minute. Drop `debug=smoke` for real runs; every override is an
# `mtl-train` command-line override (`mtl-train experiment=scenes_hps task=[semseg,depth] ...`).

# %%
import json
import os
import shutil
from pathlib import Path

import torch
from IPython.display import Image, display

import mtl
from mtl.train import run

OUT = Path(os.environ.get("MTL_OUTPUT_DIR") or "outputs") / "notebooks/train"  # where the CLIs would write from this folder
shutil.rmtree(OUT, ignore_errors=True)  # a re-run starts afresh: a run folder holding a finished run is refused
TASKS = ["semseg", "depth", "classification"]
COMMON = ["experiment=scenes_hps", "debug=smoke", "logger=none"]

# %% [markdown]
# ## Single-task baselines
# Δm compares a multi-task model with one single-task model per task. Each single-task run adds
# its test metrics to a baselines JSON (`baselines.save_to`).

# %%
baselines = OUT / "baselines.json"
for task in TASKS:
    run(COMMON + [f"task=[{task}]", f"baselines.save_to={baselines}", "viz.num_samples=0"], run_dir=OUT / f"single_{task}")
print(json.dumps(json.loads(baselines.read_text()), indent=1)[:600])

# %% [markdown]
# ## The multi-task model
# One backbone, one HPS decoder, a head per task, equal weighting (`balancer=ew`; try
# `balancer=famo` or `balancer=nash_mtl`). `baselines.path` makes the run report Δm.

# %%
run_dir = run(COMMON + [f"task=[{','.join(TASKS)}]", f"baselines.path={baselines}"], run_dir=OUT / "multitask")
metrics = json.loads((run_dir / "metrics.json").read_text())
for task, values in metrics["test"].items():
    print(f"{task:15s}", {k: round(v, 4) for k, v in values.items()})
print(f"Δm% ({metrics['delta_m']['variant']} metrics): {metrics['delta_m']['value']:+.2f}")

# %% [markdown]
# ## Predictions
# The run saved a picture of test images with every task's prediction and target.

# %%
display(Image(filename=str(run_dir / "predictions.png")))

# %% [markdown]
# The saved model folder reloads without the training code; it takes uint8 images and runs only
# the heads you ask for.

# %%
model = mtl.load_model(run_dir / "model")
images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
with torch.no_grad():
    out = model(images)
    depth_only = model(images, tasks=["depth"])
print({t: tuple(p.shape) for t, p in out.items()})
print("depth only:", {t: tuple(p.shape) for t, p in depth_only.items()})
print(mtl.model_stats(model, images[:1]))
