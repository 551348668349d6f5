"""The embedded ``scenes`` data as a LightningDataModule: rendered once into an HF ``datasets``
folder on disk (keyed by every parameter that changes the data), then served from memory."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mtl.data.hf import (arrow_to_numpy, cache_root, check_cache_writable, corrupt_cache_entry, load_cached,
                         quiet_datasets, read_cache_json)
from mtl.data.memory import SPLITS, TensorDataModule, TensorDictDataset
from mtl.data.scenes import CLASS_NAMES, GENERATOR_VERSION, SHAPE_NAMES, render_scenes
from mtl.io import atomic_path
from mtl.registry import check_int

log = logging.getLogger(__name__)

#: scene index offsets per split: splits never overlap, and val/test stay the same when n_train changes
SPLIT_OFFSETS = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
_CHUNK = 1024  # scenes per from_dict chunk


def scenes_cache_key(size: int, n_train: int, n_val: int, n_test: int, seed: int) -> str:
    params = dict(generator="scenes", version=GENERATOR_VERSION, size=size, n_train=n_train,
                  n_val=n_val, n_test=n_test, seed=seed, offsets=SPLIT_OFFSETS)
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _scenes_features(size: int):
    from datasets import Features, List, Value

    px = size * size
    return Features({
        "index": Value("int64"),
        "image": List(Value("uint8"), length=px * 3),  # (H, W, 3) row-major
        "semseg": List(Value("uint8"), length=px),
        "instance": List(Value("uint8"), length=px),
        "edges": List(Value("uint8"), length=px),
        "depth": List(Value("float32"), length=px),
        "normals": List(Value("float32"), length=px * 3),  # (H, W, 3)
        "count": Value("int64"),
        "largest": Value("int64"),
        "pitch": Value("float32"),
        "height": Value("float32"),
    })


def _scenes_split(seed: int, offset: int, n: int, size: int):
    from datasets import Dataset, concatenate_datasets

    features = _scenes_features(size)
    parts = []
    for lo in range(0, n, _CHUNK):
        k = min(_CHUNK, n - lo)
        s = render_scenes(seed, offset + lo, k, size)
        cols: dict[str, Any] = {"index": np.arange(offset + lo, offset + lo + k, dtype=np.int64)}
        for name, arr in s.items():
            if arr.ndim > 1:  # fixed-length lists: random access is ~10x faster than Array2D
                flat = np.ascontiguousarray(arr).reshape(k, -1)
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
            else:
                cols[name] = arr
        parts.append(Dataset.from_dict(cols, features=features))
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def check_scenes_settings(size: Any = 64, n_train: Any = 2000, n_val: Any = 500, n_test: Any = 500, seed: Any = 0,
                          cache_dir: str | os.PathLike | None = None, **_: Any) -> Path:
    """The split sizes, image size and seed as ints, and a cache that can take the rendered scenes unless they
    are cached already (`ScenesDataModule.check_settings`: before a run folder). Returns the cache entry."""
    # every split is used: to fit, to pick the checkpoint, for the final metrics; Python ints for the JSON key
    n_train, n_val, n_test = (check_int(f"data.{name}", n, 1) for name, n in
                              dict(n_train=n_train, n_val=n_val, n_test=n_test).items())
    size, seed = check_int("data.size", size, 1), check_int("data.seed", seed, 0)
    entry = cache_root("scenes", cache_dir) / (f"scenes-v{GENERATOR_VERSION}-{size}px-"
                                               f"{scenes_cache_key(size, n_train, n_val, n_test, seed)}")
    check_cache_writable(entry, "dataset_dict.json")
    return entry


def materialize_scenes(size: int = 64, n_train: int = 2000, n_val: int = 500, n_test: int = 500,
                       seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Render the scenes splits once into an HF ``DatasetDict`` on disk; return its folder.

    The folder (under ``cache_dir``, default ``default_cache_dir("scenes")``) is named by a hash of
    every parameter that changes the data (including GENERATOR_VERSION), so a cached copy is reused
    only when it is exactly what was asked for. It appears complete or not at all.
    """
    final = check_scenes_settings(size, n_train, n_val, n_test, seed, cache_dir)
    size, n_train, n_val, n_test, seed = map(int, (size, n_train, n_val, n_test, seed))  # numpy's pass the check
    if (final / "dataset_dict.json").exists():
        return final

    from datasets import DatasetDict

    t0 = time.perf_counter()
    counts = dict(train=n_train, val=n_val, test=n_test)
    with atomic_path(final) as tmp:
        dd = DatasetDict({sp: _scenes_split(seed, SPLIT_OFFSETS[sp], counts[sp], size) for sp in SPLITS})
        with quiet_datasets():
            dd.save_to_disk(str(tmp))
        params = dict(size=size, seed=seed, version=GENERATOR_VERSION, offsets=SPLIT_OFFSETS, **counts)
        (tmp / "mtlkit_scenes.json").write_text(json.dumps(params, indent=1))
    log.info("rendered %d scenes (%dpx) into %s in %.1fs", sum(counts.values()), size, final,
             time.perf_counter() - t0)
    return final


