"""The job behind ``mtl-merge``: resolve the pool, select a merged model, test it, report.

A CLI-level method is a function registered in `CLI_METHODS`:

    @CLI_METHODS.register("my_method")
    def my_method(job: MergeJob, hp: Mapping[str, Any]) -> Selection: ...

It gets the job (pool, evaluator with every task's data and the fine-tuned models' own scores, run
folder, config) and the method's hyperparameters (`merge.*` without `method`, read-only), and returns
the model to write, the hyperparameters it settled on (learned coefficients included) and, optionally,
its search grid, per-task test metrics (when those are not the written model's) and report entries.
Testing, the model folder, metrics.json, plots and the table are the job's.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import merging
from mtl.cli.jobs import job_output, start_run
from mtl.io import save_model, user_path, write_json
from mtl.models import MultiTaskModel
from mtl.registry import Registry, check_int

from .bn import check_bn, check_recompute_family
from .engine import check_headers
from .evaluation import Evaluator, ImageBatches
from .hf import parse_size
from .pool import ModelPool, check_same_pruning, check_same_start, manifest_paths, model_list, precheck_pool, resolve_device
from .report import build_report, print_table, write_report
from .run_outputs import RUN_OUTPUTS, STORE_DIR
from .sources import MergeInputError, check_distinct_inputs, check_readable
from .storage import STORE_FILE
from .streaming import output_target, resolve_output, writes_hf_folder

log = logging.getLogger(__name__)

__all__ = ["CLI_METHODS", "MergeJob", "Selection", "better", "run_merge", "run", "resolve_pool", "build_smoke_pool"]


@dataclass
class Selection:
    """What a CLI-level method settled on."""

    model: MultiTaskModel                     # written to the output folder (and tested unless `test` is given)
    hparams: dict[str, Any]                   # the chosen hyperparameters / learned coefficients
    grid: list[dict[str, Any]] | None = None  # every candidate tried: {"hparams", "val_normalized"[, "why"]}
    test: dict[str, dict[str, float]] | None = None  # per-task test metrics, when not those of `model`
    # more report entries ("mask_overlap" gets a plot; "tested", with `test`: whose metrics those are,
    # also written into the model folder's meta in place of its own scores)
    extra: dict[str, Any] = field(default_factory=dict)




def clear_earlier_outputs(run_dir: Path, overwrite: bool, keep: Path | None = None) -> None:
    """Remove an earlier run's `RUN_OUTPUTS` from the run folder `start_run` accepted (an overwrite rerun, a failed
    run's), so that it holds this run's outputs only: a TIES rerun over a TALL run kept its store and mask plot. A
    TALL store is refused unless `overwrite` (found now, not after a λ search); `keep` (this run's output) stays."""
    store, _ = resolve_output(Path(run_dir) / STORE_DIR, STORE_FILE)
    if store.exists() and not overwrite:
        raise FileExistsError(f"{store.parent} holds a TALL store of an earlier run; pass overwrite=true to replace "
                              "it, or choose another run folder")
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if keep is not None and (path.resolve() == keep.resolve() or path.resolve() in keep.resolve().parents):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# here, not in grid_job: tall_job needs it too, and job imports both at its end (an import cycle otherwise)
def better(val: float, best: float) -> bool:
    """`val` (a later candidate) beats `best`: the one rule of every λ search (grid methods and tall_masks'
    per-task λ). Strictly higher only, so among equal scores the earlier candidate in grid order stays (the
    smaller λ, the smaller edit of θ0, for the configs' ascending grids); a NaN never wins, and loses to any
    number: it would otherwise win or lose by its place in the grid."""
    return not math.isnan(val) and (math.isnan(best) or val > best)


@dataclass
class MergeJob:
    cfg: DictConfig
    pool: ModelPool
    evaluator: Evaluator
    run_dir: Path

    #: `merge.bn=recompute`: {split, batch_size, max_batches} of the images every model's shared
    #: BatchNorm statistics are re-estimated on (merging.bn); None: the statistics the merge gives
    bn_data: dict[str, Any] | None = None

    def merge(self, method: str, **hparams: Any) -> dict[str, torch.Tensor]:
        """Merged shared weights of the pool (`merging.merge` on θ0 and the fine-tuned folders)."""
        return merging.merge(method, self.pool.pretrained, self.pool.member_paths, **hparams)

    def model(self, shared: dict[str, torch.Tensor], recompute_bn: bool = True) -> MultiTaskModel:
        """A model with `shared` weights and every task's own head, on the evaluation device; under
        `merge.bn=recompute` (and unless `recompute_bn=False`) with its BN statistics re-estimated."""
        model = self.pool.merged_model(shared).to(self.evaluator.device)
        if self.bn_data is not None and recompute_bn:
            merging.recompute_bn(model, self.bn_batches(), task=self.evaluator.names[0])
        return model

    def bn_batches(self):
        """One pass over the images (never the labels) of every task's `bn_data` split, tasks pooled per batch."""
        from .bn import pooled_batches

        d = self.bn_data
        data = {t: ImageBatches(self.evaluator.datamodule(t).dataset(d["split"]), d["batch_size"], i, t)
                for i, t in enumerate(self.evaluator.names)}
        return pooled_batches(data, d.get("max_batches"))

    def val_normalized(self, model: MultiTaskModel) -> float:
        return self.val_score(model)[0]

    def val_score(self, model: MultiTaskModel) -> tuple[float, str | None]:
        """The mean normalized validation score, and why it is undefined (NaN) when it is."""
        results = self.evaluator.run_all(model, "val")
        return self.evaluator.normalized_mean(results, "val"), self.evaluator.undefined_mean(results, "val")


CliMethod = Callable[[MergeJob, Mapping[str, Any]], Selection]
CLI_METHODS: Registry[CliMethod] = Registry("mtl-merge method")


def check_pool_inputs(pool: ModelPool, hp: Mapping[str, Any], bn_data: dict[str, Any] | None,
                      base_among: bool = False) -> list[str]:
    """The pool's tensors fit together under the merge's key options (shapes, dtypes, shared keys, the
    linearised form and its expansion point) and `merge.bn=recompute` suits its family, before every
    member is evaluated: these errors otherwise surface only at the first merge. Returns the names of the
    tensors the merge combines (from the files' headers)."""
    from mtl.io import read_model_config

    from .engine import KeyOptions, open_context

    if bn_data is not None:  # run_merge judged given folders before the run folder; the smoke pool's are judged here
        check_recompute_family(read_model_config(pool.pretrained)["model"].get("family"))
    opts, _ = KeyOptions.split(dict(hp))
    opts["check_finite"] = False  # only the plan (headers) and the expansion points are read here
    ctx = open_context(pool.pretrained, pool.member_paths, opts, min_models=1, what="a merge", base_among=base_among)
    ctx.close()
    return list(ctx.plan.merge)


def build_smoke_pool(root: str | os.PathLike) -> ModelPool:
    """A seconds-long real pool: a tiny base trained on scenes classification, fine-tuned on 2 tasks."""
    from mtl.cli.jobs import smoke_training
    from mtl.progress_log import emit

    root = Path(root)
    common = ["experiment=scenes_hps", "debug=smoke", "viz.num_samples=0", "logger=none"]
    emit("[smoke pool] training 1/3: the pretrained base (classification)")
    # a retry reuses its first attempt's finished runs of the same configs; fine-tunes of a base trained again are not
    pre, reused = smoke_training(common + ["task=[classification]"], root / "pretrained")
    fts = []
    for i, t in enumerate(("regression", "semseg"), start=2):
        emit(f"[smoke pool] training {i}/3: fine-tune on {t}")
        fts.append(smoke_training(common + [f"task=[{t}]", f"init_from={pre}"], root / t, reuse=reused)[0])
    return ModelPool.from_folders(pre, fts)


def resolve_pool(cfg: DictConfig, run_dir: Path, manifest: tuple[Path, list[Path]] | None = None,
                 base_among: bool = False) -> ModelPool:
    """The pool the job merges, from the inputs `_input_paths` names (the one place that reads them)."""
    return ModelPool.from_folders(*_input_paths(cfg, run_dir, manifest), base_among=base_among)


def _base_grid(base: Any) -> list[float] | None:
    """The λ grid of a base method's own config (``configs/merge/<base>.yaml``): each grid in one place."""
    from importlib.resources import files

    f = files("mtl.configs") / "merge" / f"{base}.yaml"
    if not isinstance(base, str) or not f.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.create(f.read_text())).get("lam_grid")


