"""Synthetic abdominal CT phantoms with the 13 FLARE22 organs, written as nnU-Net raw datasets.

Why: the pipeline (teachers, pseudo-labels, student, low-footprint inference, evaluation) needs data
that looks like abdominal CT to nnU-Net's planner and is hard enough that a small network trained
briefly stays well below perfect Dice, so that a semi-supervised gain can show. Real FLARE22 data is
large and licensed; these phantoms take tens of milliseconds each and depend only on a seed.

How: the anatomy is defined in *reference millimetres* (X towards the patient's left, Y towards
posterior, Z towards superior; an adult abdomen, body about 340 mm wide) as smooth implicit shapes
(deformed ellipsoids and tubes along splines) whose surfaces are perturbed by smooth random fields.
A case maps the reference frame onto its voxel grid: small cases fit a scaled-down body into the
field of view (realistic spacing and HU, fewer voxels); ``body_scale`` gives real anatomical size
(``--clinical``: 512x512xN). Each shape is evaluated only inside its bounding box, in slabs, so a
small case takes tens of milliseconds and a clinical one a few seconds.

Array order is (z, y, x) = (inferior->superior, anterior->posterior, patient right->left): with the
identity direction that is standard axial CT in ITK/LPS. Other axis-aligned directions reorient the
array so that the anatomy stays physically correct; a phantom dataset stores its cases in several scanner
orientations (SCANNER_ORIENTATIONS) and reads them with nnU-Net's reorienting reader.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from noisy_student_nnunet import __version__
from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.flare import FLARE22_ORGANS, flare22_dataset_labels
from noisy_student_nnunet.outputs import check_output_folder

ORGAN_LABELS: dict[str, int] = {organ.name: organ.label for organ in FLARE22_ORGANS}
_L = ORGAN_LABELS

# Which organ a case lacks when it drops one (cholecystectomy is by far the most common).
DROP_WEIGHTS: dict[str, float] = {"gallbladder": 0.7, "right_kidney": 0.1, "left_kidney": 0.1, "spleen": 0.1}

SMALL_DEFAULTS: dict[str, tuple[float, float]] = {
    "inplane_voxels": (96, 128), "inplane_spacing": (0.6, 1.0), "slice_spacing": (1.0, 5.0), "slices": (24, 64)}
CLINICAL_DEFAULTS: dict[str, tuple[float, float]] = {
    "inplane_voxels": (512, 512), "inplane_spacing": (0.6, 1.0), "slice_spacing": (1.0, 2.0), "slices": (200, 320)}
# What the generator can still draw every organ into (checked by the tests at these extremes).
MIN_INPLANE_VOXELS, MIN_SLICES, MAX_VOXELS_PER_AXIS = 48, 16, 2048

_Z_WINDOW = (0.0, 245.0)  # reference z-range that holds every organ (kidney lower pole .. oesophagus)
_CHUNK_VOXELS = 2_000_000  # slab size for evaluating a shape: bounds memory on clinical volumes
_NOISE_SIGMA = 0.8  # Gaussian kernel of the lattice noise, in lattice cells
_NOISE_NORM = 1.0 / np.sqrt(np.sum(np.exp(-((np.arange(-6, 7) / _NOISE_SIGMA) ** 2))))
_SPLIT_CODES = {"labeled": 0, "unlabeled": 1, "test": 2}

# How axial abdominal CT arrives as NIfTI (ITK direction, row-major) and how often a phantom case is
# stored so: DICOM's LPS as ITK writes it, the same with slices stored head to feet, and RAS as some
# converters write it. The anatomy stays physically correct; only the array order changes, which is why
# a phantom dataset asks nnU-Net to read it with its reorienting reader (see write_phantom_dataset).
SCANNER_ORIENTATIONS: dict[str, tuple[tuple[float, ...], float]] = {
    "LPS": ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), 0.5),
    "LPI": ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0), 0.25),
    "RAS": ((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0), 0.25),
}
#: nnU-Net's reader for the phantom datasets: it turns every case to RAS on read and predictions back on
#: write, so a network sees one anatomical orientation whatever the scanner stored
PHANTOM_READER_WRITER = "NibabelIOWithReorient"

# Mean HU per tissue for the (native, arterial, portal venous) phase. Several organs overlap on
# purpose (liver/spleen, pancreas/bowel wall, kidney/aorta, gallbladder/bowel fluid): a network has to
# use shape and position.
_HU: dict[str, tuple[float, float, float]] = {
    "liver": (58, 75, 110), "spleen": (50, 95, 115), "kidney_cortex": (35, 185, 170),
    "kidney_medulla": (32, 85, 150), "pancreas": (42, 105, 95), "artery": (42, 290, 165),
    "vein": (40, 75, 145), "portal": (40, 95, 175), "adrenal": (35, 60, 75), "gut_wall": (40, 80, 90),
    "muscle": (50, 55, 60), "heart": (42, 210, 140),
}


@dataclass
class Phantom:
    """One generated case.

    ``spacing`` is in array order (z, y, x) like nnU-Net's ``properties['spacing']``; ``origin`` and
    ``direction`` are in ITK order (x, y, z; direction row-major, 9 values) like SimpleITK.
    """

    image: np.ndarray  # int16 HU, (z, y, x)
    label: np.ndarray  # uint8 FLARE22 labels, (z, y, x)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    dropped: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)

    def to_sitk(self):
        """(image, label) as SimpleITK images with this phantom's geometry."""
        import SimpleITK as sitk

        images = []
        for array in (self.image, self.label):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing([float(v) for v in reversed(self.spacing)])
            image.SetOrigin([float(v) for v in self.origin])
            image.SetDirection([float(v) for v in self.direction])
            images.append(image)
        return images[0], images[1]

    def write(self, image_path: str | os.PathLike, label_path: str | os.PathLike | None = None) -> None:
        """Write the image (and the label when a path is given) as compressed NIfTI (or any ITK format)."""
        import SimpleITK as sitk

        image, label = self.to_sitk()
        sitk.WriteImage(image, str(image_path), True)
        if label_path is not None:
            sitk.WriteImage(label, str(label_path), True)

    def organ_voxels(self) -> dict[str, int]:
        counts = np.bincount(self.label.ravel(), minlength=len(FLARE22_ORGANS) + 1)
        return {organ.name: int(counts[organ.label]) for organ in FLARE22_ORGANS}


# --------------------------------------------------------------------------------------------------
# Geometry machinery


class _Noise:
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


