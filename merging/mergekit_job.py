"""`mtl-merge mergekit_yaml=<config.yml>`: a mergekit recipe run as an mtl-merge job (a run folder,
metrics.json), not evaluated. The recipe (merging.mergekit_yaml) names the models and the method."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .mergekit_yaml import check_dtypes, read_mergekit_yaml, run_plan

__all__ = ["mergekit_job"]


def mergekit_job(cfg: Any, run_dir: str | os.PathLike) -> dict[str, Any]:
    """`mtl-merge mergekit_yaml=<config.yml>`: the YAML's merge, streamed into `output` (a Hugging Face
    folder), not evaluated. The YAML is the whole recipe: inputs and `merge` settings beside it are refused."""
    from importlib import resources

    import yaml
    from omegaconf import OmegaConf

    from mtl.cli.jobs import start_run

    from .job import record_unevaluated, resolved_hparams

    start = time.perf_counter()
    given = [k for k in ("pretrained", "models", "pool") if cfg.get(k)]
    if given:
        raise ValueError(f"mergekit_yaml= names the models itself: drop {given[0]}=")
    default = yaml.safe_load((resources.files("mtl.configs") / "merge" / "task_arithmetic.yaml").read_text())
    if OmegaConf.to_container(cfg.merge, resolve=True) != default:
        raise ValueError("mergekit_yaml= holds the merge method and its parameters: drop merge= and merge.* "
                         "(edit the YAML instead)")
    plan = read_mergekit_yaml(cfg.mergekit_yaml)
    check_dtypes(plan)
    run_dir, output = start_run(cfg, run_dir, inputs=[plan.pretrained, *plan.finetuned])
    output = output.resolve()
    (Path(run_dir) / "mergekit_config.yml").write_text(plan.text)  # the recipe as run, whatever becomes of the file
    seed = int(cfg.seed) if plan.method in ("dare_ties", "dare_linear") else None  # every mtl-merge run repeats
    written = run_plan(plan, output, overwrite=bool(cfg.overwrite), shard_size=cfg.get("shard_size"), seed=seed)
    hp = resolved_hparams(plan.method, {**plan.kwargs(), **({"seed": seed} if seed is not None else {})})
    return record_unevaluated(Path(run_dir), plan.method, plan.pretrained.resolve(),
                              [m.resolve() for m in plan.finetuned], hp, output, written, start,
                              mergekit_yaml=str(plan.source.resolve()))
