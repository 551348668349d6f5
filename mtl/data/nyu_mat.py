"""The NYUv2 labelled release ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5; read with h5py).

Datasets used: ``images`` (N, 3, W, H) uint8, ``depths`` (N, W, H) metres, ``labels`` (N, W, H) raw ids
0..894 (0 = unlabelled) — MATLAB stores column-major, so h5py sees each array transposed. Two more
files come from the user, since neither is inside the .mat:

* ``splits_file``: the official split (``splits.mat`` with ``trainNdxs``/``testNdxs``, 1-based, 795/654
  images), or a JSON file with the same two keys and the same 1-based indices.
* ``class_mapping``: the 894 → 13 class mapping as 895 integers (``.json`` list, ``.npy`` or a text file
  of one number per line): entry i is the 13-class id (0..12) of raw label i, −1 for ignored (entry 0,
  unlabelled, must be −1). docs/data.md says how to build it from the usual mapping file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from mtl.data.benchmarks import (dense_to_float, image_to_uint8, labels_to_uint8, resize_sample, resolve_size,
                                 stack_samples)

_KEYS = ("images", "depths", "labels")


def _need(path, what: str) -> Path:
    if path is None:
        raise ValueError(f"nyuv2 (format=mat) needs data.{what}; see docs/data.md")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"nyuv2: data.{what} {str(p)!r} does not exist")
    return p


def read_splits(path) -> dict[str, list[int]]:
    """{"train": [...], "test": [...]} as 0-based indices from splits.mat or its JSON equivalent."""
    p = _need(path, "splits_file")
    if p.suffix == ".json":
        data = json.loads(p.read_text())
    else:
        try:
            from scipy.io import loadmat
        except ImportError as e:
            raise ImportError("reading splits.mat needs scipy (pip install scipy), or give a JSON splits file") from e
        data = loadmat(str(p))
    out = {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        if key not in data:
            raise KeyError(f"nyuv2: splits file {str(p)!r} has no {key!r} (expected trainNdxs and testNdxs)")
        out[split] = [int(i) - 1 for i in np.asarray(data[key]).ravel()]  # MATLAB indices are 1-based
    return out


def read_class_mapping(path, num_classes: int) -> np.ndarray:
    """The raw-label lookup table: int64 array, entry i = class of raw id i (−1 = ignored)."""
    p = _need(path, "class_mapping")
    if p.suffix == ".json":
        table = np.asarray(json.loads(p.read_text()))
    elif p.suffix == ".npy":
        table = np.load(p, allow_pickle=False)
    else:
        table = np.loadtxt(p)
    table = table.ravel()
    if not np.issubdtype(table.dtype, np.number) or (table != np.round(table)).any():
        raise ValueError(f"nyuv2: class mapping {str(p)!r} must hold integers")
    table = table.astype(np.int64)
    bad = (table < -1) | (table >= num_classes)
    if bad.any():
        raise ValueError(f"nyuv2: class mapping {str(p)!r} maps raw label {int(np.argmax(bad))} to "
                         f"{int(table[bad][0])}, outside −1..{num_classes - 1}")
    return table


def read_nyu_mat(path, split: str, splits_file, class_mapping, num_classes: int, limit: int | None,
                 size) -> dict[str, torch.Tensor]:
    """One split ("train" or "test") of the labelled .mat as tensors: image, semseg, depth."""
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading nyu_depth_v2_labeled.mat needs h5py: pip install 'mtlkit[benchmarks]'") from e
    index = read_splits(splits_file)[split]
    table = read_class_mapping(class_mapping, num_classes)
    index = index[:limit] if limit is not None else index
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"nyuv2: {str(path)!r} is not an HDF5 (MATLAB v7.3) file: {e}") from e
    with f:
        missing = [k for k in _KEYS if k not in f]
        if missing:
            raise KeyError(f"nyuv2: {str(path)!r} has no dataset(s) {missing}; found {sorted(f.keys())}")
        n = f["images"].shape[0]
        if index and (min(index) < 0 or max(index) >= n):
            raise ValueError(f"nyuv2: splits file {splits_file} indexes past the {n} images of {path}")
        samples, hw = [], None
        for i in index:
            where = f"{path}[{i}]"
            raw = np.asarray(f["labels"][i]).T.astype(np.int64)
            if raw.max(initial=0) >= len(table):
                raise ValueError(f"{where}: raw label {int(raw.max())} has no entry in the class mapping "
                                 f"({len(table)} entries)")
            sample = {"image": image_to_uint8(np.asarray(f["images"][i]).transpose(2, 1, 0), where),
                      "semseg": labels_to_uint8(table[raw], num_classes, where),
                      "depth": dense_to_float(np.asarray(f["depths"][i]).T, 1, where)}
            hw = hw or resolve_size(size, tuple(sample["image"].shape[-2:]))
            samples.append(resize_sample(sample, hw))
    return stack_samples(samples)