def _span(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Indices of a uniform, increasing coordinate vector that lie within [lo, hi]."""
    n = len(coords)
    if n == 0:
        return slice(0, 0)
    first = float(coords[0])
    step = float(coords[1]) - first if n > 1 else 1.0
    a = min(max(math.ceil((lo - first) / step - 1e-6), 0), n)
    b = min(max(math.floor((hi - first) / step + 1e-6) + 1, 0), n)
    return slice(a, max(a, b))


class _Chunk:
    """A slab of a bounding box: reference coordinates (1-D and broadcast) and views of the arrays."""

    def __init__(self, canvas: "_Canvas", sl: tuple[slice, slice, slice]):
        self.sl = sl
        self.z, self.y, self.x = canvas.z[sl[0]], canvas.y[sl[1]], canvas.x[sl[2]]
        self.Z, self.Y, self.X = self.z[:, None, None], self.y[None, :, None], self.x[None, None, :]
        self.shape = (len(self.z), len(self.y), len(self.x))
        self.image = canvas.image[sl]
        self.label = canvas.label[sl]


class _Canvas:
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

    def chunks(self, box: Sequence[tuple[float, float]]) -> Iterator[_Chunk]:
        ranges = [_span(coords, lo, hi) for coords, (lo, hi) in zip((self.z, self.y, self.x), box)]
        if any(s.stop <= s.start for s in ranges):
            return
        (z0, z1), (y0, y1), (x0, x1) = ((s.start, s.stop) for s in ranges)
        step = max(1, _CHUNK_VOXELS // ((y1 - y0) * (x1 - x0)))
        for start in range(z0, z1, step):
            yield _Chunk(self, (slice(start, min(start + step, z1)), slice(y0, y1), slice(x0, x1)))

    def paint(self, box, shape_fn: Callable[[_Chunk], np.ndarray], value_fn, label: int | None = None,
              where: Callable[[_Chunk], np.ndarray] | None = None, clear_label: bool = False) -> None:
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


def _rotation(axial: float = 0.0, coronal: float = 0.0, sagittal: float = 0.0) -> np.ndarray:
    """Rotation in (z, y, x) coordinates; columns are the shape's local axes in the world frame."""
    ca, sa = np.cos(axial), np.sin(axial)
    cc, sc = np.cos(coronal), np.sin(coronal)
    cs, ss = np.cos(sagittal), np.sin(sagittal)
    r_axial = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])  # within the (y, x) plane
    r_coronal = np.array([[cc, 0, -sc], [0, 1, 0], [sc, 0, cc]])  # within the (z, x) plane
    r_sagittal = np.array([[cs, -ss, 0], [ss, cs, 0], [0, 0, 1]])  # within the (z, y) plane
    return r_axial @ r_coronal @ r_sagittal


