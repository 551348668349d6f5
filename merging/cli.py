"""``mtl-merge``: merge fine-tuned model folders into one model and evaluate it on every task.

    mtl-merge merge=ties pretrained=<folder> models=[<folder>,<folder>,...]
    mtl-merge merge=tall_masks store=true pool=<zoo manifest.json>
    mtl-merge debug=smoke            # builds a tiny real pool and merges it, in seconds
    mtl-merge mergekit_yaml=<config.yml> output=<folder>   # a mergekit recipe, not evaluated
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mtl.cli.common import cli_main, run_job


@hydra.main(version_base="1.3", config_path="pkg://mtl.configs.merge_app", config_name="merge")
def _main(cfg: DictConfig) -> None:
    run_job(cfg, "merging.job:run_merge")  # imported inside the guarded region


def main() -> None:
    cli_main(_main, "mtl.configs.merge_app", "mtl.configs")


if __name__ == "__main__":
    main()
