"""Columns of an HF dataset decoded into the batch layout (mtl/data/memory.py): images to uint8 RGB, label maps
resized like their images and checked against them row by row, class ids (optionally remapped) checked."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from mtl.data.benchmarks import IGNORE  # SemSegTask's default ignore_index, the loaders' one mark


#: PIL modes of more than 8 bits per pixel
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


#: what PIL raises on a file it cannot open or decode (truncated, corrupt, missing)
_UNREADABLE = (OSError, SyntaxError, ValueError)
_BATCH = 256


def _batches(ds, column: str, where: str):
    """The column's rows, ``_BATCH`` at a time, decoded; a row that cannot be decoded is named."""
    rows = ds.select_columns([column]).iter(batch_size=_BATCH)
    start = 0
    while True:
        try:
            batch = next(rows)
        except StopIteration:
            return
        except _UNREADABLE as e:
            raise ValueError(_unreadable(ds, column, where, start, e)) from None
        start += len(batch[column])
        yield batch


def _unreadable(ds, column: str, where: str, start: int, error: Exception) -> str:
    """The first row from ``start`` on that PIL cannot decode, its file if it names one, and why; the hint about
    the working directory only for a relative path (datasets reads those from the cwd, not the dataset's folder)."""
    from datasets import Image
    from PIL import UnidentifiedImageError

    stop = min(start + _BATCH, len(ds))
    stored = ds.select_columns([column]).select(range(start, stop)).cast_column(column, Image(decode=False))
    row, value = f"rows {start}..{stop - 1}", {}
    for i, v in enumerate(stored[column]):  # the batch failed as a whole: decode its rows one by one
        try:
            Image().decode_example(v)
        except _UNREADABLE as e:
            row, value, error = f"row {start + i}", v, e
            break
    path = value.get("path") if value.get("bytes") is None else None
    why = "not an image file PIL can identify" if isinstance(error, UnidentifiedImageError) else \
        (error.strerror if isinstance(error, OSError) and error.strerror else str(error) or type(error).__name__)
    hint = (f"; relative paths are read from the working directory {os.getcwd()}: store the bytes or absolute "
            "paths") if path and not os.path.isabs(path) else ""
    return f"{where}: cannot read the image in {row}" + (f" (file {path})" if path else "") + f": {why}{hint}"


def decode_images(ds, column: str, size: tuple[int, int] | None, label: bool, where: str
                   ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """An ``Image`` column decoded with PIL into one array, and each row's size (H, W) as stored. With
    ``size`` = (H, W) images are resized by PIL (bilinear) and labels by ``_resize`` (the pixel under each
    output pixel's centre), so an ``Image`` label and a numeric one pick the same source pixels."""
    from PIL import Image as PILImage

    out, sizes = [], []
    for batch in _batches(ds, column, where):
        for img in batch[column]:
            if img is None:
                raise ValueError(f"{where} has no image in row {len(out)}; every row needs one")
            sizes.append((img.size[1], img.size[0]))  # PIL sizes are (W, H)
            if not label:  # 16-bit/32-bit/float images keep their values for rgb_uint8 to judge: PIL's "RGB"
                # conversion would clip 16-bit to white and truncate floats in [0, 1] to black, without a word
                img = img.convert(("F" if img.mode == "F" else "I") if img.mode in _WIDE_MODES else "RGB")
                if size is not None and img.size != (size[1], size[0]):
                    img = img.resize((size[1], size[0]), PILImage.BILINEAR)
                out.append(np.asarray(img))
                continue
            a = np.asarray(img)
            if size is not None and a.shape[:2] != size:
                t = torch.from_numpy(np.array(a))  # a writable copy
                t = resize(t[None, None] if a.ndim == 2 else t.permute(2, 0, 1)[None], size, nearest=True)[0]
                a = (t[0] if a.ndim == 2 else t.permute(1, 2, 0)).numpy()
            out.append(a)
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ValueError(f"hf_local: column {column!r} has images of several sizes {sorted(shapes)[:4]}; "
                         "pass size (data.size) to resize them")
    return (np.stack(out) if out else np.zeros((0,), np.uint8)), sizes


def resize(x: torch.Tensor, size: tuple[int, int] | None, nearest: bool) -> torch.Tensor:
    """Bilinear (antialiased) for images; for targets the pixel under each output pixel's centre
    ("nearest-exact"), so they stay aligned with the image."""
    if size is None or tuple(x.shape[-2:]) == size:
        return x
    if nearest:
        return F.interpolate(x.float(), size=size, mode="nearest-exact").to(x.dtype)
    y = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else y


def encoded_image(t: pa.DataType) -> bool:
    """A struct of ``bytes``/``path``: an HF ``Image`` column saved without the features metadata."""
    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} == {"bytes", "path"}


