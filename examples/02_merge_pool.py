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
# # Merge a small pool of fine-tuned models with several methods
#
# A tiny real pool: a base trained on scenes classification, then fine-tuned separately on
# regression and semantic segmentation. Each merge method turns the fine-tunes into one model;
# `merging.job.run` is `mtl-merge` in-process (λ picked on validation from `merge.lam_grid`, scored on test).

# %%
import os
import shutil
from pathlib import Path

from IPython.display import Image, display
from matplotlib.figure import Figure

import merging
from merging.job import build_smoke_pool, run

OUT = Path(os.environ.get("MTL_OUTPUT_DIR") or "outputs") / "notebooks/merge"  # where the CLIs would write from this folder
shutil.rmtree(OUT, ignore_errors=True)  # a re-run starts afresh: a run folder holding a finished run is refused
pool = build_smoke_pool(OUT / "pool")
print("pretrained:", pool.pretrained)
print("fine-tuned:", dict(zip(pool.task_names, pool.member_paths)))

# %% [markdown]
# ## Several methods, one table

# %%
METHODS = {
    "average": [],
    "task_arithmetic": ["merge.lam_grid=[0.3,0.6,1.0]"],
    "ties": ["merge.lam_grid=[0.6,1.0]"],
    "tall_masks": ["merge.lam_grid=[0.3,0.5]"],
}
models = ",".join(str(p) for p in pool.member_paths)
reports = {}
for method, extra in METHODS.items():
    reports[method] = run([f"merge={method}", f"pretrained={pool.pretrained}", f"models=[{models}]",
                           "eval.max_batches=2", *extra], run_dir=OUT / method)

# %%
tasks = pool.task_names
print(f"{'method':16s}" + "".join(f"{t:>14s}" for t in tasks) + f"{'normalized':>12s}")
first = next(iter(reports.values()))
print(f"{'individual':16s}" + "".join(f"{first['tasks'][t]['individual'][first['tasks'][t]['primary']]:14.4f}" for t in tasks))
for method, r in reports.items():
    row = "".join(f"{r['tasks'][t]['merged'][r['tasks'][t]['primary']]:14.4f}" for t in tasks)
    mean = r["mean"]["normalized"]  # null, with a `why` beside it, where a score to divide by is 0
    print(f"{method:16s}{row}" + (f"{mean:12.3f}" if mean is not None else f"{'undefined':>12s}"))

# %% [markdown]
# ## Scores normalised to each task's own fine-tuned model (1.0 = no loss from merging)
# merged / individual for a higher-is-better metric (semseg mIoU), individual / merged for a lower-is-better
# one (regression MAE): above 1.0 is better than the fine-tune either way.

# %%
fig = Figure(figsize=(6, 3.5))
ax = fig.add_subplot()
width = 0.8 / len(reports)
for i, (method, r) in enumerate(reports.items()):
    scores = [r["tasks"][t]["normalized"] for t in tasks]
    ax.bar([j + i * width for j in range(len(tasks))], [float("nan") if v is None else v for v in scores], width,
           label=method)
ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
ax.axhline(1.0, color="black", lw=0.8)
ax.set_ylabel("normalized score (primary metric)")
ax.legend(fontsize="small")
fig.tight_layout()
fig.savefig(OUT / "accuracies.png", dpi=100)  # a bare Figure is not rendered by every Jupyter frontend
display(Image(filename=str(OUT / "accuracies.png")))

# %% [markdown]
# ## TALL masks: which weights each task keeps
# The masks of the `tall_masks` run above, rebuilt at the λ_t it chose on validation. A weight kept by no
# task is "catastrophic", by one task "selfish".

# %%
chosen = reports["tall_masks"]["selected"]["lam"]  # {task: λ_t}
print("λ_t chosen on validation:", chosen)
tall = merging.tall_masks(pool.pretrained, pool.member_paths, lam=chosen)
overlap = merging.mask_overlap(tall)
print({k: round(v, 4) for k, v in overlap.items() if k in ("selfish", "catastrophic")})
display(Image(filename=str(merging.plot_mask_overlap(overlap, OUT / "mask_overlap.png"))))
