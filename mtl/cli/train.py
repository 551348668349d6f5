"""``mtl-train``: train a multi-task (or single-task) model; a run folder with model/, metrics.json, checkpoints.

    mtl-train experiment=scenes_hps                 # the demo's multi-task model
    mtl-train task=[depth] balancer=ew              # one task
    mtl-train experiment=scenes_hps balancer=upgrad trainer.max_epochs=20
    mtl-train -m balancer=ew,pcgrad,famo            # a sweep, one run folder per job
    mtl-train debug=smoke                           # seconds
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mtl.cli.common import cli_main, run_job


@hydra.main(version_base="1.3", config_path="pkg://mtl.configs", config_name="train")
def _main(cfg: DictConfig) -> float | None:
    # the value a sweeper (hparams_search=optuna) optimises; None without optimized_metric
    return run_job(cfg, "mtl.cli.train:train_job", check="mtl.cli.train:check_inputs")  # imported inside the guarded region


def check_inputs(cfg: DictConfig) -> None:
    """``init_from``'s weights as every run would read them (digest, NaN or infinite values), before the run folder
    is accepted; a resume (``ckpt_path``) takes its weights from the checkpoint, not from ``init_from``."""
    if cfg.get("init_from") and not cfg.get("ckpt_path"):
        from mtl.io import ModelFolderError, load_state, read_checked_config

        try:
            read_checked_config(cfg.init_from)  # a missing or other folder, named for what it is
            load_state(cfg.init_from)
        except ModelFolderError as e:
            raise ModelFolderError(f"init_from: {e}") from None


def train_job(cfg: DictConfig, run_dir) -> float | None:
    from pathlib import Path

    from mtl.cli.common import _rank0
    from mtl.io import write_json
    from mtl.sweep import objective
    from mtl.train import train

    metrics = train(cfg, run_dir)
    value = objective(cfg, metrics)
    # each trial's value beside its metrics (the sweeper's summary keeps only the best); the run folder is rank 0's:
    # DDP's other ranks return a partial record (no model_stats, delta_m) that must not replace rank 0's file
    if value is not None and _rank0():
        metrics["objective"] = {"optimized_metric": str(cfg.optimized_metric), "value": value}
        write_json(Path(run_dir) / "metrics.json", metrics)
    return value


def main() -> None:
    cli_main(_main, "mtl.configs")


if __name__ == "__main__":
    main()
