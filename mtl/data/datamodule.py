"""LightningDataModules that hold a whole (small) dataset in memory as torch tensors.

Data lives on disk in HF ``datasets`` format; it is read once into contiguous tensors, and a batch is
one tensor index per key (``__getitems__``), with no per-row formatting. Batch layout (what the task
code relies on):

    image           uint8   (B, 3, H, W)
    semseg          int64   (B, H, W)
    depth           float32 (B, 1, H, W)   0 = invalid
    normals         float32 (B, 3, H, W)   unit, camera frame (x right, y down, z forward)
    edges           float32 (B, 1, H, W)   0/1
    classification  int64   (B,)
    regression      float32 (B, k)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from mtl.data.scenes import CLASS_NAMES, GENERATOR_VERSION, SHAPE_NAMES, render_scenes

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


# --- in-memory dataset -------------------------------------------------------------------------


class TensorDictDataset(Dataset):
    """Rows of a dict of equally long tensors; ``__getitems__`` serves a whole batch at once.

    ``cast`` maps keys to the dtype a batch should carry when storage keeps a smaller one (uint8 label
    maps become int64 / float32 per batch, which is cheap, instead of 8x the memory for the split).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        cast: Mapping[str, torch.dtype] | None = None,
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ):
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns differ in length: {lengths}")
        self.tensors = dict(tensors)
        self.cast = dict(cast or {})
        self.transform = transform
        self._len = next(iter(lengths.values()), 0)

    def __len__(self) -> int:
        return self._len

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = {}
        for k, t in self.tensors.items():
            v = t[idx]
            out[k] = v.to(self.cast[k]) if k in self.cast else v
        return self.transform(out) if self.transform is not None else out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``__getitems__`` already returns the batch; module-level so worker processes can pickle it."""
    return batch


def random_hflip(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flip half the samples left-right; dense targets follow and normals' x component changes sign."""
    first = next(iter(batch.values()))
    flip = torch.rand(len(first)) < 0.5
    if not flip.any():
        return batch
    for k, v in batch.items():
        if v.ndim >= 3:  # (B, H, W) or (B, C, H, W)
            v[flip] = v[flip].flip(-1)
            if k == "normals":
                v[flip, 0] = -v[flip, 0]
    return batch


class _TensorDataModule(LightningDataModule):
    """Shared loaders: subclasses fill ``self._data[split]`` with TensorDictDatasets in ``_load``."""

    def __init__(self, batch_size: int = 32, num_workers: int = 0, augment: bool = False):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self._data: dict[str, TensorDictDataset] = {}

    def _load(self) -> dict[str, TensorDictDataset]:
        raise TypeError(f"{type(self).__name__} must implement _load")

    def setup(self, stage: str | None = None) -> None:
        if not self._data:  # every split at once: loading is fast and Lightning calls setup per stage
            self._data = self._load()
            if self.augment:
                self._data["train"].transform = random_hflip

    def dataset(self, split: str) -> TensorDictDataset:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        self.setup()
        return self._data[split]

    def _loader_options(self, shuffle: bool) -> dict[str, Any]:
        """Extra DataLoader arguments of a subclass (a seeded generator, pin_memory, ...)."""
        return {}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            persistent_workers=self.num_workers > 0,
            **self._loader_options(shuffle),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


# --- arrow helpers -----------------------------------------------------------------------------


def _arrow_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column, possibly of (nested) equal-length lists, as one (N, ...) array, no per-row work."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n, shape = len(arr), []
    while True:
        if isinstance(arr, pa.ExtensionArray):  # e.g. datasets' Array2D/Array3D
            arr = arr.storage
        elif pa.types.is_fixed_size_list(arr.type):
            shape.append(arr.type.list_size)
            arr = arr.flatten()
        elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            lengths = np.diff(arr.offsets.to_numpy())
            if len(lengths) and (lengths != lengths[0]).any():
                raise ValueError("list column has rows of different lengths; cannot stack it into a tensor")
            shape.append(int(lengths[0]) if len(lengths) else 0)
            arr = arr.flatten()
        else:
            break
    if arr.null_count:
        raise ValueError("column holds missing values")
    return arr.to_numpy(zero_copy_only=False).reshape(n, *shape)


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Build a folder in a temporary sibling and rename it into place, so no reader sees half of it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # another process finished the same folder first; its copy is identical
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


