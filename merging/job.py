"""The job behind ``mtl-merge``: merge a pool, pick hyperparameters on validation, test, report."""
from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import merging
from merging.pool import ModelPool, evaluate, member_datamodule, normalized, resolve_device, score
from mtl.io import atomic_path, save_model, write_json

log = logging.getLogger(__name__)

#: CLI-level methods: "pretrained" is θ0 with each task's fine-tuned head (task arithmetic, λ=0)
CLI_METHODS = ("pretrained", "average", "task_arithmetic", "ties", "dare", "consensus", "tall_masks")


def build_smoke_pool(root: Path) -> ModelPool:
    """A seconds-long real pool: a tiny base trained on scenes classification, fine-tuned on 3 tasks."""
    from mtl.train import run

    common = ["experiment=scenes_hps", "debug=smoke", "viz.num_samples=0", "logger=none"]
    pre = run(common + ["task=[classification]"], run_dir=root / "pretrained") / "model"
    fts = [run(common + [f"task=[{t}]", f"init_from={pre}"], run_dir=root / t) / "model"
           for t in ("regression", "semseg")]
    return ModelPool.from_folders(pre, fts)


def resolve_pool(cfg: DictConfig, run_dir: Path) -> ModelPool:
    if cfg.get("pool"):
        return ModelPool.from_manifest(cfg.pool)
    if cfg.get("pretrained") and cfg.get("models"):
        return ModelPool.from_folders(cfg.pretrained, list(cfg.models))
    if cfg.get("smoke_pool"):
        return build_smoke_pool(run_dir / "smoke_pool")
    raise ValueError("nothing to merge: pass pretrained=<folder> models=[<folder>,...] or pool=<manifest.json>")


class Evaluator:
    """Evaluates models on every pool task, each on its own data (data modules built once)."""

    def __init__(self, pool: ModelPool, max_batches: int | None, data_overrides: dict[str, Any],
                 device: str = "cpu"):
        self.pool = pool
        self.device = resolve_device(device)
        self.max_batches = max_batches
        self.tasks = {t.name: t for t in pool.tasks()}
        self.owner = {t: m for m in pool.members for t in m.tasks}
        self._dms = {id(m): member_datamodule(m, data_overrides) for m in pool.members}

    def run(self, model, task: str, split: str) -> dict[str, float]:
        return evaluate(model, task, self._dms[id(self.owner[task])], split, self.max_batches, self.device)


