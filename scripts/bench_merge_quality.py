#!/usr/bin/env python
"""Merging quality on a zoo: every method through the real `mtl-merge` job, one table for all.

    python scripts/build_zoo.py --zoo cnn --out outputs/zoo_cnn
    python scripts/bench_merge_quality.py --manifest outputs/zoo_cnn/manifest.json [--methods ties tall_masks]

Each method runs `merging.job.run` (what `mtl-merge ... pool=<manifest>` runs) into <out>/<method>/:
hyperparameters (λ; TALL's λ_t per task) are picked on the validation splits, accuracy is on the test
splits, each task on its own data with its own head. The learned methods (AdaMerging, aTLAS,
Concrete) learn their coefficients on the test images without labels, as the papers do
(`--learn-steps n` caps their steps). `--bn recompute` re-estimates every merged model's BatchNorm
statistics on the unlabeled images of all tasks (docs/merging.md). Writes <out>/quality.md (absolute and normalized
accuracy per task and averaged, the TALL store's size), <out>/results.json, <out>/task_accuracy.png
(all methods) and <out>/mask_overlap.png (TALL masks: how many tasks use each weight).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

TA_GRID = "[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]"
TIES_GRID = "[0.2,0.3,0.4,0.5,0.6,0.8,1.0]"

#: bench name -> (label, mtl-merge overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "pretrained": ("pretrained θ0", ["merge=pretrained"]),
    "average": ("weight averaging", ["merge=average"]),
    "task_arithmetic": ("task arithmetic", ["merge=task_arithmetic", f"merge.lam_grid={TA_GRID}"]),
    "ties": ("TIES", ["merge=ties", f"merge.lam_grid={TIES_GRID}"]),
    "dare_ties": ("DARE + TIES", ["merge=dare", "merge.base=ties", f"merge.lam_grid={TIES_GRID}"]),
    "tall_masks": ("TALL masks (store)", ["merge=tall_masks", "store=true"]),
    "consensus_ta": ("Consensus (TA)", ["merge=consensus", "merge.base=task_arithmetic", f"merge.lam_grid={TA_GRID}"]),
    "consensus_ties": ("Consensus (TIES)", ["merge=consensus", "merge.base=ties", f"merge.lam_grid={TIES_GRID}"]),
    # learned at test time on the test images (no labels), as the papers do
    "adamerging_task": ("AdaMerging (task-wise)", ["merge=adamerging", "merge.granularity=task"]),
    "adamerging_layer": ("AdaMerging (layer-wise)", ["merge=adamerging", "merge.granularity=layer"]),
    "adamergingpp_layer": ("AdaMerging++ (layer-wise)", ["merge=adamerging", "merge.granularity=layer", "merge.vectors=ties"]),
    "atlas": ("aTLAS (entropy)", ["merge=atlas"]),
    "concrete_ta": ("Concrete (TA)", ["merge=concrete_ta"]),
    "concrete_adamerging": ("Concrete (layer-wise AdaMerging)", ["merge=concrete_adamerging"]),
}
LEARNED = ("adamerging_task", "adamerging_layer", "adamergingpp_layer", "atlas", "concrete_ta", "concrete_adamerging")

#: CLIP ViT-B/32, 8 tasks, average absolute accuracy (%) as the papers report it
PAPER = {"pretrained": 48.0, "average": 65.8, "task_arithmetic": 69.1, "ties": 72.4, "consensus_ta": 73.6,
         "adamerging_task": 71.1, "adamerging_layer": 80.1, "adamergingpp_layer": 81.1}
PAPER_ORDER = ["average", "task_arithmetic", "adamerging_task", "ties", "consensus_ta", "adamerging_layer", "adamergingpp_layer"]


def run_method(name: str, manifest: Path, out: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    from merging.job import run

    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    overrides = [*METHODS[name][1], f"pool={manifest}", *extra]
    start = time.perf_counter()
    report = run(overrides, run_dir=run_dir)
    report["bench_seconds"] = round(time.perf_counter() - start, 1)
    report["overrides"] = overrides
    return report


def run_all(manifest: str | Path, out: str | Path, methods: Sequence[str] | None = None,
            extra: Sequence[str] = (), learned_extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run every method (`learned_extra`: overrides for the learned ones only); a failing method is
    recorded with its error and the others still run."""
    manifest, out = Path(manifest).resolve(), Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    results: dict[str, Any] = {"manifest": str(manifest), "methods": {}, "errors": {}}
    for m in methods:
        print(f"=== {m}: {' '.join(METHODS[m][1])}", flush=True)
        try:
            results["methods"][m] = run_method(m, manifest, out, [*extra, *(learned_extra if m in LEARNED else ())])
        except Exception as e:  # noqa: BLE001 - reported in the table, the benchmark goes on
            traceback.print_exc()
            results["errors"][m] = f"{type(e).__name__}: {e}"
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def _primary(r: dict[str, Any], which: str) -> dict[str, float]:
    return {t: v[which][v["primary"]] for t, v in r["tasks"].items()}