def _ellipsoid(ch: _Chunk, center, semi, rot: np.ndarray | None = None) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid; (z, y, x) center and semi-axes."""
    d = (ch.Z - np.float32(center[0]), ch.Y - np.float32(center[1]), ch.X - np.float32(center[2]))
    if rot is None:
        q = [d[i] / np.float32(semi[i]) for i in range(3)]
    else:
        q = [(d[0] * rot[0, i] + d[1] * rot[1, i] + d[2] * rot[2, i]) / semi[i] for i in range(3)]
        q = [v.astype(np.float32, copy=False) for v in q]
    r = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
    return (r - 1.0) * np.float32(min(semi))


def _ellipsoid_box(center, semi, pad: float = 0.0) -> list[tuple[float, float]]:
    reach = max(semi) + pad
    return [(c - reach, c + reach) for c in center]


def _spline(points, radii, step: float) -> tuple[np.ndarray, np.ndarray]:
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


class _Tube:
    """A tube of varying radius along a spline: signed distance (mm) as a union of round cones."""

    def __init__(self, points, radii, r_min: float = 0.0, scale=(1.0, 1.0, 1.0), step: float | None = None):
        """``r_min`` (mm) keeps thin tubes visible at coarse voxels and sets the finest useful step."""
        radii = np.maximum(np.asarray(radii, float), r_min)
        self.scale = np.asarray(scale, float)
        step = max(step or 0.8 * float(np.min(radii)), 2.0 * r_min, 2.0)
        pts, rad = _spline(np.asarray(points, float) * self.scale, radii, step)
        self.pts, self.rad = pts, rad
        reach = float(rad.max()) + 1.0
        lo, hi = pts.min(0) - reach, pts.max(0) + reach
        self.box = [(lo[i] / self.scale[i], hi[i] / self.scale[i]) for i in range(3)]

    def field(self, ch: _Chunk) -> np.ndarray:
        f = np.full(ch.shape, np.inf, np.float32)
        sz, sy, sx = self.scale
        z, y, x = ch.z * sz, ch.y * sy, ch.x * sx
        for k in range(len(self.pts) - 1):
            a, b = self.pts[k], self.pts[k + 1]
            ra, rb = self.rad[k], self.rad[k + 1]
            reach = max(ra, rb) + 1.0
            lo, hi = np.minimum(a, b) - reach, np.maximum(a, b) + reach
            idx = [_span(coords, l, h) for coords, l, h in zip((z, y, x), lo, hi)]
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


def _enhanced(tissue: str, phase: int, strength: float) -> float:
    native = _HU[tissue][0]
    return native + strength * (_HU[tissue][phase] - native)


# --------------------------------------------------------------------------------------------------
# The anatomy


class _Anatomy:
    """Draws one abdomen onto a canvas. Every random choice comes from ``rng`` in a fixed order."""

    def __init__(self, canvas: _Canvas, rng: np.random.Generator, habitus: dict, drop: frozenset[str]):
        self.c = canvas
        self.rng = rng
        self.h = habitus
        self.drop = drop
        self.r_min = 0.8 * max(canvas.voxel[1], canvas.voxel[2])  # thin structures stay >= ~1.6 voxels wide
        self.phase = int(rng.choice(3, p=[0.2, 0.3, 0.5]))
        self.strength = float(rng.uniform(0.75, 1.15))
        self.k = habitus["k"]  # per-case stretch of organ positions (z, y, x)

    # helpers -------------------------------------------------------------------------------------
    def hu(self, tissue: str, jitter: float = 6.0) -> float:
        return _enhanced(tissue, self.phase, self.strength) + float(self.rng.normal(0, jitter))

    def at(self, z: float, y: float, x: float, jitter: float = 0.0) -> np.ndarray:
        """A reference position stretched by the case's habitus, plus random jitter (mm)."""
        p = np.array([z, y, x]) * self.k
        return p + (self.rng.normal(0, jitter, 3) if jitter else 0.0)

    def path(self, points, jitter: float) -> np.ndarray:
        return np.array([self.at(*p, jitter=jitter) for p in points])

    def noise(self, box, cell: float) -> _Noise:
        """A noise field over ``box`` clipped to the canvas (lattice cells no finer than half a voxel)."""
        c = self.c
        clipped = [(max(lo, float(v[0])), min(hi, float(v[-1]))) for (lo, hi), v in zip(box, (c.z, c.y, c.x))]
        clipped = [(lo, max(lo, hi)) for lo, hi in clipped]
        return _Noise(self.rng, clipped, max(cell, 0.5 * min(c.voxel)))

    def body_r(self, ch: _Chunk, grow: tuple[float, float, float]) -> np.ndarray:
        """Superellipse radius of the body cross-section grown by (lateral, anterior, posterior) mm."""
        h = self.h
        wave = 1.0 + 0.03 * np.sin(ch.Z * np.float32(2 * np.pi / 300.0) + np.float32(h["wave_phase"]))
        a = (np.float32(h["cavity_a"] + grow[0]) * wave)
        b = np.where(ch.Y < 0, np.float32(h["cavity_ant"] + grow[1]), np.float32(h["cavity_post"] + grow[2]))
        p = np.float32(h["exponent"])
        r = (np.abs(ch.X / a) ** p + np.abs(ch.Y / (b * wave)) ** p) ** (1.0 / p)
        return r + np.float32(0.012) * self.body_noise(ch.z, ch.y, ch.x)

    def cavity(self, ch: _Chunk) -> np.ndarray:
        return self.cav[ch.sl]

    def diaphragm(self, ch: _Chunk) -> np.ndarray:
        """Height (reference z) of the diaphragm over each (y, x): two domes, lower posteriorly."""
        h, k = self.h, self.k
        Y, X = ch.Y[0], ch.X[0]
        right = h["dome_r"] - 40.0 * (((X + 60 * k[2]) / (100 * k[2])) ** 2 + ((Y - 10) / (120 * k[1])) ** 2)
        left = h["dome_l"] - 40.0 * (((X - 60 * k[2]) / (95 * k[2])) ** 2 + ((Y - 10) / (120 * k[1])) ** 2)
        dome = np.maximum(right, left) - 20.0 * np.clip((Y - 40.0) / 60.0, 0.0, 1.0)
        return dome[None].astype(np.float32)

    def abdominal(self, ch: _Chunk) -> np.ndarray:
        return self.cav[ch.sl] & self.below[ch.sl]

    def organ(self, name: str, box, shape_fn, value_fn, where=None) -> None:
        if name in self.drop:
            return
        self.c.paint(box, shape_fn, value_fn, label=_L[name], where=where or self.abdominal)

    # drawing -------------------------------------------------------------------------------------
    def draw(self) -> None:
        full = [(-1e4, 1e4)] * 3
        self.body_noise = self.noise([(self.c.z[0], self.c.z[-1]), (-200, 200), (-200, 200)], 40.0)
        self.cav = np.zeros(self.c.shape, bool)
        self.below = np.zeros(self.c.shape, bool)
        for ch in self.c.chunks(full):
            self.cav[ch.sl] = self.body_r(ch, (0.0, 0.0, 0.0)) < 1.0
            self.below[ch.sl] = ch.Z < self.diaphragm(ch)
        self.background(full)
        self.thorax(full)
        self.retroperitoneum()
        self.bowel()
        self.vessels()
        self.liver()
        self.spleen()
        self.kidneys()
        self.stomach_and_duodenum()
        self.pancreas()
        self.gallbladder()
        self.adrenals()
        self.great_vessels()
        self.spine(full)

    def background(self, full) -> None:
        h, rng = self.h, self.rng
        fat_tex = self.noise([(self.c.z[0], self.c.z[-1]), (-200, 200), (-200, 200)], 10.0)
        fat_hu, muscle_hu = float(rng.uniform(-115, -85)), self.hu("muscle")
        m = h["muscle"]
        body = (h["fat_lat"] + m, h["fat_ant"] + m, h["fat_post"] + m)

        def values(ch, f, base, amp):
            return base + amp * fat_tex(ch.z, ch.y, ch.x)

        self.c.paint(full, lambda ch: self.body_r(ch, body) < 1.0, lambda ch, f: values(ch, f, fat_hu, 8.0))
        self.c.paint(full, lambda ch: self.body_r(ch, (m, m, m)) < 1.0, lambda ch, f: values(ch, f, muscle_hu, 6.0))
        self.c.paint(full, self.cavity, lambda ch, f: values(ch, f, fat_hu + 10.0, 10.0))
        # Lower ribs: bone in the muscle wall at periodic heights, not in front.
        rib_hu, rib_phase = float(rng.uniform(300, 550)), float(rng.uniform(0, 26))

        def ribs(ch):
            wall = ~self.cav[ch.sl] & (self.body_r(ch, (m, m, m)) < 1.0)
            angle = np.arctan2(ch.Y, ch.X)  # +pi/2 is posterior, -pi/2 anterior
            height = (ch.Z + np.float32(rib_phase) + 70.0 * (1.0 - np.sin(angle))) % 26.0
            front = np.abs(angle + np.pi / 2) < 0.7
            return wall & (height < 8.0) & ~front & (ch.Z > 110.0)

        self.c.paint([(110.0, 1e4), (-1e4, 1e4), (-1e4, 1e4)], ribs, rib_hu)

    def thorax(self, full) -> None:
        """Lung bases and heart above the diaphragm, so the top slices look like the thoracoabdominal junction."""
        lung_hu, heart_hu = float(self.rng.uniform(-880, -800)), self.hu("heart", 10.0)
        lung_tex = self.noise([(150, 400), (-200, 200), (-200, 200)], 8.0)
        above = lambda ch: self.cav[ch.sl] & ~self.below[ch.sl]  # noqa: E731
        box = [(150.0, 1e4), (-1e4, 1e4), (-1e4, 1e4)]
        self.c.paint(box, above, lambda ch, f: lung_hu + 25.0 * lung_tex(ch.z, ch.y, ch.x))
        heart_c, heart_s = self.at(300, -30, 20, 6), np.array([75.0, 65.0, 80.0]) * self.k
        self.c.paint(_ellipsoid_box(heart_c, heart_s), lambda ch: _ellipsoid(ch, heart_c, heart_s), heart_hu,
                     where=above)

    def retroperitoneum(self) -> None:
        """Psoas muscles: unlabeled soft tissue beside the spine that grows towards the pelvis."""
        hu = self.hu("muscle")
        for side in (-1, 1):
            pts = self.path([(150, 60, side * 26), (90, 62, side * 40), (0, 58, side * 52), (-60, 50, side * 62)], 3)
            tube = _Tube(pts, [3.0, 10.0, 16.0, 19.0], self.r_min)
            self.c.paint(tube.box, tube.field, hu, where=self.cavity)

    def bowel(self) -> None:
        """Colon and small-bowel loops: unlabeled distractors with gut-wall HU, fluid and gas."""
        rng, k = self.rng, self.k
        wall_hu = self.hu("gut_wall")
        colon = self.path([(15, 0, -100), (70, 5, -108), (112, -10, -100), (105, -65, -50), (98, -75, 0),
                           (108, -68, 50), (148, -20, 95), (120, 15, 112), (60, 25, 115), (10, 20, 105)], 6)
        radii = np.array([22, 20, 19, 17, 17, 17, 17, 16, 15, 15]) * rng.uniform(0.85, 1.15)
        tube = _Tube(colon, radii, self.r_min)
        tex = self.noise(tube.box, 6.0)
        wall = float(rng.uniform(2.5, 4.0))

        def colon_hu(ch, f):
            t = tex(ch.z, ch.y, ch.x)
            content = np.where(t > 0.2, np.float32(-950.0), np.float32(-120.0) + 60.0 * t)
            return np.where(f > -wall, np.float32(wall_hu), content)

        self.c.paint(tube.box, tube.field, colon_hu, where=self.cavity)
        for _ in range(int(rng.integers(4, 8))):
            start = np.array([rng.uniform(5, 95), rng.uniform(-80, 0), rng.uniform(-70, 70)])
            pts = [start]
            direction = rng.normal(0, 1, 3)
            for _ in range(4):
                direction = direction / np.linalg.norm(direction) + rng.normal(0, 0.7, 3)
                nxt = pts[-1] + 28.0 * direction / np.linalg.norm(direction)
                pts.append(np.clip(nxt, [0, -85, -80], [100, 10, 80]))
            loop = _Tube(np.array(pts) * k, rng.uniform(8, 12, len(pts)), self.r_min)
            kind = rng.choice(3, p=[0.5, 0.2, 0.3])  # fluid-filled, gas, collapsed
            content = [float(rng.uniform(0, 30)), -900.0, wall_hu][kind]
            wall_mm = float(rng.uniform(2.0, 3.0))
            self.c.paint(loop.box, loop.field,
                         lambda ch, f, c=content: np.where(f > -wall_mm, np.float32(wall_hu), np.float32(c)),
                         where=self.cavity)

    def vessels(self) -> None:
        """Unlabeled vessels (portal system, renal, iliac): same HU as the labeled aorta and IVC."""
        artery, vein, portal = self.hu("artery", 8), self.hu("vein", 8), self.hu("portal", 8)
        specs = [
            (portal, [(108, 12, -5), (135, 10, -25), (150, 5, -45)], [7, 7, 6]),  # portal vein
            (portal, [(108, 12, -5), (118, 25, 30), (135, 40, 70), (150, 45, 90)], [4.5, 4.5, 4, 4]),  # splenic
            (portal, [(108, 12, -5), (70, 5, -8), (20, 0, -12)], [5, 5, 4.5]),  # SMV
            (artery, [(112, 25, 12), (95, 12, 10), (40, 5, 5)], [3.5, 3.5, 3]),  # SMA
            (vein, [(100, 45, 45), (100, 12, 25), (98, 20, -15)], [5, 5, 5]),  # left renal vein
            (vein, [(88, 45, -45), (92, 30, -25)], [5, 5]),  # right renal vein
            (artery, [(105, 35, 12), (100, 50, 45)], [3, 3]),  # left renal artery
            (artery, [(103, 38, 12), (95, 45, -20), (88, 48, -45)], [3, 3, 3]),  # right renal artery
            (artery, [(15, 32, 10), (-25, 30, -25)], [7, 6]),  # iliac arteries
            (artery, [(15, 32, 10), (-25, 30, 40)], [7, 6]),
            (vein, [(10, 30, -20), (-25, 38, -35)], [8, 7]),  # iliac veins
            (vein, [(10, 30, -20), (-25, 40, 25)], [8, 7]),
        ]
        for hu, pts, radii in specs:
            tube = _Tube(self.path(pts, 3), radii, self.r_min)
            self.c.paint(tube.box, tube.field, hu, where=self.cavity)

    def liver(self) -> None:
        rng, k = self.rng, self.k
        c = self.at(170, -5, -55, 6)
        semi = np.array([70, 80, 90]) * k * rng.uniform(0.9, 1.1, 3)
        box = [(c[0] - semi[0] - 10, c[0] + semi[0] + 30), (c[1] - semi[1] - 40, c[1] + semi[1] + 10),
               (c[2] - semi[2] - 10, c[2] + semi[2] + 10)]
        shape_noise, tex = self.noise(box, 25.0), self.noise(box, 5.0)
        amp, left_reach = float(rng.uniform(6, 12)), float(rng.uniform(90, 130))

        def shape(ch):
            t = np.clip((ch.X - np.float32(c[2] + 10)) / np.float32(left_reach), 0, 1)  # 0 right lobe, 1 left tip
            sy, sz = semi[1] * (1 - 0.55 * t), semi[0] * (1 - 0.5 * t)
            qz, qy, qx = (ch.Z - c[0] - 10 * t) / sz, (ch.Y - c[1] + 25 * t) / sy, (ch.X - c[2]) / semi[2]
            r = np.sqrt(qz * qz + qy * qy + qx * qx)
            return (r - 1.0) * 60.0 + amp * shape_noise(ch.z, ch.y, ch.x)

        hu = self.hu("liver")
        self.organ("liver", box, shape, lambda ch, f: hu + 6.0 * tex(ch.z, ch.y, ch.x))
        if "liver" in self.drop:
            return
        # Hepatic and portal branches inside the liver: labeled liver, vessel HU.
        inside = lambda ch: ch.label == _L["liver"]  # noqa: E731
        hv, pv = self.hu("vein", 8), self.hu("portal", 8)
        branches = [(hv, [(230, 15, -15), (205, 0, -110)]), (hv, [(230, 15, -15), (212, -45, -60)]),
                    (hv, [(230, 15, -15), (215, -40, 10)]), (pv, [(150, 5, -45), (160, 10, -105)]),
                    (pv, [(150, 5, -45), (172, -40, -25)])]
        for hu_v, pts in branches:
            tube = _Tube(self.path(pts, 5), [6.0, 2.5], self.r_min)
            self.c.paint(tube.box, tube.field, hu_v, where=inside)

    def spleen(self) -> None:
        rng = self.rng
        c = self.at(170, 48, 100, 6)
        angle = float(rng.normal(np.pi / 4, 0.15))
        rot = _rotation(axial=angle, sagittal=float(rng.normal(0, 0.15)))
        semi = np.array([48, 22, 55]) * rng.uniform(0.85, 1.15, 3)  # (z, thickness, length)
        normal = rot[:, 1]  # outward (towards posterolateral wall)
        inner_c = c - (semi[1] + 6) * normal
        inner_s = semi * np.array([1.0, 1.1, 0.95])
        box = _ellipsoid_box(c, semi, 10)
        shape_noise, tex = self.noise(box, 18.0), self.noise(box, 7.0)

        def shape(ch):
            f = np.maximum(_ellipsoid(ch, c, semi, rot), -_ellipsoid(ch, inner_c, inner_s, rot))
            return f + 4.0 * shape_noise(ch.z, ch.y, ch.x)

        hu, amp = self.hu("spleen"), 25.0 if self.phase == 1 else 5.0
        self.organ("spleen", box, shape, lambda ch, f: hu + amp * tex(ch.z, ch.y, ch.x))

    def kidneys(self) -> None:
        rng = self.rng
        cortex, medulla = self.hu("kidney_cortex"), self.hu("kidney_medulla")
        for name, side, z in (("right_kidney", -1, 85.0), ("left_kidney", 1, 100.0)):
            c = self.at(z, 55, side * 65, 5)
            semi = np.array([55, 25, 27]) * rng.uniform(0.88, 1.12, 3)
            rot = _rotation(axial=float(rng.normal(side * 0.35, 0.1)), coronal=float(rng.normal(-side * 0.22, 0.06)))
            hilum = c + rot @ np.array([0.0, -8.0, -side * (semi[2] + 2)])
            hilum_r = float(rng.uniform(11, 15))
            pelvis = c + rot @ np.array([0.0, -4.0, -side * 10.0])
            box = _ellipsoid_box(c, semi, 6)
            shape_noise = self.noise(box, 15.0)
            thickness = float(rng.uniform(6, 9))

            def shape(ch, c=c, semi=semi, rot=rot, hilum=hilum, hilum_r=hilum_r, shape_noise=shape_noise):
                f = np.maximum(_ellipsoid(ch, c, semi, rot), -_ellipsoid(ch, hilum, (hilum_r,) * 3))
                return f + 2.5 * shape_noise(ch.z, ch.y, ch.x)

            def values(ch, f, pelvis=pelvis, thickness=thickness):
                v = np.where(f > -thickness, np.float32(cortex), np.float32(medulla))
                return np.where(_ellipsoid(ch, pelvis, (14.0, 7.0, 7.0)) < 0, np.float32(10.0), v)

            self.organ(name, box, shape, values)

    def stomach_and_duodenum(self) -> None:
        rng = self.rng
        wall_hu = self.hu("gut_wall")
        content_kind = int(rng.choice(4, p=[0.45, 0.3, 0.1, 0.15]))  # fluid, food, empty, oral contrast
        content_hu = [float(rng.uniform(0, 25)), float(rng.uniform(30, 60)), wall_hu,
                      float(rng.uniform(180, 320))][content_kind]
        collapsed = 0.6 if content_kind == 2 else 1.0
        pts = self.path([(215, 25, 60), (190, -5, 70), (160, -35, 65), (130, -55, 45), (118, -55, 15),
                         (120, -40, -10), (122, -28, -22)], 6)
        radii = np.array([30, 33, 30, 25, 18, 12, 8]) * rng.uniform(0.85, 1.15) * collapsed
        stomach = _Tube(pts, radii, self.r_min)
        tex = self.noise(stomach.box, 7.0)
        wall = float(rng.uniform(4, 7))
        gas_level = float(pts[3][1] - rng.uniform(0, 20)) if rng.random() < 0.75 else -1e4

        def stomach_hu(ch, f):
            content = np.float32(content_hu) + (12.0 if content_kind == 1 else 3.0) * tex(ch.z, ch.y, ch.x)
            content = np.where(ch.Y < gas_level, np.float32(-950.0), content)
            return np.where(f > -wall, np.float32(wall_hu), content)

        self.organ("stomach", stomach.box, stomach.field, stomach_hu)
        duo = self.path([(122, -28, -22), (125, -15, -45), (118, 0, -58), (95, 5, -62), (72, 8, -56),
                         (62, 5, -30), (60, 5, 0), (65, 5, 25), (80, 8, 35), (95, 5, 30)], 4)
        tube = _Tube(duo, rng.uniform(10, 13) * np.ones(len(duo)), self.r_min)
        gas = rng.random() < 0.3
        duo_content = content_hu if content_kind == 3 else float(rng.uniform(0, 30))

        def duo_hu(ch, f):
            content = np.where((ch.Y < duo[1][1] + 3) & gas, np.float32(-900.0), np.float32(duo_content))
            return np.where(f > -3.0, np.float32(wall_hu), content)

        self.organ("duodenum", tube.box, tube.field, duo_hu)

    def pancreas(self) -> None:
        rng = self.rng
        pts = self.path([(80, 18, -25), (95, 10, -40), (105, 0, -8), (115, 10, 30), (130, 30, 70), (135, 40, 85)], 4)
        radii = np.array([10, 16, 9, 11, 10, 8]) * rng.uniform(0.85, 1.15)
        tube = _Tube(pts, radii, self.r_min)
        shape_noise, tex = self.noise(tube.box, 8.0), self.noise(tube.box, 3.5)
        fatty = float(rng.uniform(0, 25))
        hu = self.hu("pancreas") - fatty
        amp = 8.0 + fatty * 0.6

        def shape(ch):
            return tube.field(ch) + 2.5 * shape_noise(ch.z, ch.y, ch.x)

        self.organ("pancreas", tube.box, shape, lambda ch, f: hu + amp * tex(ch.z, ch.y, ch.x))

    def gallbladder(self) -> None:
        rng = self.rng
        c = self.at(118, -45, -50, 5)
        semi = np.array([32, 14, 14]) * rng.uniform(0.75, 1.2, 3)
        rot = _rotation(axial=float(rng.normal(0.3, 0.2)), sagittal=float(rng.normal(-0.6, 0.2)))
        box = _ellipsoid_box(c, semi, 5)
        shape_noise = self.noise(box, 12.0)
        hu = float(rng.uniform(5, 30))
        self.organ("gallbladder", box, lambda ch: _ellipsoid(ch, c, semi, rot) + 2.0 * shape_noise(ch.z, ch.y, ch.x),
                   lambda ch, f: np.where(f > -2.0, np.float32(hu + 15.0), np.float32(hu)))

    def adrenals(self) -> None:
        hu = self.hu("adrenal")
        shapes = (("right_adrenal_gland", [(135, 60, -32), (165, 38, -38), (140, 55, -52)]),
                  ("left_adrenal_gland", [(132, 58, 38), (160, 30, 32), (138, 48, 55)]))
        for name, pts in shapes:
            tube = _Tube(self.path(pts, 3), self.rng.uniform(3.0, 4.5, 3), self.r_min, step=2.0)
            self.organ(name, tube.box, tube.field, hu)

    def great_vessels(self) -> None:
        rng, top = self.rng, float(self.c.z[-1]) + 20.0
        wall = self.hu("gut_wall")
        eso = _Tube(self.path([(max(top, 300.0), 38, 2), (240, 25, 12), (215, 10, 28), (200, 2, 45)], 3),
                    rng.uniform(7, 10) * np.ones(4), self.r_min)
        air = rng.random() < 0.3
        eso_axis = eso

        def eso_hu(ch, f):
            return np.where((f < -eso_axis.rad.min() + 2.5) & air, np.float32(-900.0), np.float32(wall))

        self.organ("esophagus", eso.box, eso.field, eso_hu, where=self.cavity)
        ivc_pts = self.path([(10, 30, -20), (60, 30, -22), (120, 25, -25), (180, 15, -25), (240, 5, -15)], 3)
        ivc = _Tube(ivc_pts, rng.uniform(10, 12.5) * np.ones(5), self.r_min, scale=(1.0, 1.35, 1.0))
        vein, artery = self.hu("vein", 8), self.hu("artery", 8)
        mixing = self.noise(ivc.box, 12.0)
        self.organ("inferior_vena_cava", ivc.box, ivc.field,
                   lambda ch, f: vein + (20.0 if self.phase == 1 else 4.0) * mixing(ch.z, ch.y, ch.x),
                   where=self.cavity)
        aorta_pts = self.path([(15, 32, 10), (100, 32, 12), (170, 34, 14), (230, 40, 20), (max(top, 300.0), 42, 24)], 3)
        aorta = _Tube(aorta_pts, np.array([10, 11, 11.5, 12, 12.5]) * rng.uniform(0.9, 1.15), self.r_min)
        self.organ("aorta", aorta.box, aorta.field, artery, where=self.cavity)
        if "aorta" not in self.drop and rng.random() < 0.35:
            for _ in range(int(rng.integers(1, 4))):  # wall calcifications, still labeled aorta
                i = int(rng.integers(0, len(aorta.pts)))
                theta = rng.uniform(0, 2 * np.pi)
                spot = aorta.pts[i] + aorta.rad[i] * 0.85 * np.array([0.0, np.sin(theta), np.cos(theta)])
                self.c.paint(_ellipsoid_box(spot, (3.0,) * 3), lambda ch, s=spot: _ellipsoid(ch, s, (3.0, 2.5, 2.5)),
                             float(rng.uniform(500, 900)), where=lambda ch: ch.label == _L["aorta"])

    def spine(self, full) -> None:
        """Vertebrae and paraspinal muscles, painted last and unlabeled (they bound the organs)."""
        rng, k = self.rng, self.k
        cy, r_body = 65.0 * k[1], float(rng.uniform(18, 22))
        cortical, cancellous = float(rng.uniform(550, 800)), float(rng.uniform(180, 300))
        disc_phase, level = float(rng.uniform(0, 33)), 33.0
        muscle = self.hu("muscle")
        tex = self.noise([(self.c.z[0], self.c.z[-1]), (0, 160), (-80, 80)], 4.0)
        box = [(-1e4, 1e4), (cy - r_body - 2, 160.0), (-90.0, 90.0)]
        for side in (-1, 1):
            c, semi = (0.0, (cy + 43), side * 38.0 * k[2]), (1e4, 20.0, 26.0)
            self.c.paint(box, lambda ch, c=c, semi=semi: _ellipsoid(ch, c, semi), muscle,
                         where=lambda ch: self.body_r(ch, (5, 5, 5)) < 1.0, clear_label=True)

        def vertebra(ch):
            disc = ((ch.Z + np.float32(disc_phase)) % np.float32(level)) < 7.0
            r_vb = np.sqrt(ch.X ** 2 + (ch.Y - cy) ** 2)
            canal = np.sqrt(ch.X ** 2 + (ch.Y - cy - 30) ** 2)
            arch = (canal < 16.0) & (canal >= 9.0) & (ch.Y > cy + 20)
            spinous = (np.abs(ch.X) < 4.0) & (ch.Y > cy + 40) & (ch.Y < cy + 62)
            transverse = (np.abs(np.abs(ch.X) - 24) < 9) & (np.abs(ch.Y - cy - 24) < 3)
            bone = (r_vb < r_body) | ((arch | spinous | transverse) & ~disc)
            return bone | (canal < 9.0)

        def vertebra_hu(ch, f):
            disc = ((ch.Z + np.float32(disc_phase)) % np.float32(level)) < 7.0
            r_vb = np.sqrt(ch.X ** 2 + (ch.Y - cy) ** 2)
            canal = np.sqrt(ch.X ** 2 + (ch.Y - cy - 30) ** 2)
            spongy = np.float32(cancellous) + 40.0 * tex(ch.z, ch.y, ch.x)
            v = np.where(r_vb > r_body - 2.5, np.float32(cortical), spongy)
            v = np.where((r_vb < r_body) & disc, np.float32(90.0), v)
            v = np.where((r_vb >= r_body) & ~disc, np.float32(cortical * 0.6) + 60.0 * tex(ch.z, ch.y, ch.x), v)
            return np.where(canal < 9.0, np.float32(25.0), v)

        self.c.paint(box, vertebra, vertebra_hu, clear_label=True)