#: `run`'s `merge=` choice (the CLI's is Hydra's runtime choice): which config file's own grid a given one is compared with
_MERGE_CHOICE: ContextVar[str | None] = ContextVar("merge_choice", default=None)


def _own_grid(method: Any) -> list[float] | None:
    """The λ grid of the chosen ``merge=`` config file (mergekit_ties.yaml's, not ties.yaml's: both are method ties),
    the method's own config's where the choice is unknown."""
    from hydra.core.hydra_config import HydraConfig

    choice = _MERGE_CHOICE.get()
    if choice is None and HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("merge")
    return _base_grid(choice or method)


def _method(cfg: DictConfig) -> tuple[str, CliMethod, dict[str, Any]]:
    hp = OmegaConf.to_container(cfg.merge, resolve=True)
    _warn_unsearched_grid(hp)
    if "base" in hp and hp.get("lam_grid") is None:  # dare, consensus: the base method's own grid
        base = hp.get("base") or ("ties" if hp.get("convention") == "mergekit" else "task_arithmetic")  # its default
        hp["lam_grid"] = _base_grid(base)  # an unknown base: no grid here; the method names it
    name = hp.pop("method")
    if name not in CLI_METHODS:
        raise ValueError(f"unknown merge method {name!r}; valid: {', '.join(CLI_METHODS.names())}")
    if name in grid_job.GRID_METHODS:  # a null hyperparameter (a convention's key left unset) takes the method's default
        hp = {k: v for k, v in hp.items() if v is not None or k == "lam"}
    if name == "dare" and hp.get("base", "task_arithmetic") == "task_arithmetic" and hp.get("convention") != "mergekit":
        hp = _without_ties_keys(hp)
    if hp.get("convention") == "mergekit":  # the configs carry the papers' k, merge_func, p, seed
        from .mergekit import from_paper_hparams

        hp = from_paper_hparams(name, hp)
    return name, CLI_METHODS.get(name), hp


