"""`mtl-merge mergekit_yaml=<config.yml>`: a mergekit recipe run as an mtl-merge job (a run folder,
metrics.json), not evaluated. The recipe (merging.mergekit_yaml) names the models and the method."""
from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

from mtl.registry import check_int

from .engine import check_headers
from .hf import parse_size
from .run_outputs import MERGEKIT_RECIPE
from .mergekit_yaml import INDEX_FIRST, check_dtypes, check_output, read_mergekit_yaml, run_plan
from .sources import check_readable

__all__ = ["mergekit_job", "check_unread_settings"]

log = logging.getLogger(__name__)

#: the mtl-merge settings a recipe run reads (`paths.*` and hydra's too); every other one must keep its default
READ_SETTINGS = ("name", "seed", "output", "overwrite", "shard_size", "mergekit_yaml", "eval.enabled")


def mergekit_job(cfg: Any, run_dir: str | os.PathLike) -> dict[str, Any]:
    """`mtl-merge mergekit_yaml=<config.yml>`: the YAML's merge, streamed into `output` (a Hugging Face
    folder), not evaluated. The YAML is the whole recipe: inputs and `merge` settings beside it are refused."""
    from mtl.cli.jobs import start_run

    from .job import clear_earlier_outputs, record_unevaluated, resolved_hparams

    start = time.perf_counter()
    check_unread_settings(cfg)
    seed = check_int("seed", cfg.get("seed"))  # before the run folder: int() would fail or truncate after it
    if cfg.get("shard_size") is not None:  # so too a size the merge would refuse
        parse_size(cfg.shard_size)
    plan = read_mergekit_yaml(cfg.mergekit_yaml)
    check_dtypes(plan)
    for path in plan.finetuned:  # one that will not open: named now, not by the merge after the run folder
        check_readable(path, index_first=INDEX_FIRST)
    check_headers(plan.pretrained, plan.finetuned, plan.kwargs(), keep_base=True, index_first=INDEX_FIRST)  # the merge's key plan, from headers
    # an output it would refuse (a user's file in it; a .safetensors file: a recipe writes a folder): after
    # start_run's own checks, before its folder
    replaceable = functools.partial(check_output, plan, overwrite=bool(cfg.overwrite), shard_size=cfg.get("shard_size"))
    run_dir, output = start_run(cfg, run_dir, inputs=[plan.pretrained, *plan.finetuned], any_weights=True,
                                replaceable=replaceable)
    output = output.resolve()
    clear_earlier_outputs(Path(run_dir), bool(cfg.overwrite), keep=output)
    (Path(run_dir) / MERGEKIT_RECIPE).write_text(plan.text)  # the recipe as run, whatever becomes of the file
    seed = seed if plan.method in ("dare_ties", "dare_linear") else None  # every mtl-merge run repeats
    written = run_plan(plan, output, overwrite=bool(cfg.overwrite), shard_size=cfg.get("shard_size"), seed=seed)
    hp = resolved_hparams(plan.method, {**plan.kwargs(), **({"seed": seed} if seed is not None else {})})
    return record_unevaluated(Path(run_dir), plan.method, plan.pretrained.resolve(),
                              [m.resolve() for m in plan.finetuned], hp, output, written, start,
                              mergekit_yaml=str(plan.source.resolve()))


def check_unread_settings(cfg: Any) -> None:
    """The recipe is the whole merge and nothing is evaluated: an mtl-merge setting it does not read
    (`store`, `eval.device`, `bn_stats.*`, ...) is refused by name unless it keeps its default, rather
    than look applied. `debug=smoke`'s own values are accepted: a recipe run takes seconds already."""
    from importlib import resources

    import yaml
    from omegaconf import OmegaConf

    given = [k for k in ("pretrained", "models", "pool") if cfg.get(k)]
    if given:
        raise ValueError(f"mergekit_yaml= names the models itself: drop {given[0]}=")
    configs = resources.files("mtl.configs")
    default_merge = yaml.safe_load((configs / "merge" / "task_arithmetic.yaml").read_text())
    if OmegaConf.to_container(cfg.merge, resolve=True) != default_merge:
        raise ValueError("mergekit_yaml= holds the merge method and its parameters: drop merge= and merge.* "
                         "(edit the YAML instead)")
    app = configs / "merge_app"
    defaults = _flat({**yaml.safe_load((app / "merge.yaml").read_text()),
                      "eval": yaml.safe_load((app / "eval" / "tasks.yaml").read_text())})
    settings = _flat(OmegaConf.to_container(cfg, resolve=False))
    smoke = _flat(yaml.safe_load((app / "debug" / "smoke.yaml").read_text()))
    if all(settings.get(k) == v for k, v in smoke.items()):
        log.info("debug=smoke with mergekit_yaml=: the recipe runs as it is (its own models; no smoke pool)")
        settings = {k: v for k, v in settings.items() if k not in smoke}
    for key, value in settings.items():
        if key in READ_SETTINGS or key.split(".")[0] in ("paths", "merge", "hydra"):
            continue
        if key not in defaults or value != defaults[key]:
            raise ValueError(f"{key}={value!r} is not read by a mergekit_yaml= run (the recipe is the whole merge, "
                             "and it is not evaluated): drop it")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for every leaf of nested mappings."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out
