"""``mtl-merge``: merge fine-tuned model folders into one model and evaluate it on every task.

    mtl-merge merge=ties pretrained=<folder> models=[<folder>,<folder>,...]
    mtl-merge merge=tall_masks store=true pool=<zoo manifest.json>
    mtl-merge debug=smoke            # builds a tiny real pool and merges it, in seconds
"""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.cli.common import finish, prepare


@hydra.main(version_base="1.3", config_path="pkg://mtl.configs.merge_app", config_name="merge")
def _main(cfg: DictConfig) -> None:
    from merging.job import run_merge

    run_dir = HydraConfig.get().runtime.output_dir
    run_merge(cfg, run_dir)
    finish(run_dir)


def main() -> None:
    prepare()
    _main()


if __name__ == "__main__":
    main()