def load_scenes_tensors(path: str | os.PathLike, split: str) -> dict[str, torch.Tensor]:
    """One split of a materialised scenes folder as tensors in storage layout (compact dtypes)."""
    ds = load_cached(Path(path), Path(path) / split)
    table = ds.data.table
    n = table.num_rows
    size = read_cache_json(Path(path), "mtlkit_scenes.json").get("size")
    if not isinstance(size, int):
        raise corrupt_cache_entry(Path(path), ValueError("mtlkit_scenes.json has no integer key 'size'"))

    def col(name, *shape, channels_last=False):
        a = arrow_to_numpy(table.column(name)).reshape(n, *shape)
        # one copy out of the memory-mapped arrow file, already in the batch layout
        a = np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if channels_last else np.array(a)
        return torch.from_numpy(a)

    return {
        "image": col("image", size, size, 3, channels_last=True),
        "semseg": col("semseg", size, size),
        "depth": col("depth", 1, size, size),
        "normals": col("normals", size, size, 3, channels_last=True),
        "edges": col("edges", 1, size, size),
        "classification": col("largest"),
        "regression": col("count").to(torch.float32).view(n, 1),
    }


class ScenesDataModule(TensorDataModule):
    """The embedded ``scenes`` data (see mtl/data/scenes.py), rendered once and cached on disk.

    Split i of size n holds scenes ``SPLIT_OFFSETS[split] + 0 .. n-1`` of stream ``seed``. Targets:
    semseg (5 classes), depth (ray distance), normals, edges, classification (shape of the largest
    visible object, 3 classes) and regression (number of visible objects, 1-5).
    """

    _CAST = {"semseg": torch.int64, "edges": torch.float32}

    def __init__(self, size: int = 64, n_train: int = 2000, n_val: int = 500, n_test: int = 500,
                 seed: int = 0, batch_size: int = 32, num_workers: int = 0,
                 cache_dir: str | os.PathLike | None = None, augment: bool = False):
        super().__init__(batch_size=batch_size, num_workers=num_workers, augment=augment)
        self.save_hyperparameters()
        self.size, self.seed = size, seed
        self.counts = dict(train=n_train, val=n_val, test=n_test)
        self.cache_dir = cache_dir
        self.path: Path | None = None

    check_settings = staticmethod(check_scenes_settings)

    @property
    def info(self) -> dict[str, Any]:
        return {
            "semseg_classes": len(CLASS_NAMES),
            "classification_classes": len(SHAPE_NAMES),
            "regression_dims": 1,
            "image_size": self.size,
            "semseg_names": list(CLASS_NAMES),
            "classification_names": list(SHAPE_NAMES),
        }

    def prepare_data(self) -> None:
        self.path = materialize_scenes(self.size, **{f"n_{k}": v for k, v in self.counts.items()},
                                       seed=self.seed, cache_dir=self.cache_dir)

    def _load(self) -> dict[str, TensorDictDataset]:
        if self.path is None:  # outside a Trainer nobody calls prepare_data
            self.prepare_data()
        return {sp: TensorDictDataset(load_scenes_tensors(self.path, sp), cast=self._CAST) for sp in SPLITS}