class _quiet_datasets:
    """Hide HF datasets' progress bars for the duration, restoring the user's setting after."""

    def __enter__(self):
        from datasets.utils import are_progress_bars_disabled, disable_progress_bars

        self._was = are_progress_bars_disabled()
        disable_progress_bars()

    def __exit__(self, *exc):
        from datasets.utils import enable_progress_bars

        if not self._was:
            enable_progress_bars()


# --- scenes ------------------------------------------------------------------------------------

#: scene index offsets per split: splits never overlap, and val/test stay the same when n_train changes
SPLIT_OFFSETS = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
_CHUNK = 1024  # scenes per from_dict chunk


def default_cache_dir() -> Path:
    env = os.environ.get("MTL_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mtlkit" / "scenes"


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
    if not parts:
        return Dataset.from_dict({k: [] for k in features}, features=features)
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def materialize_scenes(size: int = 64, n_train: int = 2000, n_val: int = 500, n_test: int = 500,
                       seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Render the scenes splits once into an HF ``DatasetDict`` on disk; return its folder.

    The folder name carries a hash of every parameter that changes the data (including
    GENERATOR_VERSION), so a cached copy is reused only when it is exactly what was asked for.
    """
    for name, n in dict(n_train=n_train, n_val=n_val, n_test=n_test).items():
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"scenes-v{GENERATOR_VERSION}-{size}px-{scenes_cache_key(size, n_train, n_val, n_test, seed)}"
    if (final / "dataset_dict.json").exists():
        return final

    def write(tmp: Path) -> None:
        from datasets import DatasetDict

        t0 = time.perf_counter()
        counts = dict(train=n_train, val=n_val, test=n_test)
        dd = DatasetDict({sp: _scenes_split(seed, SPLIT_OFFSETS[sp], counts[sp], size) for sp in SPLITS})
        with _quiet_datasets():
            dd.save_to_disk(str(tmp))
        params = dict(size=size, seed=seed, version=GENERATOR_VERSION, offsets=SPLIT_OFFSETS, **counts)
        (tmp / "mtlkit_scenes.json").write_text(json.dumps(params, indent=1))
        log.info("rendered %d scenes (%dpx) into %s in %.1fs", sum(counts.values()), size, final,
                 time.perf_counter() - t0)

    return _atomic_dir(final, write)


def load_scenes_tensors(path: str | os.PathLike, split: str) -> dict[str, torch.Tensor]:
    """One split of a materialised scenes folder as tensors in storage layout (compact dtypes)."""
    from datasets import load_from_disk

    with _quiet_datasets():
        ds = load_from_disk(str(Path(path) / split))
    table = ds.data.table
    n = table.num_rows
    size = json.loads((Path(path) / "mtlkit_scenes.json").read_text())["size"]

    def col(name, *shape, channels_last=False):
        a = _arrow_to_numpy(table.column(name)).reshape(n, *shape)
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


class ScenesDataModule(_TensorDataModule):
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


# --- a user's local HF dataset -----------------------------------------------------------------

_VAL_NAMES = ("validation", "val", "valid", "dev")
_DENSE_KEYS = {"semseg": 0, "depth": 1, "normals": 3, "edges": 1}  # key -> channels (0: no channel axis)


def _open_local(path: Path) -> dict[str, Any]:
    """{split name: datasets.Dataset} from a save_to_disk folder or parquet/arrow files."""
    from datasets import Dataset, DatasetDict, load_from_disk
    from datasets.table import InMemoryTable

    if not path.exists():
        raise FileNotFoundError(f"hf_local: no dataset at {str(path)!r} (expected a save_to_disk folder, "
                                "or .parquet/.arrow files)")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        with _quiet_datasets():
            loaded = load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, DatasetDict) else {"train": loaded}
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path])
                   if p.suffix in (".parquet", ".arrow") and p.is_file())
    if not files:
        raise FileNotFoundError(f"hf_local: {str(path)!r} holds no save_to_disk dataset and no "
                                ".parquet/.arrow files")
    by_split: dict[str, list[pa.Table]] = {}
    for f in files:
        rel = str(f.relative_to(path)).lower() if path.is_dir() else f.name.lower()
        split = next((s for s in ("train", "test", *_VAL_NAMES) if s in rel), "train")
        by_split.setdefault(split, []).append(_read_table(f))
    return {s: Dataset(InMemoryTable(pa.concat_tables(ts))) for s, ts in by_split.items()}


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


def _decode_images(ds, column: str, size: int | None, label: bool) -> np.ndarray:
    """An ``Image`` column decoded with PIL (and resized when ``size`` is given) into one array."""
    from PIL import Image as PILImage

    out = []
    for batch in ds.select_columns([column]).iter(batch_size=256):
        for img in batch[column]:
            if not label:
                img = img.convert("RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), PILImage.NEAREST if label else PILImage.BILINEAR)
            out.append(np.asarray(img))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ValueError(f"hf_local: column {column!r} has images of several sizes {sorted(shapes)[:4]}; "
                         "pass image_size to resize them")
    return np.stack(out) if out else np.zeros((0,), np.uint8)


def _resize(x: torch.Tensor, size: int | None, nearest: bool) -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    if nearest:
        return F.interpolate(x.float(), size=(size, size), mode="nearest").to(x.dtype)
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else y


def _channels_first(a: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W, C) -> (N, C, H, W) when the trailing axis looks like channels; (N, H, W) -> (N, 1, H, W)."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim == 4 and a.shape[-1] == channels and a.shape[1] != channels:
        return a.transpose(0, 3, 1, 2)
    return a


class HFImageDataModule(_TensorDataModule):
    """Any local HF-format dataset with an image column: the real-data path.

    ``path``: a ``save_to_disk`` folder (DatasetDict or Dataset) or a folder/file of parquet or arrow
    files (the split is read from each file's path: train / validation|val|valid|dev / test; other
    files count as train). ``columns`` maps dataset columns to batch keys, e.g.
    ``{"label": "classification", "mask": "semseg"}``. Known keys get the batch layout in this module's
    docstring (dense ones resized with nearest neighbour); other keys keep their shape, ints as int64
    and floats as float32. Missing val/test splits are carved from train (``val_fraction``,
    ``test_fraction``, seeded). Class counts come from ``semseg_classes``/``classification_classes`` or
    are inferred from the labels (semseg ignores 255).
    """

    def __init__(self, path: str | os.PathLike, image_column: str = "image",
                 columns: Mapping[str, str] | None = None, image_size: int | None = None,
                 splits: Mapping[str, str] | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, seed: int = 0, batch_size: int = 32, num_workers: int = 0,
                 augment: bool = False, semseg_classes: int | None = None,
                 classification_classes: int | None = None):
        super().__init__(batch_size=batch_size, num_workers=num_workers, augment=augment)
        self.save_hyperparameters()
        self.path = Path(os.path.expanduser(str(path)))
        self.image_column = image_column
        self.columns = dict(columns or {})
        self.image_size = image_size
        self.splits = dict(splits or {})
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self._classes = {"semseg_classes": semseg_classes, "classification_classes": classification_classes}

    @property
    def info(self) -> dict[str, Any]:
        self.setup()
        info: dict[str, Any] = {"image_size": int(self._data["train"].tensors["image"].shape[-1])}
        for name, key in (("semseg_classes", "semseg"), ("classification_classes", "classification")):
            if self._classes[name] is not None:
                info[name] = self._classes[name]
            elif key in self.columns.values():
                labels = torch.cat([d.tensors[key].flatten() for d in self._data.values()])
                labels = labels[labels != 255] if key == "semseg" else labels
                info[name] = int(labels.max()) + 1 if labels.numel() else 0
        if "regression" in self.columns.values():
            info["regression_dims"] = int(self._data["train"].tensors["regression"].shape[1])
        return info

    def _convert(self, ds) -> dict[str, torch.Tensor]:
        from datasets import Image

        missing = [c for c in (self.image_column, *self.columns) if c not in ds.column_names]
        if missing:
            raise KeyError(f"hf_local: {str(self.path)!r} has no column(s) {missing}; "
                           f"columns: {', '.join(ds.column_names)}")
        table = ds.data.table

        def raw(column: str, label: bool) -> np.ndarray:
            if isinstance(ds.features[column], Image):
                return _decode_images(ds, column, self.image_size, label)
            return _arrow_to_numpy(table.column(column))

        img = raw(self.image_column, label=False)
        if img.ndim == 3:  # grayscale arrays
            img = np.repeat(img[..., None], 3, -1)
        img = _channels_first(img, 3)
        if img.shape[1] == 1:
            img = np.repeat(img, 3, 1)
        if img.dtype != np.uint8:
            scale = 255.0 if np.issubdtype(img.dtype, np.floating) and img.size and img.max() <= 1.0 else 1.0
            img = np.clip(np.round(img * scale), 0, 255).astype(np.uint8)
        image = _resize(torch.from_numpy(np.ascontiguousarray(img)), self.image_size, nearest=False)
        out = {"image": image}
        for column, key in self.columns.items():
            a = raw(column, label=True)
            integer = np.issubdtype(a.dtype, np.integer) or a.dtype == bool
            if key in _DENSE_KEYS:
                ch = _DENSE_KEYS[key]
                t = torch.from_numpy(np.ascontiguousarray(_channels_first(a, max(ch, 1))))
                t = _resize(t, self.image_size, nearest=True)
                if key == "semseg":
                    t = t[:, 0] if t.ndim == 4 else t
                    out[key] = t.to(torch.int64)
                elif key == "normals" and t.dtype == torch.uint8:
                    # the usual 8-bit PNG encoding maps [-1, 1] to 0..255
                    out[key] = F.normalize(t.to(torch.float32) / 127.5 - 1, dim=1)
                else:
                    out[key] = t.to(torch.float32)
            elif key == "classification":
                out[key] = torch.from_numpy(a.astype(np.int64)).view(-1)
            elif key == "regression":
                t = torch.from_numpy(a.astype(np.float32))
                out[key] = t.view(len(t), -1)
            else:
                out[key] = torch.from_numpy(a.astype(np.int64 if integer else np.float32))
        return out

    def _load(self) -> dict[str, TensorDictDataset]:
        available = _open_local(self.path)
        chosen: dict[str, Any] = {}
        for split in SPLITS:
            name = self.splits.get(split)
            if name is None:
                candidates = ("train",) if split == "train" else _VAL_NAMES if split == "val" else ("test",)
                name = next((c for c in candidates if c in available), None)
            elif name not in available:
                raise KeyError(f"hf_local: {str(self.path)!r} has no split {name!r}; "
                               f"splits: {', '.join(sorted(available))}")
            if name is not None:
                chosen[split] = available[name]
        if "train" not in chosen:
            raise KeyError(f"hf_local: {str(self.path)!r} has no train split; splits: "
                           f"{', '.join(sorted(available))} (map one with splits={{'train': ...}})")
        tensors = {sp: self._convert(ds) for sp, ds in chosen.items()}
        carve = [sp for sp, frac in (("val", self.val_fraction), ("test", self.test_fraction)) if sp not in tensors]
        if carve:
            train = tensors["train"]
            n = len(train["image"])
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            lo = 0
            for sp in carve:
                frac = self.val_fraction if sp == "val" else self.test_fraction
                k = max(1, int(round(n * frac)))
                tensors[sp] = {key: v[perm[lo : lo + k]] for key, v in train.items()}
                lo += k
            if lo >= n:
                raise ValueError(f"hf_local: {n} training rows are too few to carve {carve} from")
            tensors["train"] = {key: v[perm[lo:]] for key, v in train.items()}
            log.info("hf_local: carved %s from the train split of %s", carve, self.path)
        return {sp: TensorDictDataset(t) for sp, t in tensors.items()}
