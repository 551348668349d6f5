"""NYUv2 and Cityscapes in the preprocessed ``.npy`` layout of MTAN and LibMTL (docs/data.md):

    <root>/{train,val}/image/<i>.npy    (H, W, 3) float in [0, 1]
    <root>/{train,val}/label/<i>.npy    (H, W) class ids, −1 = ignored
    <root>/{train,val}/depth/<i>.npy    (H, W, 1) (or (H, W)), 0 = invalid
    <root>/{train,val}/normal/<i>.npy   (H, W, 3), all-zero = invalid (NYUv2 only)

read once into memory in the batch layout of mtl/data/memory.py: −1 labels become the semseg task's
``ignore_index`` 255, and depth/normals keep 0 as their invalid mark. The ``val`` folder is the
benchmark's test set (NYUv2's 654 images, Cityscapes' 500); as in MTAN and LibMTL it also serves as
the validation split unless ``val_fraction`` carves one from train.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mtl.atomic import user_path
from mtl.data.memory import TensorDataModule, TensorDictDataset
from mtl.registry import is_integral

log = logging.getLogger(__name__)

IGNORE = 255  # SemSegTask's default ignore_index
_CAST = {"semseg": torch.int64}
#: batch key -> folder name in the npy layout
TARGET_DIRS = {"semseg": "label", "depth": "depth", "normals": "normal"}


def resolve_size(size: int | list[int] | tuple[int, int] | None, stored: tuple[int, int]) -> tuple[int, int]:
    """``None``: the stored (H, W); ``[H, W]``: that; an int: that height, the width keeping the aspect."""
    if size is None:
        return stored
    size = check_size(size)
    if isinstance(size, int):
        return size, max(1, round(size * stored[1] / stored[0]))
    return size


def check_size(size: Any, an_int: str = "the height, aspect kept") -> int | tuple[int, int] | None:
    """``data.size`` as null, a positive int or ``[H, W]`` of positive ints; anything else is named
    (``an_int``: what an int means to the caller, for the message)."""
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if size is None or ok(size):
        return size
    if not isinstance(size, (str, bytes)) and hasattr(size, "__len__") and len(size) == 2 and all(ok(v) for v in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"data.size must be null (as stored), a positive int ({an_int}) or [H, W] "
                     f"of positive ints, got {size!r}")


def resize_sample(sample: dict[str, torch.Tensor], hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Resize one sample's (C, H, W) / (H, W) tensors: bilinear for the image, nearest for targets
    (labels must stay class ids, and averaging depth or normals would blend in the invalid zeros).
    Targets take the source pixel under each output pixel's centre ("nearest-exact", as PIL's
    nearest), the point the bilinear image is centred on; plain "nearest" samples half a pixel left/up."""
    out = {}
    for key, t in sample.items():
        if tuple(t.shape[-2:]) == hw:
            out[key] = t
            continue
        x = t[None, None] if t.ndim == 2 else t[None]
        if key == "image":
            y = F.interpolate(x.float(), size=hw, mode="bilinear", antialias=True, align_corners=False)
            y = y.round().clamp(0, 255).to(t.dtype)
        else:
            y = F.interpolate(x.float(), size=hw, mode="nearest-exact").to(t.dtype)
        out[key] = y[0, 0] if t.ndim == 2 else y[0]
    return out


def check_dtype(a: np.ndarray, kinds: str, what: str, expected: str, where: str) -> None:
    """Refuse an array whose numpy dtype kind is not in `kinds`: a cast would drop or garble complex values,
    strings and objects (complex loses its imaginary part with only a numpy warning)."""
    if a.dtype.kind not in kinds:
        raise ValueError(f"{where}: {what} of dtype {a.dtype}; expected {expected}")


