"""``mtl-train``: Hydra entry point. ``mtl-train experiment=scenes_hps``; ``debug=smoke`` for seconds."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mtl.cli.common import cli_main, run_job


@hydra.main(version_base="1.3", config_path="pkg://mtl.configs", config_name="train")
def _main(cfg: DictConfig) -> None:
    from mtl.train import train

    run_job(cfg, train)


def main() -> None:
    cli_main(_main, "mtl.configs")


if __name__ == "__main__":
    main()