def _hp(r: dict[str, Any]) -> str:
    sel = dict(r.get("selected") or {})
    if isinstance(sel.get("lam"), dict):  # TALL: λ_t per task
        sel["lam"] = "/".join(f"{v:g}" for v in sel["lam"].values())
    keep = ("lam", "k", "p", "base", "merge_func", "mtv", "granularity", "steps", "final_steps", "bn")
    if sel.get("vectors", "ties") != "ties":  # a learned method's TIES settings apply with vectors=ties only
        sel = {k: v for k, v in sel.items() if k not in ("k", "merge_func")}
    return ", ".join(f"{k}={sel[k]}" for k in keep if k in sel)


def tables(results: dict[str, Any]) -> str:
    """Markdown: summary, absolute and normalized accuracy per task, TALL storage, paper comparison."""
    done = results["methods"]
    if not done:
        return "no method finished"
    first = next(iter(done.values()))
    tasks = list(first["tasks"])
    indiv = _primary(first, "individual")
    short = {t: t.replace("_like", "") for t in tasks}
    lines = ["| method | hyperparameters (picked on val) | avg. accuracy | avg. normalized | time (s) |",
             "|---|---|---:|---:|---:|",
             f"| individual (fine-tuned) | — | {100 * statistics.fmean(indiv.values()):.1f} | 100.0 | — |"]
    for m, r in done.items():
        acc = _primary(r, "merged")
        lines.append(f"| {METHODS[m][0]} | {_hp(r)} | {100 * statistics.fmean(acc.values()):.1f} | "
                     f"{100 * r['mean']['normalized']:.1f} | {r['bench_seconds']:.0f} |")
    for m, err in results["errors"].items():
        lines.append(f"| {METHODS[m][0]} | failed: {err[:80]} | — | — | — |")

    head = "| method | " + " | ".join(short[t] for t in tasks) + " | avg |"
    sep = "|---|" + "---:|" * (len(tasks) + 1)
    absolute = ["Absolute test accuracy (%):", "", head, sep,
                "| individual | " + " | ".join(f"{100 * indiv[t]:.1f}" for t in tasks)
                + f" | {100 * statistics.fmean(indiv.values()):.1f} |"]
    norm = ["Normalized accuracy (% of individual):", "", head, sep]
    for m, r in done.items():
        acc = _primary(r, "merged")
        absolute.append(f"| {METHODS[m][0]} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in tasks)
                        + f" | {100 * statistics.fmean(acc.values()):.1f} |")
        norm.append(f"| {METHODS[m][0]} | " + " | ".join(f"{100 * r['tasks'][t]['normalized']:.1f}" for t in tasks)
                    + f" | {100 * r['mean']['normalized']:.1f} |")
    out = lines + [""] + absolute + [""] + norm

    tall = done.get("tall_masks")
    if tall and "store" in tall:
        s = tall["store"]
        ov = tall.get("mask_overlap", {})
        out += ["", f"TALL store (θ0 + τ_MTL + {s['tasks']} bit-packed masks + heads): "
                    f"{s['bytes_stored'] / 2**20:.2f} MiB vs {s['bytes_full_models'] / 2**20:.2f} MiB for "
                    f"{s['tasks']} full models ({100 * s['ratio']:.1f}%); reconstructed from the store: "
                    f"{100 * tall['mean']['normalized']:.1f}% of individual accuracy."]
        if ov:
            out += [f"Mask overlap: catastrophic (0 tasks) {100 * ov['catastrophic']:.1f}%, selfish (1 task) "
                    f"{100 * ov['selfish']:.1f}%, used by all {ov['tasks']} tasks {100 * ov['universal']:.1f}%."]

    avg = {m: statistics.fmean(_primary(r, "merged").values()) for m, r in done.items()}
    have = [m for m in PAPER_ORDER if m in avg]
    if len(have) > 1:
        ours = sorted(have, key=lambda m: avg[m])
        ties = any(round(100 * avg[a], 1) == round(100 * avg[b], 1) for a, b in zip(ours, ours[1:]))
        verdict = "same order" if ours == have and not ties else "order differs" if not ties else "ties at 0.1%"
        out += ["", "Ordering of average accuracy — papers (CLIP ViT-B/32, 8 tasks): "
                + " < ".join(f"{METHODS[m][0]} {PAPER[m]}" for m in have)
                + "; this zoo: " + " ≤ ".join(f"{METHODS[m][0]} {100 * avg[m]:.1f}" for m in ours)
                + f" ({verdict})."]
    return "\n".join(out)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import merging

    done = results["methods"]
    if not done:
        return []
    first = next(iter(done.values()))
    series = {"individual": _primary(first, "individual")}
    series.update({METHODS[m][0]: _primary(r, "merged") for m, r in done.items()})
    made = [merging.plot_task_accuracy(series, out / "task_accuracy.png", ylabel="test accuracy",
                                       title=f"Per-task accuracy by method ({Path(results['manifest']).parent.name})")]
    name = next((m for m in ("tall_masks", "consensus_ta", "consensus_ties") if done.get(m, {}).get("mask_overlap")), None)
    if name:
        k = None if name == "tall_masks" else done[name]["selected"].get("k")  # Consensus: its threshold, in the title
        what = "TALL" if k is None else f"Consensus (k = {k})"
        made.append(merging.plot_mask_overlap(done[name]["mask_overlap"], out / "mask_overlap.png", k=k,
                                              title=f"{what} mask overlap ({Path(results['manifest']).parent.name})"))
    return made