def check_channels(where: str, key: str, t: torch.Tensor, channels: int) -> None:
    """A dense target is an (H, W) map per row with its key's channel count (semseg: class ids, one channel).
    ``where`` names the column and split; ``t`` is the whole column, rows first."""
    want = max(channels, 1)
    if t.ndim < 3:  # (N,) or (N, k): a label or a vector per row, e.g. a class column mapped to semseg
        held = "one value" if t.ndim == 1 else f"a {t.shape[1]}-vector"
        raise ValueError(f"{where} holds {held} per row (shape {tuple(t.shape[1:])} per row), where {key} needs "
                         "an (H, W) map per row")
    if t.ndim != 4 or t.shape[1] != want:
        got = t.shape[1] if t.ndim == 4 and t.shape[1] <= 4 else t.shape[-1]  # channels-last when not moved
        raise ValueError(f"{where} has {got} channels per pixel (shape {tuple(t.shape[1:])} per row), {key} needs "
                         f"{want}" + (": class ids, not an RGB colour map" if key == "semseg" else ""))


def check_sizes(column: str, key: str, sizes: list[tuple[int, int]], image_sizes: list[tuple[int, int]],
                 split: str, resized: bool) -> None:
    """A dense target covers its image, row by row as stored (checked before any resizing). Once resized
    (data.size) a map at another resolution of the same view (e.g. half size) is fine; another shape
    (a transposed or EXIF-rotated mask, a crop) is not: resizing would train it misaligned."""
    for row, (got, want) in enumerate(zip(sizes, image_sizes)):
        if got == want:
            continue
        same_view = abs(got[0] / want[0] - got[1] / want[1]) * max(want) <= 1  # scales agree within a pixel
        if not (resized and same_view):
            fix = "set data.size to resize both, or fix the data" if same_view else \
                "its aspect differs (transposed or rotated?), so resizing cannot align them: fix the data"
            raise ValueError(f"hf_local: column {column!r} ({key}) of split {split!r} holds a {got} map for a "
                             f"{want} image in row {row}; {fix}")


def semseg_lookup(mapping: Mapping[Any, Any] | Sequence[Any] | None, classes: int | None = None) -> torch.Tensor | None:
    """``data.semseg_map`` as a lookup table raw id -> class id (IGNORE for 255 or −1; −2: not listed).
    A list maps raw id i to its i-th entry (e.g. Cityscapes' 34 labelIds to its 19 trainIds). Class ids lie in
    0..254, or 0..``classes``-1 but 255 when ``classes`` (semseg_classes) is over 255."""
    if mapping is None:
        return None
    items = list(mapping.items()) if isinstance(mapping, Mapping) else list(enumerate(mapping)) \
        if isinstance(mapping, Sequence) and not isinstance(mapping, (str, bytes)) else None
    if not items:
        raise ValueError(f"hf_local: data.semseg_map must be a non-empty {{raw id: class id}} mapping or list, got {mapping!r}")
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    top = classes - 1 if whole(classes) and classes > IGNORE else IGNORE - 1
    for raw, cls in items:
        if not (whole(raw) and 0 <= raw <= 65535 and whole(cls) and -1 <= cls <= max(top, IGNORE)):
            ids = f"0..{top} but 255 (semseg_classes={classes})" if top > IGNORE else "0..254"
            raise ValueError(f"hf_local: data.semseg_map maps {raw!r} to {cls!r}; raw ids are ints in 0..65535 "
                             f"and class ids ints in {ids}, or 255 / −1 to ignore that raw id")
    lut = torch.full((max(r for r, _ in items) + 1,), -2, dtype=torch.int64)
    for raw, cls in items:
        lut[raw] = IGNORE if cls in (-1, IGNORE) else cls
    return lut


