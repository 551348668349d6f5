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
# # Prune a multi-task model and export it
#
# Train a tiny model (smoke settings), prune 30% of its channels, then export it three ways:
# an ONNX graph checked in ONNX Runtime, timm backbone weights, and a model folder with a model card.
# The same exports from the shell: `mtl-export model=<folder> format=onnx|timm|folder`.

# %%
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from IPython.display import Markdown, display

import mtl
import pruning
from mtl.train import run

OUT = Path(os.environ.get("MTL_OUTPUT_DIR") or "outputs") / "notebooks/export"  # where the CLIs would write from this folder
shutil.rmtree(OUT, ignore_errors=True)  # a re-run starts afresh: a run folder holding a finished run is refused
run_dir = run(["experiment=scenes_hps", "debug=smoke", "logger=none", "viz.num_samples=0",
               "task=[semseg,depth,classification]"], run_dir=OUT / "train")
model = mtl.load_model(run_dir / "model")
images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

# %% [markdown]
# ## Prune
# `l1` removes the same fraction of channels in every prunable layer (smallest L1 norm first);
# the pruned model is physically smaller and its folder stores the new layer sizes.

# %%
pruned, report = pruning.prune(model, "l1", example=images[:2], ratio=0.3)
print(f"params {report['params']['before']:,} -> {report['params']['after']:,} "
      f"({100 * report['params']['reduction']:.0f}% fewer)")
# pruned.meta keeps the parent's data and seed and names its run (pruned_from), not its test metrics
pruned_dir = mtl.save_model(pruned, OUT / "pruned", meta=pruned.meta)

# %% [markdown]
# ## ONNX
# uint8 images in (normalisation is part of the graph), one output per task, any batch size.
# The export runs the file in ONNX Runtime and compares it with PyTorch before keeping it.
# `exporter="torchscript"` traces faster than torch's default `dynamo` exporter.

# %%
onnx_dir = mtl.export(pruned_dir, "onnx", OUT / "onnx", tasks=["semseg", "depth"], exporter="torchscript",
                      overwrite=True)
session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
semseg, depth = session.run(None, {"image": images.numpy()})
with torch.no_grad():
    ref = mtl.load_model(pruned_dir)(images, tasks=["depth"])["depth"].numpy()
print("ONNX output shapes:", semseg.shape, depth.shape, "| max |diff| depth vs PyTorch:", float(np.abs(depth - ref).max()))

# %% [markdown]
# ## timm backbone weights (the unpruned model: timm cannot rebuild pruned layer sizes)
# Only what the multi-task model trained is trained here: the ImageNet classifier is zero, and stages after the
# backbone's last `out_indices` (here all of `layer4`) keep timm's random initialisation (docs/export.md).

# %%
timm_dir = mtl.export(run_dir / "model", "timm", OUT / "timm", overwrite=True)
info = json.loads((timm_dir / "export.json").read_text())
backbone = timm.create_model(info["timm_name"], pretrained=True, features_only=True, out_indices=info["out_indices"],
                             pretrained_cfg_overlay={"file": str(timm_dir / "model.safetensors")}, **info["model_args"])
print(info["load"])
x = torch.randn(2, 3, 32, 32)  # normalised images: the maps equal the multi-task model's backbone
with torch.no_grad():
    print("feature maps equal to the multi-task backbone's:",
          all(torch.equal(a, b) for a, b in zip(backbone.eval()(x), model.backbone(x))))
print("zeroed (no ImageNet head in a multi-task model):", info["filled_keys"]["zeroed"])
# tensors the multi-task backbone never had (stages after its last out_index) keep timm's random initialisation:
untrained = info["filled_keys"]["timm_init"]
print(f"{len(untrained)} tensors at timm's initialisation, e.g.", untrained[:3])

# %% [markdown]
# ## A model folder with a model card

# %%
card_dir = mtl.export(pruned_dir, "folder", OUT / "folder", overwrite=True)
display(Markdown((card_dir / "README.md").read_text().split("---", 2)[-1]))
reloaded = mtl.load_model(card_dir)
print({t: tuple(p.shape) for t, p in reloaded(images[:2]).items()})