def image_to_uint8(a: np.ndarray, where: str) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] (or uint8, or bool: 0/255) -> uint8 (3, H, W)."""
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"{where}: expected an image of shape (H, W, 3), got {a.shape}")
    if a.dtype == np.bool_:  # True is full intensity, as a float 1.0 and PIL's 1-bit images (hf_local alike)
        a = a.astype(np.uint8) * 255
    if a.dtype.kind in "iu" and a.dtype != np.uint8:  # integers: 0-255 only, never rescaled or clipped
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: {a.dtype} image values span {lo}..{hi}; expected 0-255 (or floats in [0, 1])")
        a = a.astype(np.uint8)
    check_dtype(a, "uf", "image", "uint8 0-255 or floats in [0, 1]", where)
    if a.dtype != np.uint8:
        if not np.isfinite(a).all():  # NaN would cast to 0 (black) without a word
            raise ValueError(f"{where}: image holds NaN or infinite values; expected floats in [0, 1] (or uint8 0-255)")
        top = float(np.nanmax(a)) if a.size else 0.0
        if top > 1.0 + 1e-6:  # 0-255 floats would all clip to white
            raise ValueError(f"{where}: float image values reach {top:g}; expected [0, 1] (or store uint8 0-255)")
        low = float(np.nanmin(a)) if a.size else 0.0
        if low < -1e-6:  # e.g. mean/std-normalised or [-1, 1] images: the negatives would clip to black
            raise ValueError(f"{where}: float image values go down to {low:g}; expected [0, 1] (not normalised)")
        a = np.clip(np.round(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def _outside(where: str, label: object, num_classes: int) -> ValueError:
    return ValueError(f"{where}: label {label} is outside 0..{num_classes - 1} "
                      f"(num_classes={num_classes}; −1 marks ignored pixels)")


def labels_to_uint8(a: np.ndarray, num_classes: int, where: str) -> torch.Tensor:
    """(H, W) ids with −1 (or 255) = ignored -> uint8 (H, W) with IGNORE; out-of-range ids raise."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"{where}: expected labels of shape (H, W), got {a.shape}")
    ids = whole_ids(a, where, lambda label: _outside(where, label, num_classes))
    ids[(ids == -1) | (ids == IGNORE)] = IGNORE
    bad = (ids != IGNORE) & ((ids < 0) | (ids >= num_classes))
    if bad.any():
        raise _outside(where, int(ids[bad][0]), num_classes)
    return torch.from_numpy(ids.astype(np.uint8))


def whole_ids(a: np.ndarray, where: str, outside: Callable[[object], ValueError]) -> np.ndarray:
    """Label ids as int64, refusing what the cast would change: non-numbers, NaN, fractions (nothing is rounded) and
    ids it would wrap (``outside(id)`` names them, in the caller's range)."""
    check_dtype(a, "biuf", "labels", "integer class ids", where)
    if np.issubdtype(a.dtype, np.floating):  # class ids stored as floats: whole numbers only, nothing rounded
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: labels hold NaN or infinite values; expected integer class ids "
                             "(−1 marks ignored pixels)")
        frac = a[a != np.round(a)]
        if frac.size:
            raise ValueError(f"{where}: label {float(frac[0]):g} is not a whole number; expected integer class ids")
        huge = a[np.abs(a) > 2**31]  # would wrap in the int64 cast and be named as another number
        if huge.size:
            raise outside(f"{float(huge[0]):g}")
    elif a.dtype.kind == "u" and a.dtype.itemsize >= 8:  # ids from 2**63 would wrap in the cast (2**64 - 1 to −1)
        huge = a[a > 2**31]
        if huge.size:
            raise outside(int(huge[0]))
    return a.astype(np.int64)


def dense_to_float(a: np.ndarray, channels: int, where: str) -> torch.Tensor:
    """(H, W, C) (or (H, W) for one channel) -> float32 (C, H, W); non-finite values become 0 (invalid)."""
    if a.ndim == 2 and channels == 1:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] != channels:
        raise ValueError(f"{where}: expected shape (H, W, {channels}), got {a.shape}")
    check_dtype(a, "biuf", "depth" if channels == 1 else "normals", "floats (or integers)", where)
    a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def warn_integer_depth(a: np.ndarray, where: str) -> bool:
    """Integer depth above 1000 is most likely millimetres (raw NYUv2 / Kinect PNGs) about to be read as metres:
    1000x off, with no error anywhere else. Warns (the wording every depth loader shares); True when it did."""
    if a.dtype.kind not in "iu" or not a.size or a.max() <= 1000:
        return False
    log.warning("%s: depth stored as %s integers up to %d is used as it is; if these are millimetres, divide by "
                "1000 first (depth is compared in the stored unit)", where, a.dtype, int(a.max()))
    return True


def read_depth(a: np.ndarray, where: str, depth_unit: DepthUnitCheck, negative: list[str]) -> torch.Tensor:
    """(H, W[, 1]) depth as float32 (1, H, W), as every benchmark loader reads it: integer millimetres warned about
    (``depth_unit``), ``where`` added to ``negative`` when it holds negative values (`warn_negative_depth`)."""
    depth_unit(a, where)
    t = dense_to_float(a, 1, where)
    if (t < 0).any():
        negative.append(where)
    return t


