#!/usr/bin/env python
"""Build a merging zoo: pretrain a base model, fine-tune it fully and separately on the 8 zoo tasks.

    python scripts/build_zoo.py --zoo cnn                 # ~15 min on 2 CPU cores
    python scripts/build_zoo.py --zoo vit --out zoo_vit   # ~70 min on 2 CPU cores, ~3 min on one GPU
    python scripts/build_zoo.py --zoo cnn --smoke         # timm test backbones, seconds per model
    python scripts/build_zoo.py --zoo cnn --linear        # + tangent-space fine-tunes (manifest_linear.json)
    mtl-merge merge=ties pool=<out>/manifest.json         # then merge it

Step 1 runs `mtl-train experiment=zoo_<zoo>_pretrain` (the procedural `pretrain` data), step 2
`mtl-train experiment=zoo_<zoo>_finetune init_from=<pretrain>/model data.dataset=<task>` per task, all
in-process (`mtl.train.run`). The output folder holds `pretrain/`, `finetune/<task>/` (run folders with
a `model/` each) and `manifest.json`: {"pretrained", "models", "individual": {task: test accuracy}, ...}
with paths relative to the manifest, which `mtl-merge pool=<manifest>` reads. A task whose run folder
already holds a finished model is reused (so an interrupted build resumes); --fresh rebuilds everything.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_runs, also when loaded as a module

from mtl.io import write_json  # noqa: E402
from mtl.progress_log import emit  # noqa: E402

ZOO_KINDS = ("cnn", "vit")
#: smoke fine-tunes: one probe epoch and one fine-tuning epoch, so both phases run
SMOKE_FINETUNE = ["trainer.max_epochs=2", "callbacks.probe_then_finetune.probe_epochs=1"]


def zoo_tasks() -> tuple[str, ...]:
    from mtl.data.zoo import ZOO_TASKS

    return ZOO_TASKS


def common_overrides(zoo: str, smoke: bool) -> list[str]:
    out = ["viz.num_samples=0"]
    if smoke:
        out += ["debug=smoke"] + (["backbone=test_vit"] if zoo == "vit" else [])
    return out


def finetune_args(zoo: str, smoke: bool, extra: Sequence[str] = (), init: str = "init_from=<pretrained>",
                  data: str = "data.dataset=<task>") -> list[str]:
    """Step 2's mtl-train overrides (placeholders for the manifest; real values for a run)."""
    return [f"experiment=zoo_{zoo}_finetune", init, data, *common_overrides(zoo, smoke),
            *(SMOKE_FINETUNE if smoke else []), *extra]


def _finished(run_dir: Path) -> bool:
    from bench_runs import finished_run

    return (run_dir / "model" / "model.safetensors").is_file() and finished_run(run_dir)


