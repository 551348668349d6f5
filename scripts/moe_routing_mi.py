"""Task–expert mutual information of a trained task-routed MoE ViT (family=task_moe_vit), per MoE layer,
measured in eval mode on a split of the data stored with the model (docs/models.md).

    python scripts/moe_routing_mi.py --model outputs/scenes_task_moe_vit/runs/<time>/model --split val

Two measures, both MI(task; expert) with a uniform P(task) (`mtl.models.moe.task_expert_mutual_information`):
* `probs`  — P(expert | task) = the task's mean softmax routing distribution: the quantity the
  training loss (`decoder.mi_weight`) raises;
* `routed` — P(expert | task) = the task's share of routed (token, slot) pairs per expert: what the
  top-k choice actually does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_cli, also when imported from elsewhere


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a task_moe_vit model folder")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--max-batches", type=int, default=None)
    args = p.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["max_batches"])

    import torch

    import mtl
    from mtl.data import create_datamodule
    from mtl.models.moe import task_expert_mutual_information as mi

    model = mtl.load_model(args.model).eval()
    if not hasattr(model, "moe_modules"):
        raise ValueError(f"{args.model}: not a task-routed MoE model (family=task_moe_vit)")
    data = dict(model.meta.get("data") or {})
    if "name" not in data:
        raise ValueError(f"{args.model}/config.json has no meta.data to measure on")
    dm = create_datamodule(**data)
    dm.prepare_data()
    dm.setup("fit" if args.split != "test" else "test")
    loader = getattr(dm, f"{args.split}_dataloader")()
    tasks = list(model.tasks)
    probs = {t: 0 for t in tasks}
    counts = {t: 0 for t in tasks}
    model.record_usage = True
    model.expert_usage(reset=True)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if args.max_batches is not None and i >= args.max_batches:
                break
            for t in tasks:
                model(batch["image"], tasks=[t])
                probs[t] = probs[t] + torch.stack([m.stats[t]["mean_probs"] for m in model.moe_modules()])
    counts = model.expert_usage(reset=True)
    layers = len(model.moe_modules())
    rows = {"probs": [float(mi(torch.stack([probs[t][l] for t in tasks]))) for l in range(layers)],
            "routed": [float(mi(torch.stack([counts[t][l].float() for t in tasks]))) for l in range(layers)]}
    print(json.dumps({"model": args.model, "split": args.split, "tasks": tasks, "mi_per_layer": rows}, indent=1))
    return rows


if __name__ == "__main__":
    from script_cli import run

    run(main)
