"""The model card (``README.md``) written beside every export: what the model does, how well, how it
was made and how to load it — from the folder's config, its run's metrics.json and the export report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtl.exporters.api import Source
from mtl.io import read_json


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _task_rows(src: Source, tasks: list[str]) -> list[str]:
    rows = ["| task | kind | outputs | primary metric |", "|---|---|---|---|"]
    by_name = {t.get("name"): t for t in src.config.get("tasks", []) if isinstance(t, dict)}
    model_tasks = getattr(src.model, "tasks", {}) or {}
    for name in tasks:
        t = by_name.get(name, {})
        task = model_tasks.get(name)
        outs = t.get("num_classes") or getattr(task, "out_channels", "")
        rows.append(f"| {name} | {t.get('kind', '')} | {outs} | {getattr(task, 'primary', '')} |")
    return rows


def _metric_rows(src: Source, tasks: list[str], widths: dict[str, Any] | None = None) -> list[str]:
    if widths:  # a run's test metrics are the full-width model's
        return [f"This slimmable model runs at widths {json.dumps(widths)}, not the full widths its run's test "
                f"metrics describe; {_width_table_note(src, widths)}"]
    if src.meta.get("tested") and not src.metrics:  # e.g. TALL: the run scored each task's own model
        return [f"Not tested itself: its run's test metrics describe other models — {src.meta['tested']}. "
                "Evaluate this model before relying on it."]
    if not src.metrics:
        return ["No metrics were found for this model (no `metrics.json` beside its folder or in its run "
                "folder, and none stored in its config): evaluate it before relying on it."]
    where = f"`{src.metrics_file}`" if src.metrics_file else "the model folder's config (`meta.test`)"
    rows = [f"Test-split metrics of the run that produced this model, read from {where}:", "",
            "| task | metric | value |", "|---|---|---|"]
    for task in tasks:
        for metric, value in (src.metrics.get(task) or {}).items():
            rows.append(f"| {task} | {metric} | {_fmt(value)} |")
    dm = (src.run_metrics or {}).get("delta_m")
    if isinstance(dm, dict) and dm.get("value") is None and "value" in dm:  # NaN, stored as null
        rows += ["", "Δm vs the single-task baselines is not defined for this run (null in its metrics.json)."]
    elif isinstance(dm, dict) and "value" in dm:
        run_tasks = sorted(src.metrics)
        whose = ("" if sorted(tasks) == run_tasks else  # Δm averages over every task of the run
                 f" of the whole model it was taken from (tasks {', '.join(run_tasks)}; not of this subset)")
        rows += ["", f"Δm = {dm['value']:+.2f}%{whose} ({dm.get('variant', '')} metrics) vs the single-task "
                     f"baselines in `{dm.get('baselines', '')}`."]
    return rows


def _width_table_note(src: Source, widths: dict[str, Any]) -> str:
    """Where the test metrics of these widths are: the run's ``width_table_test.json``, if it holds them all (a
    width calibrated after the run, ``calibrate_widths``, is in the model's width set but not in that table)."""
    from mtl.models.slimmable.layers import width_index

    places = ([src.folder.parent] if src.folder is not None else []) + \
        ([Path(src.meta["run_dir"])] if src.meta.get("run_dir") else [])
    table = next((p / "width_table_test.json" for p in places if (p / "width_table_test.json").is_file()), None)
    if table is None:
        return "no width table of its run was found: evaluate it."
    dec = widths.get("decoders")
    used = sorted({widths.get("encoder"), *(dec.values() if isinstance(dec, dict) else [dec])} - {None})
    try:
        table_set = [float(w) for w in read_json(table)["width_set"]]
    except (ValueError, TypeError, KeyError):
        return f"its run's `{table}` holds no readable width_set: evaluate it."
    missing = [w for w in used if width_index(table_set, w) is None]
    if missing:
        return (f"its run's `{table}` has no entry for width(s) {missing} (added to the model after that run, "
                "by BN recalibration): evaluate it.")
    return f"see its run's `{table}` for this configuration, or evaluate it."


def _tool(src: Source) -> str:
    """The mtlkit command whose run folder ``meta.run_dir`` names."""
    meta = src.meta
    if meta.get("init_from"):  # a fine-tune (of a pruned or merged model too) is mtl-train's
        return "mtl-train"
    if meta.get("prune") or meta.get("pruned_from"):
        return "mtl-prune"
    if meta.get("merge"):  # before the config's plan: a merge of pruned models inherits that architecture
        return "mtl-merge"
    if src.config.get("pruning"):
        return "mtl-prune"
    if meta.get("extract") is not None:
        return "mtl-extract"
    return "mtl-train"


