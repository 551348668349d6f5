"""Benchmark of the slimmable family (docs/models.md): quality of a short scenes training with and
without CI-KD (same steps), controllability of the width search, and CPU latency of extracted vs
sliced-at-run-time encoders.

    .venv/bin/python scripts/bench_slimmable.py --part all --out /tmp/bench_slimmable.json
    .venv/bin/python scripts/bench_slimmable.py --part speed --size 128 --batch 8
    .venv/bin/python scripts/bench_slimmable.py --part control --runs outputs/run_a outputs/run_b
    .venv/bin/python scripts/bench_slimmable.py --part compare --runs outputs/q/{none,proj}_s{0,1,2,3}

``--part control`` re-scores finished runs from their saved model folders: the width grid on the
validation and test splits, the controllability of both search methods (held out: search on
validation, scores from test) and the uniform-width test metrics. A run without ``width_table.json``
(its tables skipped) gets ``width_table.json``, ``width_table_test.json`` and ``controllability.json``
written into its folder (whole splits). Budgets, preference vectors, search method and their seed are the
run's own (``callbacks.width_table`` in its ``config.yaml``); ``--budgets``, ``--preferences``,
``--search-method`` and ``--preference-seed`` override them, and ``controllability.json`` records the
settings used and where each came from under ``settings``.

``--part compare`` pairs finished runs named ``<variant>_s<seed>`` by seed and compares every variant
with ``--baseline`` (default ``none``) at each uniform width on the test split: per-task wins and mean
differences, and Δm (`mtl.evaluation.delta_m`, primary metrics) per seed. It reads each run's
``width_table_test.json`` (its best val/loss checkpoint), or with ``--scores`` a ``--part control --out``
JSON (e.g. scored at ``--checkpoint last``).

Timings are ratios measured in one process, rounds interleaved (median of per-round ratios), so a
machine shared with other jobs slows the numerator and the denominator alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtl.models.slimmable.callback import signed
from mtl.models.slimmable.control import SEARCH_METHODS

ENCODER = {"name": "slim_resnet", "stem": 32, "channels": [32, 64, 128, 256], "out_indices": [1, 2, 3, 4]}


# --- quality -------------------------------------------------------------------------------------------
def train_once(out: Path, cikd: bool, args) -> dict:
    from bench_runs import record, reusable
    from mtl.train import run

    tasks = ",".join(args.tasks)
    overrides = [
        "experiment=scenes_slimmable", f"task=[{tasks}]", f"data.size={args.data_size}", f"data.n_train={args.n_train}",
        f"data.n_val={args.n_val}", f"data.n_test={args.n_val}", f"data.batch_size={args.batch_size}",
        f"trainer.max_epochs={args.epochs}", f"strategy.cikd={str(cikd).lower()}", "logger=none", "viz.num_samples=0",
        f"seed={args.seed}",
        *(f"callbacks.width_table.{k}={v}" for k, v in control_flags(args).items()),
    ]
    start = time.perf_counter()
    run_dir = out / ("cikd" if cikd else "no_cikd")
    if not reusable(run_dir, overrides):  # a rerun with the same --work reuses the finished runs
        run(overrides, run_dir=run_dir)
        record(run_dir, overrides)
    table = json.loads((run_dir / "width_table.json").read_text())
    control = json.loads((run_dir / "controllability.json").read_text())
    uniform = {}
    for t in table["tasks"]:
        p = table["primary"][t]
        uniform[t] = {w: table["metrics"][t][w][w][p] for w in table["encoder_flops"]}
    flops = {w: table["encoder_flops"][w] + sum(table["head_flops"][t][w][w] for t in table["tasks"])
             for w in table["encoder_flops"]}
    return {"run_dir": str(run_dir), "seconds": round(time.perf_counter() - start, 1), "primary": table["primary"],
            "higher_is_better": table["higher_is_better"], "uniform": uniform, "flops": flops,
            "controllability": control["controllability"], "adherence": control["adherence"]}


def rises(values: dict[str, float], higher: bool) -> bool:
    """Strictly better at every wider width (a flat curve does not rise)."""
    seq = [values[k] for k in sorted(values, key=float)]
    return all((b > a) if higher else (b < a) for a, b in zip(seq, seq[1:]))


def _better(a: float, b: float, higher: bool) -> bool:
    """a strictly better than b (a tie is not better)."""
    return a > b if higher else a < b


def quality(args) -> dict:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    out = Path(args.work or tempfile.mkdtemp(prefix="bench_slimmable_"))
    # the two runs are independent: side by side, each gets its own share of a busy machine
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        runs = {k: pool.submit(train_once, out, k == "cikd", args) for k in ("cikd", "no_cikd")}
        res = {k: f.result() for k, f in runs.items()}
    with_ = res["cikd"]
    smallest = min(with_["flops"], key=float)
    res["rises_with_width"] = {t: rises(with_["uniform"][t], with_["higher_is_better"][t]) for t in with_["uniform"]}
    res["smallest_width"] = {
        t: {"cikd": with_["uniform"][t][smallest], "no_cikd": res["no_cikd"]["uniform"][t][smallest],
            "cikd_better": _better(with_["uniform"][t][smallest], res["no_cikd"]["uniform"][t][smallest],
                                   with_["higher_is_better"][t])}
        for t in with_["uniform"]}
    return res


# --- control: re-score finished runs ---------------------------------------------------------------
#: callbacks.width_table setting -> the flag that overrides it
CONTROL_FLAGS = {"budgets": "--budgets", "preferences": "--preferences", "search_method": "--search-method",
                 "seed": "--preference-seed"}


def control_flags(args) -> dict:
    """The width-table settings given as flags (None: not given)."""
    return {k: v for k, v in {"budgets": args.budgets, "preferences": args.preferences,
                              "search_method": args.search_method, "seed": args.preference_seed}.items() if v is not None}


def control_settings(run_dir: Path, args) -> dict:
    """The settings the run's own WidthTableCallback had (its config.yaml), each flag given overriding its
    setting, with where each came from: a file written into the run folder must be that run's analysis."""
    import inspect

    from omegaconf import OmegaConf

    from mtl.models.slimmable.callback import WidthTableCallback

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; --part control reads the run's callbacks.width_table from it")
    stored = (OmegaConf.to_container(OmegaConf.load(path)).get("callbacks") or {}).get("width_table") or {}
    defaults = {n: p.default for n, p in inspect.signature(WidthTableCallback).parameters.items() if n in CONTROL_FLAGS}
    settings, source = {}, {}
    for key in CONTROL_FLAGS:
        settings[key], source[key] = ((stored[key], f"{path.name} callbacks.width_table.{key}") if key in stored
                                      else (defaults[key], f"default (no callbacks.width_table.{key} in {path.name})"))
    for key, value in control_flags(args).items():
        settings[key], source[key] = value, CONTROL_FLAGS[key]
    WidthTableCallback(**settings)  # the callback's own checks, naming the setting
    return {**settings, "source": source}


