"""Procedural zoo datasets: letters, SVHN-like house numbers, GTSRB-like signs, and the pretraining set.

Everything is drawn from matplotlib's bundled fonts and numpy/PIL primitives, so these need no
optional package. Each split draws from its own random stream (see `rng_for`).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from mtl.data.zoo import _image as im
from mtl.data.zoo._base import SPLITS, ZooSpec, register, render_split, rng_for


def _procedural(name: str, k: int, render):
    """A build function that renders every split sample by sample."""
    def build(sizes, seed, size):
        return {s: render_split(sizes[s], k, rng_for(seed, name, s), functools.partial(render, size=size), size)
                for s in SPLITS}
    return build


def _finish(img: np.ndarray, rng: np.random.Generator, blur: tuple[float, float],
            noise: tuple[float, float]) -> np.ndarray:
    img = im.gaussian_blur(img, rng.uniform(*blur))
    return im.to_uint8(im.add_noise(img, rng, rng.uniform(*noise)))


def _centre(size: int) -> float:
    return (size - 1) / 2.0


# ---------------------------------------------------------------------------------------------
# letters: A-Z from 23 matplotlib fonts under random affine, blur and noise
LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _cap_height(font: str, px: int, ref: str = "H") -> int:
    return im.glyph(font, ref, px).mask.shape[0]


def _render_letter(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    font = im.LETTER_FONTS[rng.integers(len(im.LETTER_FONTS))]
    px = 2 * size  # glyph resolution: the warp then shrinks ~2-3x, handled by ss=2
    g = im.glyph(font, LETTERS[label], px)
    s = size * rng.uniform(0.45, 0.68) / _cap_height(font, px)
    h, w = g.mask.shape
    c = _centre(size)
    dx, dy = rng.uniform(-0.08, 0.08, 2) * size
    fwd = im.place(((w - 1) / 2, (h - 1) / 2), (c + dx, c + dy),
                   im.rotate(rng.uniform(-15, 15)), im.shear(rng.uniform(-0.25, 0.25)),
                   im.scale(s * rng.uniform(0.85, 1.15), s))
    alpha = im.warp(g.mask, fwd, (size, size), ss=2, border="zero")
    lo, hi = rng.uniform(0.0, 0.35), rng.uniform(0.65, 1.0)
    fg, bg = (hi, lo) if rng.random() < 0.5 else (lo, hi)
    back = bg + 0.2 * (im.smooth_field(rng, (size, size), 2) - 0.5)
    img = back * (1 - alpha) + fg * alpha
    return _finish(img, rng, (0.0, 0.9), (0.0, 0.05))


register(ZooSpec(
    "letters", LETTERS, _procedural("letters", 26, _render_letter), (2000, 500, 1000),
    "A-Z rendered from matplotlib's bundled fonts (23 faces) with random affine, blur and noise",
))


# ---------------------------------------------------------------------------------------------
# svhn_like: a coloured digit with neighbouring digits, like a cropped house number
DIGITS = tuple(str(d) for d in range(10))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    c1, c2 = im.random_colour(rng), im.random_colour(rng)
    f = im.smooth_field(rng, (size, size), int(rng.integers(1, 4)))[..., None]
    bg = c1 * (1 - f) + c2 * f
    if rng.random() < 0.6:  # siding, bricks, speckle: texture the digit must be read against
        kind = ("stripes", "checker", "speckle", "dots")[rng.integers(4)]
        bg = bg + rng.uniform(0.05, 0.15) * (im.pattern(kind, rng, (size, size), 1.0)[..., None] - 0.5)
    return bg


def _render_house_number(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    font = im.DIGIT_FONTS[rng.integers(len(im.DIGIT_FONTS))]
    px = 2 * size
    spacing = rng.uniform(0.95, 1.3)
    chars = [label]
    has_left, has_right = rng.random() < 0.8, rng.random() < 0.8
    if has_left:
        chars.insert(0, int(rng.integers(10)))
    if has_right:
        chars.append(int(rng.integers(10)))
    glyphs = [im.glyph(font, DIGITS[d], px) for d in chars]
    width = int(sum(g.advance for g in glyphs) * spacing) + 4 * px
    canvas = np.zeros((3 * px, width), np.float32)
    pen, base = 2 * px, 2 * px
    centre = (0.0, 0.0)
    for i, g in enumerate(glyphs):
        im.paste_max(canvas, g.mask, int(round(pen + g.x0)), base + g.y0)
        if i == int(has_left):
            centre = (round(pen + g.x0) + (g.mask.shape[1] - 1) / 2, base + g.y0 + (g.mask.shape[0] - 1) / 2)
        pen += g.advance * spacing
    s = size * rng.uniform(0.5, 0.72) / _cap_height(font, px, "0")
    c = _centre(size)
    fwd = im.place(centre, (c + rng.uniform(-0.06, 0.06) * size, c + rng.uniform(-0.06, 0.06) * size),
                   im.rotate(rng.uniform(-8, 8)), im.shear(rng.uniform(-0.15, 0.15)),
                   im.scale(s * rng.uniform(0.85, 1.15), s))
    alpha = im.warp(canvas, fwd, (size, size), ss=2, border="zero")
    bg = _background(rng, size)
    colour = im.contrasting_colour(rng, float(im.luminance(bg.mean((0, 1)))), 0.3)
    if rng.random() < 0.3:  # drop shadow or emboss
        shadow = im.warp(canvas, im.translate(rng.uniform(-1.2, 1.2), rng.uniform(0.6, 1.5)) @ fwd,
                         (size, size), ss=2, border="zero")
        bg = im.composite(bg, colour * 0.25 if im.luminance(colour) > 0.5 else 1 - 0.25 * (1 - colour),
                          0.7 * shadow)
    img = im.composite(bg, colour, alpha)
    img = img * rng.uniform(0.7, 1.15)
    return _finish(img, rng, (0.0, 0.8), (0.0, 0.04))


register(ZooSpec(
    "svhn_like", DIGITS, _procedural("svhn_like", 10, _render_house_number), (2000, 500, 1000),
    "coloured font digits with neighbouring distractor digits on textured backgrounds",
))


# ---------------------------------------------------------------------------------------------
# gtsrb_like: synthetic traffic signs (shape x colour x pictogram), perspective, lighting, clutter
RED, WHITE, BLUE = (200, 25, 35), (245, 245, 240), (25, 75, 175)
YELLOW, BLACK, GREY = (245, 190, 25), (25, 25, 25), (150, 150, 150)

SIGNS = (
    "speed_20", "speed_30", "speed_50", "speed_60", "speed_70", "speed_80", "no_entry", "no_vehicles",
    "stop", "yield", "general_caution", "crossroads", "priority_road", "ahead_only", "turn_right",
    "keep_left", "roundabout", "parking", "end_of_limits", "pedestrian_crossing",
)


def _poly(cx: float, cy: float, r: float, n: int, start_deg: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(math.radians(start_deg + 360 * k / n)),
             cy + r * math.sin(math.radians(start_deg + 360 * k / n))) for k in range(n)]


def _arrow(cx: float, cy: float, r: float, deg: float) -> list[tuple[float, float]]:
    """An arrow of length ~1.3r through (cx, cy) pointing at `deg` (0 = up, clockwise)."""
    pts = [(-0.13, 0.65), (-0.13, -0.1), (-0.38, -0.1), (0.0, -0.65), (0.38, -0.1), (0.13, -0.1), (0.13, 0.65)]
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


@functools.lru_cache(maxsize=64)
def _sign(label: int, size: int) -> np.ndarray:
    """The clean sign as RGBA float (2*size, 2*size, 4), drawn at 4x and box-filtered to 2x."""
    from PIL import Image, ImageDraw, ImageFont

    d = 4 * size
    img = Image.new("RGB", (d, d), WHITE)
    mask = Image.new("L", (d, d), 0)
    dr, dm = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    c, r = (d - 1) / 2, 0.48 * d
    name = SIGNS[label]

    def shape(kind: str, rad: float, fill, on_mask: bool = False):
        if kind == "circle":
            box = (c - rad, c - rad, c + rad, c + rad)
            dr.ellipse(box, fill=fill)
            if on_mask:
                dm.ellipse(box, fill=255)
            return
        pts = {"up": _poly(c, c + 0.12 * rad, rad, 3, -90), "down": _poly(c, c - 0.12 * rad, rad, 3, 90),
               "octagon": _poly(c, c, rad, 8, 22.5), "diamond": _poly(c, c, rad, 4, 0),
               "square": _poly(c, c, rad * math.sqrt(2) * 0.8, 4, 45)}[kind]
        dr.polygon(pts, fill=fill)
        if on_mask:
            dm.polygon(pts, fill=255)

    def text(s: str, rel: float, fill, dy: float = 0.0):
        font = ImageFont.truetype(im.font_path("DejaVuSans-Bold.ttf"), max(4, int(rel * r)))
        dr.text((c, c + dy * r), s, fill=fill, font=font, anchor="mm")

    def bar(w: float, h: float, fill, deg: float = 0.0, oy: float = 0.0):
        pts = [(-w, oy - h), (w, oy - h), (w, oy + h), (-w, oy + h)]
        co, si = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        dr.polygon([(c + r * (x * co - y * si), c + r * (x * si + y * co)) for x, y in pts], fill=fill)

    if name.startswith("speed_") or name == "no_vehicles":
        shape("circle", r, RED, True)
        shape("circle", 0.76 * r, WHITE)
        if name != "no_vehicles":
            text(name[6:], 0.85, BLACK)
    elif name == "no_entry":
        shape("circle", r, RED, True)
        bar(0.62, 0.15, WHITE)
    elif name == "stop":
        shape("octagon", r, WHITE, True)
        shape("octagon", 0.9 * r, RED)
        text("STOP", 0.5, WHITE)
    elif name == "yield":
        shape("down", r, RED, True)
        shape("down", 0.6 * r, WHITE)
    elif name in ("general_caution", "crossroads"):
        shape("up", r, RED, True)
        shape("up", 0.62 * r, WHITE)
        if name == "general_caution":
            text("!", 0.75, BLACK, dy=0.12)
        else:
            bar(0.06, 0.36, BLACK)
            bar(0.26, 0.06, BLACK)
    elif name == "priority_road":
        shape("diamond", r, WHITE, True)
        shape("diamond", 0.68 * r, YELLOW)
    elif name in ("ahead_only", "turn_right", "keep_left"):
        shape("circle", r, BLUE, True)
        dr.polygon(_arrow(c, c, r, {"ahead_only": 0, "turn_right": 90, "keep_left": 225}[name]), fill=WHITE)
    elif name == "roundabout":
        shape("circle", r, BLUE, True)
        dr.ellipse((c - 0.55 * r, c - 0.55 * r, c + 0.55 * r, c + 0.55 * r), outline=WHITE, width=int(0.17 * r))
        for k in range(3):
            a = math.radians(90 + 120 * k)
            x, y = c + 0.55 * r * math.cos(a), c + 0.55 * r * math.sin(a)
            dr.polygon(_poly(x, y, 0.24 * r, 3, math.degrees(a) + 90), fill=WHITE)
    elif name == "parking":
        shape("square", r, BLUE, True)
        text("P", 1.1, WHITE)
    elif name == "end_of_limits":
        shape("circle", r, GREY, True)
        shape("circle", 0.93 * r, WHITE)
        for off in (-0.22, 0.0, 0.22):
            bar(0.8, 0.035, BLACK, deg=-45, oy=off)
    elif name == "pedestrian_crossing":
        shape("square", r, BLUE, True)
        shape("up", 0.62 * r, WHITE)
        bar(0.05, 0.22, BLACK)
    else:  # a new name in SIGNS without a drawing is a programming error
        raise AssertionError(name)
    rgba = np.concatenate([np.asarray(img, np.float32), np.asarray(mask, np.float32)[..., None]], axis=2)
    out = im.box_down(rgba / 255.0, 2)
    out.setflags(write=False)
    return out


def _clutter(rng: np.random.Generator, size: int) -> np.ndarray:
    muted = dict(sat=(0.05, 0.6), val=(0.15, 0.85))
    c1, c2 = im.random_colour(rng, **muted), im.random_colour(rng, **muted)
    f = im.smooth_field(rng, (size, size), int(rng.integers(1, 4)))[..., None]
    bg = c1 * (1 - f) + c2 * f
    for _ in range(int(rng.integers(1, 6))):  # buildings, windows, vehicles: axis-aligned blocks
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        bg[y0:y0 + h, x0:x0 + w] = bg[y0:y0 + h, x0:x0 + w] * 0.4 + 0.6 * im.random_colour(rng, **muted)
    if rng.random() < 0.5:  # foliage
        leaves = im.smooth_field(rng, (size, size), max(2, size // 4))[..., None]
        green = im.hsv_colour(rng.uniform(0.2, 0.4), rng.uniform(0.3, 0.8), rng.uniform(0.2, 0.6))
        bg = im.composite(bg, green, (leaves[..., 0] > 0.55) * rng.uniform(0.4, 0.9))
    return im.gaussian_blur(bg.astype(np.float32), rng.uniform(0.3, 1.2))


def _render_sign(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    sign = _sign(label, size)
    n = sign.shape[0]
    bg = _clutter(rng, size)
    c = _centre(size)
    cx, cy = c + rng.uniform(-0.1, 0.1) * size, c + rng.uniform(-0.1, 0.1) * size
    half = 0.5 * size * rng.uniform(0.55, 0.88)
    if rng.random() < 0.4:  # the post the sign stands on
        pw = max(1, int(round(0.06 * size)))
        x0 = int(round(cx - pw / 2))
        bg[int(cy):, max(0, x0):x0 + pw] = GREY[0] / 255.0 * rng.uniform(0.4, 1.0)
    # perspective: a yawed / pitched square, rotated a little, corners jittered
    yaw, pitch = rng.uniform(-0.2, 0.2, 2)
    quad = np.array([[-1 - pitch, -1 - yaw], [1 + pitch, -1 + yaw], [1 - pitch, 1 + yaw], [-1 + pitch, 1 - yaw]])
    quad = quad * half + rng.uniform(-0.04, 0.04, (4, 2)) * half
    quad = quad @ im.rotate(rng.uniform(-10, 10))[:2, :2].T + [cx, cy]
    src = np.array([[0, 0], [n - 1, 0], [n - 1, n - 1], [0, n - 1]], float)
    warped = im.warp(sign, im.homography(src, quad), (size, size), ss=2, border="zero")
    rgb, alpha = warped[..., :3], warped[..., 3]
    # weathering and lighting on the sign: faded colours, a shading gradient
    fade = rng.uniform(0.0, 0.3)
    rgb = rgb * (1 - fade) + fade * rgb.mean(2, keepdims=True)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    ang = rng.uniform(0, 2 * math.pi)
    shade = 1 + rng.uniform(0.0, 0.5) * ((xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang))
    img = im.composite(bg, rgb * shade[..., None], alpha)
    img = img * rng.uniform(0.35, 1.25) * rng.uniform(0.85, 1.15, 3)  # exposure and colour cast
    return _finish(img.astype(np.float32), rng, (0.2, 1.1), (0.005, 0.04))


register(ZooSpec(
    "gtsrb_like", SIGNS, _procedural("gtsrb_like", len(SIGNS), _render_sign), (2000, 500, 1000),
    "synthetic traffic signs (5 shapes x 4 colour schemes x pictograms/numbers) with perspective, "
    "lighting, blur and background clutter",
))


# ---------------------------------------------------------------------------------------------
# pretrain: procedural shape x fill-pattern classes for the zoo's base model
PRETRAIN_SHAPES = ("circle", "ring", "ellipse", "triangle", "square", "star", "cross", "crescent",
                   "arrow", "l_shape")
PRETRAIN_FILLS = ("solid", "stripes", "checker", "dots", "gradient", "speckle")
PRETRAIN_CLASSES = tuple(f"{s}-{f}" for s in PRETRAIN_SHAPES for f in PRETRAIN_FILLS)


@functools.lru_cache(maxsize=32)
def _shape_mask(shape: str, size: int) -> np.ndarray:
    """(2*size, 2*size) float mask, drawn at 4x and box-filtered."""
    from PIL import Image, ImageDraw

    d = 4 * size
    m = Image.new("L", (d, d), 0)
    dr = ImageDraw.Draw(m)
    c, r = (d - 1) / 2, 0.45 * d
    if shape == "circle":
        dr.ellipse((c - r, c - r, c + r, c + r), fill=255)
    elif shape == "ring":
        dr.ellipse((c - r, c - r, c + r, c + r), fill=255)
        dr.ellipse((c - 0.55 * r, c - 0.55 * r, c + 0.55 * r, c + 0.55 * r), fill=0)
    elif shape == "ellipse":
        dr.ellipse((c - r, c - 0.5 * r, c + r, c + 0.5 * r), fill=255)
    elif shape == "triangle":
        dr.polygon(_poly(c, c + 0.15 * r, r, 3, -90), fill=255)
    elif shape == "square":
        dr.polygon(_poly(c, c, r, 4, 45), fill=255)
    elif shape == "star":
        pts = [(c + (r if k % 2 == 0 else 0.42 * r) * math.cos(math.radians(-90 + 36 * k)),
                c + (r if k % 2 == 0 else 0.42 * r) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]
        dr.polygon(pts, fill=255)
    elif shape == "cross":
        dr.rectangle((c - 0.3 * r, c - r, c + 0.3 * r, c + r), fill=255)
        dr.rectangle((c - r, c - 0.3 * r, c + r, c + 0.3 * r), fill=255)
    elif shape == "crescent":
        dr.ellipse((c - r, c - r, c + r, c + r), fill=255)
        dr.ellipse((c - 0.5 * r, c - 0.95 * r, c + 1.3 * r, c + 0.85 * r), fill=0)
    elif shape == "arrow":
        dr.polygon(_arrow(c, c, 1.45 * r, 0), fill=255)
    elif shape == "l_shape":
        dr.rectangle((c - 0.8 * r, c - r, c - 0.2 * r, c + r), fill=255)
        dr.rectangle((c - 0.8 * r, c + 0.4 * r, c + 0.8 * r, c + r), fill=255)
    else:
        raise AssertionError(shape)
    out = im.box_down(np.asarray(m, np.float32) / 255.0, 2)
    out.setflags(write=False)
    return out


def _render_pretrain(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    shape, fill = PRETRAIN_SHAPES[label // len(PRETRAIN_FILLS)], PRETRAIN_FILLS[label % len(PRETRAIN_FILLS)]
    mask = _shape_mask(shape, size)
    n = mask.shape[0]
    # background: two-colour smooth field plus a faint pattern of any kind, so "has a pattern" alone
    # does not give the fill away
    b1, b2 = im.random_colour(rng, sat=(0.0, 1.0)), im.random_colour(rng, sat=(0.0, 1.0))
    f = im.smooth_field(rng, (size, size), int(rng.integers(1, 4)))[..., None]
    bg = b1 * (1 - f) + b2 * f
    kind = PRETRAIN_FILLS[rng.integers(len(PRETRAIN_FILLS))]
    bg = bg + rng.uniform(0.0, 0.12) * (im.pattern(kind, rng, (size, size), 1.0)[..., None] - 0.5)
    bg_lum = float(im.luminance(bg.mean((0, 1))))
    c1 = im.contrasting_colour(rng, bg_lum, 0.3, sat=(0.0, 1.0))
    c2 = im.contrasting_colour(rng, float(im.luminance(c1)), 0.35, sat=(0.0, 1.0))
    p = im.pattern(fill, rng, (size, size), 1.0)[..., None]
    fg = c1 * (1 - p) + c2 * p
    s = size * rng.uniform(0.55, 0.9) / n
    c = _centre(size)
    fwd = im.place(((n - 1) / 2, (n - 1) / 2), (c + rng.uniform(-0.1, 0.1) * size, c + rng.uniform(-0.1, 0.1) * size),
                   im.rotate(rng.uniform(0, 360)), im.scale(s * rng.uniform(0.9, 1.1), s))
    alpha = im.warp(mask, fwd, (size, size), ss=2, border="zero")
    img = im.composite(bg, fg, alpha)
    return _finish(img.astype(np.float32), rng, (0.0, 0.6), (0.0, 0.03))


register(ZooSpec(
    "pretrain", PRETRAIN_CLASSES, _procedural("pretrain", len(PRETRAIN_CLASSES), _render_pretrain),
    (10000, 1000, 1000),
    "procedural shapes (10) x fill patterns (6) in random colours on random backgrounds; shares no "
    "image, glyph or font with the 8 zoo tasks",
))