def _provenance(src: Source) -> list[str]:
    meta = src.meta
    lines = []
    data = meta.get("data") or {}
    if meta.get("run_dir") or data:
        made = f" Made by `{_tool(src)}` in `{meta['run_dir']}`." if meta.get("run_dir") else ""
        seed = f", seed {meta['seed']}" if meta.get("seed") is not None else ""
        lines.append(f"-{made} Training data `{data.get('name', '?')}`"
                     f"{' (image size ' + str(data['size']) + ')' if data.get('size') else ''}{seed}.")
    merge = meta.get("merge")
    if isinstance(merge, dict):
        hp = ", ".join(f"{k}={json.dumps(v)}" for k, v in merge.items() if k != "method")
        lines.append(f"- Merged by `mtl-merge` with method `{merge.get('method')}`{' (' + hp + ')' if hp else ''}.")
        inputs = meta.get("merged_from") if isinstance(meta.get("merged_from"), dict) else {}
        if inputs.get("models"):
            lines.append(f"- Merge inputs: pretrained `{inputs.get('pretrained')}`; fine-tuned "
                         + ", ".join(f"`{m}`" for m in inputs["models"]) + ".")
    plan = src.config.get("pruning")
    prune = meta.get("prune") if isinstance(meta.get("prune"), dict) else None
    if isinstance(plan, dict) or prune:
        info = dict((plan or {}).get("hparams") or {})
        info.update({k: v for k, v in (prune or {}).items() if k != "method"})
        method = (prune or {}).get("method") or (plan or {}).get("method")
        hp = ", ".join(f"{k}={json.dumps(v)}" for k, v in info.items())
        sized = f"; {len(plan['modules'])} modules resized" if isinstance(plan, dict) and plan.get("modules") else ""
        lines.append(f"- Pruned with `{method}`{' (' + hp + ')' if hp else ''}{sized}"
                     f"{' from `' + str(meta['pruned_from']) + '`' if meta.get('pruned_from') else ''}.")
    if meta.get("init_from"):
        lines.append(f"- Fine-tuned by `mtl-train` from the model folder `{meta['init_from']}`.")
    if meta.get("extract") is not None:
        lines.append(f"- Extracted sub-network ({json.dumps(meta['extract'])}) of `{meta.get('extracted_from')}`.")
    if meta.get("exported_from"):
        lines.append(f"- Exported from the model folder `{meta['exported_from']}`.")
    if src.folder is not None:
        lines.append(f"- Source model folder: `{src.folder}`.")
    return lines or ["- Not recorded (the model was exported from memory without provenance metadata)."]


def _loading(report: dict[str, Any]) -> list[str]:
    fmt = report["format"]
    if fmt == "onnx":
        h, w = report["input"]["shape"][-2:]
        outs = ", ".join(report["tasks"])
        return ["```python", "import numpy as np, onnxruntime as ort",
                'session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])',
                f"images = np.zeros((4, 3, {h}, {w}), dtype=np.uint8)  # RGB, 0-255, NCHW; any batch size",
                f'{outs}{"," if len(report["tasks"]) == 1 else ""} = session.run(None, {{"image": images}})', "```"]
    if fmt == "timm":
        indices = report["out_indices"]
        return ["```python", "import timm", f"# the trained feature maps (out_indices {indices}): a list of tensors",
                f"backbone = {report['load'].replace('<folder>', '.')}",
                f"# or: timm.create_model(\"local-dir:.\", pretrained=True, features_only=True, out_indices={indices})"
                "  # without pretrained=True: random weights",
                "# the whole plain model (zero classifier"
                + (f"; {', '.join(report['untrained_modules'])} untrained" if report.get("untrained_modules") else "")
                + f"): {report['load_plain'].replace('<folder>', '.')}",
                "```"]
    return ["```python", "import mtl", 'model = mtl.load_model(".")  # no network, no code from the folder is run',
            "out = model(images_uint8)  # {task: prediction}; uint8 (B, 3, H, W) input is normalised inside", "```"]