def rescore(run_dir: Path, args) -> dict:
    import mtl
    from mtl.data import create_datamodule
    from mtl.models.slimmable.control import score_controller
    from mtl.models.slimmable.table import build_width_table

    settings = control_settings(run_dir, args)  # before the slow part: a bad setting is refused at once
    model = mtl.load_model(run_dir / "model").eval()
    if not hasattr(model, "width_set"):
        raise ValueError(f"{run_dir / 'model'}: not a slimmable model (family {model.config.get('family')!r}); "
                         "--part control re-scores scenes_slimmable runs")
    if args.checkpoint == "last":  # the weights at the end of the budget, not the best-val/loss epoch
        import torch

        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        own = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(own)
        print(f"{run_dir.name}: last.ckpt, epoch {ckpt['epoch'] + 1}, step {ckpt['global_step']}", flush=True)
    data = dict(model.meta["data"])
    dm = create_datamodule(data.pop("name"), **data)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    val = build_width_table(model, dm.val_dataloader(), progress=False)
    test = build_width_table(model, dm.test_dataloader(), progress=False)
    report = score_controller(val, test, settings["budgets"], settings["preferences"], settings["seed"],
                              settings["search_method"])
    report["settings"] = settings
    if args.checkpoint != "last" and not (run_dir / "width_table.json").exists():
        # a run whose tables were skipped (a split limited to 0 batches): written now, from its model folder
        from mtl.io import write_json

        val.save(run_dir / "width_table.json")
        test.save(run_dir / "width_table_test.json")
        write_json(run_dir / "controllability.json", report)
        print(f"{run_dir.name}: wrote width_table.json, width_table_test.json, controllability.json", flush=True)
    return {"run_dir": str(run_dir), "settings": settings, "compare": report["compare"], "uniform_test": uniform_test(test),
            "higher_is_better": test.higher_is_better}


