"""``hf_local``: any local HF-format dataset with an image column (the real-data path), converted once
into in-memory tensors in the batch layout of mtl/data/memory.py."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from mtl.atomic import user_path
from mtl.data.benchmarks import DepthUnitCheck, check_size, check_unit_normals
from mtl.data.hf import arrow_to_numpy, quiet_datasets
from mtl.folder_checks import JSON_ERRORS
from mtl.data.hf_columns import (BATCH_DTYPES, IGNORE, channels_first, check_channels, check_sizes, class_ids,
                                 compact_labels, decode_images, edge_map, encoded_image,
                                 refuse_ignore_only_foreground, resize, rgb_uint8, semseg_lookup)
from mtl.data.hf_splits import check_splits, choose_splits, file_splits
from mtl.data.memory import TensorDataModule, TensorDictDataset

log = logging.getLogger(__name__)

_DENSE_KEYS = {"semseg": 0, "depth": 1, "normals": 3, "edges": 1}  # key -> channels (0: no channel axis)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"hf_local: no dataset at {str(path)!r} (expected a save_to_disk folder, "
                                "or .parquet/.arrow files)")


def _check_limits(limits: dict[str, Any]) -> None:
    for split, n in limits.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"hf_local: data.n_{split} must be an int >= 1 or null (all rows), got {n!r}")


def _open_local(path: Path) -> dict[str, Any]:
    """{split name: datasets.Dataset} from a save_to_disk folder or parquet/arrow files."""
    from datasets import Dataset, DatasetDict, load_from_disk
    from datasets.table import InMemoryTable

    _check_exists(path)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        try:
            with quiet_datasets():
                loaded = load_from_disk(str(path))
        except IndexError:  # datasets cannot open a split saved with 0 rows (no arrow file to map)
            raise ValueError(_no_rows(path, _empty_splits(path) or "?", "save the dataset without them")) from None
        return dict(loaded) if isinstance(loaded, DatasetDict) else {"train": loaded}
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path])
                   if p.suffix in (".parquet", ".arrow") and p.is_file())
    if not files:
        raise FileNotFoundError(f"hf_local: {str(path)!r} holds no save_to_disk dataset and no "
                                ".parquet/.arrow files")
    by_split: dict[str, list[tuple[Path, pa.Table]]] = {}
    for f, split in file_splits(path, files).items():
        by_split.setdefault(split, []).append((f, _read_table(f)))
    tables = {s: _concat_shards(s, shards) for s, shards in by_split.items()}
    empty = sorted(s for s, t in tables.items() if t.num_rows == 0)
    if empty:  # it would fail later as an image column of shape ()
        raise ValueError(_no_rows(path, empty, "remove their files"))
    return {s: Dataset(InMemoryTable(t)) for s, t in tables.items()}


def _no_rows(path: Path, empty: list[str] | str, fix: str) -> str:
    return (f"hf_local: {str(path)!r} cannot be loaded: split(s) {empty} hold 0 rows; {fix} (a missing val/test "
            "split is carved from train)")


def _concat_shards(split: str, shards: list[tuple[Path, pa.Table]]) -> pa.Table:
    """The files of one split as one table; shards must hold the same columns (in any order) of the same types."""
    first, table = shards[0]
    names, tables = table.schema.names, [table]
    for f, t in shards[1:]:
        if set(t.schema.names) == set(names):
            t = t.select(names)
        if not t.schema.equals(table.schema, check_metadata=False):
            raise ValueError(f"hf_local: {first} and {f} are files of split {split!r} with different columns "
                             f"({_schema_difference(first.name, table.schema, f.name, t.schema)}); give every file "
                             "of a split the same columns")
        tables.append(t)
    return pa.concat_tables(tables)


def _schema_difference(name_a: str, a: pa.Schema, name_b: str, b: pa.Schema) -> str:
    only_a = [n for n in a.names if n not in b.names]
    only_b = [n for n in b.names if n not in a.names]
    typed = [f"{n!r} ({a.field(n).type} vs {b.field(n).type})" for n in a.names
             if n in b.names and a.field(n).type != b.field(n).type]
    return "; ".join([f"only in {name_a}: {only_a}"] * bool(only_a) + [f"only in {name_b}: {only_b}"] * bool(only_b)
                     + [f"of other types: {', '.join(typed)}"] * bool(typed))


def _empty_splits(path: Path) -> list[str]:
    """The splits of a save_to_disk folder whose saved state lists no data file."""
    import json

    names = json.loads((path / "dataset_dict.json").read_text()).get("splits", []) \
        if (path / "dataset_dict.json").exists() else ["."]
    empty = []
    for name in names:
        state = path / name / "state.json"
        try:
            if state.exists() and not json.loads(state.read_text()).get("_data_files"):
                empty.append(name)
        except JSON_ERRORS:  # not readable as JSON (also nested too deep): not a saved state of no files
            continue
    return empty


def _read_table(f: Path) -> pa.Table:
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(f)
    with pa.memory_map(str(f)) as src:  # datasets writes the IPC stream format; plain files also exist
        try:
            return pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            src.seek(0)
            return pa.ipc.open_file(src).read_all()


class HFImageDataModule(TensorDataModule):
    """Any local HF-format dataset with an image column: the real-data path.

    ``path``: a ``save_to_disk`` folder (DatasetDict or Dataset) or a folder/file of parquet or arrow
    files (the split is read from each file's path by HF's keywords, mtl/data/hf_splits.py; a DatasetDict's
    splits serve as train/val/test by the same words). ``columns`` maps dataset columns to batch keys, e.g.
    ``{"label": "classification", "mask": "semseg"}``. Known keys get the batch layout of mtl/data/memory.py's
    docstring (dense ones resized with nearest neighbour); other keys keep their shape, ints as int64
    and floats as float32. Missing val/test splits are carved from train (``val_fraction``,
    ``test_fraction``, seeded). Class counts come from ``semseg_classes``/``classification_classes`` or
    are inferred from the labels (semseg: −1 and 255 are ignored). ``size`` resizes every image and dense target
    to size × size (an int) or to [H, W]; ``n_train``/``n_val``/``n_test`` keep the first n rows of a split (null: all).
    ``channels_last`` says whether numeric 4-D image and map columns are (N, H, W, C) or (N, C, H, W) (null: read
    from the shape, refusing one that reads both ways); decoded ``Image`` columns are always (H, W, C).
    """

    def __init__(self, path: str | os.PathLike, image_column: str = "image",
                 columns: Mapping[str, str] | None = None, size: int | list[int] | None = None,
                 splits: Mapping[str, str] | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, seed: int = 0, batch_size: int = 32, num_workers: int = 0,
                 augment: bool = False, semseg_classes: int | None = None,
                 classification_classes: int | None = None, n_train: int | None = None,
                 n_val: int | None = None, n_test: int | None = None,
                 semseg_map: dict[int, int] | list[int] | None = None, channels_last: bool | None = None):
        super().__init__(batch_size=batch_size, num_workers=num_workers, augment=augment)
        self.save_hyperparameters()
        self.check_settings(path=path, image_column=image_column, columns=columns, size=size, splits=splits,
                            val_fraction=val_fraction, test_fraction=test_fraction, semseg_classes=semseg_classes,
                            n_train=n_train, n_val=n_val, n_test=n_test, semseg_map=semseg_map,
                            channels_last=channels_last)
        self.path = user_path(str(path))
        self.image_column, self.channels_last, self.columns = image_column, channels_last, dict(columns or {})
        size = check_size(size)  # [H, W] as a tuple
        self.size = size if size is None or isinstance(size, tuple) else (size, size)  # (H, W); an int: square
        self.splits = dict(splits or {})
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.limits = {"train": n_train, "val": n_val, "test": n_test}
        self._classes = {"semseg_classes": semseg_classes, "classification_classes": classification_classes}
        self.semseg_lut = semseg_lookup(semseg_map, semseg_classes)
        self._depth_unit = DepthUnitCheck()

    @classmethod
    def check_settings(cls, path: str | os.PathLike | None = None, image_column: Any = "image", columns: Any = None,
                       size: Any = None, splits: Any = None, val_fraction: Any = 0.1, test_fraction: Any = 0.1,
                       semseg_classes: Any = None, n_train: Any = None, n_val: Any = None, n_test: Any = None,
                       semseg_map: Any = None, channels_last: Any = None, **_: Any) -> None:
        """What the settings alone decide, cheaply (`mtl.data.check_datamodule`, before a run folder, and
        ``__init__``): each setting's form, and that the dataset's path exists (what it holds is read with the data)."""
        if not (channels_last is None or isinstance(channels_last, bool)):
            raise ValueError(f"hf_local: data.channels_last must be true, false or null, got {channels_last!r}")
        taken = {"image": f"image_column {image_column!r}"}
        for column, key in dict(columns or {}).items():  # a second column for one key would replace the first unseen
            if key in taken:
                raise ValueError(f"hf_local: {taken[key]} and column {column!r} both map to batch key {key!r}; "
                                 "map each batch key from one column")
            taken[key] = f"column {column!r}"
        check_size(size, an_int="a square side")
        check_splits(splits)
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"hf_local: {name} must be in [0, 1), got {frac}")
        _check_limits({"train": n_train, "val": n_val, "test": n_test})
        if semseg_lookup(semseg_map, semseg_classes) is not None and "semseg" not in taken:
            raise ValueError("hf_local: data.semseg_map is set but no column maps to semseg")
        if path is not None:
            _check_exists(user_path(str(path)))

    def source(self) -> str:
        return f"hf_local ({self.path})"

    @property
    def info(self) -> dict[str, Any]:
        self.setup()
        h, w = (int(v) for v in self._data["train"].tensors["image"].shape[-2:])
        info: dict[str, Any] = {"image_size": h if h == w else [h, w],  # int when square, as the other modules
                                "targets": sorted(k for k in self._data["train"].tensors if k != "image")}
        for name, key in (("semseg_classes", "semseg"), ("classification_classes", "classification")):
            if self._classes[name] is not None:
                info[name] = self._classes[name]
            elif key in self.columns.values():
                labels = torch.cat([d.tensors[key].flatten() for d in self._data.values()])
                labels = labels[labels != 255] if key == "semseg" else labels
                seen = int(labels.max()) + 1 if labels.numel() else 0
                info[name] = max(seen, getattr(self, "_declared", {}).get(key, 0))
        if "semseg" in self.columns.values():
            info["semseg_ignore_index"] = IGNORE
        if "regression" in self.columns.values():
            info["regression_dims"] = int(self._data["train"].tensors["regression"].shape[1])
        return info

    def _convert(self, ds, split: str, train: bool) -> dict[str, torch.Tensor]:
        """One split as tensors; ``split`` is its name in the dataset, ``train`` whether it is the training one."""
        from datasets import Image

        missing = [c for c in (self.image_column, *self.columns) if c not in ds.column_names]
        if missing:
            raise KeyError(f"hf_local: {str(self.path)!r} has no column(s) {missing}; "
                           f"columns: {', '.join(ds.column_names)}")
        table = ds.data.table

        def raw(column: str, label: bool, where: str
                ) -> tuple[np.ndarray, list[tuple[int, int]] | None, bool | None]:
            """The column as one array, each row's (H, W) as stored for ``Image`` columns (else None), and
            whether a 4-D array is channels-last (None: unknown, read from the shape)."""
            if isinstance(ds.features[column], Image) or encoded_image(table.schema.field(column).type):
                return (*decode_images(ds.cast_column(column, Image()), column, self.size, label, where), True)
            try:
                a = arrow_to_numpy(table.column(column))
            except ValueError as e:
                raise ValueError(f"hf_local: column {column!r} of {str(self.path)!r}: {e}") from None
            if a.dtype.kind not in "biuf":
                example = repr(a.ravel()[0]) if a.size else "None"
                example = example if len(example) <= 40 else example[:40] + "..."  # encoded bytes: not the whole file
                raise ValueError(f"hf_local: column {column!r} of split {split!r} holds {a.dtype} values "
                                 f"(e.g. {example}), not numbers")
            return a, None, self.channels_last

        where_img = f"hf_local: image column {self.image_column!r} of split {split!r}"
        img, image_sizes, layout = raw(self.image_column, False, where_img)
        img = rgb_uint8(channels_first(img, (1, 3, 4), layout, where_img), where_img)
        image_sizes = image_sizes or [tuple(img.shape[-2:])] * len(img)
        # np.require(..., "W"): arrow buffers are read-only, which torch.from_numpy warns about
        image = resize(torch.from_numpy(np.require(img, requirements=["C", "W"])), self.size, nearest=False)
        out = {"image": image}
        for column, key in self.columns.items():
            where = f"hf_local: column {column!r} ({key}) of split {split!r}"
            a, sizes, layout = raw(column, True, where)
            integer = np.issubdtype(a.dtype, np.integer) or a.dtype == bool
            if key in _DENSE_KEYS:
                ch = _DENSE_KEYS[key]
                chw = channels_first(a, (max(ch, 1),), layout, where)
                t = torch.from_numpy(np.require(chw, requirements=["C", "W"]))
                check_channels(where, key, t, ch)
                check_sizes(column, key, sizes or [tuple(t.shape[-2:])] * len(t), image_sizes, split,
                             self.size is not None)
                t = resize(t, self.size, nearest=True)
                if key == "semseg":
                    if train and self.semseg_lut is None:  # another split may lack the foreground, train may not
                        refuse_ignore_only_foreground(where, t, self._classes["semseg_classes"])
                    out[key] = compact_labels(key, class_ids(where, key, t[:, 0] if t.ndim == 4 else t,
                                                             self._classes["semseg_classes"], self.semseg_lut))
                elif key == "normals" and t.dtype == torch.uint8:
                    # the usual 8-bit PNG encoding maps [-1, 1] to 0..255; all-zero pixels stay 0 (invalid)
                    valid = (t != 0).any(dim=1, keepdim=True)
                    out[key] = torch.where(valid, F.normalize(t.to(torch.float32) / 127.5 - 1, dim=1), 0.0)
                elif key == "normals":  # any other dtype holds the vectors themselves
                    out[key] = t.to(torch.float32)
                    check_unit_normals(out[key], where)
                elif key == "edges":
                    out[key] = compact_labels(key, edge_map(where, t))
                else:  # depth: a missing value (NaN, ±inf) is what 0 already means, an invalid pixel
                    self._depth_unit(a, where)
                    t = t.to(torch.float32)
                    out[key] = torch.where(torch.isfinite(t), t, 0.0)
            elif key == "classification":
                if not (a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1)):
                    raise ValueError(f"{where} has shape {a.shape}; classification needs one class id per row, "
                                     "shape (N,) or (N, 1)")
                t = torch.from_numpy(np.require(a.reshape(-1), requirements=["C", "W"]))
                out[key] = class_ids(where, key, t, self._classes["classification_classes"])
            elif key == "regression":
                t = torch.from_numpy(a.astype(np.float32))
                if not torch.isfinite(t).all():
                    row = int((~torch.isfinite(t.view(len(t), -1))).any(1).nonzero()[0])
                    raise ValueError(f"{where} holds a missing value ({t.view(len(t), -1)[row].tolist()[:4]} in row "
                                     f"{row}); the regression loss has no mask: drop or fill those rows")
                out[key] = t.view(len(t), -1)
            else:
                out[key] = torch.from_numpy(a.astype(np.int64 if integer else np.float32))
        for column, key in self.columns.items():  # the splits are carved by row: every column needs one per image
            if len(out[key]) != len(image):
                raise ValueError(f"hf_local: column {column!r} ({key}) of split {split!r} gives {len(out[key])} "
                                 f"rows for {len(image)} images")
        return out

    def _load(self) -> dict[str, TensorDictDataset]:
        available = _open_local(self.path)
        names = choose_splits(available, self.splits, repr(str(self.path)))  # batch split -> the dataset's split
        if "train" not in names:
            raise KeyError(f"hf_local: {str(self.path)!r} has no train split; splits: "
                           f"{', '.join(sorted(available))} (map one with splits={{'train': ...}})")
        chosen = {split: available[name] for split, name in names.items()}
        from datasets import ClassLabel

        # a ClassLabel column states its class count: classes no split happens to hold still get an output
        self._declared = {key: ds.features[col].num_classes for ds in chosen.values() for col, key in self.columns.items()
                          if col in ds.features and isinstance(ds.features[col], ClassLabel)}
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for sp, ds in chosen.items():  # train first: the other splits' images must come out at its size
            tensors[sp] = self._convert(ds, names[sp], sp == "train")
            hw, train_hw = (tuple(tensors[s]["image"].shape[-2:]) for s in (sp, "train"))
            if hw != train_hw:  # only with size=null: data.size gives every split one size
                raise ValueError(f"hf_local: image column {self.image_column!r} of split {names[sp]!r} in "
                                 f"{str(self.path)!r} holds {hw} images, split {names['train']!r} {train_hw} ones; "
                                 "pass data.size to resize them all")
        carve = [sp for sp, frac in (("val", self.val_fraction), ("test", self.test_fraction)) if sp not in tensors]
        if carve:
            train = tensors["train"]
            n = len(train["image"])
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            lo = 0
            for sp in carve:
                frac = self.val_fraction if sp == "val" else self.test_fraction
                if frac == 0:
                    raise ValueError(f"hf_local: {str(self.path)!r} has no {sp} split and {sp}_fraction=0; map "
                                     f"one with splits={{'{sp}': ...}} or set {sp}_fraction > 0")
                k = max(1, int(round(n * frac)))
                tensors[sp] = {key: v[perm[lo : lo + k]] for key, v in train.items()}
                lo += k
            if lo >= n:
                raise ValueError(f"hf_local: {n} training rows are too few to carve {carve} from")
            tensors["train"] = {key: v[perm[lo:]] for key, v in train.items()}
            log.info("hf_local: carved %s from the train split of %s", carve, self.path)
        limited = {sp: {k: v[: self.limits[sp]] for k, v in t.items()} for sp, t in tensors.items()}
        return {sp: TensorDictDataset(t, cast=BATCH_DTYPES) for sp, t in limited.items()}