def warn_negative_depth(negative: list[str], source: object) -> None:
    if negative:  # the depth task's mask (target > 0) drops them, as 0; say so rather than train on less unseen
        log.warning("%d depth map(s) of %s hold negative values (first: %s); they count as invalid pixels, as 0",
                    len(negative), source, negative[0])


class DepthUnitCheck:
    """`warn_integer_depth` once per dataset: its splits store depth alike, so the train split's warning says it
    (the val and test splits repeated it word for word)."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, a: np.ndarray, where: str) -> None:
        if not self.warned:
            self.warned = warn_integer_depth(a, where)


class FirstImage:
    """The first image read of a dataset, over all its splits: with ``data.size`` null every other image needs its
    stored size, with an int its aspect, so a val or test split cannot come out at another shape than train."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.stored: tuple[int, int] | None = None
        self.hw: tuple[int, int] | None = None  # the size every image is resized to

    def __call__(self, path: Path, stored: tuple[int, int], size: Any) -> tuple[int, int]:
        """The (H, W) the image at ``path`` (stored at ``stored``) is resized to; another size or aspect is named."""
        own = resolve_size(size, stored)
        if self.hw is None:
            self.path, self.stored, self.hw = path, stored, own
        elif size is None and stored != self.stored:
            raise ValueError(f"{path}: size {stored} differs from {self.stored} of the first image {self.path}; "
                             "pass data.size to resize them all")
        elif own != self.hw:  # an int keeps each image's aspect: another aspect would be stretched
            raise ValueError(f"{path}: size {stored} has another aspect than {self.stored} of the first image "
                             f"{self.path} (data.size={size} gives {own}, not {self.hw}); pass data.size=[H, W] to "
                             "resize every image to one shape")
        return self.hw


def check_unit_normals(t: torch.Tensor, where: str) -> None:
    """(3, H, W) or (N, 3, H, W) normals: unit vectors, all-zero = invalid. Half of the valid ones off
    unit length by more than 0.01 means another encoding (e.g. (n + 1) / 2 in [0, 1], or 0-255); a few
    off pixels, as bilinear resizing leaves at creases, pass."""
    length = t.norm(dim=-3)
    length = length[length > 0]
    off = float((length - 1).abs().median()) if length.numel() else 0.0
    if off > 1e-2:
        raise ValueError(f"{where}: half the normals are off unit length by {off:.3g} or more (median length "
                         f"{float(length.median()):.3g}); expected unit vectors, all-zero = invalid, not an image "
                         "encoding such as (n + 1) / 2 or 0-255")


def check_target_size(t: torch.Tensor, image: torch.Tensor, where: str) -> None:
    """A target stored at another size than its image (half size, or transposed) is refused: resizing it to the
    image's would misalign every pixel without a word."""
    if tuple(t.shape[-2:]) != tuple(image.shape[-2:]):
        raise ValueError(f"{where}: size {tuple(t.shape[-2:])} differs from its image's {tuple(image.shape[-2:])}")