def uniform_test(table) -> dict[str, dict]:
    """{task: {width: primary metric of the uniform configuration at that width}} of a WidthTable."""
    return {t: {w: table.metrics[t][w][w][table.primary[t]] for w in table.encoder_flops} for t in table.tasks}


def control(args) -> dict:
    if not args.runs:
        raise ValueError("--part control needs --runs <run folder> ... (finished scenes_slimmable runs)")
    out = {}
    for run in args.runs:
        r = rescore(Path(run), args)
        out[Path(run).name] = r
        print(f"{Path(run).name}: " + ", ".join(f"{k}={v} ({r['settings']['source'][k]})" for k, v in r["settings"].items()
                                                if k != "source"), flush=True)
        cmp = ", ".join(f"{k} {signed(v['controllability'])}" for k, v in r["compare"].items())
        print(f"{Path(run).name}: {cmp}", flush=True)
        for t, vals in r["uniform_test"].items():
            print(f"    {t} (test): " + ", ".join(f"{w}: {v:.4f}" for w, v in vals.items()), flush=True)
    return out


# --- compare: paired variants across seeds ---------------------------------------------------------------
def uniform_scores(args) -> dict[str, dict]:
    """{run name: {task: {width: test primary metric}}}."""
    # a missing, broken or incomplete file (an unfinished run): one error line naming it and the key it lacks
    from mtl.io import read_json
    from mtl.models.slimmable.table import WidthTable

    if not args.scores:
        return {Path(r).name: uniform_test(WidthTable.load(Path(r) / "width_table_test.json")) for r in args.runs}
    data = read_json(args.scores)
    data = data.get("control", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ValueError(f"{args.scores}: expected a --part control --out JSON object, got {type(data).__name__}")
    names = sorted(Path(r).name for r in args.runs)
    for n in names:
        if not isinstance(data.get(n), dict) or "uniform_test" not in data[n]:
            raise ValueError(f"{args.scores}: missing key {n + ('.uniform_test' if n in data else '')!r} "
                             f"(a --part control --out JSON of the runs; it holds {sorted(data)})")
    return {n: data[n]["uniform_test"] for n in names}


def run_tasks(run: Path) -> dict:
    """{name: Task} of a finished run, rebuilt from its model folder's config (no weights read)."""
    from mtl.io import read_model_config
    from mtl.tasks.base import create_task

    return {t["name"]: create_task(**t) for t in read_model_config(run / "model")["model"]["tasks"]}


def compare(args) -> dict:
    from mtl.evaluation import delta_m

    if not args.runs:
        raise SystemExit("error: --part compare needs --runs <variant>_s<seed> run folders")
    runs = uniform_scores(args)
    by = {}
    for name, scores in runs.items():
        variant, _, seed = name.rpartition("_s")
        by.setdefault(variant, {})[seed] = scores
    if args.baseline not in by:
        raise SystemExit(f"error: --baseline {args.baseline!r}: no run named {args.baseline}_s<seed> among {sorted(runs)}")
    base = by[args.baseline]
    first = next(iter(base.values()))
    tasks = {n: t for n, t in run_tasks(Path(args.runs[0])).items() if n in first}
    sign = {n: 1 if t.directions[t.primary] else -1 for n, t in tasks.items()}
    widths = list(first[next(iter(first))])

    def at(scores: dict, w: str) -> dict:  # Δm's layout: {task: {primary metric: value}}
        return {n: {t.primary: scores[n][w]} for n, t in tasks.items()}

    out = {}
    for variant, seeds in sorted(by.items()):
        if variant == args.baseline:
            continue
        paired = sorted(set(seeds) & set(base), key=int)
        rows = {}
        for w in widths:
            gain = {t: [sign[t] * (seeds[s][t][w] - base[s][t][w]) for s in paired] for t in tasks}
            dm = [delta_m(at(seeds[s], w), at(base[s], w), tasks) for s in paired]
            sd = statistics.stdev(dm) if len(dm) > 1 else float("nan")
            rows[w] = {"seeds": paired, "delta_m": dm, "mean_delta_m": statistics.fmean(dm), "sd_delta_m": sd,
                       "se_delta_m": sd / len(dm) ** 0.5, "positive": sum(d > 0 for d in dm),
                       "tasks": {t: {"wins": sum(g > 0 for g in gain[t]), "mean_gain": statistics.fmean(gain[t]),
                                     variant: statistics.fmean(seeds[s][t][w] for s in paired),
                                     args.baseline: statistics.fmean(base[s][t][w] for s in paired)} for t in tasks}}
            print(f"{variant} vs {args.baseline}, width {w}, seeds {','.join(paired)}: Δm per seed "
                  + " ".join(f"{d:+.1f}" for d in dm) + f" (mean {rows[w]['mean_delta_m']:+.1f} %, sd {sd:.1f}, "
                  f"se {rows[w]['se_delta_m']:.1f}, {rows[w]['positive']}/{len(dm)} positive); "
                  + "; ".join(f"{t} {r[variant]:.3f} vs {r[args.baseline]:.3f}, better in {r['wins']}/{len(paired)}"
                              for t, r in rows[w]["tasks"].items()), flush=True)
        out[variant] = rows
    return out


# --- speed ---------------------------------------------------------------------------------------------
def speed(args) -> dict:
    from mtl.models import create_model

    torch.set_num_threads(args.threads)
    model = create_model(["depth"], backbone=ENCODER, decoder={"name": "slimmable", "channels": 64}, family="slimmable")
    model.eval()
    full = model.extract_subnetwork({"encoder": 1.0, "decoders": 1.0}).backbone.eval()
    half = model.extract_subnetwork({"encoder": 0.5, "decoders": 1.0}).backbone.eval()
    sliced = model.backbone
    x = torch.randn(args.batch, 3, args.size, args.size)

    def latency(net, at_half: bool) -> float:
        model.set_widths(encoder=0.5 if at_half else 1.0)
        with torch.inference_mode():
            t = time.perf_counter()
            for _ in range(args.iters):
                net(x)
            return (time.perf_counter() - t) / args.iters

    from mtl.flops import count_flops

    for net, h in ((full, False), (half, False), (sliced, True)):  # warm-up
        latency(net, h)
    rounds = []
    for r in range(args.rounds):
        t_full, t_half, t_sliced = latency(full, False), latency(half, False), latency(sliced, True)
        rounds.append({"full_s": t_full, "half_s": t_half, "sliced_half_s": t_sliced})
        print(f"speed round {r + 1}/{args.rounds}: full {t_full * 1e3:.1f} ms, extracted 0.5 {t_half * 1e3:.1f} ms, "
              f"sliced 0.5 {t_sliced * 1e3:.1f} ms", flush=True)
    half_ratio = statistics.median(r["half_s"] / r["full_s"] for r in rounds)
    sliced_ratio = statistics.median(r["sliced_half_s"] / r["half_s"] for r in rounds)
    return {"input": [args.batch, 3, args.size, args.size], "threads": args.threads, "rounds": rounds,
            "flops_ratio_half_vs_full": count_flops(half, x[:1]) / count_flops(full, x[:1]), "latency_ratio_half_vs_full": half_ratio,
            "latency_ratio_sliced_vs_extracted_half": sliced_ratio,
            "params": {"full": sum(p.numel() for p in full.parameters()), "half": sum(p.numel() for p in half.parameters())}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["quality", "speed", "control", "compare", "all"], default="all")
    ap.add_argument("--runs", nargs="+", default=[], help="control: finished scenes_slimmable run folders")
    ap.add_argument("--checkpoint", choices=["model", "last"], default="model",
                    help="control: score the run's model folder (best val/loss epoch) or checkpoints/last.ckpt "
                         "(the end of the training budget)")
    ap.add_argument("--baseline", default="none", help="compare: the variant the others are paired with")
    ap.add_argument("--scores", help="compare: a --part control --out JSON instead of each run's width_table_test.json")
    ap.add_argument("--tasks", nargs="+", default=["semseg", "depth", "normals"])
    ap.add_argument("--data-size", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=384)
    ap.add_argument("--n-val", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    # the controllability settings; not given: each run's own callbacks.width_table (quality: the experiment's)
    ap.add_argument("--preferences", type=int, help="preference vectors per budget (default: the run's own)")
    ap.add_argument("--budgets", type=int, help="FLOPs budgets (default: the run's own)")
    ap.add_argument("--search-method", choices=SEARCH_METHODS, help="the search scored on top (default: the run's own)")
    ap.add_argument("--preference-seed", type=int, help="seed of the preference vectors (default: the run's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="folder for the two training runs (default: a temporary one)")
    ap.add_argument("--size", type=int, default=128, help="speed: input resolution")
    ap.add_argument("--batch", type=int, default=8, help="speed: batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["data_size", "n_train", "n_val", "batch_size", "epochs", "size", "batch", "threads", "iters",
                            "rounds"])
    require_positive(args, ["budgets", "preferences"], least=2)  # as WidthTableCallback's checks
    require_positive(args, ["preference_seed"], least=0)
    res = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.part in ("speed", "all"):
        res["speed"] = speed(args)
        s = res["speed"]
        print(f"\nencoder {ENCODER['channels']} at {s['input']}, {args.threads} thread(s):")
        print(f"  FLOPs 0.5 / 1.0: {s['flops_ratio_half_vs_full']:.3f}")
        print(f"  parameters, extracted 0.5 / full: {s['params']['half']:,} / {s['params']['full']:,}")
        print(f"  latency extracted 0.5 / full: {s['latency_ratio_half_vs_full']:.3f} (target <= 0.45)")
        print(f"  latency sliced 0.5 / extracted 0.5: {s['latency_ratio_sliced_vs_extracted_half']:.3f} (target <= 1.3)")
    if args.part == "control":
        res["control"] = control(args)
    if args.part == "compare":
        res["compare"] = compare(args)
    if args.part in ("quality", "all"):
        res["quality"] = q = quality(args)
        print("\nuniform width -> primary metric (CI-KD run):")
        for t, vals in q["cikd"]["uniform"].items():
            print(f"  {t} ({q['cikd']['primary'][t]}): " + ", ".join(f"{w}: {v:.4f}" for w, v in vals.items())
                  + f"; rises with width: {q['rises_with_width'][t]}")
        print("smallest width, CI-KD vs none (same steps):")
        for t, v in q["smallest_width"].items():
            print(f"  {t}: {v['cikd']:.4f} vs {v['no_cikd']:.4f} (CI-KD better: {v['cikd_better']})")
        for k in ("cikd", "no_cikd"):
            print(f"{k}: controllability {signed(q[k]['controllability'])}, budget adherence {100 * q[k]['adherence']:.1f}%,"
                  f" {q[k]['seconds']} s")
    if args.out:
        from mtl.io import write_json

        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    from script_cli import run

    run(main)
