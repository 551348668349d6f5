"""Data modules: the embedded ``scenes`` data and local HF-format datasets, served as torch tensors.

``create_datamodule("scenes", size=32, n_train=256)`` builds a registered LightningDataModule; see
mtl/data/memory.py for the batch layout shared by all of them. One module per job: memory.py (serving
tensors), hf.py (cache location, Arrow helpers), scenes_module.py, hf_local.py, zoo/, benchmarks.py
(NYUv2, Cityscapes) and nyu_mat.py (the NYUv2 labelled .mat).
"""
from __future__ import annotations

from typing import Any

from lightning import LightningDataModule

from mtl.data.benchmarks import CityscapesDataModule, NYUv2DataModule
from mtl.data.hf import default_cache_dir
from mtl.data.hf_local import HFImageDataModule
from mtl.data.memory import TensorDataModule, TensorDictDataset, collate_batch
from mtl.data.scenes import CLASS_NAMES, SHAPE_NAMES, render_scenes
from mtl.data.scenes_module import ScenesDataModule, materialize_scenes
from mtl.registry import Registry, check_kwargs

DATAMODULES: "Registry[type[LightningDataModule]]" = Registry("dataset")
DATAMODULES.register("scenes")(ScenesDataModule)
DATAMODULES.register("hf_local")(HFImageDataModule)
DATAMODULES.register("nyuv2")(NYUv2DataModule)
DATAMODULES.register("cityscapes")(CityscapesDataModule)


@DATAMODULES.register("zoo")
def _zoo_datamodule(dataset: str, **kwargs: Any) -> LightningDataModule:
    """One of the merging zoo's classification datasets (``data=zoo data.dataset=mnist``)."""
    from mtl.data.zoo import ZooDataModule

    check_kwargs(ZooDataModule, kwargs, "data", given=("name",))
    return ZooDataModule(dataset, **kwargs)


def _check_zoo(dataset: str, **kwargs: Any) -> None:
    # check_datamodule sees this wrapper, whose **kwargs hide ZooDataModule's keys and types: judge them here
    from mtl.data.zoo import ZooDataModule

    check_kwargs(ZooDataModule, kwargs, "data", given=("name",))
    ZooDataModule.check_loader_settings(**kwargs)
    ZooDataModule.check_settings(dataset, **kwargs)


_zoo_datamodule.check_settings = _check_zoo  # type: ignore[attr-defined]  (read by check_datamodule)


def check_datamodule(name: str, **kwargs: Any) -> type[LightningDataModule]:
    """The data module class ``name`` names, its settings checked (unknown ones with a did-you-mean, scalar types,
    then what the class's optional ``check_settings(**kwargs)`` judges cheaply: a ``data.root`` that does not
    exist) without building it: a job names a bad ``data.<key>`` before its run folder exists."""
    cls = DATAMODULES.get(name)
    check_kwargs(cls, kwargs, "data")
    for check in (getattr(cls, "check_loader_settings", None), getattr(cls, "check_settings", None)):
        if check is not None:
            check(**kwargs)
    return cls


def create_datamodule(name: str, **kwargs: Any) -> LightningDataModule:
    """Build a data module from its registry name; unknown names raise an error listing valid ones."""
    return check_datamodule(name, **kwargs)(**kwargs)


__all__ = [
    "DATAMODULES", "check_datamodule", "create_datamodule", "ScenesDataModule", "HFImageDataModule", "NYUv2DataModule",
    "CityscapesDataModule", "TensorDataModule",
    "TensorDictDataset", "collate_batch", "default_cache_dir", "materialize_scenes", "render_scenes",
    "CLASS_NAMES", "SHAPE_NAMES",
]