def stack_samples(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not samples:
        raise ValueError("no samples to stack")
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _indexed_files(folder: Path) -> dict[int, Path]:
    """The ``<i>.npy`` files in ``folder`` by index, in numeric order (``0007.npy`` is index 7)."""
    files: dict[int, Path] = {}
    for p in sorted(folder.glob("*.npy")):
        if p.name.startswith("."):  # hidden side-files (macOS "._0.npy" on copied drives) are no samples
            continue
        if not (p.stem.isascii() and p.stem.isdigit()):  # "2 (copy).npy", "img_3.npy": not skipped unseen
            raise ValueError(f"{p}: not named <i>.npy with an integer index (the layout's file names); "
                             "rename it or move it out of the folder")
        if (i := int(p.stem)) in files:
            raise ValueError(f"{folder}: {files[i].name} and {p.name} are both index {i}; keep one")
        files[i] = p
    return dict(sorted(files.items()))


def read_npy_split(split_dir: Path, dirs: dict[str, str], num_classes: int, limit: int | None,
                   size: int | list[int] | None, depth_unit: DepthUnitCheck | None = None,
                   first: FirstImage | None = None) -> dict[str, torch.Tensor]:
    """One split folder of the npy layout as tensors; ``dirs`` maps batch keys to folder names. ``depth_unit`` and
    ``first``: the dataset's, shared by its splits (default: this split's own)."""
    depth_unit, first = depth_unit or DepthUnitCheck(), first or FirstImage()
    for name in ("image", *dirs.values()):
        if not (split_dir / name).is_dir():
            raise FileNotFoundError(f"expected the folder {split_dir / name} (layout <root>/{{train,val}}/"
                                    f"{{{','.join(('image', *dirs.values()))}}}/<i>.npy; see docs/data.md)")
    images = _indexed_files(split_dir / "image")
    if not images:
        raise FileNotFoundError(f"expected files {split_dir / 'image'}/<i>.npy (0.npy, 1.npy, ...); found none")
    targets = {name: _indexed_files(split_dir / name) for name in dirs.values()}
    for name, files in targets.items():
        orphans = sorted(set(files) - set(images))
        if orphans:
            raise ValueError(f"{files[orphans[0]]} has no image ({split_dir / 'image'} has no index "
                             f"{orphans[0]}; {len(orphans)} such file(s))")
    ids = list(images)[:limit] if limit is not None else list(images)
    samples, negative = [], []
    for i in ids:
        sample = {}
        for key, name in (("image", "image"), *dirs.items()):
            f = images[i] if key == "image" else targets[name].get(i)
            if f is None:
                raise FileNotFoundError(f"expected the file {split_dir / name / images[i].name} "
                                        f"(every image needs its {name})")
            try:
                a = np.load(f, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                why = ("not an .npy file, or one holding Python objects, which are never unpickled"
                       if "pickle" in str(e) else str(e).splitlines()[0] if str(e) else type(e).__name__)
                raise ValueError(f"{f}: not a plain numeric .npy array ({why})") from None
            if key == "image":
                sample[key] = image_to_uint8(a, str(f))
            elif key == "semseg":
                sample[key] = labels_to_uint8(a, num_classes, str(f))
            elif key == "depth":
                sample[key] = read_depth(a, str(f), depth_unit, negative)
            else:
                sample[key] = dense_to_float(a, 3, str(f))
                check_unit_normals(sample[key], str(f))
            check_target_size(sample[key], sample["image"], str(f))
        samples.append(resize_sample(sample, first(images[i], tuple(sample["image"].shape[-2:]), size)))
    warn_negative_depth(negative, split_dir)
    return stack_samples(samples)


def _check_root_exists(benchmark: str, root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(f"{benchmark}: data.root {str(root)!r} does not exist "
                                f"(expected {root / 'train' / 'image'}/<i>.npy; see docs/data.md)")


class DenseBenchmarkDataModule(TensorDataModule):
    """Shared splitting and limits of the dense benchmarks; subclasses read their splits in ``_read``.

    ``size``: null keeps the stored size, ``[H, W]`` resizes, an int sets the height and keeps the aspect
    (bilinear for images, nearest for targets). ``n_train``/``n_val``/``n_test``: use only the first n
    samples of a split (null: all). ``val_fraction`` > 0 carves a seeded validation split out of train;
    at 0 the benchmark's test set also picks the checkpoint, as MTAN and LibMTL do. A subclass's ``__init__`` runs
    its ``check_settings`` first, the check `mtl.data.check_datamodule` runs before a run folder.
    """

    benchmark: ClassVar[str] = ""

    def __init__(self, root: str | os.PathLike, num_classes: int, size: Any = None,
                 n_train: int | None = None, n_val: int | None = None, n_test: int | None = None,
                 val_fraction: float = 0.0, seed: int = 0, batch_size: int = 8, num_workers: int = 0,
                 augment: bool = False):
        super().__init__(batch_size=batch_size, num_workers=num_workers, augment=augment)
        self.root = user_path(str(root))
        self.num_classes = int(num_classes)
        self.size = check_size(size)  # [H, W] as a tuple
        self.limits = {"train": n_train, "val": n_val, "test": n_test}
        self.val_fraction, self.seed = float(val_fraction), seed
        self._depth_unit, self._first_image = DepthUnitCheck(), FirstImage()

    @property
    def val_is_test(self) -> bool:
        return self.val_fraction == 0  # `_load` serves the test set as val

    def source(self) -> str:
        return f"{self.benchmark} ({self.root})"

    @property
    def info(self) -> dict[str, Any]:
        self.setup()
        return {"semseg_classes": self.num_classes, "semseg_ignore_index": IGNORE,
                "image_size": list(self._data["train"].tensors["image"].shape[-2:]),
                "targets": sorted(k for k in self._data["train"].tensors if k != "image")}

    def _read(self, split: str, limit: int | None) -> dict[str, torch.Tensor]:
        """``split`` is "train" or "test" (the benchmark's own two splits)."""
        raise TypeError(f"{type(self).__name__} must implement _read")

    @classmethod
    def check_settings(cls, root: str | os.PathLike | None = None, num_classes: Any = None, size: Any = None,
                       n_train: Any = None, n_val: Any = None, n_test: Any = None, val_fraction: Any = 0.0,
                       **_: Any) -> None:
        """What the settings alone decide, cheaply (`mtl.data.check_datamodule`, before a run folder, and
        ``__init__``): the class count (None: the class's default), size, limits and val_fraction, then that the root
        folder exists and is not the original release (`_check_layout`; its files are read with the data)."""
        if num_classes is not None and not (is_integral(num_classes) and 1 <= num_classes < IGNORE):  # uint8, 255 ignored
            raise ValueError(f"{cls.benchmark}: data.num_classes must be in 1..{IGNORE - 1} (255 marks ignored "
                             f"pixels), got {num_classes!r}")
        check_size(size)
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):  # 0: an empty split with no name
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"{cls.benchmark}: n_{split} must be a positive int or null (all), got {n!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"{cls.benchmark}: val_fraction must be in [0, 1), got {val_fraction}")
        if root is not None:
            cls._check_layout(user_path(str(root)))

    @classmethod
    def _check_layout(cls, root: Path) -> None:
        _check_root_exists(cls.benchmark, root)
        raw = [d for d in ("leftImg8bit", "gtFine") if (root / d).exists()]
        if raw and not (root / "train").is_dir():  # the original release, not the preprocessed one
            raise FileNotFoundError(f"{cls.benchmark}: data.root {str(root)!r} holds {raw[0]} (the original "
                                    f"release) but no train/ folder; this loader reads the preprocessed npy "
                                    f"release (<root>/{{train,val}}/image/<i>.npy; see docs/data.md)")

    def _check_root(self) -> None:
        self.check_settings(self.root)

    def _load(self) -> dict[str, TensorDictDataset]:
        self._check_root()
        train = self._read("train", self.limits["train"])
        test = self._read("test", self.limits["test"])
        if self.val_fraction > 0:
            n = len(train["image"])
            k = max(1, int(round(n * self.val_fraction)))
            if k >= n:
                raise ValueError(f"{self.benchmark}: {n} training samples are too few for val_fraction={self.val_fraction}")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            val = {key: v[perm[:k]] for key, v in train.items()}
            train = {key: v[perm[k:]] for key, v in train.items()}
        else:
            val = test
        if self.limits["val"] is not None:
            val = {key: v[: self.limits["val"]] for key, v in val.items()}
        return {sp: TensorDictDataset(t, cast=_CAST) for sp, t in (("train", train), ("val", val), ("test", test))}


class CityscapesDataModule(DenseBenchmarkDataModule):
    """Cityscapes in the MTAN/LibMTL npy layout: semseg (7 classes, or 19 from ``label_19/``) and depth.

    Labels come from ``label_7/`` when present, else ``label/`` (7 classes); ``num_classes=19`` reads
    ``label_19/`` (MTAN's release ships it; LibMTL's has 7 classes only). The depth folder holds
    MTAN's inverse-depth (disparity-like) maps, 0 = invalid.
    """

    benchmark = "cityscapes"

    def __init__(self, root: str | os.PathLike, num_classes: int = 7, **kwargs: Any):
        self.check_settings(root, num_classes, **kwargs)
        super().__init__(root, num_classes=num_classes, **kwargs)
        self.save_hyperparameters()

    @classmethod
    def check_settings(cls, root: str | os.PathLike | None = None, num_classes: Any = None, **kwargs: Any) -> None:
        """As the benchmarks' (`DenseBenchmarkDataModule.check_settings`), with 7 or 19 classes only."""
        if num_classes is not None and num_classes not in (7, 19):
            raise ValueError(f"cityscapes: num_classes must be 7 or 19, got {num_classes}")
        super().check_settings(root, num_classes, **kwargs)

    def _read(self, split: str, limit: int | None) -> dict[str, torch.Tensor]:
        split_dir = self.root / ("train" if split == "train" else "val")
        label = f"label_{self.num_classes}"
        if self.num_classes == 7 and not (split_dir / label).is_dir():
            label = "label"
            if not (split_dir / label).is_dir():  # name both folders a 7-class release may use
                raise FileNotFoundError(f"cityscapes: {split_dir} has neither label_7/ nor label/ (7-class semseg "
                                        f"labels; num_classes=19 reads label_19/)")
        return read_npy_split(split_dir, {"semseg": label, "depth": "depth"}, self.num_classes, limit, self.size,
                              self._depth_unit, self._first_image)


def _nyu_format(root: Path, format: str) -> str:
    """``format: auto`` reads a ``.mat`` root as the labelled release, anything else as the npy layout."""
    return ("mat" if root.suffix == ".mat" else "npy") if format == "auto" else format


def _check_mat_file(root: Path) -> None:
    if not root.is_file():
        raise FileNotFoundError(f"nyuv2: expected the labelled release file {str(root)!r} "
                                "(nyu_depth_v2_labeled.mat; see docs/data.md)")


class NYUv2DataModule(DenseBenchmarkDataModule):
    """NYUv2: 13-class semseg, depth (metres) and surface normals.

    ``root`` is a folder in the MTAN/LibMTL npy layout, or the labelled release
    ``nyu_depth_v2_labeled.mat`` (``format: mat``; needs ``splits_file`` and ``class_mapping``,
    see mtl/data/nyu_mat.py; it has no normals, so train it with ``task=[bench_semseg,bench_depth]``).
    """

    benchmark = "nyuv2"

    def __init__(self, root: str | os.PathLike, num_classes: int = 13, format: str = "auto",
                 splits_file: str | os.PathLike | None = None,
                 class_mapping: str | os.PathLike | list[str | os.PathLike] | list[int] | None = None,
                 **kwargs: Any):
        self.check_settings(root, format, splits_file, class_mapping, num_classes, **kwargs)
        super().__init__(root, num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        self.format = _nyu_format(self.root, format)
        self.splits_file, self.class_mapping = splits_file, class_mapping

    @classmethod
    def check_settings(cls, root: str | os.PathLike | None = None, format: str = "auto", splits_file: Any = None,
                       class_mapping: Any = None, num_classes: int = 13, **kwargs: Any) -> None:
        """As the benchmarks' (`DenseBenchmarkDataModule.check_settings`): the labelled release is one file, read with
        ``splits_file`` and ``class_mapping`` (both set, their files there: `check_mat_inputs`); the npy layout takes
        neither, and a folder holding the .mat but no train/ is the .mat given the wrong way."""
        if format not in ("auto", "npy", "mat"):
            raise ValueError(f"nyuv2: format must be auto, npy or mat, got {format!r}")
        super().check_settings(None, num_classes, **kwargs)  # the root: below, as the format reads it
        if root is None:
            return
        root = user_path(str(root))
        if _nyu_format(root, format) == "mat":
            from mtl.data.nyu_mat import check_mat_inputs

            _check_mat_file(root)
            check_mat_inputs(splits_file, class_mapping)
        elif _nyu_format(root, format) == "npy":
            mat = root / "nyu_depth_v2_labeled.mat"
            if mat.is_file() and not (root / "train").is_dir():
                raise FileNotFoundError(f"nyuv2: data.root {str(root)!r} holds nyu_depth_v2_labeled.mat but no train/ "
                                        f"folder; to read the .mat, point data.root at the file ({mat}) and set "
                                        "data.splits_file and data.class_mapping; else give the preprocessed npy "
                                        "release (<root>/{train,val}/image/<i>.npy); see docs/data.md")
            given = [k for k, v in (("splits_file", splits_file), ("class_mapping", class_mapping)) if v is not None]
            if given:  # the npy release is split and mapped already
                raise ValueError(f"nyuv2: data.{given[0]} is read only with the labelled .mat release (data.root "
                                 f"{str(root)!r} reads as the npy layout, already split and mapped to {num_classes} "
                                 "classes); drop it, or point data.root at nyu_depth_v2_labeled.mat")
            cls._check_layout(root)

    def _check_root(self) -> None:
        self.check_settings(self.root, self.format, self.splits_file, self.class_mapping, self.num_classes)

    def _read(self, split: str, limit: int | None) -> dict[str, torch.Tensor]:
        if self.format == "mat":
            from mtl.data.nyu_mat import read_nyu_mat

            return read_nyu_mat(self.root, split, self.splits_file, self.class_mapping, self.num_classes,
                                limit, self.size, self._depth_unit)
        split_dir = self.root / ("train" if split == "train" else "val")
        return read_npy_split(split_dir, TARGET_DIRS, self.num_classes, limit, self.size, self._depth_unit,
                              self._first_image)
