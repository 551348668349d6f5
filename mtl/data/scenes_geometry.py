"""Camera and ray-primitive geometry of the ``scenes`` renderer (frame conventions: `mtl.data.scenes`)."""
from __future__ import annotations

import numpy as np

FOV_DEG = 60.0  # horizontal and vertical (square images)
SPHERE, BOX, CYLINDER = 0, 1, 2  # shape ids, as in ``largest`` and SHAPE_NAMES
_EPS = 1e-4  # a hit must lie this far along the ray (no self-hits of shadow rays)


def camera_rays(size: int) -> np.ndarray:
    """Unit ray directions in the camera frame, (size*size, 3) float64, row-major over pixels."""
    half = np.tan(np.deg2rad(FOV_DEG) / 2)
    c = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")
    d = np.stack([u * half, v * half, np.ones_like(u)], -1).reshape(-1, 3)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def camera_rotation(pitch: float | np.ndarray) -> np.ndarray:
    """Rows = camera x (right), y (down), z (forward) axes in world coordinates; (..., 3, 3).

    A world vector w has camera coordinates R @ w; e.g. the floor normal (0, 0, 1) becomes
    (0, -cos(pitch), -sin(pitch)).
    """
    p = np.asarray(pitch, dtype=np.float64)
    c, s = np.cos(p), np.sin(p)
    z, o = np.zeros_like(p), np.ones_like(p)
    right = np.stack([o, z, z], -1)
    down = np.stack([z, -s, -c], -1)
    forward = np.stack([z, c, -s], -1)
    return np.stack([right, down, forward], -2)


# Vectors are passed as (x, y, z) tuples of arrays (structure of arrays: numpy is slow on a trailing
# axis of length 3). Origins broadcast as (M, 1) or (M, P), directions as (M, P) or (M, 1); object
# parameters are (M, 1). Each returns t (M, P), inf where the ray misses, and with ``normals`` the
# world-frame normal components and a face id (used for creases).


def ray_sphere(o, d, centre, r, normals=True):
    ox, oy, oz = o[0] - centre[0], o[1] - centre[1], o[2] - centre[2]
    b = ox * d[0] + oy * d[1] + oz * d[2]
    c = ox * ox + oy * oy + oz * oz - r * r
    disc = b * b - c
    hit = disc > 0
    t = -b - np.sqrt(np.where(hit, disc, 0))
    hit &= t > _EPS
    t = np.where(hit, t, np.inf)
    if not normals:
        return t
    ts = np.where(hit, t, 0) / r
    inv = 1 / r
    n = (ox * inv + ts * d[0], oy * inv + ts * d[1], oz * inv + ts * d[2])
    return t, n, 0


def ray_cylinder(o, d, centre, r, h, normals=True):
    # vertical axis through the centre, from z = 0 to z = h; the bottom cap rests on the floor
    ox, oy, oz = o[0] - centre[0], o[1] - centre[1], o[2]
    dx, dy, dz = d
    r2 = r * r
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    c = ox * ox + oy * oy - r2
    disc = b * b - a * c
    ok = (disc > 0) & (a > 1e-12)
    t_side = (-b - np.sqrt(np.where(ok, disc, 0))) / np.where(ok, a, 1)
    z = oz + t_side * dz
    ok &= (t_side > _EPS) & (z >= 0) & (z <= h)
    t_side = np.where(ok, t_side, np.inf)
    # top cap, seen only from above
    down = dz < -1e-12
    t_top = (h - oz) / np.where(down, dz, -1)
    xt, yt = ox + t_top * dx, oy + t_top * dy
    t_top = np.where(down & (t_top > _EPS) & (xt * xt + yt * yt <= r2), t_top, np.inf)
    t = np.minimum(t_side, t_top)
    if not normals:
        return t
    top = t_top < t_side
    ts = np.where(np.isfinite(t), t, 0)
    inv = 1 / r
    nx = np.where(top, 0, (ox + ts * dx) * inv)
    ny = np.where(top, 0, (oy + ts * dy) * inv)
    return t, (nx, ny, top.astype(nx.dtype)), top


def ray_box(o, d, centre, cos_yaw, sin_yaw, half, normals=True):
    # axis-aligned in a frame rotated by yaw about the vertical; slab method
    ox, oy = o[0] - centre[0], o[1] - centre[1]
    lo = (cos_yaw * ox + sin_yaw * oy, cos_yaw * oy - sin_yaw * ox, o[2] - half[2])
    ld = (cos_yaw * d[0] + sin_yaw * d[1], cos_yaw * d[1] - sin_yaw * d[0], d[2])
    tmin, tmax, dsign = [], [], []
    for j in range(3):
        dj = np.where(np.abs(ld[j]) < 1e-12, 1e-12, ld[j])
        inv = 1 / dj
        t1, t2 = (-half[j] - lo[j]) * inv, (half[j] - lo[j]) * inv
        tmin.append(np.minimum(t1, t2))
        tmax.append(np.maximum(t1, t2))
        dsign.append(dj > 0)
    tnear = np.maximum(np.maximum(tmin[0], tmin[1]), tmin[2])
    tfar = np.minimum(np.minimum(tmax[0], tmax[1]), tmax[2])
    hit = (tnear <= tfar) & (tnear > _EPS)
    t = np.where(hit, tnear, np.inf)
    if not normals:
        return t
    # the entry face is on the axis whose slab is entered last; its normal opposes the ray
    on_x = tmin[0] >= np.maximum(tmin[1], tmin[2])
    on_y = ~on_x & (tmin[1] >= tmin[2])
    on_z = ~on_x & ~on_y
    dt = tnear.dtype
    lx = on_x * np.where(dsign[0], -1, 1).astype(dt)
    ly = on_y * np.where(dsign[1], -1, 1).astype(dt)
    lz = on_z * np.where(dsign[2], -1, 1).astype(dt)
    n = (cos_yaw * lx - sin_yaw * ly, sin_yaw * lx + cos_yaw * ly, lz)
    face = np.where(on_x, 0, np.where(on_y, 2, 4)) + np.where(on_x, dsign[0], np.where(on_y, dsign[1], dsign[2]))
    return t, n, face


def intersect(shape, g, o, d, normals=True):
    if shape == SPHERE:
        return ray_sphere(o, d, g["centre"], g["r"], normals)
    if shape == CYLINDER:
        return ray_cylinder(o, d, g["centre"], g["r"], g["h"], normals)
    return ray_box(o, d, g["centre"], g["cos"], g["sin"], g["half"], normals)