def _warn_unsearched_grid(hp: dict[str, Any]) -> None:
    """`merge.lam` takes precedence over `merge.lam_grid` (documented): a grid the user gave (not the method
    config's own) is then never searched, which is said once rather than dropped in silence."""
    grid, lam = hp.get("lam_grid"), hp.get("lam")
    if lam is not None and grid is not None and grid != _own_grid(hp.get("method")):
        log.warning("merge.lam_grid=%s is not searched: merge.lam=%s is set and takes precedence (drop merge.lam, "
                    "i.e. merge.lam=null, to search the grid)", grid, lam)


def _without_ties_keys(hp: dict[str, Any]) -> dict[str, Any]:
    """`merge=dare` with `base=task_arithmetic`: dare.yaml carries TIES's `k` and `merge_func` (its default
    base is TIES); at their defaults they are dropped, and one the user changed is an error naming it."""
    ties, ta = merging.METHODS.get("ties").defaults, merging.METHODS.get("task_arithmetic").defaults
    out = {}
    for k, v in hp.items():
        if k in ties and k not in ta:
            if v != ties[k]:
                raise ValueError(f"merge=dare: merge.{k}={v!r} is a TIES hyperparameter, unused with "
                                 "merge.base=task_arithmetic; remove it or set merge.base=ties")
            continue
        out[k] = v
    return out