def finetuned_with_recomputed_bn(manifest: Path, split: str = "test", batch_size: int = 16) -> str:
    """Each fine-tuned model on its own task's test split: with its stored BN statistics, and with them
    re-estimated on its own task's `split` images (the best case for `bn=recompute`: one task, its own
    weights). Markdown."""
    import statistics

    from merging.bn import pooled_batches, recompute_bn
    from merging.evaluation import Evaluator
    from merging.evaluation import ImageBatches
    from merging.pool import ModelPool

    pool = ModelPool.from_manifest(manifest)
    ev = Evaluator(pool, None, {"batch_size": 256}, "cpu", progress=False)
    rows = ["| fine-tuned model (own task) | stored BN statistics | re-estimated on its own images |", "|---|---:|---:|"]
    before, after = [], []
    for i, m in enumerate(pool.members):
        model = pool.member_model(i)
        for t in m.tasks:
            a = ev.normalized(t, ev.run(model, t, "test"), "test")
            recompute_bn(model, pooled_batches({t: ImageBatches(ev.datamodule(t).dataset(split), batch_size, 0, t)}), task=t)
            b = ev.normalized(t, ev.run(model, t, "test"), "test")
            before.append(a), after.append(b)
            rows.append(f"| {t} | {100 * a:.1f} | {100 * b:.1f} |")
            print(rows[-1], flush=True)
    rows.append(f"| mean | {100 * statistics.fmean(before):.1f} | {100 * statistics.fmean(after):.1f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="zoo manifest from scripts/build_zoo.py")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all")
    p.add_argument("--out", help="default: <manifest folder>/quality")
    p.add_argument("--max-batches", type=int, help="cap evaluation batches per split (smoke runs)")
    p.add_argument("--eval-batch-size", type=int, default=256, help="evaluation batch size (speed only)")
    p.add_argument("--overrides", nargs="*", default=[], help="extra mtl-merge overrides for every method")
    p.add_argument("--learned-overrides", nargs="*", default=[],
                   help="extra mtl-merge overrides for the learned methods only (e.g. merge.eval_every=40)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a CPU other jobs share)")
    p.add_argument("--learn-steps", type=int, help="cap on the learned methods' optimisation steps (learn_max_steps)")
    p.add_argument("--finetuned-bn-check", action="store_true",
                   help="only: each fine-tuned model with its BN statistics re-estimated on its own task's test "
                        "images vs stored (normalized test accuracy); writes <out>/finetuned_bn.md")
    p.add_argument("--bn", choices=["pretrained", "average", "recompute"],
                   help="BatchNorm statistics of every merged model (merge.bn; default: the method's, θ0's); "
                        "recompute: re-estimated on the unlabeled images of every task (bn_stats.*, learned: merge.split)")
    args = p.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["max_batches", "eval_batch_size", "threads", "learn_steps"])

    from mtl.cli.common import prepare

    prepare()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    manifest = Path(args.manifest).resolve()
    if not manifest.is_file():  # every method would fail on it, one traceback each
        print(f"error: --manifest {args.manifest}: file not found (build a zoo first: scripts/build_zoo.py)",
              file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else manifest.parent / "quality"
    extra = [f"+eval.data.batch_size={args.eval_batch_size}", *args.overrides]
    extra += [f"eval.max_batches={args.max_batches}"] if args.max_batches else []
    extra += [f"+merge.bn={args.bn}"] if args.bn else []
    start = time.perf_counter()
    if args.finetuned_bn_check:
        out.mkdir(parents=True, exist_ok=True)
        md = finetuned_with_recomputed_bn(manifest)
        (out / "finetuned_bn.md").write_text(md + "\n")
        print("\n" + md + f"\n\ntotal {time.perf_counter() - start:.0f} s; wrote {out / 'finetuned_bn.md'}")
        return 0
    learned = [*args.learned_overrides, *([f"learn_max_steps={args.learn_steps}"] if args.learn_steps else [])]
    results = run_all(manifest, out, args.methods, extra, learned)  # the others refuse learn_max_steps
    md = tables(results)
    (out / "quality.md").write_text(md + "\n")
    made = plots(results, out)
    print("\n" + md)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; wrote " + ", ".join(
        str(p) for p in [out / "quality.md", out / "results.json", *made]))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    from script_cli import run

    run(main)
