"""``mtl-prune``: prune a trained multi-task model folder into a smaller one, with a report.

    mtl-prune prune=pagcp model=<folder> prune.flops_target=0.4
    mtl-prune prune=l1 model=<folder> prune.ratio=0.5 'data={batch_size: 64}'
    mtl-prune prune=taylor debug=smoke     # trains a tiny real model first, prunes it, in seconds
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mtl.cli.common import cli_main, run_job


@hydra.main(version_base="1.3", config_path="pkg://mtl.configs.prune_app", config_name="prune")
def _main(cfg: DictConfig) -> None:
    run_job(cfg, "pruning.job:run_prune")  # imported inside the guarded region


def main() -> None:
    cli_main(_main, "mtl.configs.prune_app", "mtl.configs")


if __name__ == "__main__":
    main()