def _export_section(report: dict[str, Any]) -> list[str]:
    fmt = report["format"]
    if fmt == "onnx":
        v = report["verification"]
        diffs = ", ".join(f"{t} {e:.2e}" for t, e in v["max_abs_diff"].items())
        return [f"- ONNX opset {report['opset']} (`{report['exporter']}` exporter), file `{report['file']}`.",
                f"- Input `{report['input']['name']}`: {report['input']['dtype']} {report['input']['shape']} "
                f"({report['input']['layout']}); batch size is dynamic, image size fixed.",
                f"- Preprocessing: {report['preprocessing']}.",
                "- Outputs (one per task, in this order): " + ", ".join(f"`{t}` {o['shape']}" for t, o in report["outputs"].items()) + ".",
                f"- Verified in {v['runtime']} against PyTorch on batches {v['batches']}: max |diff| {diffs} "
                f"(tolerance atol={v['atol']:g} + rtol={v['rtol']:g}·|value|)."]
    if fmt == "timm":
        filled = report["filled_keys"]
        lines = [f"- timm architecture `{report['timm_name']}`, model args {json.dumps(report['model_args'])}; "
                 f"{report['trained_keys']} tensors come from the multi-task backbone."]
        indices = report["out_indices"]
        features = (f"`features_only=True, out_indices={indices}` or `forward_intermediates(x, indices={indices}, "
                    "intermediates_only=True)`")
        untrained = report.get("untrained_modules") or []
        lines.append(f"- The trained feature maps are those at out_indices {indices}: use {features}"
                     + (" (or `forward_features`)." if not untrained else
                        f"; `forward_features` runs {', '.join(f'`{m}`' for m in untrained)}, which the multi-task "
                        "backbone never had: untrained (timm's seeded initialisation), so its output is not a "
                        "trained feature."))
        if filled["zeroed"]:
            lines.append(f"- The multi-task model has no ImageNet classifier: {', '.join(filled['zeroed'])} "
                         "are zero (zero logits); fine-tune a head for classification.")
        if filled["timm_init"]:
            lines.append(f"- Not used by the multi-task backbone and left at timm's initialisation: "
                         f"{', '.join(filled['timm_init'][:12])}{' …' if len(filled['timm_init']) > 12 else ''}.")
        lines.append("- Preprocessing is not part of the weights: feed float images normalised with the mean/std "
                     "below (the multi-task model's own). timm's `config.json` records them with the training "
                     "image size and a resize without centre crop, so `timm.data.resolve_data_config` / "
                     "`create_transform` on `local-dir:<folder>` give that recipe, not timm's ImageNet one.")
        return lines
    return [f"- mtlkit model folder ({report.get('parameters', '?')} parameters); `mtl.load_model` rebuilds it from "
            "`config.json` + `model.safetensors` (no pickles). It follows the layout of Hugging Face model "
            "folders but is read by mtlkit, not by `huggingface_hub`'s `ModelHubMixin`."]


def render_card(src: Source, report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    bb = src.config.get("backbone", {})
    dec = src.config.get("decoder", {})
    mean, std = src.config.get("mean"), src.config.get("std")
    lines = [
        "---", "library_name: mtlkit", f"tags: [multi-task, mtlkit, {report['format']}]", "---", "",
        f"# Multi-task model: {', '.join(tasks)}", "",
        f"A `{src.family}` model exported as `{report['format']}` by mtlkit (`mtl.export`, which `mtl-export` "
        f"runs): one shared backbone "
        f"(`{bb.get('name', '?')}`), decoder `{dec.get('name', '?')}` "
        f"({json.dumps({k: v for k, v in dec.items() if k != 'name'})}), one head per task"
        f"{'; widths ' + json.dumps(report['widths']) if report.get('widths') else ''}.", "",
        "## Tasks", "", *_task_rows(src, tasks), "",
        "## Metrics", "", *_metric_rows(src, tasks, report.get("widths")), "",
        "## How it was made", "", *_provenance(src), "",
        "## Export", "", *_export_section(report),
        f"- Input normalisation: mean {_round(mean)}, std {_round(std)}.", "",
        "## Intended use", "",
        "Research and prototyping: dense and image-level predictions for the tasks above on images like its "
        "training data. It has not been evaluated beyond the metrics listed here (often small synthetic or "
        "benchmark data); check it on your own data before any real use.", "",
        "## Loading", "", *_loading(report), "",
    ]
    return "\n".join(lines)


def _round(values: Any) -> Any:
    return [round(float(v), 4) for v in values] if isinstance(values, (list, tuple)) else values
