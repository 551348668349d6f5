"""The embedded ``scenes`` data: small 3-D scenes rendered by analytic ray casting in numpy.

A pinhole camera (random height and downward pitch) looks at a floor and a back wall with 1-5
spheres, boxes and vertical cylinders resting on the floor. The nearest hit of each pixel's ray gives
exact labels. Conventions (also in docs/data.md):

* world frame: x right, y forward (away from the camera, horizontal), z up; floor z = 0, wall y = D.
* camera frame: x right, y down, z forward (optical axis). The camera sits at (0, 0, height) and is
  pitched down by ``pitch`` radians; there is no yaw or roll.
* ``depth`` is the ray distance: the Euclidean distance from the camera centre to the hit point
  (not the z coordinate in the camera frame).
* ``normals`` are unit vectors in the camera frame, facing the camera (dot(normal, ray) < 0).
* ``semseg``: 0 floor, 1 wall, 2 sphere, 3 box, 4 cylinder. ``instance``: 0 floor, 1 wall, 2.. the
  visible objects, numbered contiguously.
* ``edges``: 1 on the nearer pixel of every pair of 4-neighbours whose instance differs, and of every
  pair on different faces of one object whose normals differ by more than 30 degrees (box edges,
  cylinder rims). Face ids are used rather than the angle alone so that the coarse sampling of a
  curved surface at 16-64 px does not produce spurious creases.
* ``count``: number of visible objects (1-5); ``largest``: shape of the object with most visible
  pixels, 0 sphere, 1 box, 2 cylinder (ties go to the earlier object).

Scene i depends only on (seed, i): its parameters and noise come from
``np.random.default_rng([seed, i, attempt])`` (attempt > 0 only in the rare case that no object ends
up visible), so any index range reproduces exactly, however it is chunked.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np

from mtl.data.scenes_geometry import BOX, CYLINDER, FOV_DEG, SPHERE, camera_rays, intersect
from mtl.data.scenes_geometry import camera_rotation  # noqa: F401  (public: docs/data.md)

#: bump whenever the output for a given (seed, index, size) changes; it keys the on-disk cache
GENERATOR_VERSION = 1

CLASS_NAMES = ("floor", "wall", "sphere", "box", "cylinder")
SHAPE_NAMES = ("sphere", "box", "cylinder")
MAX_OBJECTS = 5
CREASE_DEG = 30.0

# scenes per vectorised chunk: about 256k pixels keeps the working set in cache-friendly sizes
_CHUNK_PIXELS = 1 << 18


@dataclass
class _Scene:
    height: float
    pitch: float
    wall: float
    light: np.ndarray  # unit vector towards the light, world frame
    ambient: float
    floor_colors: np.ndarray  # (2, 3) checker colours
    wall_colors: np.ndarray
    floor_check: float  # checker square size
    wall_check: float
    noise: np.ndarray  # (H, W, 3) float32
    # per object: shape id, centre (x, y), yaw, dims (sphere r | box half-x, half-y, height | cyl r, height)
    shapes: list = field(default_factory=list)
    centres: list = field(default_factory=list)
    yaws: list = field(default_factory=list)
    dims: list = field(default_factory=list)
    albedo: list = field(default_factory=list)
    specular: list = field(default_factory=list)


def _sample_scene(seed: int, index: int, attempt: int, size: int) -> _Scene:
    rng = np.random.default_rng([seed, index, attempt])
    height = rng.uniform(1.2, 2.4)
    pitch = np.deg2rad(rng.uniform(12.0, 38.0))
    wall = rng.uniform(5.0, 8.0)
    # light from above and mostly from the camera's side, so the wall and object fronts are lit
    elev, azim = np.deg2rad(rng.uniform(25, 70)), np.deg2rad(rng.uniform(-100, 100))
    light = np.array([np.cos(elev) * np.sin(azim), -np.cos(elev) * np.cos(azim), np.sin(elev)])
    ambient = rng.uniform(0.15, 0.35)

    def checker_colors():
        base = rng.uniform(0.35, 0.85, 3)
        return np.stack([base, base * rng.uniform(0.5, 0.8)])

    scene = _Scene(
        height=height, pitch=pitch, wall=wall, light=light, ambient=ambient,
        floor_colors=checker_colors(), wall_colors=checker_colors(),
        floor_check=rng.uniform(0.4, 1.2), wall_check=rng.uniform(0.4, 1.2),
        noise=(rng.standard_normal((size, size, 3), dtype=np.float32) * rng.uniform(0.01, 0.03)).astype(np.float32),
    )
    # plain floats here: this loop runs per scene and numpy's per-call overhead would dominate
    cp, sp, half = math.cos(pitch), math.sin(pitch), math.tan(math.radians(FOV_DEG) / 2)
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    placed: list[tuple[float, float, float]] = []  # (x, y, bounding radius)
    for _ in range(n_objects):
        shape = int(rng.integers(0, 3))
        r = rng.uniform(0.45, 0.95)
        if shape == SPHERE:
            dims, bound = (r, 0.0, 0.0), r
        elif shape == BOX:
            a, b = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.6, 1.0)
            dims, bound = (a, b, r * rng.uniform(1.0, 2.6)), math.hypot(a, b)
        else:
            rc = r * rng.uniform(0.6, 0.9)
            dims, bound = (rc, r * rng.uniform(1.2, 3.2), 0.0), rc
        yaw = rng.uniform(0, math.pi / 2) if shape == BOX else 0.0
        hue, sat, val = rng.uniform(), rng.uniform(0.45, 0.9), rng.uniform(0.6, 1.0)
        albedo = colorsys.hsv_to_rgb(hue, sat, val)
        spec = rng.uniform(0.0, 0.35)
        # place the footprint where some image pixel sees the floor, clear of the camera, the wall and
        # the other objects; objects that do not fit after a few tries are dropped
        for _ in range(25):
            u, v = rng.uniform(-0.8, 0.8) * half, rng.uniform(-0.3, 0.9) * half
            # world direction of camera ray (u, v, 1): u * right + v * down + forward
            dy, dz = -sp * v + cp, -cp * v - sp
            if dz >= -1e-3:
                continue
            t = height / -dz
            x, y = u * t, dy * t
            if not (1.2 + bound <= y <= wall - bound - 0.1):
                continue
            if all(math.hypot(x - px, y - py) >= bound + pb + 0.05 for px, py, pb in placed):
                placed.append((x, y, bound))
                scene.shapes.append(shape)
                scene.centres.append((x, y))
                scene.yaws.append(yaw)
                scene.dims.append(dims)
                scene.albedo.append(albedo)
                scene.specular.append(spec)
                break
    return scene


def _objects_by_shape(scenes: list[_Scene], dtype):
    """Flatten the objects of a chunk into per-shape arrays: scene index, slot and (M, 1) parameters."""
    rows: dict[int, list] = {0: [], 1: [], 2: []}
    for si, sc in enumerate(scenes):
        for k, shape in enumerate(sc.shapes):
            (x, y), (p0, p1, p2) = sc.centres[k], sc.dims[k]
            rows[shape].append((si, k, x, y, p0, p1, p2, np.cos(sc.yaws[k]), np.sin(sc.yaws[k])))
    out = {}
    for shape, rs in rows.items():
        if not rs:
            continue
        a = np.asarray(rs, np.float64)
        col = [a[:, j : j + 1].astype(dtype) for j in range(a.shape[1])]
        g = dict(si=a[:, 0].astype(np.int64), slot=a[:, 1].astype(np.int64))
        if shape == SPHERE:
            g.update(centre=(col[2], col[3], col[4]), r=col[4])  # resting on the floor
        elif shape == CYLINDER:
            g.update(centre=(col[2], col[3]), r=col[4], h=col[5])
        else:
            g.update(centre=(col[2], col[3]), half=(col[4], col[5], col[6] / 2), cos=col[7], sin=col[8])
        out[shape] = g
    return out


def _render_chunk(scenes: list[_Scene], size: int, dtype=np.float32) -> dict[str, np.ndarray]:
    S, P, K = len(scenes), size * size, MAX_OBJECTS
    rc = camera_rays(size)
    pitch = np.array([s.pitch for s in scenes])[:, None]
    cp, sp = np.cos(pitch), np.sin(pitch)
    # world ray directions (S, P): d = R^T d_cam with R's rows right, down, forward
    d = (
        np.broadcast_to(rc[:, 0], (S, P)).astype(dtype),
        (-sp * rc[:, 1] + cp * rc[:, 2]).astype(dtype),
        (-cp * rc[:, 1] - sp * rc[:, 2]).astype(dtype),
    )
    height = np.array([s.height for s in scenes], dtype)[:, None]
    wall = np.array([s.wall for s in scenes], dtype)[:, None]
    zero = np.zeros((S, 1), dtype)
    origin = (zero, zero, height)

    # candidate surfaces per pixel: 0 floor, 1 wall, 2 + k object slot k
    T = np.full((S, K + 2, P), np.inf, dtype)
    NX, NY, NZ = (np.zeros((S, K + 2, P), dtype) for _ in range(3))
    F = np.zeros((S, K + 2, P), np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        T[:, 0] = np.where(d[2] < 0, height / -d[2], np.inf)
        T[:, 1] = np.where(d[1] > 0, wall / d[1], np.inf)
        NZ[:, 0] = 1
        NY[:, 1] = -1
        groups = _objects_by_shape(scenes, dtype)
        for shape, g in groups.items():
            si, sl = g["si"], g["slot"] + 2
            t, n, f = intersect(shape, g, tuple(c[si] for c in origin), tuple(c[si] for c in d))
            T[si, sl] = t
            NX[si, sl], NY[si, sl], NZ[si, sl] = n
            F[si, sl] = f

    slot = np.argmin(T, axis=1)  # (S, P)
    flat = (np.arange(S)[:, None] * (K + 2) + slot) * P + np.arange(P)
    depth = T.ravel().take(flat)
    n = [A.ravel().take(flat) for A in (NX, NY, NZ)]
    face = F.ravel().take(flat)
    # exact by construction; the flip only guards against round-off at grazing angles
    flip = np.where(n[0] * d[0] + n[1] * d[1] + n[2] * d[2] > 0, -1, 1).astype(dtype)
    norm = flip / np.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])
    n = [c * norm for c in n]

    # shading: Lambert + Blinn-Phong highlight, hard shadows from the objects, checker floor/wall
    hit = [o + depth * c for o, c in zip(origin, d)]
    light = np.array([s.light for s in scenes], dtype)
    L = [light[:, j : j + 1] for j in range(3)]
    shadow = np.zeros((S, P), bool)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        start = [h + 1e-3 * c for h, c in zip(hit, n)]
        for shape, g in groups.items():
            si = g["si"]
            ts = intersect(shape, g, tuple(c[si] for c in start), tuple(c[si] for c in L), normals=False)
            # si is sorted (objects are listed scene by scene), so reduceat ORs each scene's rows
            first = np.flatnonzero(np.r_[True, si[1:] != si[:-1]])
            shadow[si[first]] |= np.logical_or.reduceat(np.isfinite(ts), first, axis=0)
    lambert = np.maximum(n[0] * L[0] + n[1] * L[1] + n[2] * L[2], 0) * ~shadow
    ambient = np.array([s.ambient for s in scenes], dtype)[:, None]

    # per-slot albedo, then floor and wall checkers
    albedo = np.zeros((S, K + 2, 3), dtype)
    spec = np.zeros((S, K + 2), dtype)
    for si, sc in enumerate(scenes):
        if sc.shapes:
            albedo[si, 2 : 2 + len(sc.shapes)] = sc.albedo
            spec[si, 2 : 2 + len(sc.shapes)] = sc.specular
    sflat = np.arange(S)[:, None] * (K + 2) + slot
    color = albedo.reshape(-1, 3)[sflat]  # (S, P, 3)
    fcheck = np.array([s.floor_check for s in scenes], dtype)[:, None]
    wcheck = np.array([s.wall_check for s in scenes], dtype)[:, None]
    fpar = (np.floor(hit[0] / fcheck) + np.floor(hit[1] / fcheck)).astype(np.int64) & 1
    wpar = (np.floor(hit[0] / wcheck) + np.floor(hit[2] / wcheck)).astype(np.int64) & 1
    fcol = np.array([s.floor_colors for s in scenes], dtype).reshape(-1, 3)  # (S*2, 3)
    wcol = np.array([s.wall_colors for s in scenes], dtype).reshape(-1, 3)
    base = np.arange(S)[:, None] * 2
    is_floor, is_wall = slot == 0, slot == 1
    color[is_floor] = fcol[(base + fpar)[is_floor]]
    color[is_wall] = wcol[(base + wpar)[is_wall]]
    hx, hy, hz = L[0] - d[0], L[1] - d[1], L[2] - d[2]
    cos_h = (n[0] * hx + n[1] * hy + n[2] * hz) / np.sqrt(hx * hx + hy * hy + hz * hz)
    highlight = np.maximum(cos_h, 0) ** 24 * (lambert > 0) * spec.ravel()[sflat]
    radiance = color * (ambient + (1 - ambient) * lambert)[..., None] + highlight[..., None]
    noise = np.stack([s.noise for s in scenes]).reshape(S, P, 3)
    rgb = np.clip(radiance, 0, 1) ** (1 / 2.2) + noise  # gamma, so mid-tones look natural
    image = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)

    # visible objects, renumbered contiguously from instance id 2
    pix = np.bincount(sflat.ravel(), minlength=S * (K + 2)).reshape(S, K + 2)
    visible = pix[:, 2:] > 0
    count = visible.sum(1)
    remap = np.zeros((S, K + 2), np.uint8)
    remap[:, 1] = 1
    remap[:, 2:] = np.where(visible, 1 + np.cumsum(visible, 1), 0)
    instance = remap.ravel()[sflat]
    shape_of_slot = np.zeros((S, K), np.int64)
    for si, sc in enumerate(scenes):
        shape_of_slot[si, : len(sc.shapes)] = sc.shapes
    largest = shape_of_slot[np.arange(S), pix[:, 2:].argmax(1)]
    cls_of_slot = np.concatenate([np.tile(np.array([0, 1], np.uint8), (S, 1)), 2 + shape_of_slot.astype(np.uint8)], 1)
    semseg = cls_of_slot.ravel()[sflat]

    # normals into the camera frame: rows of R are right (1,0,0), down (0,-s,-c), forward (0,c,-s)
    normal_c = np.stack([n[0], -sp * n[1] - cp * n[2], cp * n[1] - sp * n[2]], -1).astype(np.float32)
    shp = (S, size, size)
    depth = depth.reshape(shp).astype(np.float32)
    edges = _edges(instance.reshape(shp), face.reshape(shp), depth, normal_c.reshape(*shp, 3))
    return {
        "image": image.reshape(*shp, 3),
        "semseg": semseg.reshape(shp),
        "depth": depth,
        "normals": normal_c.reshape(*shp, 3),
        "edges": edges,
        "instance": instance.reshape(shp),
        "count": count.astype(np.int64),
        "largest": largest.astype(np.int64),
        "pitch": pitch[:, 0].astype(np.float32),
        "height": height[:, 0].astype(np.float32),
    }


def _edges(instance, face, depth, normals):
    """Mark the nearer pixel of each 4-neighbour pair across an instance change or a crease."""
    cos_crease = np.cos(np.deg2rad(CREASE_DEG))
    edges = np.zeros(instance.shape, bool)
    for axis in (1, 2):
        n = instance.shape[axis]
        a, b = (slice(None),) * axis + (slice(0, n - 1),), (slice(None),) * axis + (slice(1, n),)
        cos = np.einsum("...k,...k->...", normals[a], normals[b])
        crease = (face[a] != face[b]) & (cos < cos_crease)
        boundary = (instance[a] != instance[b]) | crease
        first_nearer = depth[a] <= depth[b]
        edges[a] |= boundary & first_nearer
        edges[b] |= boundary & ~first_nearer
    return edges.astype(np.uint8)


def render_scenes(seed: int, start: int, count: int, size: int = 64) -> dict[str, np.ndarray]:
    """Render scenes ``start .. start+count-1`` of the stream ``seed`` at ``size`` x ``size`` pixels.

    Returns (N = count, H = W = size): image uint8 (N,H,W,3); semseg, instance, edges uint8 (N,H,W);
    depth float32 (N,H,W); normals float32 (N,H,W,3); count, largest int64 (N,); pitch, height
    float32 (N,) (camera pitch in radians below horizontal and camera height above the floor).
    """
    if size < 2 or count < 0 or start < 0:
        raise ValueError(f"need size >= 2, start >= 0, count >= 0; got size={size}, start={start}, count={count}")
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    out: dict[str, np.ndarray] = {}
    for lo in range(start, start + count, chunk):
        idx = list(range(lo, min(lo + chunk, start + count)))
        attempts = [0] * len(idx)
        part = _render_chunk([_sample_scene(seed, i, 0, size) for i in idx], size)
        # rare: every object hidden or too thin to cover a pixel centre; redraw just those scenes
        while (bad := np.flatnonzero(part["count"] == 0)).size:
            for j in bad:
                attempts[j] += 1
            redo = _render_chunk([_sample_scene(seed, idx[j], attempts[j], size) for j in bad], size)
            for key in part:
                part[key][bad] = redo[key]
        if not out:
            out = {k: np.empty((count,) + v.shape[1:], v.dtype) for k, v in part.items()}
        for k, v in part.items():
            out[k][lo - start : lo - start + len(idx)] = v
    if not out:
        return {k: v[:0] for k, v in render_scenes(seed, 0, 1, size).items()}
    return out
