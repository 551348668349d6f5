"""The NYUv2 labelled release ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5; read with h5py).

Datasets used: ``images`` (N, 3, W, H) uint8, ``depths`` (N, W, H) metres, ``labels`` (N, W, H) raw ids
0..894 (0 = unlabelled) — MATLAB stores column-major, so h5py sees each array transposed. Two more
files come from the user, since neither is inside the .mat:

* ``splits_file``: the official split (``splits.mat`` with ``trainNdxs``/``testNdxs``, 1-based, 795/654
  images), or a JSON file with the same two keys and the same 1-based indices.
* ``class_mapping``: raw label → class, one file or a list of files applied in turn:

  - the community's files (github.com/ankurhanda/nyuv2-meta-data): ``classMapping40.mat`` (key
    ``mapClass``, 894 entries: raw id i+1 → 40-class id 1..40) and ``class13Mapping.mat`` (struct
    ``classMapping13``, field ``labels13``, 40 entries: 40-class id j+1 → 13-class id 1..13);
    ``[classMapping40.mat, class13Mapping.mat]`` gives the 13-class task, ``classMapping40.mat``
    alone the 40-class one;
  - or a table of 895 integers (``.json`` list, ``.npy``, a text file of one number per line, or the list itself
    inline, ``data.class_mapping=[-1, 0, ...]``): entry i is the 0-based class of raw label i, −1 for ignored.

  Ids are 1-based in the .mat files (0 = unlabelled); the result is 0-based with −1 = ignored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from mtl.atomic import user_path
from mtl.folder_checks import JSON_ERRORS
from mtl.data.benchmarks import (DepthUnitCheck, check_target_size, image_to_uint8, labels_to_uint8, read_depth,
                                 resize_sample, resolve_size, stack_samples, warn_negative_depth, whole_ids)

_KEYS = ("images", "depths", "labels")


def _need(path, what: str) -> Path:
    if path is None:
        raise ValueError(f"nyuv2 (format=mat) needs data.{what}; see docs/data.md")
    p = user_path(str(path))
    if not p.is_file():
        raise FileNotFoundError(f"nyuv2: data.{what} {str(p)!r} does not exist")
    return p


def read_splits(path) -> dict[str, list[int]]:
    """{"train": [...], "test": [...]} as 0-based indices from splits.mat or its JSON equivalent."""
    p = _need(path, "splits_file")
    if p.suffix == ".json":
        from mtl.io import read_json

        data = read_json(p)
    else:
        data = _loadmat(p, "or give a JSON splits file")
    if not isinstance(data, dict):
        raise ValueError(f"nyuv2: splits file {str(p)!r} must hold {{\"trainNdxs\": [...], \"testNdxs\": [...]}}, "
                         f"got {str(data)[:40]}")
    out = {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        if key not in data:
            raise KeyError(f"nyuv2: splits file {str(p)!r} has no {key!r} (expected trainNdxs and testNdxs)")
        raw = np.asarray(data[key]).ravel()
        where = f"nyuv2: splits file {str(p)!r}, {key}"
        if not raw.size:  # would surface as "no samples to stack"
            raise ValueError(f"nyuv2: splits file {str(p)!r}: {key} is empty")
        if raw.dtype.kind not in "biuf" or (raw.dtype.kind == "f" and not np.isfinite(raw).all()):
            raise ValueError(f"{where}: holds {raw.dtype} values, not image numbers")
        frac = raw[raw != np.round(raw)]
        if frac.size:
            raise ValueError(f"{where}: {float(frac[0]):g} is not a whole image number")
        if raw.size and raw.min() < 1:
            raise ValueError(f"{where}: holds {int(raw.min())}; the indices are MATLAB's, 1-based (image 1 is the first)")
        out[split] = [int(i) - 1 for i in raw]  # MATLAB indices are 1-based
        if len(set(out[split])) != len(out[split]):
            dup = next(i for i in out[split] if out[split].count(i) > 1)
            raise ValueError(f"{where}: image {dup + 1} appears more than once")
    shared = sorted(set(out["train"]) & set(out["test"]))
    if shared:
        raise ValueError(f"nyuv2: splits file {str(p)!r}: {len(shared)} image(s) in both trainNdxs and testNdxs "
                         f"(first: {shared[0] + 1}); the test set would leak into training")
    return out


RAW_LABELS = 894  # raw ids 1..894 in nyu_depth_v2_labeled.mat; 0 = unlabelled


def _loadmat(p: Path, alternative: str = "") -> dict:
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError(f"reading {p.name} needs scipy (pip install scipy){', ' + alternative if alternative else ''}") from e
    try:
        return loadmat(str(p))
    except NotImplementedError as e:  # MATLAB v7.3 files are HDF5
        raise ValueError(f"nyuv2: {str(p)!r} is a MATLAB v7.3 file; save it with -v7 or give the table as .npy") from e
    except Exception as e:  # scipy raises several types for a file that is not a .mat
        raise ValueError(f"nyuv2: cannot read {str(p)!r} as a MATLAB .mat file: {e}") from e


def _ids(values, p: Path, key: str, length: int | None) -> np.ndarray:
    """Whole numbers ≥ 0 (1-based class ids, 0 = unlabelled) from a .mat entry, with 0 prepended
    so that index = the id being mapped."""
    a = np.asarray(values)
    if a.dtype == object or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"nyuv2: {key!r} in {str(p)!r} must be a numeric array, got {a.dtype}")
    a = a.ravel()
    if length is not None and a.size != length:
        raise ValueError(f"nyuv2: {key!r} in {str(p)!r} has {a.size} entries, expected {length}")
    if (a != np.round(a)).any() or (a < 0).any():
        raise ValueError(f"nyuv2: {key!r} in {str(p)!r} must hold class ids ≥ 0 (1-based, 0 = unlabelled)")
    return np.concatenate([[0], a.astype(np.int64)])


def _labels13(p: Path, m: dict) -> np.ndarray:
    """class13Mapping.mat: struct ``classMapping13`` with field ``labels13`` (40 → 13, 1-based)."""
    struct = np.asarray(m["classMapping13"])
    names = struct.dtype.names or ()
    if "labels13" not in names:
        raise KeyError(f"nyuv2: 'classMapping13' in {str(p)!r} has no field 'labels13' (fields: {list(names)})")
    return _ids(struct.ravel()[0]["labels13"], p, "classMapping13.labels13", None)


def _first_stage(p: Path) -> np.ndarray:
    """Raw label → 1-based class (0 = ignored) for raw labels 0..894."""
    if p.suffix == ".mat":
        m = _loadmat(p)
        if "mapClass" in m:
            return _ids(m["mapClass"], p, "mapClass", RAW_LABELS)
        if "classMapping13" in m:
            raise ValueError(f"nyuv2: {str(p)!r} maps the 40 classes to 13; put classMapping40.mat (key 'mapClass') "
                             "before it: data.class_mapping=[<dir>/classMapping40.mat,<dir>/class13Mapping.mat]")
        raise KeyError(f"nyuv2: {str(p)!r} has no key 'mapClass' (classMapping40.mat) or 'classMapping13' "
                       f"(class13Mapping.mat); found {sorted(k for k in m if not k.startswith('__'))}")
    try:
        if p.suffix == ".json":
            table = np.asarray(json.loads(p.read_text()))
        elif p.suffix == ".npy":
            table = np.load(p, allow_pickle=False)
        else:
            table = np.loadtxt(p)
    except (*JSON_ERRORS, OSError, EOFError) as e:  # the parser's words name the line (row) at fault
        raise ValueError(f"nyuv2: class mapping {str(p)!r} cannot be read as a table of numbers ({e})") from None
    return _table(table.ravel(), f"class mapping {str(p)!r}")


def _table(table: np.ndarray, source: str) -> np.ndarray:
    """A table of 895 integers ≥ −1 (entry i: the 0-based class of raw label i) as 1-based classes (0 = ignored)."""
    if not np.issubdtype(table.dtype, np.number) or (table != np.round(table)).any() or (table < -1).any():
        raise ValueError(f"nyuv2: {source} must hold integers ≥ −1 (−1 = ignored)")
    if table.size != RAW_LABELS + 1:  # as mapClass: its 894 entries, plus raw label 0 (unlabelled)
        raise ValueError(f"nyuv2: {source} has {table.size} entries, expected {RAW_LABELS + 1} "
                         f"(entry i = the 0-based class of raw label i, for raw labels 0..{RAW_LABELS})")
    return table.astype(np.int64) + 1


def _inline_table(spec) -> np.ndarray | None:
    """``data.class_mapping`` given as the table itself (a list of ints, not of files), as 1-based classes; None for
    files. A list mixing numbers and file names is refused rather than read as either."""
    if isinstance(spec, (str, os.PathLike)) or spec is None or not len(spec):
        return None
    numbers = [isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in spec]
    if not any(numbers):
        return None
    if not all(numbers):
        bad = next(v for v, n in zip(spec, numbers) if not n)
        raise ValueError(f"nyuv2: data.class_mapping mixes numbers and {bad!r}; give the table of {RAW_LABELS + 1} "
                         "ints itself or a list of files, not both")
    return _table(np.asarray(spec).ravel(), "data.class_mapping (the inline table)")


def _next_stage(p: Path) -> np.ndarray:
    """1-based class → 1-based coarser class; entry 0 stays 0 (ignored)."""
    m = _loadmat(p) if p.suffix == ".mat" else {}
    if "classMapping13" not in m:
        found = sorted(k for k in m if not k.startswith("__"))
        raise KeyError(f"nyuv2: {str(p)!r} after the first class-mapping file must be class13Mapping.mat with the "
                       f"struct 'classMapping13' (field 'labels13')" + (f"; found {found}" if p.suffix == ".mat" else ""))
    return _labels13(p, m)


def check_mat_inputs(splits_file, class_mapping) -> None:
    """What the settings alone decide of the release's two other inputs (`NYUv2DataModule.check_settings`, before a
    run folder): each is set and its files exist (an inline table: well formed); their contents are read with the
    data."""
    _need(splits_file, "splits_file")
    _mapping_inputs(class_mapping)


def _mapping_inputs(spec) -> tuple[np.ndarray | None, list[Path]]:
    """(the inline table or None, the files applied in turn, each there) that ``data.class_mapping`` gives."""
    inline = _inline_table(spec)
    specs = [] if inline is not None else [spec] if spec is None or isinstance(spec, (str, os.PathLike)) else list(spec)
    if inline is None and not specs:
        raise ValueError("nyuv2 (format=mat) needs data.class_mapping; see docs/data.md")
    return inline, [_need(s, "class_mapping") for s in specs]


def read_class_mapping(spec, num_classes: int) -> np.ndarray:
    """The raw-label lookup table: int64 array, entry i = 0-based class of raw id i (−1 = ignored).

    ``spec`` is one file or a list of files applied in turn (see the module docstring), e.g.
    ``[classMapping40.mat, class13Mapping.mat]`` for the 13 classes, or the table of 895 ints itself."""
    inline, files = _mapping_inputs(spec)
    ids, source = (inline, "data.class_mapping") if inline is not None else (_first_stage(files[0]), files[0].name)
    for p in files[1:]:
        lookup = _next_stage(p)
        if ids.max(initial=0) >= len(lookup):
            raise ValueError(f"nyuv2: {source} gives class {int(ids.max())} but {str(p)!r} maps only classes "
                             f"1..{len(lookup) - 1}")
        ids, source = lookup[ids], f"{source} → {p.name}"
    table = ids - 1
    bad = table >= num_classes
    if bad.any():
        raw = int(np.argmax(bad))
        hint = ""
        if files and files[0].suffix == ".mat" and len(files) == 1 and num_classes < table.max() + 1:
            hint = (f"; {files[0].name} alone gives {int(table.max()) + 1} classes: set data.num_classes="
                    f"{int(table.max()) + 1} or add class13Mapping.mat after it")
        raise ValueError(f"nyuv2: class mapping {source} maps raw label {raw} to class {int(table[raw])}, outside "
                         f"0..{num_classes - 1} (data.num_classes={num_classes}){hint}")
    if table.max(initial=-1) + 1 < num_classes:  # a head with classes no pixel can have
        raise ValueError(f"nyuv2: class mapping {source} gives {int(table.max()) + 1} classes but data.num_classes="
                         f"{num_classes}; set data.num_classes={int(table.max()) + 1}")
    return table


def read_nyu_mat(path, split: str, splits_file, class_mapping, num_classes: int, limit: int | None,
                 size, depth_unit: DepthUnitCheck | None = None) -> dict[str, torch.Tensor]:
    """One split ("train" or "test") of the labelled .mat as tensors: image, semseg, depth; labels and depth checked
    as the npy layout's (``depth_unit``: the dataset's, shared by its splits)."""
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading nyu_depth_v2_labeled.mat needs h5py: pip install 'mtlkit[benchmarks]'") from e
    depth_unit = depth_unit or DepthUnitCheck()
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
        counts = {k: (f[k].shape or (0,))[0] for k in _KEYS}
        n = counts["images"]
        for k in _KEYS[1:]:  # read by index below: a short one failed there as a bare h5py IndexError
            if counts[k] != n:
                raise ValueError(f"nyuv2: {str(path)!r}: {k!r} holds {counts[k]} entries, 'images' {n}; every "
                                 "image needs its depth and labels")
        if index and (min(index) < 0 or max(index) >= n):
            raise ValueError(f"nyuv2: splits file {splits_file} indexes past the {n} images of {path}")
        samples, hw, negative = [], None, []
        for i in index:
            where = {k: f"{path}: {k}[{i}]" for k in _KEYS}

            def no_entry(label: object) -> ValueError:
                return ValueError(f"{where['labels']}: raw label {label} has no entry in the class mapping "
                                  f"({len(table)} entries)")

            raw = whole_ids(np.asarray(f["labels"][i]).T, where["labels"], no_entry)  # (fractions: refused)
            if raw.size and (raw.min() < 0 or raw.max() >= len(table)):
                raise no_entry(int(raw.max() if raw.max() >= len(table) else raw.min()))
            sample = {"image": image_to_uint8(np.asarray(f["images"][i]).transpose(2, 1, 0), where["images"]),
                      "semseg": labels_to_uint8(table[raw], num_classes, where["labels"]),
                      "depth": read_depth(np.asarray(f["depths"][i]).T, where["depths"], depth_unit, negative)}
            for key, name in (("semseg", "labels"), ("depth", "depths")):
                check_target_size(sample[key], sample["image"], where[name])
            hw = hw or resolve_size(size, tuple(sample["image"].shape[-2:]))
            samples.append(resize_sample(sample, hw))
    warn_negative_depth(negative, f"{path} ({split})")
    return stack_samples(samples)