def _hparams(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    hp = OmegaConf.to_container(cfg.merge, resolve=True)
    method = hp.pop("method")
    if method not in CLI_METHODS:
        raise ValueError(f"unknown merge method {method!r}; valid: {', '.join(CLI_METHODS)}")
    return method, hp


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node else {}


def _grid(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def run_merge(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    output = Path(cfg.output) if cfg.get("output") else run_dir / "model"
    if output.exists() and not cfg.overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=true to replace it")
    method, hp = _hparams(cfg)
    start = time.perf_counter()
    pool = resolve_pool(cfg, run_dir)
    ev = Evaluator(pool, cfg.eval.get("max_batches"), _plain(cfg.eval.get("data")), cfg.eval.get("device") or "cpu")
    pre, fts, names = pool.pretrained, pool.member_paths, pool.task_names

    individual = {}
    for i, m in enumerate(pool.members):
        model = pool.member_model(i)
        for t in m.tasks:
            individual[t] = {s: ev.run(model, t, s) for s in ("val", "test")}

    def norm_mean(results: dict[str, dict[str, float]], split: str) -> float:
        return statistics.fmean(
            normalized(ev.tasks[t], score(ev.tasks[t], results[t]), score(ev.tasks[t], individual[t][split])) for t in names
        )

    report: dict[str, Any] = {"method": method, "pretrained": str(pre), "models": [str(p) for p in fts]}
    if method == "tall_masks":
        final_model, test, extra = _run_tall(cfg, pool, ev, individual, hp, run_dir)
        report.update(extra)
    else:
        lam_key = "lam" if method != "average" else None
        candidates = _grid(hp.get(lam_key)) if lam_key and lam_key in hp else [None]
        grid = []
        for lam in candidates:
            kw = dict(hp)
            if lam is not None:
                kw[lam_key] = lam
            shared = merging.merge("task_arithmetic", pre, fts, lam=0.0) if method == "pretrained" else \
                merging.merge(method, pre, fts, **kw)
            model = pool.merged_model(shared)
            val = {t: ev.run(model, t, "val") for t in names}
            grid.append({"hparams": kw, "val_normalized": norm_mean(val, "val"), "model": model})
        best = max(grid, key=lambda g: g["val_normalized"])
        final_model = best["model"]
        test = {t: ev.run(final_model, t, "test") for t in names}
        report["selected"] = best["hparams"]
        report["grid"] = [{"hparams": g["hparams"], "val_normalized": g["val_normalized"]} for g in grid]
        if method == "consensus":
            _overlap_plot(merging.tall_masks(pre, fts, lam=best["hparams"].get("tall_lam", 0.4)), run_dir, report)

    report["tasks"] = {
        t: {"merged": test[t], "individual": individual[t]["test"], "primary": ev.tasks[t].primary,
            "normalized": normalized(ev.tasks[t], score(ev.tasks[t], test[t]), score(ev.tasks[t], individual[t]["test"]))}
        for t in names
    }
    same_metric = len({ev.tasks[t].primary for t in names}) == 1  # a mean over mixed metrics means nothing
    report["mean"] = {
        "merged": statistics.fmean(score(ev.tasks[t], test[t]) for t in names) if same_metric else None,
        "individual": statistics.fmean(score(ev.tasks[t], individual[t]["test"]) for t in names) if same_metric else None,
        "normalized": norm_mean(test, "test"),
    }
    report["seconds"] = round(time.perf_counter() - start, 2)
    save_model(final_model, output, overwrite=bool(cfg.overwrite),
               meta={"merge": {"method": method, **report.get("selected", {})}, "test": {t: test[t] for t in names}})
    report["output"] = str(output)
    write_json(run_dir / "metrics.json", report)
    merging.plot_task_accuracy(
        {"individual": {t: score(ev.tasks[t], individual[t]["test"]) for t in names},
         method: {t: score(ev.tasks[t], test[t]) for t in names}},
        run_dir / "task_accuracy.png", ylabel="primary metric (test)")
    print_table(report)
    return report


def _run_tall(cfg, pool: ModelPool, ev: Evaluator, individual, hp, run_dir: Path):
    """TALL masks: λ_t picked per task on its validation split; optional compressed store."""
    pre, fts, names = pool.pretrained, pool.member_paths, pool.task_names
    lam_grid = _grid(hp.pop("lam", [0.2, 0.3, 0.4, 0.5, 0.6]))
    mtv = hp.pop("mtv", "sum")
    per_task: dict[str, list[tuple[float, float]]] = {t: [] for t in names}
    for lam in lam_grid:
        tm = merging.tall_masks(pre, fts, lam=lam, mtv=mtv, **hp)
        for i, t in enumerate(names):
            model = pool.merged_model(tm.reconstruct(i))
            per_task[t].append((score(ev.tasks[t], ev.run(model, t, "val")) * (1 if ev.tasks[t].directions.get(ev.tasks[t].primary, True) else -1), lam))
    lams = [max(per_task[t])[1] for t in names]
    tm = merging.tall_masks(pre, fts, lam=lams, mtv=mtv, **hp)
    test = {}
    extra: dict[str, Any] = {"selected": {"lam": dict(zip(names, lams)), "mtv": mtv}}
    if cfg.get("store"):
        store = merging.write_tall_store(pre, fts, run_dir / "tall_store", lam=lams, mtv=mtv, tasks=names,
                                         overwrite=bool(cfg.overwrite), **hp)
        extra["store"] = {"path": str(store), **merging.store_report(store)}
        for i, t in enumerate(names):
            state = merging.load_task_model(store, t)
            model = pool.merged_model({k: v for k, v in state.items() if not k.startswith("decoder.heads.")})
            test[t] = ev.run(model, t, "test")
    else:
        for i, t in enumerate(names):
            test[t] = ev.run(pool.merged_model(tm.reconstruct(i)), t, "test")
    _overlap_plot(tm, run_dir, extra)
    return pool.merged_model(tm.merged), test, extra


def _overlap_plot(tm, run_dir: Path, report: dict[str, Any]) -> None:
    overlap = merging.mask_overlap(tm.masks)
    report["mask_overlap"] = {k: v for k, v in overlap.items() if isinstance(v, (int, float, list))}
    merging.plot_mask_overlap(overlap, run_dir / "mask_overlap.png")


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mtl-merge: {report['method']} {report.get('selected', '')}")
    for col in ("task", "metric", "merged", "individual", "normalized"):
        table.add_column(col)
    for t, r in report["tasks"].items():
        p = r["primary"]
        table.add_row(t, p, f"{r['merged'][p]:.4f}", f"{r['individual'][p]:.4f}", f"{r['normalized']:.3f}")
    m = report["mean"]
    fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    table.add_row("mean", "", fmt(m["merged"]), fmt(m["individual"]), f"{m['normalized']:.3f}")
    Console().print(table)
    if "store" in report:
        s = report["store"]
        Console().print(f"TALL store: {s}")


def run(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Compose the ``mtl-merge`` config in-process and run it (for notebooks, scripts and tests)."""
    from mtl.cli.common import compose_in_process

    cfg, run_dir = compose_in_process("mtl.configs.merge_app", "merge", overrides, run_dir)
    return run_merge(cfg, run_dir)
