"""Small numpy image toolkit for the zoo generators.

Images are float32 arrays in [0, 1], (H, W) or (H, W, C). Geometry uses pixel centres at integer
coordinates and 3x3 matrices acting on (x, y, 1) column vectors; `warp` takes the *inverse* map
(output pixel -> source coordinate), so any affine or projective transform is one call.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np


# ---------------------------------------------------------------------------------------------
# geometry
def translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def rotate(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def scale(sx: float, sy: float | None = None) -> np.ndarray:
    return np.diag([sx, sx if sy is None else sy, 1.0])


def shear(k: float) -> np.ndarray:
    return np.array([[1.0, k, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def place(src_centre: tuple[float, float], dst_centre: tuple[float, float], *mats: np.ndarray) -> np.ndarray:
    """Forward map that moves `src_centre` to `dst_centre` after applying `mats` (leftmost last)."""
    m = translate(*dst_centre)
    for a in mats:
        m = m @ a
    return m @ translate(-src_centre[0], -src_centre[1])


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 projective map sending the 4 points `src` (4, 2) onto `dst` (4, 2)."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    h = np.linalg.solve(np.asarray(a, float), np.asarray(b, float))
    return np.append(h, 1.0).reshape(3, 3)


def warp(src: np.ndarray, fwd: np.ndarray, out_hw: tuple[int, int], ss: int = 1,
         border: str = "edge") -> np.ndarray:
    """Resample `src` under the forward map `fwd` (source -> output) with bilinear interpolation.

    `ss` > 1 samples an ss x ss sub-pixel grid and box-averages it: cheap anti-aliasing when the map
    shrinks the source. `border` is "edge" (clamp) or "zero" (transparent outside the source).
    """
    inv = np.linalg.inv(fwd)
    h, w = out_hw
    ys = (np.arange(h * ss, dtype=np.float64) + 0.5) / ss - 0.5
    xs = (np.arange(w * ss, dtype=np.float64) + 0.5) / ss - 0.5
    gx, gy = np.meshgrid(xs, ys)
    sx = inv[0, 0] * gx + inv[0, 1] * gy + inv[0, 2]
    sy = inv[1, 0] * gx + inv[1, 1] * gy + inv[1, 2]
    sw = inv[2, 0] * gx + inv[2, 1] * gy + inv[2, 2]
    if not np.allclose(inv[2], [0.0, 0.0, 1.0]):
        sw = np.where(np.abs(sw) < 1e-9, 1e-9, sw)
        sx, sy = sx / sw, sy / sw
    img = src
    if border == "zero":
        # one ring of zeros makes out-of-range samples fade to 0 instead of smearing the edge
        pad = ((1, 1), (1, 1)) + ((0, 0),) * (src.ndim - 2)
        img = np.pad(src, pad)
        sx, sy = sx + 1.0, sy + 1.0
    hh, ww = img.shape[:2]
    sx = np.clip(sx, 0.0, ww - 1.0)
    sy = np.clip(sy, 0.0, hh - 1.0)
    x0 = np.minimum(sx.astype(np.int64), ww - 2) if ww > 1 else np.zeros_like(sx, dtype=np.int64)
    y0 = np.minimum(sy.astype(np.int64), hh - 2) if hh > 1 else np.zeros_like(sy, dtype=np.int64)
    fx, fy = (sx - x0).astype(np.float32), (sy - y0).astype(np.float32)
    x1, y1 = np.minimum(x0 + 1, ww - 1), np.minimum(y0 + 1, hh - 1)
    if img.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    out = (top * (1 - fy) + bot * fy).astype(np.float32)
    if ss > 1:
        out = out.reshape(h, ss, w, ss, *out.shape[2:]).mean(axis=(1, 3))
    return out


def resize(img: np.ndarray, out_hw: tuple[int, int], ss: int = 1) -> np.ndarray:
    h, w = img.shape[:2]
    fwd = scale(out_hw[1] / w, out_hw[0] / h)
    # pixel-centre convention: align the outer edges, not the first/last centres
    fwd = translate(-0.5, -0.5) @ fwd @ translate(0.5, 0.5)
    return warp(img, fwd, out_hw, ss=ss)


def box_down(img: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return img
    h, w = img.shape[:2]
    return img.reshape(h // f, f, w // f, f, *img.shape[2:]).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------------
# photometric
def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.15:
        return img
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma * sigma)).astype(np.float32)
    k /= k.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect" if out.shape[axis] > r else "edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, kv in enumerate(k):
            acc += kv * np.take(p, np.arange(i, i + n), axis=axis)
        out = acc
    return out


def add_noise(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    return img + rng.normal(0.0, sigma, img.shape).astype(np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def hsv_colour(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.asarray(rgb, np.float32)


def random_colour(rng: np.random.Generator, sat=(0.3, 1.0), val=(0.2, 1.0)) -> np.ndarray:
    return hsv_colour(rng.random(), rng.uniform(*sat), rng.uniform(*val))


def luminance(c: np.ndarray) -> float | np.ndarray:
    return c[..., 0] * 0.299 + c[..., 1] * 0.587 + c[..., 2] * 0.114


def contrasting_colour(rng: np.random.Generator, against: float, min_diff: float = 0.3,
                       sat=(0.3, 1.0)) -> np.ndarray:
    """A random colour whose luminance differs from `against` by at least `min_diff` (when possible)."""
    for _ in range(24):
        c = random_colour(rng, sat=sat, val=(0.05, 1.0))
        if abs(float(luminance(c)) - against) >= min_diff:
            return c
    # fall back to black or white, whichever is further away
    return np.zeros(3, np.float32) if against > 0.5 else np.ones(3, np.float32)


def smooth_field(rng: np.random.Generator, hw: tuple[int, int], cells: int, channels: int = 1) -> np.ndarray:
    """Band-limited noise in [0, 1]: a random (cells+1)^2 grid upsampled bilinearly."""
    grid = rng.random((cells + 1, cells + 1, channels)).astype(np.float32)
    fwd = scale((hw[1] - 1) / cells, (hw[0] - 1) / cells)
    out = warp(grid, fwd, hw)
    return out[..., 0] if channels == 1 else out


# ---------------------------------------------------------------------------------------------
# patterns: each returns an (H, W) float32 array in [0, 1] (a 2-tone blend factor)
def pattern(kind: str, rng: np.random.Generator, hw: tuple[int, int], unit: float) -> np.ndarray:
    """Procedural pattern; `unit` is the output pixel size in the array's pixels (for frequencies)."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, math.pi)
    u = xx * math.cos(ang) + yy * math.sin(ang)
    v = -xx * math.sin(ang) + yy * math.cos(ang)
    if kind == "solid":
        return np.zeros(hw, np.float32)
    if kind == "stripes":
        period = rng.uniform(3.0, 6.0) * unit
        return (np.sin(2 * math.pi * u / period + rng.uniform(0, 6.3)) > 0).astype(np.float32)
    if kind == "checker":
        cell = rng.uniform(2.0, 4.0) * unit
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    if kind == "dots":
        period = rng.uniform(3.5, 6.0) * unit
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return (du * du + dv * dv < rng.uniform(0.05, 0.1)).astype(np.float32)
    if kind == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        return t.astype(np.float32)
    if kind == "speckle":
        g = rng.random((max(2, int(h / (1.5 * unit))), max(2, int(w / (1.5 * unit))))).astype(np.float32)
        return (resize(g, hw) > 0.5).astype(np.float32)
    raise ValueError(f"unknown pattern {kind!r}")