# --------------------------------------------------------------------------------------------------
# Public API


def _single_threaded_blas():
    """The noise fields are many tiny matrix products: threaded BLAS makes them 10-40x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn (nnU-Net)
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _as_generator(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _organ_names(drop: Iterable[str | int] | None) -> frozenset[str]:
    names = set()
    by_label = {organ.label: organ.name for organ in FLARE22_ORGANS}
    for item in drop or ():
        if isinstance(item, (int, np.integer)) and int(item) in by_label:
            names.add(by_label[int(item)])
        elif isinstance(item, str) and item in ORGAN_LABELS:
            names.add(item)
        else:
            raise ValueError(f"unknown organ to drop: {item!r} (use a FLARE22 name or label 1-13)")
    return frozenset(names)


def _axis_map(direction) -> tuple[list[int], list[float], np.ndarray]:
    """For an axis-aligned ITK direction: the physical axis and sign of each index axis (x, y, z)."""
    d = np.asarray(direction, float).reshape(3, 3)
    perm, sign = [], []
    for a in range(3):
        col = d[:, a]
        p = int(np.argmax(np.abs(col)))
        if not np.isclose(abs(col[p]), 1.0) or not np.allclose(np.delete(col, p), 0.0):
            raise ValueError("direction must be an axis-aligned (signed permutation) 3x3 matrix")
        perm.append(p)
        sign.append(float(np.sign(col[p])))
    if sorted(perm) != [0, 1, 2]:
        raise ValueError("direction must be an axis-aligned (signed permutation) 3x3 matrix")
    return perm, sign, d


def make_phantom(rng_or_seed, shape_zyx: Sequence[int], spacing_zyx: Sequence[float], *,
                 origin: Sequence[float] | None = None, direction: Sequence[float] | None = None,
                 body_scale: float | None = None, drop: Iterable[str | int] | None = None,
                 noise_sd: float | None = None) -> Phantom:
    """Generate one abdominal CT phantom.

    rng_or_seed: an int, SeedSequence or numpy Generator (same seed and arguments: identical arrays).
    shape_zyx, spacing_zyx: the output array's shape and voxel spacing (mm) in array order.
    origin: ITK (x, y, z) of voxel 0; by default the volume is centred in-plane at a random table height.
    direction: 9 ITK values (axis-aligned only); identity = standard axial CT in LPS.
    body_scale: None fits a scaled-down body into the field of view (about 85-90 % of its width);
        a number gives physical size (1.0 = an adult abdomen about 340 mm wide), capped to fit.
    drop: organs (names or labels) to leave out; every other organ is present in the label map.
    noise_sd: HU of the image noise; drawn per case when None.
    """
    rng = _as_generator(rng_or_seed)
    shape_zyx = tuple(int(v) for v in shape_zyx)
    spacing_zyx = tuple(float(v) for v in spacing_zyx)
    if len(shape_zyx) != 3 or len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
        raise ValueError("shape_zyx and spacing_zyx need 3 positive values each")
    if min(shape_zyx) < 8:
        raise ValueError(f"shape {shape_zyx} is too small for a phantom (at least 8 voxels per axis)")
    drop_names = _organ_names(drop)
    perm, sign, d = _axis_map(direction if direction is not None else np.eye(3).ravel())
    # The canonical grid: index axis p along physical axis p (ITK order x, y, z).
    size_xyz, spacing_xyz = shape_zyx[::-1], spacing_zyx[::-1]
    canon_size, canon_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for a in range(3):
        canon_size[perm[a]], canon_spacing[perm[a]] = size_xyz[a], spacing_xyz[a]
    canon_shape, canon_sp = tuple(canon_size[::-1]), tuple(canon_spacing[::-1])

    for attempt in range(8):
        with _single_threaded_blas():
            image, label, info = _generate(rng, canon_shape, canon_sp, body_scale, drop_names, noise_sd)
        counts = np.bincount(label.ravel(), minlength=len(FLARE22_ORGANS) + 1)
        missing = [o.name for o in FLARE22_ORGANS if o.name not in drop_names and counts[o.label] == 0]
        if not missing:
            break
    else:
        raise RuntimeError(f"could not place {missing} in a {shape_zyx} volume; use a larger volume")
    info["attempts"] = attempt + 1

    # Reorient the canonical arrays into the requested index order.
    axes = [2 - perm[2 - ax] for ax in range(3)]
    flips = tuple(2 - a for a in range(3) if sign[a] < 0)
    image = np.ascontiguousarray(np.flip(np.transpose(image, axes), flips) if flips else np.transpose(image, axes))
    label = np.ascontiguousarray(np.flip(np.transpose(label, axes), flips) if flips else np.transpose(label, axes))
    if origin is None:
        extent = (np.array(size_xyz) - 1) * np.array(spacing_xyz)
        center = np.array([0.0, float(rng.uniform(-30, 30)), float(rng.uniform(-400, 200))])
        origin = center - d @ (extent / 2)
    return Phantom(image=image, label=label, spacing=spacing_zyx, origin=tuple(float(v) for v in origin),
                   direction=tuple(float(v) + 0.0 for v in d.ravel()), dropped=tuple(sorted(drop_names)), info=info)


def _generate(rng, shape, spacing, body_scale, drop, noise_sd):
    """Draw the canonical (identity-direction) image and label."""
    nz, ny, nx = shape
    sz, sy, sx = spacing
    k = rng.uniform(0.93, 1.07, 3)
    habitus = {
        "k": k, "cavity_a": 140.0 * k[2], "cavity_ant": 95.0 * k[1], "cavity_post": 105.0 * k[1],
        "muscle": float(rng.uniform(8, 14)), "fat_lat": float(rng.uniform(5, 40)),
        "fat_ant": float(rng.uniform(5, 45)), "fat_post": float(rng.uniform(4, 20)),
        "exponent": float(rng.uniform(2.1, 2.6)), "wave_phase": float(rng.uniform(0, 2 * np.pi)),
        "dome_r": float(rng.normal(232, 6)) * k[0], "dome_l": float(rng.normal(222, 6)) * k[0],
    }
    m = habitus["muscle"]
    half_width = habitus["cavity_a"] + m + habitus["fat_lat"]
    ant = habitus["cavity_ant"] + m + habitus["fat_ant"]
    post = habitus["cavity_post"] + m + habitus["fat_post"]
    fit = min(nx * sx / (2 * half_width), ny * sy / (ant + post))
    if body_scale is None:
        s_xy = fit * float(rng.uniform(0.85, 0.9))
    else:
        s_xy = min(float(body_scale), 0.95 * fit)
    fov_z = nz * sz
    window = _Z_WINDOW[1] - _Z_WINDOW[0]
    if body_scale is None:
        s_z = fov_z / (window * float(rng.uniform(1.03, 1.15)))
    else:
        s_z = min(s_xy, fov_z / (window * 1.03))
    spare = fov_z / s_z - window
    z_bottom = _Z_WINDOW[0] - float(rng.uniform(0.2, 0.8)) * spare
    jitter = 0.03 * np.array([ny, nx]) * rng.uniform(-1, 1, 2)
    center_yx = ((ny - 1) / 2 - (post - ant) / 2 * s_xy / sy + jitter[0], (nx - 1) / 2 + jitter[1])
    canvas = _Canvas(shape, spacing, s_xy, s_z, center_yx, z_bottom)
    anatomy = _Anatomy(canvas, rng, habitus, drop)
    anatomy.draw()

    # Image formation: noise, then a small in-plane blur (partial volume, correlated noise), in slabs.
    sd = float(noise_sd) / 0.375 if noise_sd is not None else float(rng.uniform(20, 50))
    out = np.empty(shape, np.int16)
    step = max(1, _CHUNK_VOXELS // (ny * nx))
    for z0 in range(0, nz, step):
        slab = canvas.image[z0:z0 + step]
        slab += rng.normal(0.0, sd, slab.shape).astype(np.float32)
        slab = _blur_inplane(slab)
        np.clip(np.rint(slab), -1024, 3071, out=slab)
        out[z0:z0 + step] = slab
    info = {"phase": ["native", "arterial", "portal"][anatomy.phase], "noise_sd": round(sd * 0.375, 2),
            "scale_xy": round(s_xy, 4), "scale_z": round(s_z, 4)}
    return out, canvas.label, info


def _blur_inplane(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 smoothing along y and x."""
    out = a * 0.5
    out[:, 1:] += 0.25 * a[:, :-1]
    out[:, :-1] += 0.25 * a[:, 1:]
    out[:, 0] += 0.25 * a[:, 0]
    out[:, -1] += 0.25 * a[:, -1]
    b = out * 0.5
    b[:, :, 1:] += 0.25 * out[:, :, :-1]
    b[:, :, :-1] += 0.25 * out[:, :, 1:]
    b[:, :, 0] += 0.25 * out[:, :, 0]
    b[:, :, -1] += 0.25 * out[:, :, -1]
    return b


