"""Geometry of the phantoms: smooth noise fields, the voxel canvas and implicit shapes (ellipsoids, tubes).

Shapes are signed fields in *reference millimetres* (see the package docstring), evaluated only inside their
bounding box and in slabs, so a small case takes tens of milliseconds and a clinical one a few seconds.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np

CHUNK_VOXELS = 2_000_000  # slab size for evaluating a shape: bounds memory on clinical volumes
_NOISE_SIGMA = 0.8  # Gaussian kernel of the lattice noise, in lattice cells
_NOISE_NORM = 1.0 / np.sqrt(np.sum(np.exp(-((np.arange(-6, 7) / _NOISE_SIGMA) ** 2))))


class Noise:
    """A smooth Gaussian random field (std about 1) on a coarse lattice in reference mm.

    Evaluated at separable coordinates with three small matrix products, so a texture costs little,
    needs no full-volume array and looks the same at any voxel size.
    """

    def __init__(self, rng: np.random.Generator, box: Sequence[tuple[float, float]], cell: float):
        margin = 4 * cell
        self.origin = np.array([lo - margin for lo, _ in box])
        size = [max(int(np.ceil((hi - lo + 2 * margin) / cell)) + 1, 1) for lo, hi in box]
        self.cell = cell
        self.lattice = rng.standard_normal(size).astype(np.float32)

    def __call__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        weights, spans = [], []
        for axis, coords in enumerate((z, y, x)):
            u = (coords.astype(np.float64) - self.origin[axis]) / self.cell
            size = self.lattice.shape[axis]
            lo = int(np.clip(np.floor(u.min()) - 3, 0, size - 1))
            hi = int(np.clip(np.ceil(u.max()) + 4, lo + 1, size))
            index = np.arange(lo, hi)
            w = np.exp(-0.5 * ((u[:, None] - index[None, :]) / _NOISE_SIGMA) ** 2) * _NOISE_NORM
            weights.append(w.astype(np.float32))
            spans.append(slice(lo, hi))
        wz, wy, wx = weights
        t = self.lattice[tuple(spans)] @ wx.T  # (a, b, nx)
        t = np.matmul(wy, t)  # (a, ny, nx)
        return (wz @ t.reshape(t.shape[0], -1)).reshape(len(z), len(y), len(x))


def span(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Indices of a uniform, increasing coordinate vector that lie within [lo, hi]."""
    n = len(coords)
    if n == 0:
        return slice(0, 0)
    first = float(coords[0])
    step = float(coords[1]) - first if n > 1 else 1.0
    a = min(max(math.ceil((lo - first) / step - 1e-6), 0), n)
    b = min(max(math.floor((hi - first) / step + 1e-6) + 1, 0), n)
    return slice(a, max(a, b))


class Chunk:
    """A slab of a bounding box: reference coordinates (1-D and broadcast) and views of the arrays."""

    def __init__(self, canvas: "Canvas", sl: tuple[slice, slice, slice]):
        self.sl = sl
        self.z, self.y, self.x = canvas.z[sl[0]], canvas.y[sl[1]], canvas.x[sl[2]]
        self.Z, self.Y, self.X = self.z[:, None, None], self.y[None, :, None], self.x[None, None, :]
        self.shape = (len(self.z), len(self.y), len(self.x))
        self.image = canvas.image[sl]
        self.label = canvas.label[sl]


class Canvas:
    """The voxel grid of one case with its mapping to reference millimetres."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], s_xy: float,
                 s_z: float, center_yx: tuple[float, float], z_bottom: float):
        nz, ny, nx = shape
        sz, sy, sx = spacing
        self.shape = shape
        self.z = (z_bottom + np.arange(nz) * sz / s_z).astype(np.float32)
        self.y = ((np.arange(ny) - center_yx[0]) * sy / s_xy).astype(np.float32)
        self.x = ((np.arange(nx) - center_yx[1]) * sx / s_xy).astype(np.float32)
        self.voxel = (sz / s_z, sy / s_xy, sx / s_xy)  # voxel size in reference mm
        self.image = np.full(shape, -1000.0, np.float32)
        self.label = np.zeros(shape, np.uint8)

    def chunks(self, box: Sequence[tuple[float, float]]) -> Iterator[Chunk]:
        ranges = [span(coords, lo, hi) for coords, (lo, hi) in zip((self.z, self.y, self.x), box)]
        if any(s.stop <= s.start for s in ranges):
            return
        (z0, z1), (y0, y1), (x0, x1) = ((s.start, s.stop) for s in ranges)
        step = max(1, CHUNK_VOXELS // ((y1 - y0) * (x1 - x0)))
        for start in range(z0, z1, step):
            yield Chunk(self, (slice(start, min(start + step, z1)), slice(y0, y1), slice(x0, x1)))

    def paint(self, box, shape_fn: Callable[[Chunk], np.ndarray], value_fn, label: int | None = None,
              where: Callable[[Chunk], np.ndarray] | None = None, clear_label: bool = False) -> None:
        """Set HU (and a label) where ``shape_fn`` (a signed field, < 0 inside, or a mask) holds."""
        for ch in self.chunks(box):
            f = shape_fn(ch)
            mask = f if f.dtype == bool else f < 0
            if where is not None:
                mask = mask & where(ch)
            if not mask.any():
                continue
            values = value_fn(ch, f) if callable(value_fn) else value_fn
            ch.image[mask] = np.broadcast_to(np.asarray(values, np.float32), mask.shape)[mask]
            if label is not None:
                ch.label[mask] = label
            elif clear_label:
                ch.label[mask] = 0


def rotation(axial: float = 0.0, coronal: float = 0.0, sagittal: float = 0.0) -> np.ndarray:
    """Rotation in (z, y, x) coordinates; columns are the shape's local axes in the world frame."""
    ca, sa = np.cos(axial), np.sin(axial)
    cc, sc = np.cos(coronal), np.sin(coronal)
    cs, ss = np.cos(sagittal), np.sin(sagittal)
    r_axial = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])  # within the (y, x) plane
    r_coronal = np.array([[cc, 0, -sc], [0, 1, 0], [sc, 0, cc]])  # within the (z, x) plane
    r_sagittal = np.array([[cs, -ss, 0], [ss, cs, 0], [0, 0, 1]])  # within the (z, y) plane
    return r_axial @ r_coronal @ r_sagittal