def _weights_id(folder: Path) -> str:
    """A digest of a model folder's weights file: a fine-tune is reused only from the same θ0 (its
    init_from path stays the same when the pretraining is rebuilt)."""
    h = hashlib.sha256()
    with open(Path(folder) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _train(overrides: list[str], run_dir: Path, fresh: bool, init: Path | None = None) -> tuple[dict[str, Any], float | None, bool]:
    """(metrics, seconds, reused). A half-written run folder is replaced. `init`: the init_from folder,
    whose weights' digest joins the recorded recipe. `seconds` is the run's training time as its metrics.json
    records it (fit_seconds), for a reused run as for one trained now; None where the run recorded none."""
    from bench_runs import record, reusable
    from mtl.train import run

    recipe = [*_placeholder_init(overrides), f"init_from weights sha256={_weights_id(init)}"] if init is not None \
        else overrides
    _upgrade_recipe(run_dir)
    reused = not fresh and reusable(run_dir, recipe, _finished)
    if not reused:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run(overrides, run_dir=run_dir)
        record(run_dir, recipe)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics, metrics.get("fit_seconds"), reused


def _placeholder_init(overrides: Sequence[str]) -> list[str]:
    """θ0 is identified by its weights' digest, not its absolute path: a moved zoo resumes."""
    return ["init_from=<pretrained>" if o.startswith("init_from=") else o for o in overrides]


def _upgrade_recipe(run_dir: Path) -> None:
    """A recipe recorded with θ0's absolute path (before `_placeholder_init`) and its digest: the path
    is redundant, so it is rewritten in today's form instead of refusing a moved or older zoo."""
    from bench_runs import RECIPE, record

    if not (run_dir / RECIPE).is_file():
        return
    stored = json.loads((run_dir / RECIPE).read_text())
    if any(o.startswith("init_from weights sha256=") for o in stored) and _placeholder_init(stored) != stored:
        record(run_dir, _placeholder_init(stored))


def pretrain(zoo: str, out: Path, smoke: bool = False, extra: Sequence[str] = (), fresh: bool = False) -> dict[str, Any]:
    ov = [f"experiment=zoo_{zoo}_pretrain", *common_overrides(zoo, smoke), *extra]
    metrics, seconds, reused = _train(ov, out / "pretrain", fresh)
    return {"run_dir": out / "pretrain", "model": out / "pretrain" / "model", "overrides": ov,
            "accuracy": metrics["test"]["pretrain"]["accuracy"], "seconds": seconds, "reused": reused}


def finetune(zoo: str, task: str, pretrained: Path, out: Path, smoke: bool = False, extra: Sequence[str] = (),
             fresh: bool = False, linear: bool = False) -> dict[str, Any]:
    run_dir = out / ("finetune_linear" if linear else "finetune") / task
    extra = [*extra, "linearize=true"] if linear else extra
    ov = finetune_args(zoo, smoke, extra, f"init_from={Path(pretrained).resolve()}", f"data.dataset={task}")
    metrics, seconds, reused = _train(ov, run_dir, fresh, init=Path(pretrained))
    return {"task": task, "run_dir": run_dir, "model": run_dir / "model", "overrides": ov,
            "accuracy": metrics["test"][task]["accuracy"], "val_accuracy": metrics["val"].get(task, {}).get("accuracy"),
            "seconds": seconds, "reused": reused}


def build_zoo(zoo: str, out: str | Path, tasks: Sequence[str] | None = None, smoke: bool = False,
              pretrain_overrides: Sequence[str] = (), finetune_overrides: Sequence[str] = (),
              fresh: bool = False, linear: bool = False) -> dict[str, Any]:
    """Pretrain, fine-tune every task, write `<out>/manifest.json`; returns the manifest.

    `linear`: tangent-space fine-tunes (`linearize=true`) into `<out>/finetune_linear/`, merged against
    θ0 as a linearised model folder (`<out>/pretrain/model_linearized`), listed in `manifest_linear.json`;
    the pretrained model is shared with the standard zoo (reused when it exists).
    """
    if zoo not in ZOO_KINDS:
        raise ValueError(f"zoo must be one of {ZOO_KINDS}, got {zoo!r}")
    tasks = list(tasks or zoo_tasks())
    unknown = [t for t in tasks if t not in zoo_tasks()]
    if unknown:
        raise ValueError(f"unknown zoo task(s) {unknown}; valid: {', '.join(zoo_tasks())}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / ("manifest_linear.json" if linear else "manifest.json")
    if fresh:  # retraining θ0: until the build ends, the old manifest would list fine-tunes of another θ0
        manifest_path.unlink(missing_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    pre = pretrain(zoo, out, smoke, pretrain_overrides, fresh)
    emit(f"[zoo] {zoo} base: {'reused the finished pretraining run' if pre['reused'] else 'pretrained'}")
    fts = []
    for i, t in enumerate(tasks, start=1):
        emit(f"[zoo] fine-tune {i}/{len(tasks)}: {t}{' (tangent space)' if linear else ''}")
        fts.append(finetune(zoo, t, pre["model"], out, smoke, finetune_overrides, fresh, linear))
    if linear:
        pre["model"] = _linearized_pretrained(pre["model"])
    rel = lambda p: str(Path(p).relative_to(out))  # noqa: E731
    manifest = {
        "zoo": zoo,
        "smoke": smoke,
        "pretrained": rel(pre["model"]),
        "models": [rel(f["model"]) for f in fts],
        "tasks": tasks,
        "individual": {f["task"]: f["accuracy"] for f in fts},
        "individual_val": {f["task"]: f["val_accuracy"] for f in fts},
        "pretrain_accuracy": pre["accuracy"],
        # each run's training time (a reused run's too, from its metrics.json); total: this build's wall time
        "seconds": {"pretrain": _round(pre["seconds"]), **{f["task"]: _round(f["seconds"]) for f in fts},
                    "total": round(time.perf_counter() - start, 1)},
        "cpu_seconds": round(time.process_time() - cpu, 1),  # this process, all threads
        "reused": [n for n, r in [("pretrain", pre), *((f["task"], f) for f in fts)] if r["reused"]],
        "overrides": {"pretrain": pre["overrides"],
                      "finetune": finetune_args(zoo, smoke, [*finetune_overrides, *(["linearize=true"] if linear else [])])},
        "linear": linear,
    }
    write_json(manifest_path, manifest)  # atomic: a manifest is whole or absent
    return manifest


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _linearized_pretrained(folder: Path) -> Path:
    """θ0 as a linearised model folder, so its keys match the linearised fine-tunes' (θ0 buffers)."""
    from mtl.io import load_model, save_model
    from mtl.models import linearize

    dest = Path(folder).parent / "model_linearized"
    from mtl.io import recorded_weights_digest

    save_model(linearize(load_model(folder)), dest, meta={"linearized_from": str(folder),  # the pool's θ0 check
                                                          "linearized_from_weights_digest": recorded_weights_digest(folder)})
    return dest


def summary_table(manifest: dict[str, Any]) -> str:
    """Markdown table: individual test accuracy and build time per task."""
    sec = {k: "?" if v is None else f"{v:.0f}" for k, v in manifest["seconds"].items()}
    rows = ["| model | test accuracy | train time (s) |", "|---|---:|---:|",
            f"| pretrain (60 classes) | {manifest['pretrain_accuracy']:.4f} | {sec['pretrain']} |"]
    for t in manifest["tasks"]:
        rows.append(f"| {t} | {manifest['individual'][t]:.4f} | {sec[t]} |")
    acc = manifest["individual"].values()
    rows.append(f"| mean of {len(acc)} tasks | {sum(acc) / len(acc):.4f} | {sec['total']} (total) |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", choices=ZOO_KINDS, required=True)
    p.add_argument("--smoke", action="store_true", help="debug=smoke: timm test backbones, a few steps each")
    p.add_argument("--out", help="output folder (default outputs/zoo_<zoo>[_smoke])")
    p.add_argument("--tasks", nargs="+", help="subset of the 8 tasks (default: all)")
    p.add_argument("--pretrain-overrides", nargs="*", default=[], help="extra mtl-train overrides for step 1")
    p.add_argument("--finetune-overrides", nargs="*", default=[], help="extra mtl-train overrides for step 2")
    p.add_argument("--fresh", action="store_true", help="retrain models whose run folders are already complete")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a CPU other jobs share)")
    p.add_argument("--linear", action="store_true",
                   help="tangent-space fine-tunes (linearize=true) -> finetune_linear/ and manifest_linear.json")
    args = p.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["threads"])

    from mtl.cli.common import prepare

    prepare()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out or f"outputs/zoo_{args.zoo}{'_smoke' if args.smoke else ''}")
    manifest = build_zoo(args.zoo, out, args.tasks, args.smoke, args.pretrain_overrides, args.finetune_overrides,
                         args.fresh, args.linear)
    print(f"\n{args.zoo.upper()} zoo{' (smoke)' if args.smoke else ''}:\n")
    print(summary_table(manifest))
    print(f"\nwall {manifest['seconds']['total']:.0f} s, CPU {manifest['cpu_seconds']:.0f} s (this process)")
    if manifest["reused"]:
        print(f"\nreused finished runs: {', '.join(manifest['reused'])} (--fresh retrains them)")
    name = "manifest_linear.json" if args.linear else "manifest.json"
    print(f"\nmanifest: {out.resolve() / name}")
    print(f"merge it: mtl-merge merge=ties pool={out.resolve() / name}")
    return 0


if __name__ == "__main__":
    from script_cli import run

    run(main)
