"""Zoo dataset specs, the `ZOO` registry and the in-memory builder."""
from __future__ import annotations

import dataclasses
import importlib
import zlib
from typing import Callable

import numpy as np

from mtl.registry import Registry, check_seed

SPLITS = ("train", "val", "test")
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}

#: one split: images uint8 (N, S, S, 3), labels int64 (N,), sources int64 (N, k)
Split = tuple[np.ndarray, np.ndarray, np.ndarray]
BuildFn = Callable[[dict[str, int], int, int], dict[str, Split]]


@dataclasses.dataclass(frozen=True)
class ZooSpec:
    name: str
    class_names: tuple[str, ...]
    build: BuildFn  # (sizes {split: n}, seed, size) -> {split: (images, labels, sources)}
    defaults: tuple[int, int, int]  # n_train, n_val, n_test
    source: str  # one line for docs and error messages
    max_total: int | None = None  # real data without augmentation cannot exceed its source
    requires: tuple[str, ...] = ()  # optional modules (the `zoo` extra) the builder imports
    version: int = 1  # bump when the generator's output changes (part of the cache key)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


ZOO: "Registry[ZooSpec]" = Registry("zoo dataset")


def register(spec: ZooSpec) -> ZooSpec:
    return ZOO.register(spec.name)(spec)


def require(module: str, dataset: str, pip_name: str | None = None):
    """Import an optional dependency of a zoo dataset or explain how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"zoo dataset {dataset!r} needs the optional package {pip_name or module!r}; install the "
            f"zoo extra with: pip install -e \".[zoo]\"  (or: pip install mtlkit[zoo])"
        ) from e


def rng_for(seed: int, name: str, stream: str | int) -> np.random.Generator:
    """Independent stream per (seed, dataset, split): resizing one split never changes another."""
    if isinstance(stream, str):
        stream = _SPLIT_IDS.get(stream) or zlib.crc32(stream.encode())
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(stream)])


def balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of indices whose every prefix is (nearly) class-balanced."""
    key = np.empty(len(labels), np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        ranks = rng.permutation(len(idx))
        key[idx] = (ranks + rng.random(len(idx))) / len(idx)
    return np.argsort(key, kind="stable")


def no_sources(n: int) -> np.ndarray:
    return np.zeros((n, 0), np.int64)


def resolve_sizes(spec: ZooSpec, n_train: int | None, n_val: int | None, n_test: int | None) -> dict[str, int]:
    sizes = {}
    for split, n, d in zip(SPLITS, (n_train, n_val, n_test), spec.defaults):
        n = d if n is None else n
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"zoo dataset {spec.name!r}: n_{split} must be an int >= 0, got {n!r}")
        sizes[split] = int(n)
    if spec.max_total is not None and sum(sizes.values()) > spec.max_total:
        raise ValueError(
            f"zoo dataset {spec.name!r} has {spec.max_total} source images ({spec.source}); "
            f"n_train + n_val + n_test = {sum(sizes.values())} ({sizes}) exceeds it"
        )
    return sizes


def check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= 512:
        raise ValueError(f"zoo image size must be an int in [8, 512], got {size!r}")
    return int(size)


def check_zoo_seed(seed: object, key: str = "zoo seed") -> int:
    # numpy's streams take no negative seed, the loaders' torch shuffle none above 2**64 - 1
    return check_seed(key, seed, low=0)


def build_zoo_dataset(name: str, n_train: int | None = None, n_val: int | None = None,
                      n_test: int | None = None, *, seed: int = 0, size: int = 32,
                      return_sources: bool = False) -> dict[str, tuple[np.ndarray, ...]]:
    """Generate a zoo dataset in memory (no disk cache; see `load_zoo_dataset` for the cached path).

    Returns {"train"|"val"|"test": (images uint8 (N, size, size, 3), labels int64 (N,))}; with
    `return_sources=True` each tuple gains an int64 (N, k) provenance array (source image index, crop
    box, ...; k = 0 for procedural datasets). Deterministic in (name, sizes, seed, size).
    """
    spec = ZOO.get(name)
    sizes = resolve_sizes(spec, n_train, n_val, n_test)
    size = check_size(size)
    out = spec.build(sizes, check_zoo_seed(seed), size)
    result = {}
    for split in SPLITS:
        images, labels, sources = out[split]
        n = sizes[split]
        _check_split(name, split, images, labels, n, size, spec.num_classes)
        result[split] = (images, labels, sources) if return_sources else (images, labels)
    return result


class ZooBuilderError(ValueError):
    """A zoo builder returned arrays of the wrong shape, dtype or label range."""


def _check_split(name: str, split: str, images: np.ndarray, labels: np.ndarray, n: int, size: int,
                 classes: int) -> None:
    # cheap guards: a builder bug would otherwise surface as a shape error deep in training
    where = f"zoo dataset {name!r}, split {split!r}"
    if images.shape != (n, size, size, 3) or images.dtype != np.uint8:
        raise ZooBuilderError(f"{where}: images are {images.dtype} {images.shape}, expected uint8 {(n, size, size, 3)}")
    if labels.shape != (n,) or labels.dtype != np.int64:
        raise ZooBuilderError(f"{where}: labels are {labels.dtype} {labels.shape}, expected int64 {(n,)}")
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise ZooBuilderError(f"{where}: labels span [{labels.min()}, {labels.max()}], expected [0, {classes - 1}]")


def num_classes(name: str) -> int:
    return ZOO.get(name).num_classes


def class_names(name: str) -> tuple[str, ...]:
    return ZOO.get(name).class_names


def render_split(n: int, k: int, rng: np.random.Generator,
                 render: Callable[[int, np.random.Generator], np.ndarray], size: int) -> Split:
    """Balanced labels, then one `render(label, rng)` -> uint8 (size, size, 3) per sample."""
    labels = balanced_labels(rng, n, k)
    images = np.empty((n, size, size, 3), np.uint8)
    for i, y in enumerate(labels):
        images[i] = render(int(y), rng)
    return images, labels, no_sources(n)