def ellipsoid(ch: Chunk, center, semi, rot: np.ndarray | None = None) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid; (z, y, x) center and semi-axes."""
    d = (ch.Z - np.float32(center[0]), ch.Y - np.float32(center[1]), ch.X - np.float32(center[2]))
    if rot is None:
        q = [d[i] / np.float32(semi[i]) for i in range(3)]
    else:
        q = [(d[0] * rot[0, i] + d[1] * rot[1, i] + d[2] * rot[2, i]) / semi[i] for i in range(3)]
        q = [v.astype(np.float32, copy=False) for v in q]
    r = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
    return (r - 1.0) * np.float32(min(semi))


def ellipsoid_box(center, semi, pad: float = 0.0) -> list[tuple[float, float]]:
    reach = max(semi) + pad
    return [(c - reach, c + reach) for c in center]


def spline(points, radii, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Catmull-Rom curve through control points, resampled about every ``step`` mm, with radii."""
    p = np.asarray(points, float)
    r = np.asarray(radii, float)
    if len(p) == 1:
        return p, r
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out_p, out_r = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = ext[i:i + 4]
        n = max(1, int(np.ceil(np.linalg.norm(p2 - p1) / step)))
        t = (np.arange(n) / n)[:, None]
        out_p.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                            + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
        out_r.append(r[i] + (r[i + 1] - r[i]) * t[:, 0])
    out_p.append(p[-1:])
    out_r.append(r[-1:])
    return np.vstack(out_p), np.concatenate(out_r)


class Tube:
    """A tube of varying radius along a spline: signed distance (mm) as a union of round cones."""

    def __init__(self, points, radii, r_min: float = 0.0, scale=(1.0, 1.0, 1.0), step: float | None = None):
        """``r_min`` (mm) keeps thin tubes visible at coarse voxels and sets the finest useful step."""
        radii = np.maximum(np.asarray(radii, float), r_min)
        self.scale = np.asarray(scale, float)
        step = max(step or 0.8 * float(np.min(radii)), 2.0 * r_min, 2.0)
        pts, rad = spline(np.asarray(points, float) * self.scale, radii, step)
        self.pts, self.rad = pts, rad
        reach = float(rad.max()) + 1.0
        lo, hi = pts.min(0) - reach, pts.max(0) + reach
        self.box = [(lo[i] / self.scale[i], hi[i] / self.scale[i]) for i in range(3)]

    def field(self, ch: Chunk) -> np.ndarray:
        f = np.full(ch.shape, np.inf, np.float32)
        sz, sy, sx = self.scale
        z, y, x = ch.z * sz, ch.y * sy, ch.x * sx
        for k in range(len(self.pts) - 1):
            a, b = self.pts[k], self.pts[k + 1]
            ra, rb = self.rad[k], self.rad[k + 1]
            reach = max(ra, rb) + 1.0
            lo, hi = np.minimum(a, b) - reach, np.maximum(a, b) + reach
            idx = [span(coords, low, high) for coords, low, high in zip((z, y, x), lo, hi)]
            if any(s.stop <= s.start for s in idx):
                continue
            Z, Y, X = z[idx[0], None, None], y[None, idx[1], None], x[None, None, idx[2]]
            ab = (b - a).astype(np.float32)
            length2 = float(ab @ ab) or 1e-6
            dz, dy, dx = Z - np.float32(a[0]), Y - np.float32(a[1]), X - np.float32(a[2])
            t = np.clip((dz * ab[0] + dy * ab[1] + dx * ab[2]) / np.float32(length2), 0.0, 1.0)
            ez, ey, ex = dz - t * ab[0], dy - t * ab[1], dx - t * ab[2]
            d = np.sqrt(ez * ez + ey * ey + ex * ex) - (np.float32(ra) + t * np.float32(rb - ra))
            view = f[tuple(idx)]
            np.minimum(view, d, out=view)
        return f

