"""LightningDataModule over one zoo dataset, held in memory as uint8 tensors."""
from __future__ import annotations

import os

import numpy as np
import torch

from mtl.data.memory import TensorDataModule, TensorDictDataset
from mtl.data.zoo._base import ZOO, check_size, check_zoo_seed
from mtl.data.hf import check_cache_writable
from mtl.data.zoo.cache import load_zoo_dataset, zoo_cache_path


class ZooDataModule(TensorDataModule):
    """One zoo classification dataset as batches {"image": uint8 (B,3,H,W), target_key: int64 (B,)}.

    `target_key` defaults to the dataset name, so a classification task named like the dataset reads it.
    Data are generated (or loaded from the cache) once, then served from memory.
    """

    def __init__(self, name: str, batch_size: int = 64, num_workers: int = 0, seed: int = 0, size: int = 32,
                 n_train: int | None = None, n_val: int | None = None, n_test: int | None = None,
                 cache_dir: str | os.PathLike | None = None, target_key: str | None = None,
                 pin_memory: bool = False, drop_last: bool = False):
        super().__init__(batch_size, num_workers)  # checks them, naming data.batch_size / data.num_workers
        self.spec = ZOO.get(name)  # fail fast on an unknown name, listing the valid ones
        self.name = name
        self.seed, self.size = check_zoo_seed(seed, "data.seed"), check_size(size)
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.cache_dir, self.target_key = cache_dir, target_key or name
        self.pin_memory, self.drop_last = pin_memory, drop_last

    @staticmethod
    def check_settings(name: str, seed: int = 0, size: int = 32, n_train: int | None = None, n_val: int | None = None,
                       n_test: int | None = None, cache_dir: str | os.PathLike | None = None, **_) -> None:
        """A cache that can take the generated dataset unless it is cached already (before a run folder)."""
        check_zoo_seed(seed, "data.seed")
        check_cache_writable(zoo_cache_path(name, n_train, n_val, n_test, seed=seed, size=size, cache_dir=cache_dir),
                             "zoo.json")

    def source(self) -> str:
        return f"zoo dataset {self.name!r}"

    @property
    def info(self) -> dict:
        return {"num_classes": self.spec.num_classes, "image_size": self.size}

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def _load(self) -> dict:
        return load_zoo_dataset(self.name, self.n_train, self.n_val, self.n_test, seed=self.seed,
                                size=self.size, cache_dir=self.cache_dir)

    def prepare_data(self) -> None:
        # runs on one process per node: generates and caches, so the other ranks only read
        if not self._data:
            self._load()

    def setup(self, stage: str | None = None) -> None:
        if not self._data:
            for split, (images, labels) in self._load().items():
                x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
                y = torch.from_numpy(np.array(labels, np.int64))  # a copy: Arrow hands out read-only memory
                self._data[split] = TensorDictDataset({"image": x, self.target_key: y})
        self._check_targets()  # e.g. the scenes tasks on a zoo set: named before training, not a KeyError

    def _loader_options(self, shuffle: bool) -> dict:
        # a seeded shuffle: the zoo's fine-tunes see the same batch order run after run
        return {"generator": torch.Generator().manual_seed(self.seed) if shuffle else None,
                "pin_memory": self.pin_memory, "drop_last": self.drop_last and shuffle}
