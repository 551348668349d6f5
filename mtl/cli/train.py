"""``mtl-train``: Hydra entry point. ``mtl-train experiment=scenes_hps``; ``debug=smoke`` for seconds."""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.cli.common import finish, prepare


@hydra.main(version_base="1.3", config_path="pkg://mtl.configs", config_name="train")
def _main(cfg: DictConfig) -> None:
    from mtl.train import train

    run_dir = HydraConfig.get().runtime.output_dir
    train(cfg, run_dir)
    finish(run_dir)


def main() -> None:
    prepare()
    _main()


if __name__ == "__main__":
    main()
