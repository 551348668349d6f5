"""Disk cache for zoo datasets: HF `datasets` folders keyed by every generation parameter."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mtl.data.hf import cache_root, check_cache_writable, load_cached, quiet_datasets
from mtl.data.zoo._base import SPLITS, ZOO, build_zoo_dataset, check_size, resolve_sizes
from mtl.io import atomic_path

FORMAT_VERSION = 1  # bump when the on-disk layout changes


def cache_key(name: str, sizes: dict[str, int], seed: int, size: int) -> str:
    spec = ZOO.get(name)
    n = "-".join(str(sizes[s]) for s in SPLITS)
    return f"{name}_s{size}_seed{seed}_n{n}_v{FORMAT_VERSION}.{spec.version}"


def _to_hf(images: np.ndarray, labels: np.ndarray, names: tuple[str, ...]):
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    n, h, w, c = images.shape
    # a fixed-length uint8 list column: compact on disk and read back zero-copy (see `_from_hf`)
    flat = pa.array(np.ascontiguousarray(images).reshape(-1), type=pa.uint8())
    col = pa.FixedSizeListArray.from_arrays(flat, h * w * c)
    features = datasets.Features({
        "image": datasets.List(datasets.Value("uint8"), length=h * w * c),
        "label": datasets.ClassLabel(names=list(names)),
    })
    table = pa.table({"image": col, "label": pa.array(labels, pa.int64())}, schema=features.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))


def _from_hf(ds, size: int) -> tuple[np.ndarray, np.ndarray]:
    # straight from Arrow: the numpy/torch formatters would go row by row and widen uint8 to int64
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    img = table.column("image").combine_chunks()
    if len(img) == 0:
        images = np.empty((0, size, size, 3), np.uint8)
    else:
        images = img.flatten().to_numpy(zero_copy_only=False).reshape(-1, size, size, 3)
    labels = table.column("label").to_numpy().astype(np.int64, copy=False)
    return np.ascontiguousarray(images), labels


def save_zoo_dataset(splits: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
                     name: str, meta: dict) -> Path:
    """Write splits as an HF DatasetDict plus ``zoo.json``; the folder appears complete or not at all."""
    import datasets

    path = Path(path)
    names = ZOO.get(name).class_names
    # datasets cannot reload an empty split it saved, so empty splits are left out
    dd = datasets.DatasetDict({s: _to_hf(*splits[s], names) for s in SPLITS if len(splits[s][1])})
    with atomic_path(path) as tmp:
        tmp.mkdir()
        with quiet_datasets():
            dd.save_to_disk(str(tmp / "data"))
        (tmp / "zoo.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return path


def load_zoo_dataset(name: str, n_train: int | None = None, n_val: int | None = None,
                     n_test: int | None = None, *, seed: int = 0, size: int = 32,
                     cache_dir: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`build_zoo_dataset`, through an on-disk cache keyed by (name, sizes, seed, size, version).

    The cache folder is `cache_dir`, else `$MTL_DATA_CACHE/zoo`, else `~/.cache/mtlkit/zoo`.
    """
    spec = ZOO.get(name)
    sizes = resolve_sizes(spec, n_train, n_val, n_test)
    size = check_size(size)
    path = zoo_cache_path(name, sizes["train"], sizes["val"], sizes["test"], seed=seed, size=size,
                          cache_dir=cache_dir)
    if not (path / "zoo.json").exists():
        check_cache_writable(path, "zoo.json")
        splits = build_zoo_dataset(name, sizes["train"], sizes["val"], sizes["test"], seed=seed, size=size)
        meta = {"name": name, "seed": int(seed), "size": size, **{f"n_{s}": sizes[s] for s in SPLITS},
                "num_classes": spec.num_classes, "class_names": list(spec.class_names),
                "source": spec.source, "version": [FORMAT_VERSION, spec.version]}
        save_zoo_dataset(splits, path, name, meta)
        return splits
    dd = load_cached(path, path / "data")
    empty = (np.empty((0, size, size, 3), np.uint8), np.empty((0,), np.int64))
    return {s: _from_hf(dd[s], size) if s in dd else empty for s in SPLITS}


def zoo_cache_path(name: str, n_train: int | None = None, n_val: int | None = None,
                   n_test: int | None = None, *, seed: int = 0, size: int = 32,
                   cache_dir: str | os.PathLike | None = None) -> Path:
    sizes = resolve_sizes(ZOO.get(name), n_train, n_val, n_test)
    root = cache_root("zoo", cache_dir)
    return root / cache_key(name, sizes, int(seed), check_size(size))
