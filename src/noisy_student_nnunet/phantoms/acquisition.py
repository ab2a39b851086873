"""How a scanner records the phantom: orientation on disk, image noise and in-plane blur."""

from __future__ import annotations

import numpy as np

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


def axis_map(direction) -> tuple[list[int], list[float], np.ndarray]:
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


def blur_inplane(a: np.ndarray) -> np.ndarray:
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


#: how much each kernel (0, 1, 2 passes of blur_inplane) lowers white noise: std after / std before
#: (the [1, 2, 1] / 4 kernel keeps sqrt(6/16) per axis, two passes sqrt(70/256))
KERNEL_PASSES = {"sharp": 0, "standard": 1, "soft": 2}
KERNEL_NOISE_GAIN = {0: 1.0, 1: 6 / 16, 2: 70 / 256}


def form_image(ideal: np.ndarray, rng: np.random.Generator, noise_sd: float | None, kernel: str = "standard",
               hu_offset: float = 0.0, chunk_voxels: int = 2_000_000) -> tuple[np.ndarray, float]:
    """The scanner's image of the ideal HU volume: noise, the reconstruction kernel, a calibration offset, int16.

    ``noise_sd`` is the HU noise of the final image (drawn, 7.5-19 HU, when None, as the phantoms always did);
    works in slabs of about ``chunk_voxels`` (``ideal`` is overwritten). Returns the image and the noise HU."""
    passes = KERNEL_PASSES[kernel]
    gain = KERNEL_NOISE_GAIN[passes]
    if noise_sd is not None:
        sd = float(noise_sd) / gain
    else:  # drawn before the kernel, as the phantoms always did for the standard kernel
        sd = float(rng.uniform(20, 50))
        if passes != 1:
            sd *= KERNEL_NOISE_GAIN[1] / gain
    nz, ny, nx = ideal.shape
    out = np.empty(ideal.shape, np.int16)
    step = max(1, chunk_voxels // (ny * nx))
    for z0 in range(0, nz, step):
        slab = ideal[z0:z0 + step]
        slab += rng.normal(0.0, sd, slab.shape).astype(np.float32)
        for _ in range(passes):
            slab = blur_inplane(slab)
        if hu_offset:
            slab += np.float32(hu_offset)
        np.clip(np.rint(slab), -1024, 3071, out=slab)
        out[z0:z0 + step] = slab
    return out, sd * gain