def _remap(where: str, t: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Raw ids through ``lut``; raw −1 and 255 stay ignored unless the map lists 255."""
    keep = (t == -1) | ((t == IGNORE) & (len(lut) <= IGNORE or lut[IGNORE] == -2))
    raw = t[~keep]
    bad = (raw < 0) | (raw >= len(lut))
    if not bad.any():
        bad = lut[raw] == -2
    if bad.any():
        raise ValueError(f"{where} holds raw id {int(raw[bad][0])}, which data.semseg_map does not list; "
                         "list every raw id (map it to 255 to ignore it)")
    out = torch.full_like(t, IGNORE)
    out[~keep] = lut[raw]
    return out


def refuse_ignore_only_foreground(where: str, t: torch.Tensor, classes: int | None = None) -> None:
    """A training mask of only 0 and 255 (and −1) is a binary 0/255 mask: 255 is the ignore mark, so read as it is
    every labelled pixel is class 0 and there is one class to learn. With more than two classes declared it is
    rather a train split missing its other classes, and the 0/255 advice would turn its ignored pixels into a class."""
    labelled = t[(t != IGNORE) & (t != -1)]
    if labelled.numel() and bool((labelled == 0).all()) and bool((t == IGNORE).any()):
        found = f"{where} holds only 0 and 255, and 255 marks ignored pixels, so every labelled pixel is class 0"
        if classes is not None and classes > 2:
            raise ValueError(f"{found} although semseg_classes={classes}: no other class can be learned from it; "
                             "check the split (data.splits), or, for a binary 0/255 mask, set semseg_classes=2 and "
                             "data.semseg_map={0: 0, 255: 1}")
        raise ValueError(f"{found}: a binary 0/255 mask needs data.semseg_map={{0: 0, 255: 1}}")


def refuse_class_255(where: str, t: torch.Tensor, classes: int) -> None:
    """With ``semseg_classes`` > 255, id 255 is a class id in the data's range, yet it stays the ignore mark: its
    pixels would be neither learned nor scored, silently. Refused, naming the column and the count."""
    count = int((t == IGNORE).sum())
    if count:
        raise ValueError(f"{where} holds id 255 in {count} pixels, which semseg_classes={classes} makes a class id, "
                         "but 255 marks ignored pixels: move that class with data.semseg_map (listing every raw id, "
                         f"e.g. a list of 0..{classes - 1} with 255 replaced by {classes}, and "
                         f"semseg_classes={classes + 1}), or map 255 to 255 there to ignore it on purpose")


def class_ids(where: str, key: str, t: torch.Tensor, classes: int | None,
               lut: torch.Tensor | None = None) -> torch.Tensor:
    """Whole class ids in 0..classes-1 as int64; semseg's −1 becomes IGNORE (255 stays ignored), after
    ``lut`` (``semseg_lookup``) maps raw ids when given. ``where`` names the column and split. A
    classification −1 (an unlabelled row) is refused."""
    if t.is_floating_point() and (frac := t != t.round()).any():
        raise ValueError(f"{where} holds {t[frac][0].item():g}; {key} needs whole class ids")
    t = t.to(torch.int64)
    if key == "semseg" and lut is None and classes is not None and classes > IGNORE:
        refuse_class_255(where, t, classes)
    if lut is not None:
        t = _remap(where, t, lut)
    if key == "semseg":
        t = torch.where(t == -1, IGNORE, t)
    elif (t == -1).any():
        raise ValueError(f"{where} holds −1 in {int((t == -1).sum())} of {len(t)} rows (unlabelled, as in many "
                         "test splits); classification needs a class id in every row: drop those rows or map a "
                         "labelled split with data.splits")
    ids = t[t != IGNORE] if key == "semseg" else t
    if key == "semseg" and classes is None and (ids > IGNORE).any():  # e.g. a 16-bit mask with 65535 as ignore
        raise ValueError(f"{where} holds {int(ids[ids > IGNORE][0])}; semseg class ids lie in 0..254 (255 marks "
                         "ignored pixels): remap the labels, or set data.semseg_classes to say how many there are")
    bad = (ids < 0) | (ids >= classes) if classes is not None else ids < 0
    if bad.any():
        ignored = "; −1 and 255 mark ignored pixels" if key == "semseg" else ""
        limit = f"outside 0..{classes - 1} ({key}_classes={classes}{ignored})" if classes is not None else \
            f"below 0 (class ids start at 0{ignored})"
        raise ValueError(f"{where} holds {int(ids[bad][0])}, {limit}")
    return t


def rgb_uint8(img: np.ndarray, where: str) -> np.ndarray:
    """Images as (N, C, H, W) arrays (``channels_first``) -> (N, 3, H, W) uint8. One channel is repeated, an alpha
    channel dropped; floats in [0, 1] are scaled to 0..255, floats up to 255 read as 0..255. Anything else is
    refused, not clipped: normalised (negative) floats or 16-bit values would turn into black or white."""
    if img.ndim != 4 or img.shape[1] not in (1, 3, 4):
        raise ValueError(f"{where} has shape {img.shape[1:]} per image; images need (H, W), (H, W, C) or (C, H, W) "
                         "with C = 1 (grey), 3 (RGB) or 4 (RGBA)")
    img = np.repeat(img, 3, 1) if img.shape[1] == 1 else img[:, :3]
    if img.dtype == np.uint8 or not img.size:
        return img.astype(np.uint8)
    if img.dtype == bool:
        return img.astype(np.uint8) * 255
    lo, hi = img.min(), img.max()
    if np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all():
            raise ValueError(f"{where} holds NaN or infinite pixel values")
        if lo < 0:
            raise ValueError(f"{where} holds negative pixel values (min {lo:.3g}): it looks normalised "
                             "(mean/std); store 0..1 or 0..255 values, the model normalises its input itself")
        if hi > 255:
            raise ValueError(f"{where} holds pixel values up to {hi:.4g}; images are 0..1 or 0..255")
        return np.round(img * (255.0 if hi <= 1.0 else 1.0)).astype(np.uint8)
    if lo < 0 or hi > 255:
        raise ValueError(f"{where} holds {img.dtype} pixel values in {lo}..{hi}; images are 8-bit (0..255): "
                         "convert them first (e.g. 16-bit: multiply by 255/65535)")
    return img.astype(np.uint8)


def edge_map(where: str, t: torch.Tensor) -> torch.Tensor:
    """Edge targets as float 0/1 (or probabilities in [0, 1]); 8-bit masks stored as 0/255 read as 0/1."""
    f = t.to(torch.float32)
    if not torch.isfinite(f).all():
        raise ValueError(f"{where} holds NaN or infinite values; edges need 0/1 per pixel")
    if not t.is_floating_point() and f.max() > 1 and bool(((f == 0) | (f == 255)).all()):
        return f / 255
    if f.min() < 0 or f.max() > 1:
        raise ValueError(f"{where} holds values in {f.min().item():g}..{f.max().item():g}; edges need 1 = boundary, "
                         "0 = not (or probabilities in [0, 1]); 8-bit masks of 0/255 are read as 0/1")
    return f


#: batch key -> the dtype its batches carry when memory keeps a smaller one (``compact_labels``)
BATCH_DTYPES = {"semseg": torch.int64, "edges": torch.float32}


def compact_labels(key: str, t: torch.Tensor) -> torch.Tensor:
    """Label maps as the benchmark loaders keep them in memory: semseg ids (255 = ignored) and 0/1 edges as uint8,
    cast back per batch (``BATCH_DTYPES``); ids above 255 (semseg_classes > 255) and edge probabilities keep
    their type, which a uint8 would wrap or round."""
    if key == "semseg" and (not t.numel() or (int(t.min()) >= 0 and int(t.max()) <= IGNORE)):
        return t.to(torch.uint8)
    if key == "edges" and bool(((t == 0) | (t == 1)).all()):
        return t.to(torch.uint8)
    return t


def channels_first(a: np.ndarray, channels: tuple[int, ...], channels_last: bool | None, where: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); a 4-D array -> (N, C, H, W). ``channels_last`` is its layout: True for decoded
    ``Image`` columns (PIL gives (H, W, C)), ``data.channels_last`` for numeric ones. None reads it from the shape:
    the axis that holds one of ``channels`` values; a shape with such an axis at both ends (a 4x4 RGB image is
    also a 4x3 RGBA one) is refused rather than guessed, naming the column."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim != 4:
        return a
    if channels_last is None:
        first, last = a.shape[1] in channels, a.shape[-1] in channels
        if first and last:
            raise ValueError(f"{where} has shape {a.shape[1:]} per row, which reads both as (H, W, C) and as "
                             "(C, H, W); set data.channels_last=true (H, W, C) or false (C, H, W) to say which")
        channels_last = last
    return a.transpose(0, 3, 1, 2) if channels_last else a