def run_merge(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    if cfg.get("mergekit_yaml"):  # a mergekit recipe: its own inputs and method, never evaluated
        from .mergekit_job import mergekit_job

        return mergekit_job(cfg, run_dir)
    name, select, hp = _method(cfg)  # the method's keys and values from the config alone: refused before any folder
    grid_job.precheck(name, hp)
    if cfg.get("shard_size") is not None and cfg.eval.get("enabled", True):  # said, not silently ignored
        raise ValueError("shard_size shards the output of an eval=none merge (Hugging Face folders); an evaluated "
                         "merge writes a model folder with one model.safetensors: drop shard_size or add eval=none")
    if cfg.get("shard_size") is not None:  # a size merge_to_file would refuse: now, not after the run folder
        parse_size(cfg.shard_size)
    filters = [k for k in ("include", "exclude") if hp.get(k) is not None]
    if filters and cfg.eval.get("enabled", True):  # found now, not after the pool's evaluation
        raise ValueError(f"merge.{filters[0]}: a key filter leaves keys out of the merged weights, and an evaluated "
                         "merge builds a whole model from them; filter with eval=none (a state-dict merge) or in "
                         "Python (merging.merge, then merging.compose takes left-out keys from each task's model)")
    if cfg.get("store") and name != "tall_masks":
        raise ValueError(f"store=true writes a TALL-mask store (merge=tall_masks); merge={name} has none to write")
    if cfg.eval.get("max_batches") is not None:  # 0 once wrote NaN scores everywhere
        check_int("eval.max_batches", cfg.eval.max_batches, low=1, note=" or null (every batch)")
    if cfg.get("learn_max_steps") is not None:  # -1 was passed on as merge.steps=-1 and refused under that name
        check_int("learn_max_steps", cfg.learn_max_steps, low=0, note=" or null (no cap)")
        if name not in merging.LEARNED_METHODS and not _smoke_value(cfg, "learn_max_steps"):
            raise ValueError(f"learn_max_steps caps the learned merges ({', '.join(merging.LEARNED_METHODS)}); "
                             f"merge={name} does not read it")
    evaluated = bool(cfg.eval.get("enabled", True))  # eval=none merges any weights (Hugging Face folders, files)
    if evaluated:  # a misspelt or absent device: said before the run folder, not when the Evaluator is built
        resolve_device(cfg.eval.get("device") or "cpu")
    if not evaluated:
        check_state_dict_method(name)
    bn_data = _bn_data(cfg, hp, name) if evaluated else None  # eval=none: merge_to_file refuses bn=recompute
    if bn_data is not None and name == "tall_masks":
        raise ValueError("merge=tall_masks with +merge.bn=recompute: the TALL store keeps θ0's BatchNorm statistics, so "
                         "the task models it rebuilds would not be the ones scored; use merge.bn=pretrained (default) "
                         "or average for TALL")
    check_inputs_given(cfg)  # the settings above and the inputs here: before the run folder
    manifest = manifest_paths(cfg.pool) if cfg.get("pool") else None  # read once: checked, then merged
    base_among = _merges_models(name)  # average: θ0 may be a model (a soup with the base), evaluated or not
    if manifest or cfg.get("pretrained"):  # a folder twice, or θ0 among the models: before the run folder
        pre, models = _given_paths(cfg, Path(run_dir), manifest)
        try:
            check_distinct_inputs(pre, models, ("pretrained", "models"), base_among=base_among)
        except MergeInputError as e:
            raise MergeInputError(f"{cfg.pool}: {e}" if manifest else str(e)) from None
        kinds = None
        if evaluated:  # a pool the model pool would refuse (family, θ0, architecture, task names): config.json alone
            pre_cfg, kinds = precheck_pool(pre, models)
            if bn_data is not None:
                check_recompute_family(pre_cfg.get("family"))
        # a per-model list (lam, weight, density) by its length; a learned merge's entropy objective by the task kinds
        grid_job.precheck(name, hp, num_models=len(models), task_kinds=kinds)
        if not evaluated:  # any weights: a file that will not open, or a folder without them (start_run names a missing one)
            for key, path in [("pretrained", pre), *(("models", m) for m in models)]:
                try:
                    if user_path(path).exists():
                        check_readable(path)
                except MergeInputError as e:
                    raise MergeInputError(f"{cfg.pool if manifest else key}: {e}") from None
            check_same_pruning(pre, models)
            check_same_start(pre, models)
            if all(user_path(p).exists() for p in (pre, *models)):  # keys and shapes: merge_to_file found them later
                hf = writes_hf_folder(pre, job_output(cfg, run_dir), shard_size=cfg.get("shard_size"))
                check_headers(pre, models, hp, keep_base=hf)  # a Hugging Face output keeps every θ0 tensor
    replaceable = None  # eval=none: an output merge_to_file would refuse (a user's file in it, a file for a folder)
    if not evaluated and (manifest or cfg.get("pretrained")):
        replaceable = functools.partial(output_target, pre, models, overwrite=bool(cfg.get("overwrite")),
                                        shard_size=cfg.get("shard_size"))
    run_dir, output = start_run(cfg, run_dir, inputs=[manifest[0], *manifest[1]] if manifest else [],
                                model_output=evaluated, any_weights=not evaluated, replaceable=replaceable)
    output = output.resolve()  # a relative output= is the cwd's, not the run folder's: record where it is
    clear_earlier_outputs(run_dir, bool(cfg.get("overwrite")), keep=output)
    start = time.perf_counter()
    if not evaluated:
        return merge_only(cfg, run_dir, name, hp, output, start, manifest)
    pool = resolve_pool(cfg, run_dir, manifest, base_among)
    merged_keys = check_pool_inputs(pool, hp, bn_data, base_among)
    grid_job.precheck(name, hp, num_models=len(pool.members), tasks=[t for m in pool.members for t in m.tasks],
                      merged_keys=merged_keys)
    ev = Evaluator(pool, cfg.eval.get("max_batches"), _plain(cfg.eval.get("data")), cfg.eval.get("device") or "cpu")
    sel = select(MergeJob(cfg, pool, ev, run_dir, bn_data), MappingProxyType(hp))
    if len(sel.grid or ()) > 1:  # a search ranked its candidates on val
        ev.warn_selection_on_test()
    if bn_data is not None:
        sel.hparams.setdefault("bn", "recompute")
    test = sel.test if sel.test is not None else ev.run_all(sel.model, "test")
    report = build_report(name, ev, sel, test)
    report["seconds"] = round(time.perf_counter() - start, 2)
    meta: dict[str, Any] = {"merge": {"method": name, **report["selected"]}, "run_dir": str(Path(run_dir).resolve()),
                            "merged_from": {"pretrained": str(Path(pool.pretrained).resolve()),
                                            "models": [str(Path(m.path).resolve()) for m in pool.members]}}
    if sel.test is None:  # the scores of this very folder
        meta["test"] = test
    elif "tested" in sel.extra:  # the run's scores are other models' (TALL's task models): say whose
        meta["tested"] = sel.extra["tested"]
    if "test" in meta or "tested" in meta:  # how they were measured: a capped split says so
        meta["eval"] = report["eval"]
    datas = [m.data for m in pool.members]
    if datas[0] and all(d == datas[0] for d in datas):  # one data config for all inputs holds for the merge
        meta["data"] = datas[0]
    else:  # members of other datasets (a zoo): their common image size still says what input the model takes
        sizes = [(d or {}).get("size") for d in datas]
        if sizes[0] is not None and all(sz == sizes[0] for sz in sizes):
            meta["image_size"] = sizes[0]
    save_model(sel.model, output, overwrite=bool(cfg.overwrite), meta=meta)
    report["output"] = str(output)
    write_report(report, run_dir)
    print_table(report)
    return report


def _input_paths(cfg: DictConfig, run_dir: Path, manifest: tuple[Path, list[Path]] | None = None
                 ) -> tuple[Path, list[Path]]:
    """(pretrained, models), absolute (metrics.json records them: they must read from any folder);
    `manifest`: `pool=`'s folders when the caller has read them already."""
    pre, models = _given_paths(cfg, run_dir, manifest)
    return Path(pre).resolve(), [Path(m).resolve() for m in models]


def check_inputs_given(cfg: DictConfig) -> None:
    """One source of inputs is given (``pool=``, ``pretrained=`` with ``models=``, or debug=smoke's pool when neither
    is given), before the run folder is made: the smoke pool is built only after it (`_given_paths`)."""
    if cfg.get("pool"):
        given = [k for k in ("pretrained", "models") if cfg.get(k)]
        if given:  # one source of inputs: pool= would otherwise win silently
            raise ValueError(f"pass pool= or pretrained=/models=, not both (got pool= and {'/'.join(f'{k}=' for k in given)})")
    elif cfg.get("pretrained") and cfg.get("models"):  # used as given, debug=smoke or not (smoke: a shorter evaluation)
        model_list(cfg.models, "models")  # models=a is one path, not its characters
    elif cfg.get("pretrained") or cfg.get("models"):  # half a pool: never completed by the smoke pool, nor ignored
        given, missing = ("pretrained", "models") if cfg.get("pretrained") else ("models", "pretrained")
        other = "neither, to merge debug=smoke's pool" if cfg.get("smoke_pool") else "pool=<manifest.json>"
        raise ValueError(f"{given}= needs {missing}=: pass pretrained=<folder> models=[<folder>,...], or {other}")
    elif not cfg.get("smoke_pool"):
        raise ValueError("nothing to merge: pass pretrained=<folder> models=[<folder>,...] or pool=<manifest.json>")


def _merges_models(name: str) -> bool:
    """A merge method that merges the models themselves, not their task vectors (θ0 may be one of them)."""
    from .methods import METHODS

    return name in METHODS and not METHODS.get(name).uses_task_vectors


def _given_paths(cfg: DictConfig, run_dir: Path, manifest: tuple[Path, list[Path]] | None) -> tuple[Path, list[Path]]:
    check_inputs_given(cfg)
    if cfg.get("pool"):
        return manifest or manifest_paths(cfg.pool)
    if cfg.get("pretrained") and cfg.get("models"):
        return user_path(str(cfg.pretrained)), [user_path(str(m)) for m in model_list(cfg.models, "models")]
    pool = build_smoke_pool(run_dir / "smoke_pool")
    return pool.pretrained, pool.member_paths


def merge_only(cfg: DictConfig, run_dir: Path, name: str, hp: dict[str, Any], output: Path, start: float,
               manifest: tuple[Path, list[Path]] | None = None) -> dict[str, Any]:
    """``eval=none``: a streaming state-dict merge of any model folders (Hugging Face ones included),
    with the hyperparameters as given (`run_merge` has checked `name` with `check_state_dict_method`): nothing is
    evaluated, so no grid is searched."""
    method, hp = ("task_arithmetic", grid_job.pretrained_hparams(hp)) if name == "pretrained" else (name, dict(hp))
    grid = hp.pop("lam_grid", None)
    if grid and hp.get("lam") is None:
        # a grid the user gave (not a method config's own) is worth a console line: its λ values are not used
        given = grid not in (_own_grid(name), _base_grid(hp.get("base")))
        (log.warning if given else log.info)(
            "eval=none: no λ search without evaluation%s; %s uses its default λ (set merge.lam to choose)",
            f" (merge.lam_grid={grid} is not searched)" if given else "", name)
    hp = {k: v for k, v in hp.items() if not (k == "lam" and v is None)}
    pre, models = _input_paths(cfg, run_dir, manifest)  # given ones were checked before the run folder (run_merge)
    path = merging.merge_to_file(method, pre, models, output, overwrite=bool(cfg.overwrite),
                                 shard_size=cfg.get("shard_size"), **hp)
    return record_unevaluated(run_dir, name, pre, models, resolved_hparams(method, hp), output, path, start)


def check_state_dict_method(name: str) -> None:
    """``eval=none`` runs state-dict methods only: one that chooses its hyperparameters on task data (TALL masks, the
    learned merges) is refused, before the run folder is made."""
    if name not in merging.METHODS and name != "pretrained":
        raise ValueError(f"merge={name} chooses its hyperparameters on task data and cannot run with eval=none; "
                         f"state-dict methods: {', '.join(merging.method_names())}")


def record_unevaluated(run_dir: Path, name: str, pre: Path, models: list[Path], hp: dict[str, Any], output: Path,
                       written: Path, start: float, **extra: Any) -> dict[str, Any]:
    """metrics.json, the log line and the console line of a merge that was not evaluated (``eval=none``,
    ``mergekit_yaml=``); `extra` (e.g. the recipe's path) goes into the report after ``evaluated``."""
    report = {"method": name, "evaluated": False, **extra, "pretrained": str(pre), "models": [str(m) for m in models],
              "selected": hp, "output": str(output),
              "files": sorted(p.name for p in output.iterdir()) if output.is_dir() else [Path(written).name],
              "seconds": round(time.perf_counter() - start, 2)}
    write_json(Path(run_dir) / "metrics.json", report)
    source = f" from {Path(extra['mergekit_yaml']).name}" if "mergekit_yaml" in extra else ""
    log.info("merged %d models with %s%s %s into %s in %.1f s (not evaluated)", len(models), name, source, hp, output,
             report["seconds"])
    print(f"mtl-merge: {name}{source} {hp} -> {output} ({report['seconds']} s, not evaluated)")
    return report


def resolved_hparams(method: str, hp: Mapping[str, Any]) -> dict[str, Any]:
    """`hp` as the merge used it: the convention and every hyperparameter of the method, defaults
    included (the method's own `hp`), and the key options that were given."""
    from .engine import KeyOptions

    opts = {k: v for k, v in hp.items() if k in KeyOptions.DEFAULTS}
    _, method_hp = KeyOptions.split(dict(hp))
    m = merging.create_method(method, **method_hp)
    used = m.used_hparams() if hasattr(m, "used_hparams") else m.hp  # e.g. consensus: λ resolved, no idle keys
    base = {k: v for k, v in method_hp.items() if k in used or k == "convention"}
    return {"convention": "paper", **base, **used, **opts}


BN_STATS = {"split": "test", "batch_size": 16, "max_batches": None}


def _bn_data(cfg: DictConfig, hp: dict[str, Any], method: str) -> dict[str, Any] | None:
    """`merge.bn=recompute` is the job's (it has the data): taken out of the merge's options, with `bn_stats.*`.
    A learned merge re-estimates on the images it learned on: its `bn_stats.split` / `batch_size` are unread."""
    if check_bn(hp.get("bn", "pretrained")) != "recompute":
        return None
    del hp["bn"]
    d = {**BN_STATS, **_plain(cfg.get("bn_stats"))}
    unknown = sorted(set(d) - set(BN_STATS))
    if unknown:
        raise ValueError(f"bn_stats: unknown key(s) {unknown}; valid: split, batch_size, max_batches")
    if d["split"] not in ("val", "test"):
        raise ValueError(f"bn_stats.split must be 'val' or 'test' (its images, never its labels), got {d['split']!r}")
    check_int("bn_stats.batch_size", d["batch_size"], low=2)
    if d["max_batches"] is not None:
        check_int("bn_stats.max_batches", d["max_batches"], low=1, note=" or null (the whole split)")
    unread = [k for k in ("split", "batch_size") if d[k] != BN_STATS[k]] if method in merging.LEARNED_METHODS else []
    if unread:
        raise ValueError(f"merge={method}: bn_stats.{unread[0]}={d[unread[0]]!r} is not read: a learned merge "
                         "re-estimates its BN statistics on the images it learned on (merge.split, merge.batch_size "
                         "per task per pass); remove it")
    return d


def _smoke_value(cfg: DictConfig, key: str) -> bool:
    """`key` holds debug=smoke's own value, which it sets for every method (learn_max_steps: 3), not the user's."""
    from importlib import resources

    import yaml

    smoke = yaml.safe_load((resources.files("mtl.configs") / "merge_app" / "debug" / "smoke.yaml").read_text())
    return bool(cfg.get("smoke_pool")) and cfg.get(key) == smoke.get(key)


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node else {}


def run(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``mtl-merge`` in this process (notebooks, scripts, tests): ``overrides`` as on the command line (a list
    of strings; one job), with the CLI's checks and failure marking (``FAILED``).
    ``run_dir``: the folder the run writes its files to (default: a new ``$MTL_OUTPUT_DIR/<name>/runs/<time>``,
    ``outputs/`` without the variable, as the CLI's; a ``hydra.run.dir=`` override names it too).
    Returns the run's report (as in its ``metrics.json``, with ``output``: the result's path) plus ``run_dir``
    (absolute)."""
    from mtl.cli.choices import app_config
    from mtl.cli.in_process import report_in_process

    given = [str(o).split("=", 1)[1] for o in (overrides if isinstance(overrides, (list, tuple)) else [])
             if str(o).split("=", 1)[0] == "merge"]
    token = _MERGE_CHOICE.set(given[-1] if given else app_config("mtl.configs.merge_app")[1].get("merge"))
    try:
        return report_in_process(run_merge, ("mtl.configs.merge_app", "mtl.configs"), "merge", overrides, run_dir)
    finally:
        _MERGE_CHOICE.reset(token)


from . import tall_job as _tall_job  # noqa: E402,F401  (registers tall_masks)
from . import grid_job  # noqa: E402  (registers average, task_arithmetic, ties, dare, consensus, pretrained)
from .learned import cli as _learned_cli  # noqa: E402,F401  (registers adamerging, atlas, concrete_ta, concrete_adamerging)
