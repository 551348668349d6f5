"""``mtl-export``: export a model folder as ONNX, timm backbone weights or a model-card folder.

    mtl-export model=<folder> format=onnx [tasks=[depth]]
    mtl-export model=<folder> format=timm
    mtl-export model=<folder> format=folder output=<dir>
    mtl-export debug=smoke format=onnx     # trains a tiny real model first, in seconds
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mtl.cli.common import cli_main, run_job


@hydra.main(version_base="1.3", config_path="pkg://mtl.configs.export_app", config_name="export")
def _main(cfg: DictConfig) -> None:
    run_job(cfg, "mtl.exporters.job:run_export")  # imported inside the guarded region


def main() -> None:
    cli_main(_main, "mtl.configs.export_app", "mtl.configs")


if __name__ == "__main__":
    main()