# --------------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class CaseSpec:
    """What one case of a phantom dataset is made of (also written to ``phantoms.json``)."""

    identifier: str
    split: str  # "labeled", "unlabeled" or "test"
    seed: int  # make_phantom(seed, shape_zyx, spacing_zyx, body_scale=..., drop=..., direction=...) reproduces the case
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    body_scale: float | None
    dropped: tuple[str, ...]
    orientation: str  # a key of SCANNER_ORIENTATIONS: make_phantom(..., direction=...) stores it so

    @property
    def direction(self) -> tuple[float, ...]:
        return SCANNER_ORIENTATIONS[self.orientation][0]


def _draw_orientation(seed: int, split: str, index: int) -> str:
    """A case's scanner orientation, from a stream of its own: sizes, spacings, drops and anatomy stay what
    they were before orientations were drawn."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SPLIT_CODES[split], index, 1)))
    names = list(SCANNER_ORIENTATIONS)
    weights = np.array([SCANNER_ORIENTATIONS[n][1] for n in names])
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _check_range(name: str, value, low: float, high: float, integer: bool) -> tuple:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise NsnError(f"{name} needs two numbers MIN MAX, got {value!r}") from None
    if integer and (lo != int(lo) or hi != int(hi)):
        raise NsnError(f"{name} needs whole numbers, got {lo:g} {hi:g}")
    if not (low <= lo <= hi <= high):
        raise NsnError(f"{name} must satisfy {low:g} <= MIN <= MAX <= {high:g}, got {lo:g} {hi:g}")
    return (int(lo), int(hi)) if integer else (lo, hi)


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise NsnError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def plan_cases(num_labeled: int = 8, num_unlabeled: int = 24, num_test: int = 0, seed: int = 0,
               clinical: bool = False, *, name: str = "Phantoms", slices=None, inplane_voxels=None,
               inplane_spacing=None, slice_spacing=None, drop_probability: float = 0.2) -> list[CaseSpec]:
    """Draw every case's size, spacing, dropped organ and scanner orientation; cheap, deterministic, validated.

    Each case draws from SeedSequence(seed, spawn_key=(split, index)), so changing one split's
    count leaves the other splits' cases unchanged.
    """
    defaults = CLINICAL_DEFAULTS if clinical else SMALL_DEFAULTS
    num_labeled = _check_int("--num-labeled", num_labeled, 1, 100_000)
    num_unlabeled = _check_int("--num-unlabeled", num_unlabeled, 0, 100_000)
    num_test = _check_int("--num-test", num_test, 0, 100_000)
    seed = _check_int("--seed", seed, 0, 2**63 - 1)
    slices = _check_range("--slices", defaults["slices"] if slices is None else slices,
                          MIN_SLICES, MAX_VOXELS_PER_AXIS, True)
    voxels = _check_range("--inplane-voxels", defaults["inplane_voxels"] if inplane_voxels is None else inplane_voxels,
                          MIN_INPLANE_VOXELS, MAX_VOXELS_PER_AXIS, True)
    inplane = _check_range("--inplane-spacing", defaults["inplane_spacing"] if inplane_spacing is None
                           else inplane_spacing, 0.05, 10.0, False)
    thick = _check_range("--slice-spacing", defaults["slice_spacing"] if slice_spacing is None else slice_spacing,
                         0.1, 20.0, False)
    try:
        drop_probability = float(drop_probability)
    except (TypeError, ValueError):
        raise NsnError(f"--drop-probability must be a number from 0 to 1, got {drop_probability!r}") from None
    if not 0.0 <= drop_probability <= 1.0:
        raise NsnError(f"--drop-probability must be from 0 to 1, got {drop_probability:g}")
    drop_names, drop_p = list(DROP_WEIGHTS), np.array(list(DROP_WEIGHTS.values()))
    drop_p = drop_p / drop_p.sum()

    cases = []
    for split, count, prefix in (("labeled", num_labeled, f"{name}_"), ("unlabeled", num_unlabeled, f"{name}_unl_"),
                                 ("test", num_test, f"{name}_ts_")):
        for index in range(count):
            sequence = np.random.SeedSequence(seed, spawn_key=(_SPLIT_CODES[split], index))
            draw_seed, case_seed = (int(v) for v in sequence.generate_state(2, np.uint64))
            rng = np.random.default_rng(draw_seed)
            n_xy = int(rng.integers(voxels[0], voxels[1] + 1))
            sp_xy = round(float(rng.uniform(*inplane)), 3)
            sp_z = round(float(rng.uniform(*thick)), 3)
            if clinical:
                body_scale = round(float(rng.uniform(0.9, 1.1)), 3)
                target = body_scale * float(rng.uniform(300, 450))  # z field of view in mm
            else:
                body_scale = None
                target = 0.875 * n_xy * sp_xy / 340.0 * float(rng.uniform(260, 330))
            n_z = int(np.clip(round(target / sp_z), slices[0], slices[1]))
            dropped = ()
            if rng.random() < drop_probability:
                dropped = (drop_names[int(rng.choice(len(drop_names), p=drop_p))],)
            cases.append(CaseSpec(f"{prefix}{index:04d}", split, case_seed, (n_z, n_xy, n_xy), (sp_z, sp_xy, sp_xy),
                                  body_scale, dropped, _draw_orientation(seed, split, index)))
    return cases


def _manifest_text(manifest: dict) -> str:
    """JSON with one line per case: readable and diffable."""
    head = {k: v for k, v in manifest.items() if k != "cases"}
    lines = [json.dumps(head, indent=1)[:-2] + ',\n "cases": [']
    lines.append(",\n".join("  " + json.dumps(case) for case in manifest["cases"]))
    return "\n".join(lines) + "\n ]\n}\n"


#: peak bytes per voxel of making and writing one case (float32 canvas, uint8 labels, int16 image, the
#: reoriented copies and SimpleITK's): 12-16 measured on 6.5 M and 29 M voxel cases, plus a fixed margin
BYTES_PER_VOXEL = 16
FIXED_BYTES = 256 * 1024**2


def _address_space_left() -> int:
    """What ``ulimit -v`` (RLIMIT_AS, common on clusters) still allows this process; unlimited is huge."""
    import resource

    import psutil

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return 2**63 - 1
    return max(0, soft - psutil.Process().memory_info().vms)


def check_memory(cases: Sequence[CaseSpec]) -> None:
    """Refuse sizes whose largest case cannot fit in the available memory, before allocating anything
    (otherwise numpy fails with MemoryError halfway, or the kernel's OOM killer ends the process)."""
    import psutil

    if not cases:
        return
    largest = max(cases, key=lambda c: int(np.prod(c.shape_zyx, dtype=np.int64)))
    voxels = int(np.prod(largest.shape_zyx, dtype=np.int64))
    needed = voxels * BYTES_PER_VOXEL + FIXED_BYTES
    available = min(int(psutil.virtual_memory().available), _address_space_left())
    if needed > available:
        shape = "x".join(str(v) for v in largest.shape_zyx)
        raise NsnError(f"the largest case ({largest.identifier}, {shape} voxels) needs about {needed / 1024**3:.1f} GB "
                       f"of memory to generate, {available / 1024**3:.1f} GB are available; choose smaller "
                       f"--slices / --inplane-voxels")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def _check_target(raw_root: Path, dataset_id: int, name: str) -> Path:
    """Refuse an existing non-empty target or another dataset with the same id (nnU-Net would find two)."""
    target = raw_root / dataset_folder_name(dataset_id, name)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise NsnError(f"{target} already exists and is not empty; remove it or choose another -d/--name")
    prefix = f"Dataset{dataset_id:03d}_"
    roots = [("nnUNet_raw", raw_root)] + [(var, Path(os.environ[var]))
                                           for var in ("nnUNet_preprocessed", "nnUNet_results") if os.environ.get(var)]
    for var, root in roots:
        if not root.is_dir():
            continue
        for other in sorted(root.iterdir()):
            if other.name.startswith(prefix) and other.name != target.name and other.is_dir():
                raise NsnError(f"dataset id {dataset_id} is taken by {other} ({var}); choose another -d")
    return target


def write_phantom_dataset(raw_root: str | os.PathLike, dataset_id: int, name: str = "Phantoms", num_labeled: int = 8,
                          num_unlabeled: int = 24, num_test: int = 0, seed: int = 0, clinical: bool = False, *,
                          slices=None, inplane_voxels=None, inplane_spacing=None, slice_spacing=None,
                          drop_probability: float = 0.2, progress: bool = False) -> Path:
    """Write ``raw_root/DatasetXXX_name`` as an nnU-Net raw dataset and return its path.

    Layout: dataset.json, imagesTr + labelsTr (labeled), imagesUnlabeled (no labels anywhere),
    imagesTs + labelsTs (only when num_test > 0) and phantoms.json (per-case seed, shape, spacing,
    dropped organs, scanner orientation, phase, organ voxel counts). The cases come in the scanner
    orientations of SCANNER_ORIENTATIONS, and dataset.json names nnU-Net's reorienting reader
    (PHANTOM_READER_WRITER), as a user of nnU-Net does for data of mixed orientation. Built in a hidden
    sibling folder and renamed at the end: on any error nothing is left behind. Invalid arguments raise NsnError.
    """
    dataset_id = _check_int("-d (dataset id)", dataset_id, 1, 999)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise NsnError(f"--name must be letters, digits, '_' or '-', got {name!r}")
    cases = plan_cases(num_labeled, num_unlabeled, num_test, seed, clinical, name=name, slices=slices,
                       inplane_voxels=inplane_voxels, inplane_spacing=inplane_spacing, slice_spacing=slice_spacing,
                       drop_probability=drop_probability)
    raw_root = check_output_folder(Path(raw_root).expanduser().absolute(), "nnUNet_raw (-o)")
    target = _check_target(raw_root, dataset_id, name)
    check_memory(cases)
    raw_root.mkdir(parents=True, exist_ok=True)
    partial = raw_root / f".{target.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    folders = {"labeled": ("imagesTr", "labelsTr"), "unlabeled": ("imagesUnlabeled", None),
               "test": ("imagesTs", "labelsTs")}
    try:
        from tqdm import tqdm

        partial.mkdir()
        for split, (images, labels) in folders.items():
            if split == "test" and num_test == 0:
                continue
            (partial / images).mkdir()
            if labels:
                (partial / labels).mkdir()
        records = []
        for case in tqdm(cases, desc=f"phantoms {target.name}", unit="case", disable=not progress):
            phantom = make_phantom(case.seed, case.shape_zyx, case.spacing_zyx, body_scale=case.body_scale,
                                   drop=case.dropped, direction=case.direction)
            images, labels = folders[case.split]
            image_path = f"{images}/{case.identifier}_0000.nii.gz"
            label_path = f"{labels}/{case.identifier}.nii.gz" if labels else None
            phantom.write(partial / image_path, partial / label_path if label_path else None)
            records.append({
                "identifier": case.identifier, "split": case.split, "image": image_path, "label": label_path,
                "seed": case.seed, "shape_zyx": list(case.shape_zyx), "spacing_zyx": list(case.spacing_zyx),
                "body_scale": case.body_scale, "dropped": list(case.dropped), "orientation": case.orientation,
                "direction": list(case.direction), "phase": phantom.info["phase"],
                "noise_sd": phantom.info["noise_sd"], "organ_voxels": phantom.organ_voxels()})
        counts = f"{num_labeled} labeled (imagesTr/labelsTr), {num_unlabeled} unlabeled (imagesUnlabeled)" + (
            f", {num_test} test (imagesTs/labelsTs)" if num_test else "")
        dataset = {
            "channel_names": {"0": "CT"},
            "labels": flare22_dataset_labels(),
            "numTraining": num_labeled,
            "file_ending": ".nii.gz",
            "overwrite_image_reader_writer": PHANTOM_READER_WRITER,
            "name": name,
            "description": f"Synthetic abdominal CT phantoms with the 13 FLARE22 organs (noisy_student_nnunet "
                           f"{__version__}, seed {seed}{', clinical size' if clinical else ''}): {counts}. "
                           "Not patient data.",
        }
        manifest = {"generator": f"noisy_student_nnunet.phantoms {__version__}", "seed": seed, "clinical": clinical,
                    "drop_probability": float(drop_probability), "cases": records}
        (partial / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
        (partial / "phantoms.json").write_text(_manifest_text(manifest))
        if target.exists():
            target.rmdir()  # checked empty above
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target