# ---------------------------------------------------------------------------------------------
# fonts: matplotlib ships TrueType fonts with every install, so glyphs need no download
LETTER_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf",
    "cmmi10.ttf", "cmsy10.ttf",
)
# cmmi10 has old-style (descending) figures and cmsy10 has no digits
DIGIT_FONTS = tuple(f for f in LETTER_FONTS if f not in ("cmmi10.ttf", "cmsy10.ttf"))


def font_path(name: str) -> str:
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"matplotlib font {name!r} not found at {path}")
    return path


class Glyph:
    """An anti-aliased glyph mask with its placement relative to the pen origin on the baseline."""

    __slots__ = ("mask", "x0", "y0", "advance")

    def __init__(self, mask: np.ndarray, x0: int, y0: int, advance: float):
        self.mask, self.x0, self.y0, self.advance = mask, x0, y0, advance

    @property
    def centre(self) -> tuple[float, float]:
        h, w = self.mask.shape
        return self.x0 + (w - 1) / 2.0, self.y0 + (h - 1) / 2.0


@functools.lru_cache(maxsize=4096)
def glyph(font: str, text: str, px: int) -> Glyph:
    from PIL import Image, ImageDraw, ImageFont

    f = ImageFont.truetype(font_path(font), px)
    canvas = 3 * px * max(1, len(text))
    ox, oy = px, 2 * px  # pen origin (left end of the baseline)
    im = Image.new("L", (canvas, 3 * px), 0)
    ImageDraw.Draw(im).text((ox, oy), text, fill=255, font=f, anchor="ls")
    a = np.asarray(im, np.float32) / 255.0
    rows, cols = np.flatnonzero(a.max(1) > 0), np.flatnonzero(a.max(0) > 0)
    if len(rows) == 0:
        raise ValueError(f"font {font!r} renders nothing for {text!r}")
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    m = a[y0:y1, x0:x1].copy()
    m.setflags(write=False)
    return Glyph(m, int(x0 - ox), int(y0 - oy), float(f.getlength(text)))


def paste_max(canvas: np.ndarray, mask: np.ndarray, x: int, y: int) -> None:
    """canvas = max(canvas, mask placed with its top-left at (x, y)), clipped to the canvas."""
    h, w = mask.shape
    ch, cw = canvas.shape
    xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + w, cw), min(y + h, ch)
    if xa >= xb or ya >= yb:
        return
    sub = mask[ya - y:yb - y, xa - x:xb - x]
    np.maximum(canvas[ya:yb, xa:xb], sub, out=canvas[ya:yb, xa:xb])


def composite(bg: np.ndarray, fg, alpha: np.ndarray) -> np.ndarray:
    """Alpha-blend colour/image `fg` over `bg` (H, W, 3) with an (H, W) alpha."""
    a = alpha[..., None]
    return bg * (1 - a) + np.asarray(fg, np.float32) * a
