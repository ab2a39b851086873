"""One phantom case: anatomy on a canvas, then image formation, reoriented to the requested direction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from noisy_student_nnunet.flare import FLARE22_ORGANS
from noisy_student_nnunet.phantoms.acquisition import axis_map, form_image
from noisy_student_nnunet.phantoms.anatomy import ORGAN_LABELS, Z_WINDOW, Anatomy
from noisy_student_nnunet.phantoms.cohorts import PHASES, Condition
from noisy_student_nnunet.phantoms.geometry import CHUNK_VOXELS, Canvas
from noisy_student_nnunet.phantoms.pathology import paint_lesions


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
        """Write the image (and the label when a path is given) as compressed NIfTI (or any ITK format), each
        checked whole on disk (SimpleITK does not raise when the disk fills: written.WriteFailed does)."""
        import SimpleITK as sitk

        from noisy_student_nnunet.written import check_file

        image, label = self.to_sitk()
        for sitk_image, path in ((image, image_path), (label, label_path)):
            if path is not None:
                sitk.WriteImage(sitk_image, str(path), True)
                check_file(path, path)

    def organ_voxels(self) -> dict[str, int]:
        counts = np.bincount(self.label.ravel(), minlength=len(FLARE22_ORGANS) + 1)
        return {organ.name: int(counts[organ.label]) for organ in FLARE22_ORGANS}


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



def make_phantom(rng_or_seed, shape_zyx: Sequence[int], spacing_zyx: Sequence[float], *,
                 origin: Sequence[float] | None = None, direction: Sequence[float] | None = None,
                 body_scale: float | None = None, drop: Iterable[str | int] | None = None,
                 noise_sd: float | None = None, condition: Condition | None = None) -> Phantom:
    """Generate one abdominal CT phantom.

    rng_or_seed: an int, SeedSequence or numpy Generator (same seed and arguments: identical arrays).
    shape_zyx, spacing_zyx: the output array's shape and voxel spacing (mm) in array order.
    origin: ITK (x, y, z) of voxel 0; by default the volume is centred in-plane at a random table height.
    direction: 9 ITK values (axis-aligned only); identity = standard axial CT in LPS.
    body_scale: None fits a scaled-down body into the field of view (about 85-90 % of its width);
        a number gives physical size (1.0 = an adult abdomen about 340 mm wide), capped to fit.
    drop: organs (names or labels) to leave out; every other organ is present in the label map.
    noise_sd: HU of the image noise; drawn per case when None.
    condition: pathology and acquisition (lesions, phase, organ size, kernel, offset, partial coverage), as a
        cohort draws them; None is a case of the ``iid`` cohort. A partial scan may lack organs beyond its ends.
    """
    condition = condition or Condition()
    rng = _as_generator(rng_or_seed)
    shape_zyx = tuple(int(v) for v in shape_zyx)
    spacing_zyx = tuple(float(v) for v in spacing_zyx)
    if len(shape_zyx) != 3 or len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
        raise ValueError("shape_zyx and spacing_zyx need 3 positive values each")
    if min(shape_zyx) < 8:
        raise ValueError(f"shape {shape_zyx} is too small for a phantom (at least 8 voxels per axis)")
    drop_names = _organ_names(drop)
    perm, sign, d = axis_map(direction if direction is not None else np.eye(3).ravel())
    # The canonical grid: index axis p along physical axis p (ITK order x, y, z).
    size_xyz, spacing_xyz = shape_zyx[::-1], spacing_zyx[::-1]
    canon_size, canon_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for a in range(3):
        canon_size[perm[a]], canon_spacing[perm[a]] = size_xyz[a], spacing_xyz[a]
    canon_shape, canon_sp = tuple(canon_size[::-1]), tuple(canon_spacing[::-1])

    for attempt in range(8):
        with _single_threaded_blas():
            image, label, info = _generate(rng, canon_shape, canon_sp, body_scale, drop_names, noise_sd, condition)
        counts = np.bincount(label.ravel(), minlength=len(FLARE22_ORGANS) + 1)
        missing = [o.name for o in FLARE22_ORGANS if o.name not in drop_names and counts[o.label] == 0]
        if condition.coverage is not None:  # organs beyond a partial scan's ends are absent, not misplaced
            missing = []
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


def _generate(rng, shape, spacing, body_scale, drop, noise_sd, condition: Condition):
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
    low, high = condition.coverage or Z_WINDOW  # a partial scan covers less of the reference abdomen
    window = high - low
    if body_scale is None:
        s_z = fov_z / (window * float(rng.uniform(1.03, 1.15)))
    else:
        s_z = min(s_xy, fov_z / (window * 1.03))
    spare = fov_z / s_z - window
    z_bottom = low - float(rng.uniform(0.2, 0.8)) * spare
    jitter = 0.03 * np.array([ny, nx]) * rng.uniform(-1, 1, 2)
    center_yx = ((ny - 1) / 2 - (post - ant) / 2 * s_xy / sy + jitter[0], (nx - 1) / 2 + jitter[1])
    canvas = Canvas(shape, spacing, s_xy, s_z, center_yx, z_bottom)
    anatomy = Anatomy(canvas, rng, habitus, drop, phase=None if condition.phase is None else
                      PHASES.index(condition.phase), organ_scale=dict(condition.organ_scale))
    anatomy.draw()

    if condition.lesions:
        paint_lesions(canvas, condition.lesions, anatomy.phase, anatomy.strength,
                      np.random.default_rng(condition.seed))
    image, sd = form_image(canvas.image, rng, noise_sd if noise_sd is not None else condition.noise_sd,
                           condition.kernel, condition.hu_offset, CHUNK_VOXELS)
    info = {"phase": PHASES[anatomy.phase], "noise_sd": round(sd, 2), "scale_xy": round(s_xy, 4),
            "scale_z": round(s_z, 4)}
    return image, canvas.label, info
